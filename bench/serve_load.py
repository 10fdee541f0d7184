"""Load test of `hybridtune serve` on loopback: N concurrent clients over K adapter sets for a
fixed time, with the engine batching requests (--max-batch 8) and without (--max-batch 1).

python bench/serve_load.py [--model smollm2-135m] [--clients 8] [--sets 3] [--seconds 30]

The K sets are LoRA (q,v) + Adapter sets with random weights saved to a temporary directory (the
cost of serving does not depend on the values). Reports requests/s, p50/p99 latency and failed
requests; writes bench/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent


def make_sets(model: str, count: int, root: Path) -> list[str]:
    import torch

    import hybridtune as ht
    from hybridtune.core.base_models import load_base

    names = []
    for i in range(count):
        base, _ = load_base(model)
        hybrid = ht.inject(base, {"methods": {
            "lora": {"type": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
            "adapter": {"type": "adapter", "after": "mlp", "reduction_factor": 16},
        }})  # fmt: skip
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in hybrid.parameters_to_train():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        hybrid.save_adapters(root / f"tenant-{i}")
        names.append(f"tenant-{i}")
    return names


async def client_loop(url: str, names: list[str], index: int, until: float, tokens: int, results: list) -> None:
    async with httpx.AsyncClient(timeout=300) as http:
        turn = index
        while time.monotonic() < until:
            name = names[turn % len(names)]
            turn += 1
            body = {"model": name, "max_tokens": tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Say something about film number {turn}."}]}  # fmt: skip
            start = time.monotonic()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                ok = response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None
            except httpx.HTTPError:
                ok = False
            results.append((time.monotonic() - start, ok))


def run_server(model: str, root: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "hybridtune", "serve", "--base", model, "--adapters-dir", str(root),
               "--port", str(port), "--max-batch", str(max_batch), "--max-loaded", "8"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start: {process.stderr.read()[-2000:]}")


def measure(url: str, names: list[str], clients: int, seconds: float, tokens: int) -> dict:
    results: list = []
    until = time.monotonic() + seconds
    start = time.monotonic()

    async def everyone() -> None:
        await asyncio.gather(*(client_loop(url, names, i, until, tokens, results) for i in range(clients)))

    asyncio.run(everyone())
    elapsed = time.monotonic() - start
    latencies = sorted(t for t, ok in results if ok)
    health = httpx.get(f"{url}/health").json()
    return {
        "requests": len(results),
        "failed": sum(not ok for _, ok in results),
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "largest_batch": health["largest_batch"],
        "mean_batch": health["row_steps"] / max(health["steps"], 1),  # rows per decoding step
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_sets(args.model, args.sets, root)
        for max_batch in (8, 1):
            process, url = run_server(args.model, root, max_batch)
            try:
                measure(url, names, 1, 2, 2)  # warm-up: loads the sets, first-call costs
                result = measure(url, names, args.clients, args.seconds, args.tokens)
            finally:
                process.terminate()
                process.wait(timeout=30)
            rows.append((max_batch, result))
            print(max_batch, result, file=sys.stderr)
    lines = [
        "# `hybridtune serve` under load",
        "",
        f"{args.model}, {platform.machine()} CPU; {args.clients} concurrent clients on loopback over {args.sets} "
        f"adapter sets (LoRA q,v + Adapter each, round-robin), chat completions of {args.tokens} tokens, greedy, "
        f"for {args.seconds:.0f} s per configuration. Command: `python bench/serve_load.py`.",
        "",
        "| --max-batch | requests | failed | requests/s | p50 latency s | p99 latency s | mean / largest batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for max_batch, r in rows:
        lines.append(f"| {max_batch} | {r['requests']} | {r['failed']} | {r['rps']:.2f} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {r['mean_batch']:.1f} / {r['largest_batch']} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "serve_load.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

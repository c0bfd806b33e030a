"""Communication: bytes per round and final accuracy on Rotten Tomatoes, by what travels.

Variants of one experiment (MiniLM-L6 on Rotten Tomatoes, clients split by movie; the default
experiment's data, partition, cohort and local steps), each an ordinary `fedfm run`:

    full            full fine-tuning: all 22.7M parameters travel
    lora            LoRA r=8 on query/key/value/dense + the classifier head
    lora-q8         LoRA, uplink stochastically quantized to 8 bits
    lora-q4         LoRA, uplink 4 bits
    lora-topk1      LoRA, uplink top-1% coordinates with error feedback
    lora-q4-topk    LoRA, uplink top-1% then 4-bit values (a chain)
    lora-q4-down4   LoRA, 4 bits both ways: the download is a 4-bit correction of the client's
                    replica (compression.downlink)
    lora-q2-down4   LoRA, uplink 2 bits, downlink 4 bits
    lora-q2-down2   LoRA, 2 bits both ways

Bytes are what fedfm counted from the serialized payloads (metrics.jsonl: bytes_up and
bytes_down, summed over the cohort); printed per client per round, uplink and downlink apart,
and as a ratio to full fine-tuning. ``compression`` applies to the uplink; without
``compression.downlink`` the download is the plain trainable state. Accuracy is the final test accuracy. Full fine-tuning uses a lower
learning rate (5e-5, the usual for full BERT fine-tuning) than the adapters (3e-3).

    .venv/bin/python benchmarks/comm.py                 # all variants, config's rounds
    .venv/bin/python benchmarks/comm.py --rounds 3 --variants lora,lora-q4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, list[str]] = {
    "full": ['adapter.method="full"', "client.lr=5e-5"],
    "lora": [],
    "lora-q8": ['compression.name="quantize"', "compression.bits=8"],
    "lora-q4": ['compression.name="quantize"', "compression.bits=4"],
    "lora-topk1": ['compression.name="topk"', "compression.fraction=0.01", "compression.error_feedback=true"],
    "lora-q4-topk": ['compression.name=["topk", "quantize"]', "compression.fraction=0.01", "compression.bits=4",
                     "compression.error_feedback=true"],
    "lora-q4-down4": ['compression.name="quantize"', "compression.bits=4", 'compression.downlink.name="quantize"',
                      "compression.downlink.bits=4"],
    "lora-q2-down4": ['compression.name="quantize"', "compression.bits=2", 'compression.downlink.name="quantize"',
                      "compression.downlink.bits=4"],
    "lora-q2-down2": ['compression.name="quantize"', "compression.bits=2", 'compression.downlink.name="quantize"',
                      "compression.downlink.bits=2"],
}


def run_variant(name: str, out: Path, a: argparse.Namespace) -> dict:
    run_dir = out / name
    sets = VARIANTS[name] + [f"runtime.threads={a.threads}"] + ([f"federation.rounds={a.rounds}"] if a.rounds else [])
    cmd = [str(Path(sys.executable).parent / "fedfm"), "run"]
    if (run_dir / "config.toml").is_file():  # an interrupted variant continues with its saved config
        cmd += ["--resume", str(run_dir), "--quiet"]
    else:
        cmd += [str(a.config), "--out", str(run_dir), "--quiet", *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not (run_dir / "summary.json").is_file():
        subprocess.run(cmd, check=True, env=env)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    fed = [x for x in lines if x.get("phase") == "federated"]
    cohort = [len(x.get("clients") or []) or 1 for x in fed]
    up = sum(x["bytes_up"] for x in fed) / sum(cohort)
    down = sum(x["bytes_down"] for x in fed) / sum(cohort)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"up": up, "down": down, "accuracy": summary["accuracy"], "rounds": len(fed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.toml")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-comm", help="run directories (resumable)")
    a = p.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; allowed: {', '.join(VARIANTS)}")
    rows = {n: run_variant(n, a.out, a) for n in names}
    full = rows.get("full")
    print(f"\n{a.config.name}, {next(iter(rows.values()))['rounds']} rounds; bytes per client per round")
    print("| variant | up bytes | down bytes | up: full / this | up+down: full / this | accuracy | vs full (points) |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        ratio_up = f"{full['up'] / r['up']:.0f}x" if full else "-"
        ratio_all = f"{(full['up'] + full['down']) / (r['up'] + r['down']):.0f}x" if full else "-"
        diff = f"{100 * (r['accuracy'] - full['accuracy']):+.1f}" if full else "-"
        print(f"| {n} | {r['up']:,.0f} | {r['down']:,.0f} | {ratio_up} | {ratio_all} | {r['accuracy']:.4f} | {diff} |")


if __name__ == "__main__":
    main()

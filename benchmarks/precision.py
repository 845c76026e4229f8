"""The default job in every precision against full precision, in the same run: what each learns, how fast, and how
far its adapter's validation loss moves when stock peft reloads it onto the base in fp32 and in the run's dtype.

Each precision runs `examples/default.yaml` in a fresh process (fp16 on a CPU through tests/cpu_fp16.py, which
switches on torch's CPU fp16 autocast and gradient scaler where accelerate would on a GPU). fp32 is the reference.

    .venv/bin/python benchmarks/precision.py [--precisions no bf16 fp16] [--set FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from job.rundir import read_jsonl  # noqa: E402

DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}

RELOAD = """
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from job.data import Packed
from job.evaluate import validate
run, dtype, batch, batches = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = load_file(next((run / "data" / "cache").glob("*.safetensors")))
val = Packed(t["val.input_ids"].long(), t["val.position_ids"].long(), t["val.labels"].long())
base = AutoModelForCausalLM.from_pretrained(run / "model", dtype=getattr(torch, dtype))
model = PeftModel.from_pretrained(base, run / "adapter").eval()
print(json.dumps(validate(model, val, batch, batches, "cpu")["loss"]))
"""


def command(precision: str) -> list[str]:
    if precision == "fp16" and not torch.cuda.is_available():
        return [sys.executable, str(PROJECT / "tests" / "cpu_fp16.py")]
    return [sys.executable, "-m", "job"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="job-precision-"))
    rows = []
    for precision in args.precisions:
        sets = ["--set", f"run.output_dir={out}", "--set", f"run.name=precision-{precision}", "--set",
                f"train.mixed_precision={precision}"] + [x for o in args.overrides for x in ("--set", o)]
        launched = time.time()
        result = subprocess.run(command(precision) + ["run", "--spec", "examples/default.yaml", *sets], cwd=PROJECT,
                                capture_output=True, text=True)
        wall = time.time() - launched
        if result.returncode != 0:
            sys.exit(f"{precision}: exit {result.returncode}\n{result.stderr[-3000:]}")
        run = out / f"precision-{precision}"
        metrics = read_jsonl(run / "metrics.jsonl")
        val = [r for r in metrics if r["split"] == "val"]
        train = [r for r in metrics if r["split"] == "train"]
        config = json.loads((run / "config.json").read_text())["resolved"]
        batch = config["eval"]["batch_size"] or config["train"]["micro_batch_size"]
        reloads = {}
        for dtype in dict.fromkeys(["float32", DTYPES[precision]]):
            reloaded = subprocess.run([sys.executable, "-c", RELOAD, str(run), dtype, str(batch),
                                       str(config["eval"]["max_batches"])],
                                      cwd=PROJECT, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                          filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))})
            reloads[dtype] = json.loads(reloaded.stdout.strip().splitlines()[-1]) - val[-1]["loss"]
        state = json.loads((run / "state.json").read_text())
        rows.append((precision, val[0]["loss"], val[-1]["loss"], val[-1]["step"],
                     statistics.median(r["tokens_per_s"] for r in train if r["tokens_per_s"]), wall,
                     state["overflow_steps"], reloads))
    reference = rows[0][2] if rows[0][0] == "no" else None
    print("command: python benchmarks/precision.py " + shlex.join(sys.argv[1:]))
    print(f"machine: {torch.get_num_threads()} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}\n")
    print("| precision | validation loss, step 0 → last | lower by | last vs fp32 | median tokens/s | wall time "
          "| fp16 overflows | reloaded with stock peft, on fp32 / own-dtype base (Δ loss) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for precision, first, last, step, speed, wall, overflows, reloads in rows:
        versus = f"{(last / reference - 1):+.2%}" if reference else "-"
        deltas = " / ".join(f"{delta:+.1e}" for delta in reloads.values())
        print(f"| {precision} | {first:.4f} → {last:.4f} (step {step}) | {1 - last / first:.1%} | {versus} "
              f"| {speed:,.0f} "
              f"| {wall:.1f} s | {overflows} | {deltas} |")
    print(f"\nrun folders: {out}")


if __name__ == "__main__":
    main()

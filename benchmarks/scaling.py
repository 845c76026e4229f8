"""From 1 to 2 processes on this machine: throughput, throughput per process, and where the wall time goes.

Runs a spec (default: examples/default.yaml) three times in fresh processes, one after the other, into a temporary
folder:
  1. the reference, `job run`: one process with every core;
  2. `job launch --nproc-per-node 2`: two processes (gloo on the CPU, NCCL on GPUs), each with its share of the
     cores, each reading its own micro-batches, so a step holds twice the sequences;
  3. the same with train.fsdp: the model sharded over the two (FSDP2), each layer gathered for its pass.
All train the same number of steps. Target tokens/s counts every process's tokens (the loop's own step timing);
the wall time is split as benchmarks/wall_time.py splits it.

    .venv/bin/python benchmarks/scaling.py [--spec examples/default.yaml] [--steps 120]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))

from wall_time import shares  # noqa: E402

from job.rundir import read_jsonl  # noqa: E402


def timed_run(command: list[str], out: Path, name: str, spec: str, steps: int, *extra: str) -> dict:
    settings = [f"run.output_dir={out}", f"run.name={name}", f"train.max_steps={steps}", *extra]
    full = [sys.executable, "-m", "job", *command, "--spec", spec, *(x for s in settings for x in ("--set", s))]
    launched = time.time()
    result = subprocess.run(full, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ended = time.time()
    if result.returncode != 0:
        sys.exit(f"{name} exited {result.returncode}:\n{result.stderr[-3000:]}")
    run_dir = out / name
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train" and r.get("tokens_per_s")]
    rates = sorted(r["tokens_per_s"] for r in train)
    plan = json.loads((run_dir / "config.json").read_text())["plan"]
    return {"wall": ended - launched, "median_rate": rates[len(rates) // 2], "parts": shares(run_dir, launched, ended),
            "processes": plan["processes"], "sequences_per_step": plan["sequences_per_step"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="examples/default.yaml")
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="job-scaling-"))
    two = ["launch", "--nproc-per-node", "2"]
    runs = {"1 process": timed_run(["run"], out, "one", args.spec, args.steps),
            "2 processes": timed_run(two, out, "two", args.spec, args.steps),
            "2 processes, sharded": timed_run(two, out, "sharded", args.spec, args.steps, "train.fsdp=true")}
    one = runs["1 process"]

    def row(label: str, cells: list[str]) -> None:
        print(f"| {label} | {' | '.join(cells)} |")

    print(f"command: .venv/bin/python benchmarks/scaling.py --spec {args.spec} --steps {args.steps}")
    print(f"\n| | {' | '.join(runs)} |\n| --- |{' ---: |' * len(runs)}")
    row("sequences a step", [str(run["sequences_per_step"]) for run in runs.values()])
    row("median target tokens/s, all processes",
        [f"{run['median_rate']:,.0f}" + ("" if run is one else f" ({run['median_rate'] / one['median_rate']:.2f}x)")
         for run in runs.values()])
    row("the same per process", [f"{run['median_rate'] / run['processes']:,.0f}" for run in runs.values()])
    row("wall time, s", [f"{run['wall']:.1f}" for run in runs.values()])
    for index, (part, _) in enumerate(one["parts"]):
        row(f"{part}, s", [f"{run['parts'][index][1]:.1f} ({100 * run['parts'][index][1] / run['wall']:.0f}%)"
                           for run in runs.values()])
    print(f"\nrun folders: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

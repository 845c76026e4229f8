"""Where the default job's wall time goes: start-up, training steps, evaluation, checkpoints, and the rest.

Runs a spec (default: examples/default.yaml) in a fresh process into a temporary output folder and splits the
wall time, from launching the process to its exit, with the run's own records:
  - start-up: launch to the `start` event (imports, data, tokenizer, model, LoRA);
  - training steps: the sum over `train` records of tokens / tokens_per_s (the loop's own step timing);
  - evaluation: the `seconds` of every `val` record (validation loss, samples, syntax check, best adapter);
  - checkpoints: the `seconds` of every `checkpoint` event;
  - the rest: plots and report, metrics and state files, the final adapter, shutting down.

    .venv/bin/python benchmarks/wall_time.py [--spec examples/default.yaml] [--set FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from job.rundir import read_jsonl  # noqa: E402


def shares(run_dir: Path, launched: float, ended: float) -> list[tuple[str, float]]:
    """(part, seconds) for each part of the wall time, the rest last."""
    metrics, events = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "events.jsonl")
    started = next(e["time"] for e in events if e["event"] in ("start", "resume"))
    steps = sum(r["tokens"] / r["tokens_per_s"] for r in metrics if r["split"] == "train" and r.get("tokens_per_s"))
    evaluation = sum(r["seconds"] for r in metrics if r["split"] == "val")
    checkpoints = sum(e["seconds"] for e in events if e["event"] == "checkpoint")
    parts = [("start-up", started - launched), ("training steps", steps), ("evaluation", evaluation),
             ("checkpoints", checkpoints)]
    return parts + [("plots, report, logging and the rest", (ended - launched) - sum(seconds for _, seconds in parts))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="examples/default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a spec override, as job run takes it")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="job-wall-"))
    command = [sys.executable, "-m", "job", "run", "--spec", args.spec, "--set", f"run.output_dir={out}",
               "--set", "run.name=timed"]
    for override in args.set:
        command += ["--set", override]
    launched = time.time()
    result = subprocess.run(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ended = time.time()
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return 1
    wall = ended - launched
    train = [r for r in read_jsonl(out / "timed" / "metrics.jsonl") if r["split"] == "train"]
    rates = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    print("command: " + shlex.join(["python", "benchmarks/wall_time.py", *sys.argv[1:]]))
    print(f"wall time {wall:.1f} s; {len(train)} steps, median {rates[len(rates) // 2]:,.0f} tokens/s\n")
    print("| part | seconds | share |\n| --- | ---: | ---: |")
    for part, seconds in shares(out / "timed", launched, ended):
        print(f"| {part} | {seconds:.1f} | {100 * seconds / wall:.1f}% |")
    print(f"\nrun folder: {out / 'timed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

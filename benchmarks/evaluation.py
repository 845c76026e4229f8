"""What evaluation (validation loss, sample completions, syntax check, best adapter) costs the default job.

Runs examples/default.yaml twice in fresh processes, into a temporary output folder, one after the other:
  1. as written: the seconds each evaluation took (the `seconds` of its `val` record), split into
     validation loss and sample generation, and their share of the run's wall time;
  2. the reference, the same spec with evaluation reduced to the two the job always does (before the first
     step and at the end) and no samples: the difference in wall time is what evaluation costs.

    .venv/bin/python benchmarks/evaluation.py [--spec examples/default.yaml]
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


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def run(spec: str, out: Path, name: str, *overrides: str) -> float:
    command = [sys.executable, "-m", "job", "run", "--spec", spec, "--set", f"run.output_dir={out}",
               "--set", f"run.name={name}"]
    for override in overrides:
        command += ["--set", override]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="examples/default.yaml")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="job-bench-"))

    wall = run(args.spec, out, "evaluated")
    reference_wall = run(args.spec, out, "reference", "eval.every_steps=1000000", "eval.samples=0")
    run_dir = out / "evaluated"
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"]
    samples = read_jsonl(run_dir / "samples.jsonl")
    generation = sum({s["step"]: s["seconds"] for s in samples}.values())
    evaluation = sum(r["seconds"] for r in val)
    config = json.loads((run_dir / "config.json").read_text())

    rows = [
        ("evaluations", f"{len(val)} (steps {', '.join(str(r['step']) for r in val)})"),
        ("samples an evaluation", f"{len(samples) // max(len(val), 1)}, "
                                  f"up to {config['spec']['eval']['max_new_tokens']} new tokens each"),
        ("evaluation time, in all", f"{evaluation:.1f} s ({generation:.1f} s of it generating samples)"),
        ("evaluation time, median one", f"{sorted(r['seconds'] for r in val)[len(val) // 2]:.2f} s"),
        ("share of the run's wall time", f"{100 * evaluation / wall:.1f}% of {wall:.1f} s"),
        ("reference wall time (2 evaluations, no samples)", f"{reference_wall:.1f} s"),
        ("wall-time difference", f"{wall - reference_wall:+.1f} s ({100 * (wall - reference_wall) / wall:+.1f}%)"),
        ("validation loss, first → last", f"{val[0]['loss']:.3f} → {val[-1]['loss']:.3f}"),
        ("syntax rate, first → last", f"{val[0]['syntax_rate']} → {val[-1]['syntax_rate']} "
                                      f"of {val[-1]['syntax_samples']} samples"),
    ]
    print(f"command: .venv/bin/python benchmarks/evaluation.py --spec {args.spec}")
    print("| figure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"run folders: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

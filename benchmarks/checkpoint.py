"""What checkpointing costs the default job, and how fast it stops and comes back.

Runs examples/default.yaml three times in fresh processes, into a temporary output folder:
  1. uninterrupted: checkpoint write time and size, and their share of the run's wall time;
  2. stopped by SIGTERM part-way: time from the signal to the process's exit (exit code 75);
  3. resumed: time from process start to the first training step, against the fresh run's.

    .venv/bin/python benchmarks/checkpoint.py [--spec examples/default.yaml] [--stop-at-step 70]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def start(spec: str, out: Path, name: str) -> tuple[subprocess.Popen, float]:
    command = [sys.executable, "-m", "job", "run", "--spec", spec, "--set", f"run.output_dir={out}",
               "--set", f"run.name={name}"]
    began = time.time()
    return subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), began


def first_train_time(run: Path, after: float) -> float:
    return min(r["time"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train" and r["time"] >= after)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="examples/default.yaml")
    parser.add_argument("--stop-at-step", type=int, default=70, help="send SIGTERM once this step is logged")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="job-bench-"))

    process, began = start(args.spec, out, "whole")
    _, err = process.communicate()
    assert process.returncode == 0, err[-2000:]
    whole = out / "whole"
    events = read_jsonl(whole / "events.jsonl")
    saves = [e for e in events if e["event"] == "checkpoint"]
    wall = next(e for e in events if e["event"] == "complete")["time"] - began
    fresh_first = first_train_time(whole, began) - began

    process, began = start(args.spec, out, "stopped")
    run = out / "stopped"
    while not any(r["split"] == "train" and r["step"] >= args.stop_at_step for r in read_jsonl(run / "metrics.jsonl")):
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait()
    stop_seconds = time.monotonic() - signalled
    assert process.returncode == 75, process.returncode

    process, began = start(args.spec, out, "stopped")
    _, err = process.communicate()
    assert process.returncode == 0, err[-2000:]
    resume_first = first_train_time(run, began) - began
    identical = ((run / "adapter" / "adapter_model.safetensors").read_bytes()
                 == (whole / "adapter" / "adapter_model.safetensors").read_bytes())

    seconds = [e["seconds"] for e in saves]
    rows = [
        ("checkpoints written in the uninterrupted run", f"{len(saves)}"),
        ("checkpoint write time (median, max)", f"{statistics.median(seconds):.3f} s, {max(seconds):.3f} s"),
        ("checkpoint size", f"{saves[0]['bytes'] / 2**20:.1f} MiB"),
        ("share of wall time spent checkpointing", f"{100 * sum(seconds) / wall:.2f}% of {wall:.1f} s"),
        ("SIGTERM to exit (code 75)", f"{stop_seconds:.2f} s"),
        ("start to first step, fresh run", f"{fresh_first:.1f} s"),
        ("start to first step, resume", f"{resume_first:.1f} s"),
        ("resumed adapter identical to uninterrupted", "yes" if identical else "NO"),
    ]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}  (spec {args.spec}, output {out})")
    print("| figure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

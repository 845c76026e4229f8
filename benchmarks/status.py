"""How fast `job status` reads an output folder of many runs.

Builds --runs run folders (default 100) in a temporary folder, each with a state.json, a config.json and a
metrics.jsonl of --steps train records (default 20,000: a long run) plus validation records, then times, each
in a fresh process, --repeats times (round-robin):
  - `python -m job status FOLDER` (the table) and `--json`;
  - the reference: a bare Python process that only reads and parses every state.json, the least any
    status command must do.

    .venv/bin/python benchmarks/status.py [--runs 100] [--steps 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
STATUSES = ["running", "stopped", "completed", "failed"]


def build(folder: Path, runs: int, steps: int) -> None:
    now = time.time()
    for index in range(runs):
        run = folder / f"run-{index:03d}"
        run.mkdir(parents=True)
        status = STATUSES[index % len(STATUSES)]
        step = steps if status == "completed" else steps // 2
        (run / "state.json").write_text(json.dumps({
            "status": status, "step": step, "total_steps": steps, "epoch": 1.0, "best_val_loss": 1.5, "best_step": step,
            "restarts": index % 3, "errors": [], "updated": now - index}))
        (run / "config.json").write_text(json.dumps({"spec": {"run": {"name": run.name}}}))
        with (run / "metrics.jsonl").open("w") as out:
            for s in range(1, step + 1):
                out.write(json.dumps({"step": s, "time": now - (step - s) * 0.5, "split": "train", "loss": 2.0,
                                      "lr": {"lora_A": 1e-4, "lora_B": 1.6e-3}, "grad_norm": 0.5, "tokens": 2048,
                                      "tokens_per_s": 4000.0, "peak_memory_bytes": 1 << 30}) + "\n")
                if s % 500 == 0:
                    out.write(json.dumps({"step": s, "time": now, "split": "val", "loss": 1.5, "perplexity": 4.48,
                                          "syntax_rate": 0.5, "syntax_samples": 4}) + "\n")


def timed(command: list[str]) -> float:
    began = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="job-status-bench-"))
    build(folder, args.runs, args.steps)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    reference = [sys.executable, "-c", "import json, pathlib, sys\n"
                 "[json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob('*/state.json'))]",
                 str(folder)]
    variants = {
        "job status (table)": [sys.executable, "-m", "job", "status", str(folder)],
        "job status --json": [sys.executable, "-m", "job", "status", str(folder), "--json"],
        "reference: read every state.json": reference,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, command in variants.items():
            times[name].append(timed(command))

    print(f"command: .venv/bin/python benchmarks/status.py --runs {args.runs} --steps {args.steps} "
          f"--repeats {args.repeats}")
    print(f"{args.runs} run folders, {size / 2**20:.0f} MiB in all "
          f"(metrics.jsonl of up to {args.steps:,} steps each)\n")
    print("| command | median s | min s | max s |\n| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

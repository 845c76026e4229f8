"""The command line: run, launch, validate, plan, schema, status, compare, report, export.
User errors become one line each and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from job import EXIT_BUDGET, EXIT_FAILED, EXIT_INVALID, EXIT_OK
from job.spec import JobSpec, SpecError, json_schema, load_spec

# Each command imports the modules it needs inside its own function: `job health` (a container's health check, run
# every few seconds), `job status` and `job validate` answer without importing torch's training stack, matplotlib or
# peft, which take seconds.

DESCRIPTION = """\
Fine-tune a causal code language model on a repository with LoRA / LoRA+.

Everything a run writes goes to <run.output_dir>/<run.name>/: the resolved config, metrics,
plots, checkpoints and the final adapter. Running the same spec again continues the run
where it stopped, or exits 0 at once when it is complete.

exit codes: 0 complete, 2 invalid spec or input, 75 stopped by a signal after a checkpoint,
3 restart budget spent, 1 anything else."""


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spec", type=Path, default=os.environ.get("JOB_SPEC"),
        help="the job spec (YAML); defaults to $JOB_SPEC. Example: examples/default.yaml",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override one spec field with a YAML-typed value, e.g. --set train.max_steps=20 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="job", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train (or resume) the job a spec describes",
                              description="Train, or resume from the newest good checkpoint, the job the spec "
                                          "describes.")
    _spec_arguments(run)

    launch = commands.add_parser(
        "launch", allow_abbrev=False, help="torchrun running `job run` on every process, keeping the exit codes",
        description="Train with several processes or machines: torchrun's options (--nproc-per-node, --nnodes, "
                    "--rdzv-backend, --rdzv-endpoint, --max-restarts, ... or the PET_* variables Kubeflow sets) "
                    "with the spec's. Every process runs `job run`. The exit code keeps the job's contract (0, 1, 2, "
                    "3, 75), where torchrun alone would exit 1 for a worker's 2, 3 or 75 and for a signal.",
        epilog="example: python -m job launch --nproc-per-node 2 --spec my.yaml")
    _spec_arguments(launch)

    validate = commands.add_parser("validate", help="check a spec and its inputs without training",
                                   description="Check the spec, the repository and the model folder; print ok or one "
                                               "line per problem.")
    _spec_arguments(validate)

    plan = commands.add_parser("plan",
                               help="what the job would train with on this machine, its predicted memory, and why",
                               description="Resolve the spec's auto fields (data.context_length, "
                                           "train.micro_batch_size, train.grad_accum, train.gradient_checkpointing, "
                                           "quantization.mode) for this machine or a described one, from the model's "
                                           "config alone (no weights are loaded), and print the choice, the "
                                           "predicted peak memory by part and the reason for each decision. "
                                           "A run that has started keeps the plan of its first start (config.json).")
    _spec_arguments(plan)
    plan.add_argument("--gpu-memory", metavar="SIZE", help="plan for a CUDA GPU with this much free memory instead of "
                                                           "this machine, e.g. 24GiB")
    plan.add_argument("--no-bf16", action="store_true", help="with --gpu-memory: a GPU without bf16 (before Ampere)")
    plan.add_argument("--processes", type=int, default=1, metavar="N", help="processes training together (default 1)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    commands.add_parser("schema", help="print the JSON Schema of the spec (for editors)",
                        description="Print the JSON Schema of the job spec, with every field's default and "
                                    "description.")

    status = commands.add_parser("status", help="one line per run: status, progress, best loss, age, ETA",
                                 description="Read run folders (never write them; safe while a run is writing) and "
                                             "print one line per run. PATH is a run folder or a folder of runs.")
    status.add_argument("path", type=Path, nargs="?", default=Path("runs"), metavar="PATH", help="default: runs")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    compare = commands.add_parser("compare",
                                  help="spec differences and metrics of runs side by side, and an overlay plot",
                                  description="Print the spec fields that differ between runs and their final and "
                                              "best metrics; write compare.png (validation loss by step and by tokens "
                                              "seen).")
    compare.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    compare.add_argument("--out", type=Path, default=Path("."),
                         help="folder for compare.png (default: the current folder)")
    compare.add_argument("--json", action="store_true", help="print the table as JSON")

    health = commands.add_parser("health",
                                 help="exit 0 while the run's heartbeat is fresh or the run is complete, else 1",
                                 description="The container's health check: healthy (0) while the training loop's "
                                             "heartbeat is younger than run.heartbeat_timeout or the run is complete; "
                                             "unhealthy (1) otherwise.")
    _spec_arguments(health)

    export = commands.add_parser("export", help="the run's adapter merged into its base model, as GGUF, or alone",
                                 description="Export a run's final adapter (or best/ with --best) into a new folder: "
                                             "merged, the base model with the adapter merged into its weights "
                                             "(safetensors, with the tokenizer); gguf, that model as one GGUF file "
                                             "for llama.cpp and Ollama (llama.cpp's converter) with an Ollama "
                                             "Modelfile; or adapter, the peft adapter alone, checked against what "
                                             "vLLM's LoRA loading accepts. The run folder is only read; an existing "
                                             "--out is never overwritten.")
    export.add_argument("run", type=Path, metavar="RUN")
    export.add_argument("--format", required=True, choices=["merged", "gguf", "adapter"])
    export.add_argument("--out", type=Path, required=True, help="a folder that does not exist yet")
    export.add_argument("--best", action="store_true", help="export best/, the adapter of the best validation loss")
    export.add_argument("--outtype", default="f16", choices=["f16", "bf16", "q8_0", "f32"],
                        help="gguf: the weights' type (q8_0: 8-bit, about half of f16's size)")
    export.add_argument("--converter", type=Path,
                        help="gguf: the folder of llama.cpp's convert_hf_to_gguf.py (default: this Python's "
                             "share/llama.cpp, where scripts/llama-cpp-converter.sh puts it)")

    report = commands.add_parser("report", help="rebuild a run's plots and report.html from its files",
                                 description="Regenerate plots/ and report.html of a run folder from its files alone "
                                             "(for runs written by an older version, or after a crash).")
    report.add_argument("run", type=Path, metavar="RUN")
    return parser


def _status(args) -> int:
    from job import runs

    if not args.path.exists():
        raise SpecError([f"{args.path}: does not exist"])
    summaries = runs.status(args.path)
    if args.json:
        print(runs.summary_json(summaries))
    elif summaries:
        print(runs.status_table(summaries))
    else:
        print(f"no runs in {args.path}")
    return EXIT_OK


def _compare(args) -> int:
    from job import report, runs

    loaded = [runs.load_run(path) for path in args.runs]
    header, rows = runs.compare_rows(loaded)
    if args.json:
        print(json.dumps({row[0]: dict(zip(header[1:], row[1:])) for row in rows}, indent=2))
    else:
        print(runs.format_table(header, rows))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        plot = report.write_compare_plot(loaded, args.out / "compare.png")
    except OSError as err:
        raise SpecError([f"--out: {args.out} cannot be written ({err.strerror or err})"]) from None
    print(f"plot: {plot}", file=sys.stderr)
    return EXIT_OK


def _health(args) -> int:
    # Docker reads 0 as healthy and 1 as unhealthy (2 is reserved): every problem here is 1.
    try:
        spec, _ = _load(args)
    except SpecError as err:
        print(f"unhealthy: {err.problems[0]}")
        return EXIT_FAILED
    run_dir = spec.run_dir
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("status") == "completed":
        print(f"healthy: {run_dir} is complete at step {state.get('step')}")
        return EXIT_OK
    try:
        beat = json.loads((run_dir / "heartbeat.json").read_text())
        age = time.time() - float(beat["time"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"unhealthy: {run_dir} has no heartbeat yet")
        return EXIT_FAILED
    where = f"{beat.get('phase')} at step {beat.get('step')}, heartbeat {age:.0f} s ago"
    if age > spec.run.heartbeat_timeout:
        print(f"unhealthy: {where} (run.heartbeat_timeout is {spec.run.heartbeat_timeout:.0f} s)")
        return EXIT_FAILED
    print(f"healthy: {where}")
    return EXIT_OK


def _plan(args) -> int:
    from job import hardware, model

    spec, _ = _load(args)
    if args.processes < 1:
        raise SpecError([f"--processes: must be at least 1 (got {args.processes})"])
    device = None
    if args.gpu_memory is not None:
        try:
            memory = hardware.parse_bytes(args.gpu_memory)
        except ValueError as err:
            raise SpecError([f"--gpu-memory: {err}"]) from None
        device = hardware.Device("cuda", f"described GPU ({args.gpu_memory})", memory, not args.no_bf16)
    if spec.model.path != model.BUILTIN_TINY and not model.is_gguf(spec.model.path):
        model.check_model_folder(Path(spec.model.path), spec.model.trust_remote_code)
    plan = hardware.plan_for(spec, device, args.processes)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else hardware.describe_plan(plan))
    return EXIT_OK


def _report(args) -> int:
    from job import report, runs

    if not runs.is_run_folder(args.run):
        raise SpecError([f"{args.run}: not a run folder (no state.json, config.json or job.yaml)"])
    try:
        report.refresh(args.run)
    except OSError as err:
        raise SpecError([f"{args.run}: cannot be written ({err.strerror or err})"]) from None
    print(args.run / "report.html")
    return EXIT_OK


def _export(args) -> int:
    from job.export import export

    for line in export(args.run, args.format, args.out, args.best, args.outtype, args.converter):
        print(line)
    return EXIT_OK


def _load(args) -> tuple[JobSpec, str]:
    if args.spec is None:
        raise SpecError(["--spec: no spec given (pass --spec PATH or set JOB_SPEC)"])
    spec = load_spec(args.spec, args.overrides)
    return spec, args.spec.read_text(encoding="utf-8")


def validate_inputs(spec: JobSpec) -> None:
    """The checks that need no training: repository, model folder, output folder."""
    from job import hardware, model
    from job.data import check_repo

    problems = []
    try:
        check_repo(spec.data)
    except SpecError as err:
        problems.extend(err.problems)
    try:
        hardware.check_precision(hardware.mixed_precision(spec), hardware.device_kind())
    except SpecError as err:
        problems.extend(err.problems)
    if spec.model.path != model.BUILTIN_TINY:
        try:
            config = (hardware.model_config(spec).to_dict() if model.is_gguf(spec.model.path)
                      else model.check_model_folder(Path(spec.model.path), spec.model.trust_remote_code))
            positions = config.get("max_position_embeddings")
            if (isinstance(positions, int) and spec.data.context_length != "auto"
                    and spec.data.context_length > positions):
                problems.append(f"data.context_length: {spec.data.context_length} is more than the model's {positions} "
                                "trained positions (max_position_embeddings)")
        except SpecError as err:
            problems.extend(err.problems)
    output = spec.run.output_dir
    existing = next((p for p in [output, *output.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        problems.append(f"run.output_dir: {output} cannot be created ({existing} is not a folder)")
    elif existing is not None and not os.access(existing, os.W_OK):
        problems.append(f"run.output_dir: {output} cannot be written")
    if problems:
        raise SpecError(problems)


def _settled(spec: JobSpec) -> int | None:
    """A restart of a run that is complete, or whose restart budget is spent, answers at once (without loading
    torch or the model) with the same exit code: what a restart policy that cannot tell exit codes apart needs."""
    try:
        state = json.loads((spec.run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("status") == "completed":
        print(f"run {spec.run_dir} is already complete at step {state.get('step')}; nothing to do", file=sys.stderr)
        return EXIT_OK
    if state.get("status") == "failed" and state.get("failed_starts", 0) > spec.run.max_restarts:
        print(f"error: run {spec.run_dir}: {state.get('failed_starts')} starts in a row failed without progress "
              f"(run.max_restarts is {spec.run.max_restarts}); raise it to try again", file=sys.stderr)
        return EXIT_BUDGET
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, torchrun_args = parser.parse_known_args(argv)
    if torchrun_args and args.command != "launch":
        parser.error(f"unrecognized arguments: {' '.join(torchrun_args)}")
    try:
        if args.command == "schema":
            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        if args.command in ("status", "compare", "report", "health", "plan", "export"):
            return {"status": _status, "compare": _compare, "report": _report, "health": _health,
                    "plan": _plan, "export": _export}[args.command](args)
        spec, submitted = _load(args)
        if args.command in ("run", "launch"):
            settled = _settled(spec)
            if settled is not None:
                return settled
        validate_inputs(spec)
        if args.command == "validate":
            print("ok")
            return EXIT_OK
        if args.command == "launch":
            from job.launch import launch

            job_args = ["--spec", str(args.spec), *(item for o in args.overrides for item in ("--set", o))]
            return launch(spec, torchrun_args, job_args)
        from job.train import run

        return run(spec, submitted)
    except SpecError as err:
        for problem in err.problems:
            # The line in one write: the ranks of a launch share one stream, and print writes its newline apart.
            sys.stderr.write(f"error: {problem}\n")
        sys.stderr.flush()
        return EXIT_INVALID
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; every checkpoint on disk is complete or ignored
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""The command line: run, validate, schema. Spec errors become one line each and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from job import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from job.spec import JobSpec, SpecError, load_spec

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
    parser = argparse.ArgumentParser(prog="job", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train (or resume) the job a spec describes",
                              description="Train, or resume from the newest good checkpoint, the job the spec describes.")
    _spec_arguments(run)

    validate = commands.add_parser("validate", help="check a spec and its inputs without training",
                                   description="Check the spec, the repository and the model folder; print ok or one line per problem.")
    _spec_arguments(validate)

    commands.add_parser("schema", help="print the JSON Schema of the spec (for editors)",
                        description="Print the JSON Schema of the job spec, with every field's default and description.")
    return parser


def _load(args) -> tuple[JobSpec, str]:
    if args.spec is None:
        raise SpecError(["--spec: no spec given (pass --spec PATH or set JOB_SPEC)"])
    spec = load_spec(args.spec, args.overrides)
    return spec, args.spec.read_text(encoding="utf-8")


def validate_inputs(spec: JobSpec) -> None:
    """The checks that need no training: repository, model folder, output folder."""
    from job import model

    from job.data import check_repo

    problems = []
    try:
        check_repo(spec.data)
    except SpecError as err:
        problems.extend(err.problems)
    if spec.model.path != model.BUILTIN_TINY:
        try:
            model.check_model_folder(Path(spec.model.path), spec.model.trust_remote_code)
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


def _already_complete(spec: JobSpec) -> bool:
    """A scheduled restart of a finished run answers at once, without loading torch or the model."""
    try:
        state = json.loads((spec.run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return False
    if state.get("status") != "completed":
        return False
    print(f"run {spec.run_dir} is already complete at step {state.get('step')}; nothing to do", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schema":
            from job.spec import json_schema

            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        spec, submitted = _load(args)
        if args.command == "run" and _already_complete(spec):
            return EXIT_OK
        validate_inputs(spec)
        if args.command == "validate":
            print("ok")
            return EXIT_OK
        from job.train import run

        return run(spec, submitted)
    except SpecError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; every checkpoint on disk is complete or ignored
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

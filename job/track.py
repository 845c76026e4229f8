"""What a run writes for tools to read: config.json, metrics.jsonl, events.jsonl (plots and the report: report.py)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from job import hardware, log
from job.rundir import append_jsonl, read_jsonl, truncate_after, write_json_atomic
from job.spec import spec_to_dict

LIBRARIES = ["torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "pydantic", "bitsandbytes"]


# The schema of metrics.jsonl and events.jsonl: every field a record may have, with what it means. The README's
# tables list the same fields, and the tests hold every record a run writes to it.
METRICS_SCHEMA = {
    "train": {
        "step": "optimizer steps done", "time": "Unix time of the record", "split": "`train`",
        "epoch": "passes over the training data so far",
        "loss": "token-weighted training loss over the logging window (null if every step in it was skipped)",
        "lr": "learning rate per parameter group (`lora_A`, `lora_B`, ... under LoRA+, `lora` otherwise)",
        "grad_norm": "gradient norm before clipping (null for a skipped step)",
        "tokens": "target tokens trained on in the window",
        "tokens_per_s": "target tokens per second over the window",
        "peak_memory_bytes": "peak GPU memory allocated, or peak resident memory on the CPU",
        "loss_scale": "fp16 only: the gradient scaler's loss scale this step was computed with",
        "skipped": "present when the step was skipped: `non-finite loss`, `non-finite gradient`, "
                   "or `gradient overflow` (fp16)",
    },
    "val": {
        "step": "optimizer steps done (0: before training)", "time": "Unix time of the record", "split": "`val`",
        "loss": "validation loss: total over total target tokens", "perplexity": "exp(loss)",
        "tokens": "validation target tokens",
        "syntax_rate": "share of the samples that parse (null: no sample in a supported language)",
        "syntax_samples": "samples behind syntax_rate",
        "stale_evals": "evaluations in a row without improvement (early stopping)",
        "next_line_exact": "share of next-line tasks written exactly (whitespace-normalized)",
        "next_line_edit_sim": "mean edit similarity of the next lines written to the real ones (1 - Levenshtein / "
                              "length)",
        "next_line_tasks": "next-line tasks behind the two figures above (eval.next_lines)",
        "infill_exact": "FIM runs: share of infill tasks whose middle was written exactly (whitespace-normalized)",
        "infill_edit_sim": "FIM runs: mean edit similarity of the middles written to the real lines",
        "infill_trimmed_exact": "FIM runs: infill_exact of the middles as an editor shows them: cut before a line "
                                "that repeats the line below the cursor",
        "infill_trimmed_edit_sim": "FIM runs: infill_edit_sim of the middles so cut",
        "infill_tasks": "FIM runs: infill tasks behind the four figures above (eval.infills)",
        "body_edit_sim": "mean edit similarity of the function bodies written to the real ones",
        "body_tasks": "function-body samples behind body_edit_sim",
        "body_identifier_f1": "mean F1 of the identifiers written against those of the real bodies",
        "body_identifier_tasks": "function-body samples in a language with a parser, behind body_identifier_f1",
        "seconds": "seconds the evaluation took (validation, samples, best adapter)",
    },
}
# Fields a record may lack: present only when they apply, or missing from runs written by an older version.
OPTIONAL_METRICS = ("skipped", "loss_scale", "next_line_exact", "next_line_edit_sim", "next_line_tasks",
                    "infill_exact", "infill_edit_sim", "infill_trimmed_exact", "infill_trimmed_edit_sim",
                    "infill_tasks",
                    "body_edit_sim", "body_tasks", "body_identifier_f1", "body_identifier_tasks")
EVENTS_SCHEMA = {
    "start": ["step", "micro_in_step", "checkpoint", "processes", "micro_batch", "grad_accum"],
    "resume": ["step", "micro_in_step", "checkpoint", "processes", "micro_batch", "grad_accum"],
    "processes_changed": ["step", "checkpoint", "from_processes", "processes", "from_grad_accum", "grad_accum",
                          "redone_micro_batches"],
    "checkpoint": ["step", "micro_in_step", "path", "seconds", "bytes"],
    "checkpoint_rejected": ["checkpoint", "problem", "moved_to"],
    "nonfinite_loss": ["step", "in_a_row", "problem"],
    "gradient_overflow": ["step", "loss_scale"],
    "rollback": ["to_step", "checkpoint", "skipped_micro_batches", "lr_scale"],
    "early_stop": ["step", "best_step", "best_val_loss", "patience", "min_delta"],
    "out_of_memory": ["step", "micro_batch", "grad_accum", "error"],
    "compile_failed": ["step", "error"],
    "stopped": ["signal", "step"],
    "error": ["error", "step"],
    "budget_spent": ["reason"],
    "tracker_failed": ["tracker", "error"],
    "complete": ["step", "best_val_loss", "best_step", "early_stopped", "seconds"],
}


def schema_problems(record: dict, kind: str) -> list[str]:
    """What makes a metrics (kind "metrics") or events (kind "events") record differ from the schema."""
    if kind == "metrics":
        allowed = METRICS_SCHEMA.get(record.get("split"))
        if allowed is None:
            return [f"unknown split {record.get('split')!r}"]
        required = [f for f in allowed if f not in OPTIONAL_METRICS]
    else:
        fields = EVENTS_SCHEMA.get(record.get("event"))
        if fields is None:
            return [f"unknown event {record.get('event')!r}"]
        allowed = required = ["time", "event", *fields]
    problems = [f"unknown field {f!r}" for f in record if f not in allowed]
    problems += [f"missing field {f!r}" for f in required if f not in record]
    return problems


def versions() -> dict[str, str | None]:
    found = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def event(run_dir: Path, kind: str, **fields) -> None:
    append_jsonl(run_dir / "events.jsonl", {"time": time.time(), "event": kind, **fields})


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class RunRecords:
    """The one writer of what a run appends while it trains: metrics, samples, events, and the trackers that mirror
    the metrics. A step reaches a tracker once: steps replayed after a resume or a rollback are written to the files
    again but never sent again (W&B refuses a step it has seen, TensorBoard would draw it twice)."""

    run_dir: Path
    sent: dict[str, int]  # the highest step of each split the trackers have had, in this start or an earlier one
    trackers: list[tuple[str, object]] = field(default_factory=list)

    @classmethod
    def open(cls, run_dir: Path) -> RunRecords:
        # Every metrics record went to the trackers as it was written: what the file holds, they have had.
        sent: dict[str, int] = {}
        for record in read_jsonl(run_dir / "metrics.jsonl"):
            sent[record["split"]] = max(sent.get(record["split"], -1), record["step"])
        return cls(run_dir, sent)

    def start_trackers(self, spec) -> None:
        self.trackers = start_trackers(spec, self.run_dir)

    def metric(self, record: dict) -> None:
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        if record["step"] > self.sent.get(record["split"], -1):
            log_to_trackers(self.trackers, self.run_dir, record)
            self.sent[record["split"]] = record["step"]

    def sample(self, record: dict) -> None:
        append_jsonl(self.run_dir / "samples.jsonl", record)

    def event(self, kind: str, **fields) -> None:
        event(self.run_dir, kind, **fields)

    def batches(self, step: int, sequences: list[list[int]]) -> None:
        """debug.record_batches: the sequences of every micro-batch optimizer step `step` read."""
        append_jsonl(self.run_dir / "batches.jsonl", {"step": step, "sequences": sequences})

    def rewind(self, step: int) -> None:
        """Drop the metrics, samples and batches after step: the steps from there are trained, and written, again."""
        for name in ("metrics.jsonl", "samples.jsonl", "batches.jsonl"):
            truncate_after(self.run_dir / name, step)

    def close(self) -> None:
        """Flush and finish the trackers; on every way out of a start, a crash included."""
        finish_trackers(self.trackers, self.run_dir)


def write_config(run_dir: Path, given, spec, plan, manifest: dict, train_pack, val_pack, total_steps: int,
                 processes: int, cached: bool, fim=None, headers=None) -> None:
    """config.json: the spec as given (auto fields kept), the plan that resolved it, the machine, library versions
    and the data summary (with the FIM setting and file header the tokenizer led to)."""
    write_json_atomic(run_dir / "config.json", {
        "spec": spec_to_dict(given),
        "plan": {
            **plan.to_dict(),
            "total_steps": total_steps,
            "sequences_per_step": plan.sequences_per_step,
            "tokens_per_step": plan.sequences_per_step * spec.data.context_length,
        },
        # How this start splits each step (a resume on another number of processes accumulates more or less).
        "start": {"processes": processes, "grad_accum": spec.train.grad_accum},
        "resolved": spec_to_dict(spec),
        "hardware": hardware.describe(),
        "versions": versions(),
        "data": {
            **manifest,
            "sequences": {"train": len(train_pack), "val": len(val_pack)},
            "target_tokens": {"train": train_pack.useful_tokens, "val": val_pack.useful_tokens},
            "tokenized_from_cache": cached,
            "fim": asdict(fim) if fim is not None else None,
            "file_header": headers.template.replace("{repo}", headers.repo) if headers is not None else None,
        },
    })


# Optional trackers ---------------------------------------------------------------------------------------------


def start_trackers(spec, run_dir: Path) -> list[tuple[str, object]]:
    """accelerate's tracker for each name in tracking.report_to that starts; one that does not is logged and skipped."""
    started = []
    for name in spec.tracking.report_to:
        try:
            kind = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = kind(spec.run.name, str(run_dir / "tensorboard"), flush_secs=10)
            elif name == "mlflow":
                tracker = kind(experiment_name=spec.tracking.project, run_name=spec.run.name)
            else:  # wandb: one W&B run for all the starts of this run folder
                run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
                tracker = kind(spec.tracking.project, name=spec.run.name, id=run_id, resume="allow", dir=str(run_dir))
            tracker.start()
            started.append((name, tracker))
        except Exception as err:  # a tracker is never worth the run: missing package, no server, no credentials
            _tracker_failed(run_dir, name, err, log.get())
    return started


def log_to_trackers(trackers: list[tuple[str, object]], run_dir: Path, record: dict) -> None:
    """Send a metrics record's numbers as <split>/<name>; a tracker that fails is dropped after one warning."""
    prefix = record.get("split", "train")
    values = {}
    for key, value in record.items():
        if key in ("step", "time", "split"):
            continue
        if isinstance(value, dict):
            values.update({f"{prefix}/{key}/{name}": v for name, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"{prefix}/{key}"] = value
    for entry in list(trackers):
        name, tracker = entry
        try:
            tracker.log(values, step=record["step"])
        except Exception as err:
            trackers.remove(entry)
            _tracker_failed(run_dir, name, err, log.get())


def finish_trackers(trackers: list[tuple[str, object]], run_dir: Path) -> None:
    for name, tracker in trackers:
        try:
            tracker.finish()
        except Exception as err:
            _tracker_failed(run_dir, name, err, log.get())
    trackers.clear()


def _tracker_failed(run_dir: Path, name: str, err: Exception, logger) -> None:
    message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    logger.warning("tracker failed; the run goes on without it", tracker=name, error=message)
    event(run_dir, "tracker_failed", tracker=name, error=message)

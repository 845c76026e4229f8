"""The job spec: every option, its default, its validation and its description, in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(Exception):
    """A spec or input a user can fix; carries one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Section(BaseModel):
    # extra="forbid": a typo in a field name is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSpec(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Name of the run; its folder is <output_dir>/<name>.")
    output_dir: Path = Field(Path("runs"), description="Folder that holds run folders (the volume).")
    seed: int = Field(
        0, ge=0, description="Seed of every random generator the job owns (model init, split, data order, dropout).")
    max_restarts: int = Field(
        5, ge=0, description="Consecutive failed starts without progress before the job gives up with exit code 3.")
    lock_wait: float = Field(0.0, ge=0,
                             description="Seconds a start waits for the run folder's lock while another process holds "
                                         "it, then exits 2. On NFS a node that died keeps its lock until its lease "
                                         "runs out (90 s by default): wait longer than that there.")
    heartbeat_timeout: float = Field(1800.0, gt=0,
                                     description="job health (the container's health check) fails when the training "
                                                 "loop's heartbeat is older than this many seconds.")


class FimSpec(Section):
    rate: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        "auto", description="Share of file pieces (a file's part in one training sequence) trained as "
                            "fill-in-the-middle examples, drawn anew each epoch; auto: 0.5 where the tokenizer has FIM "
                            "tokens, else 0.")
    spm_rate: float = Field(0.5, ge=0, le=1, description="Share of FIM examples in suffix-prefix-middle order (the "
                                                          "rest are prefix-suffix-middle).")
    syntax_spans: float = Field(0.5, ge=0, le=1,
                                description="Share of FIM examples whose middle is a whole line, statement or function "
                                            "body; the rest are random character spans.")
    tokens: tuple[str, str, str] | None = Field(
        None, description="The prefix, suffix and middle tokens (default: the tokenizer's, detected by convention).")
    add_tokens: bool = Field(True, description="Add the FIM tokens to a tokenizer without them and train only their "
                                               "embedding rows; false: such a tokenizer is refused.")
    @field_validator("tokens")
    @classmethod
    def _three_distinct_tokens(cls, tokens: tuple[str, str, str] | None) -> tuple[str, str, str] | None:
        if tokens is not None and (len(set(tokens)) < 3 or not all(t.strip() for t in tokens)):
            raise ValueError("the prefix, suffix and middle tokens must be three different, non-empty tokens")
        return tokens

    prompt_order: Literal["psm", "spm"] = Field(
        "psm", description="The order the model is prompted in by the infill evaluation and the exported Modelfile: "
                           "psm (prefix, suffix, middle) or spm (suffix, then the prefix the middle goes on from).")


class DataSpec(Section):
    repo: Path = Field(Path("."), description="Repository to learn from (read only; .gitignore files are honoured).")
    include: list[str] = Field(default_factory=list, description="Gitignore-style globs a file must match to be used "
                                                                 "(empty: every text file).")
    exclude: list[str] = Field(default_factory=list, description="Gitignore-style globs of files to leave out, on top "
                                                                 "of the built-in defaults.")
    val_ratio: float = Field(0.1, gt=0, lt=1, description="Share of files (not chunks) that go to validation.")
    context_length: Annotated[int, Field(ge=16, le=131072)] | Literal["auto"] = Field(
        256, description="Tokens per packed training sequence; auto: the largest tier (512, 1024, ...) up to "
                         "max_context_length and the model's positions that fits in memory (job plan).")
    max_context_length: int = Field(4096, ge=16, le=131072,
                                    description="Largest context data.context_length: auto may choose.")
    max_file_bytes: int = Field(1_000_000, ge=1, description="Files larger than this are skipped.")
    min_file_chars: int = Field(16, ge=0, description="Files with fewer non-blank characters than this are skipped.")
    max_line_chars: int = Field(
        1000, ge=1, description="Files with a longer line are treated as minified or generated and skipped.")
    file_headers: bool | Literal["auto"] = Field(
        "auto", description="Begin every file with its path (and the repository's name) in the model's own repository "
                            "tokens; auto: where the tokenizer has them (<repo_name>, <file_sep>, <filename>).")
    repo_name: str | None = Field(None, min_length=1, description="The repository's name in file headers (default: "
                                                                  "the name of data.repo's folder).")
    packing: Literal["file", "directory"] = Field(
        "file", description="file: every training file attends to itself alone; directory: the files of a directory, "
                            "in dependency order and each after its header, form one document that attends across "
                            "them, as repository-level pre-training packs (needs file headers).")
    fim: FimSpec = Field(default_factory=FimSpec, description="Fill-in-the-middle training.")

    @model_validator(mode="after")
    def _directory_packing_has_headers(self) -> DataSpec:
        if self.packing == "directory" and self.file_headers is False:
            raise ValueError("data.packing: directory marks where each file begins with its header; it cannot go "
                             "with data.file_headers: false")
        return self


class TinyModelSpec(Section):
    vocab_size: int = Field(4096, ge=300,
                            description="Vocabulary of the byte-level BPE tokenizer trained on the training split.")
    hidden_size: int = Field(256, ge=8, description="Hidden size of the built-in tiny Llama.")
    num_layers: int = Field(4, ge=1, description="Decoder layers of the built-in tiny Llama.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the built-in tiny Llama.")
    intermediate_size: int = Field(688, ge=8, description="MLP width of the built-in tiny Llama.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


class ModelSpec(Section):
    path: str = Field("builtin:tiny",
                      description="Local Hugging Face model folder, a llama.cpp .gguf file (dequantized once into "
                                  "the run folder's model/), or builtin:tiny for the built-in demo model.")
    trust_remote_code: bool = Field(False, description="Allow a model folder's own Python code to run (off: only "
                                                       "architectures transformers ships).")
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec,
                                description="Shape of the built-in tiny model (used only with builtin:tiny).")


class LoraSpec(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear",
                                            description="Modules that get adapters: all-linear (every linear layer "
                                                        "but the output head) or a list of names.")
    modules_to_save: list[str] = Field(default_factory=list,
                                       description="Modules trained in full and saved with the adapter (e.g. lm_head "
                                                   "for a randomly initialized model).")
    plus_ratio: float | None = Field(16.0, ge=1, description="LoRA+: learning rate of the B matrices over that of the "
                                                             "A matrices; null turns LoRA+ off.")


class OptimSpec(Section):
    lr: float = Field(2e-4, ge=0, description="Peak learning rate (of the LoRA A matrices under LoRA+); 0 runs the "
                                              "loop without changing a weight.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0,
                                        description="Clip the gradient norm to this; null turns clipping off.")


class ScheduleSpec(Section):
    kind: Literal["one_cycle", "cosine"] = Field(
        "one_cycle", description="Learning-rate schedule: one_cycle (torch OneCycleLR, cosine annealing) or cosine "
                                 "(linear warm-up, cosine decay to 0).")
    pct_start: float = Field(0.3, gt=0, lt=1, description="one_cycle: share of steps spent rising to the peak.")
    div_factor: float = Field(25.0, ge=1, description="one_cycle: initial rate = peak / div_factor.")
    final_div_factor: float = Field(1e4, ge=1, description="one_cycle: final rate = initial rate / final_div_factor.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="cosine: share of steps of linear warm-up.")


class TrainSpec(Section):
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (may be fractional); with "
                                                         "max_steps, whichever ends first.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; with epochs, whichever ends first.")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8, description="Sequences per forward pass per process; auto: the most (a power of two, at most 64) that fit "
                       "in memory.")
    grad_accum: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="Micro-batches accumulated into one optimizer step; auto: as many as reach "
                       "train.tokens_per_step.")
    tokens_per_step: int | None = Field(None, ge=1, description="Tokens per optimizer step over all processes that "
                                                                "grad_accum: auto aims for (required by it).")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False, description="Recompute each layer's activations in the backward pass instead of keeping them (about a "
                           "third more compute, far less memory); auto: only when the plan needs it to fit.")
    memory_fraction: float = Field(0.9, gt=0, le=1,
                                   description="Share of the device's free memory (RAM on the CPU) the plan may fill; "
                                               "the rest is headroom for what the estimate misses.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast of the forward pass, evaluation and sampling (the adapter and optimizer state "
                            "stay fp32); fp16 adds a gradient scaler and needs a GPU; auto: bf16 on a GPU with native "
                            "bf16 (compute capability 8.0+) or a CPU with AVX512-BF16 or AMX, fp16 on an older GPU "
                            "(T4, V100), else full precision.")
    compile: bool | Literal["auto"] = Field("auto",
                                            description="torch.compile the training forward and backward (evaluation "
                                                        "stays eager); auto: only where it pays for its compile time "
                                                        "(job plan says why); a compile failure falls back to eager.")
    deterministic: bool = Field(False, description="Deterministic kernels only (torch.use_deterministic_algorithms): "
                                                   "on a GPU a resumed run then ends with the same adapter bit for "
                                                   "bit, at some cost in speed; the CPU is deterministic without it.")
    fsdp: bool = Field(False,
                       description="Shard the base model, the adapter and its optimizer state over the processes with "
                                   "FSDP2 (torch's fully_shard), for a model too large for one device; with 4-bit "
                                   "quantization too (QLoRA + FSDP).")
    liger: bool = Field(False,
                        description="CUDA only: Liger Kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy "
                                    "for the architectures it supports (llama, mistral, qwen2, gemma, phi3, ...).")
    max_bad_steps: int = Field(3, ge=1, description="Non-finite losses in a row (each step skipped) before rolling "
                                                    "back to the last checkpoint.")
    max_rollbacks: int = Field(
        3, ge=0, description="Rollbacks allowed in one run; one more non-finite streak then fails the run.")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1,
                                      description="Each rollback multiplies every learning rate by this.")
    cpu_threads: int | None = Field(None, ge=1, description="Torch threads per process on the CPU (default: the cores "
                                                            "this process may use, shared among local processes).")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_false_in_yaml(cls, value):
        # YAML reads a bare `no` as false: `mixed_precision: no` must mean what it says.
        return "no" if value is False else value


class EarlyStoppingSpec(Section):
    patience: int | None = Field(None, ge=1, description="Evaluations in a row without improving validation loss by "
                                                         "more than min_delta before the run ends early (null: never).")
    min_delta: float = Field(0.0, ge=0,
                             description="Smallest drop in validation loss that counts as an improvement for patience.")


class EvalSpec(Section):
    every_steps: int = Field(50, ge=1,
                             description="Validate every this many optimizer steps (and once before the first).")
    max_batches: int | None = Field(None, ge=1,
                                    description="Cap on validation batches per evaluation, spread evenly over the "
                                                "validation files (null: the whole validation set).")
    batch_size: int | None = Field(
        None, ge=1, description="Sequences per validation forward pass (default: train.micro_batch_size).")
    samples: int = Field(4, ge=0, description="Prompts from validation files completed at every evaluation, the same "
                                              "each time (0: none).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Token budget of a sample completion (null: half of data.context_length, at most "
                                "128); function prompts are chosen among those whose real body fits in it.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the completions; 0 is greedy decoding.")
    next_lines: int = Field(16, ge=0, description="Next-line completion tasks from the validation files at every "
                                                  "evaluation, the same each time, written greedily (0: none).")
    next_line_max_tokens: int = Field(32, ge=1, description="Token budget of a next-line completion; only lines "
                                                            "shorter than it are chosen.")
    infills: int = Field(16, ge=0, description="Fill-in-the-middle tasks (a held-out line between its prefix and "
                                               "suffix) at every evaluation of a run that trains FIM (0: none); their "
                                               "budget is next_line_max_tokens.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: draw from the most likely tokens whose "
                                                      "probabilities add up to top_p (temperature > 0).")
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec,
                                              description="Ending the run when validation stops improving.")


class CheckpointSpec(Section):
    every_steps: int = Field(100, ge=1, description="Write a checkpoint every this many optimizer steps.")
    every_minutes: float | None = Field(
        30.0, gt=0, description="Also write one when this many minutes passed since the last (null: steps only).")
    keep_last: int = Field(
        3, ge=2, description="Checkpoints kept; at least 2, so the newest is never the only one while it is written.")
    adapter_every_steps: int | None = Field(
        None, ge=1, description="Also keep the adapter as it is after every this many steps, in "
                                "adapters/step-NNNNNNNN/ (loadable by peft, never pruned; null: none).")


class LogSpec(Section):
    every_steps: int = Field(1, ge=1,
                             description="Append a train record to metrics.jsonl every this many optimizer steps.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="Log lines: console on a terminal, JSON otherwise (auto), or forced.")
    plots_every_minutes: float = Field(1.0, ge=0,
                                       description="plots/ and report.html are redrawn after an evaluation at most "
                                                   "this often (0: after every one), and always at the end.")


class TrackingSpec(Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Trackers that also get every metric, through accelerate (none: the run "
                                          "folder only); a failing tracker is logged once and dropped.")
    project: str = Field("job", min_length=1,
                         description="Project (MLflow experiment, W&B project) the trackers file the run under.")


class DebugSpec(Section):
    nonfinite_micro_batches: list[int] = Field(default_factory=list,
                                               description="Fault injection: micro-batch indices (counted over all "
                                                           "processes) whose loss is made NaN, to test recovery.")
    out_of_memory_steps: list[int] = Field(default_factory=list,
                                           description="Fault injection: optimizer steps (0-based) whose first "
                                                       "attempt in each start runs out of memory, to test the retry.")
    overflow_micro_batches: list[int] = Field(default_factory=list,
                                              description="Fault injection: micro-batch indices (over all "
                                                          "processes) after whose backward pass a gradient is made "
                                                          "infinite (an fp16 overflow; a non-finite step in other "
                                                          "precisions).")
    compile_fails: bool = Field(
        False, description="Fault injection: torch.compile gets a backend that raises, to test the fall-back to eager.")
    record_batches: bool = Field(
        False, description="Write batches.jsonl: the training sequences each optimizer step read, on every process "
                           "together, to test the data order across resumes.")


class QuantizationSpec(Section):
    mode: Literal["none", "8bit", "4bit", "auto"] = Field(
        "none", description="Quantization of the frozen base model through bitsandbytes: none, 8bit (LLM.int8), 4bit "
                            "(QLoRA), or auto: the lightest that fits the chosen context (job plan).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4bit: the 4-bit data type (NF4 is QLoRA's).")
    double_quant: bool = Field(
        True, description="4bit: quantize the quantization constants too (about 0.4 bits a parameter saved).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="4bit: dtype the 4-bit weights are dequantized to for each matmul; auto: that of "
                            "train.mixed_precision (bfloat16 under bf16, float16 under fp16, else float32).")


class JobSpec(Section):
    run: RunSpec = Field(default_factory=RunSpec, description="Naming, output and seed.")
    data: DataSpec = Field(default_factory=DataSpec, description="Where the training text comes from.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="The adapter.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="The optimizer.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="The learning-rate schedule.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="How long and in what batches to train.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Validation cadence and cost.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint cadence and retention.")
    log: LogSpec = Field(default_factory=LogSpec, description="Metrics and log lines.")
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec,
                                           description="Quantization of the base model.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Optional experiment trackers.")
    debug: DebugSpec = Field(default_factory=DebugSpec,
                             description="Fault injection for testing recovery; leave empty.")

    @model_validator(mode="after")
    def _length_given(self) -> JobSpec:
        if self.train.epochs is None and self.train.max_steps is None:
            raise ValueError("train.epochs or train.max_steps must be given")
        if self.train.grad_accum == "auto" and self.train.tokens_per_step is None:
            raise ValueError("train.grad_accum: auto needs train.tokens_per_step "
                             "(the tokens per optimizer step to reach)")
        if (self.train.tokens_per_step is not None
                and "auto" not in (self.train.grad_accum, self.train.micro_batch_size)):
            raise ValueError("train.tokens_per_step is used only with train.grad_accum or "
                             "train.micro_batch_size auto")
        if self.train.fsdp:
            if self.quantization.mode == "8bit":
                raise ValueError("train.fsdp: 8-bit weights (LLM.int8) cannot be sharded; use quantization.mode 4bit "
                                 "or none")
            if self.train.liger:
                raise ValueError("train.fsdp cannot go with train.liger (its fused loss reads lm_head's whole weight)")
            if self.train.compile is True:
                raise ValueError("train.fsdp cannot go with train.compile: true (the sharded step runs eagerly)")
        if self.data.context_length == "auto":
            return self  # max_new_tokens is resolved with the planned context (hardware.resolve)
        if self.eval.max_new_tokens is None:
            # Resolved here, once, so that config.json and every later start see the number the run used.
            self.eval.max_new_tokens = min(128, self.data.context_length // 2)
        if self.eval.samples and self.eval.max_new_tokens >= self.data.context_length:
            raise ValueError(f"eval.max_new_tokens ({self.eval.max_new_tokens}) must be less than data.context_length "
                             f"({self.data.context_length}): a sample's prompt and completion share the context")
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir / self.run.name

    @property
    def has_auto(self) -> bool:
        """Whether the plan decides any field
        (context, micro-batch, accumulation, checkpointing, quantization, compile)."""
        return "auto" in (self.data.context_length, self.train.micro_batch_size, self.train.grad_accum,
                          self.train.gradient_checkpointing, self.quantization.mode, self.train.compile)


# Fields that may change between starts of one run: none of them can change the trained adapter.
# train.memory_fraction only shapes the plan of a run's first start; later starts reuse that plan.
RESUMABLE_CHANGES = ("run.output_dir", "run.max_restarts", "run.heartbeat_timeout", "run.lock_wait",
                     "train.memory_fraction", "eval.", "data.fim.prompt_order",
                     "log.", "checkpoint.", "tracking.")
# With early stopping on, these decide when the run ends, and so its result.
STOPPING_FIELDS = ("eval.early_stopping.", "eval.every_steps", "eval.max_batches", "eval.batch_size")


def result_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The changed fields (between two resolved specs) that would change the run's result if it resumed."""
    stopping = any(spec.get("eval", {}).get("early_stopping", {}).get("patience") is not None
                   for spec in (before, after))
    return [f for f in changed_fields(before, after)
            if not f.startswith(RESUMABLE_CHANGES) or (stopping and f.startswith(STOPPING_FIELDS))]


def changed_fields(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two resolved specs (as spec_to_dict gives them)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed.extend(changed_fields(old, new, f"{prefix}{key}."))
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError([f"--set {dotted}: {key} is not a section"])
        node = child
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """Turn `key.path=value` strings into (path, YAML-typed value) pairs."""
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise SpecError([f"--set {pair}: expected key.path=value"])
        try:
            parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
        except yaml.YAMLError as err:
            raise SpecError([f"--set {pair}: value is not valid YAML ({err.__class__.__name__})"]) from None
    return parsed


def read_spec_file(path: Path) -> dict[str, Any]:
    """The spec file as a plain mapping, or a SpecError naming the file."""
    if not path.exists():
        raise SpecError([f"{path}: spec file does not exist"])
    if not path.is_file():
        raise SpecError([f"{path}: spec path is not a file"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpecError([f"{path}: spec file is not UTF-8 text"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError([f"{path}: YAML syntax error{where}: {problem}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: the spec must be a mapping of sections (run, data, model, ...)"])
    return raw


def build_spec(raw: dict[str, Any], overrides: list[tuple[str, Any]] = (), source: str = "spec") -> JobSpec:
    """Validate a raw mapping (plus overrides) into a JobSpec; every problem is reported at once."""
    tree = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy made of plain types
    for dotted, value in overrides:
        _set_dotted(tree, dotted, value)
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as err:
        raise SpecError([_describe(error, source) for error in _merge_union_errors(err.errors())]) from None


# The member tags pydantic adds to the location of an error in one alternative of a union (int | "auto").
_UNION_TAGS = {"int", "bool", "float", "str", "none"}


def _merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per field: a value that fits no alternative of a union names them all in one line."""
    merged: dict[tuple, dict[str, Any]] = {}
    for error in errors:
        loc = tuple(part for part in error["loc"]
                    if not (isinstance(part, str) and (part in _UNION_TAGS or not part.isidentifier())))
        if loc in merged and loc != tuple(error["loc"]):
            first = merged[loc]
            first["msg"] += ", or " + error["msg"].removeprefix("Input should be ")
        else:
            merged[loc] = {**error, "loc": loc}
    return list(merged.values())


def load_spec(path: Path, overrides: list[str] = ()) -> JobSpec:
    return build_spec(read_spec_file(path), parse_overrides(list(overrides)), source=str(path))


def _describe(error: dict[str, Any], source: str) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    if (error["type"] != "extra_forbidden" and error["type"] != "missing" and "input" in error
            and not isinstance(error["input"], dict)):
        message += f" (got {error['input']!r})"
    return f"{source}: {field}: {message}"


def field_reference(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted path, default, description) of every leaf field, for the README's reference."""
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_reference(annotation, f"{prefix}{name}."))
        else:
            default = info.default_factory() if info.default_factory is not None else info.default
            rows.append((f"{prefix}{name}", default, info.description or ""))
    return rows


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")

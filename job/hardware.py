"""What machine this is, and the plan that follows from it: precision, threads, and the context length, micro-batch,
accumulation, gradient checkpointing and quantization that fit in its memory."""

from __future__ import annotations

import math
import os
import platform
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from job import model
from job.spec import JobSpec, SpecError, build_spec, spec_to_dict

GiB = 2**30
CONTEXT_TIERS_FROM = 512  # data.context_length: auto tries 512, 1024, 2048, ... (each a power of two)
# Past 64 sequences a forward pass no GPU we know gets faster per token; accumulation reaches larger batches.
MAX_AUTO_MICRO_BATCH = 64
# Memory the estimate leaves out on purpose: the CUDA context (outside torch's allocations), or on the CPU the
# process itself (Python, torch and the libraries, measured at about 400 MiB) and the data set.
OVERHEAD_BYTES = {"cuda": 768 * 2**20, "mps": 768 * 2**20, "cpu": 640 * 2**20}

# Bytes kept for the backward pass per token per decoder layer, measured with saved-tensor hooks on Llama and Phi
# models (transformers 5.23, peft 0.21, torch 2.13): per unit of hidden size, of MLP width (gated MLPs keep 4
# tensors of that width, plain ones 2 and the GELU's own), per LoRA rank and module, and the dropout on LoRA inputs.
ACTIVATION_BYTES = {
    "fp32": {"hidden": 32.0, "gated": 16.0, "plain": 20.0, "rank": 4.0, "dropout_hidden": 40.0, "dropout_mlp": 4.0},
    # bf16/fp16 autocast: norms and the adapters stay fp32, matmul inputs are half width.
    "half": {"hidden": 28.7, "gated": 8.2, "plain": 10.0, "rank": 6.9, "dropout_hidden": 24.0, "dropout_mlp": 2.4},
}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX); elsewhere bf16 on the CPU is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_native_bf16(index: int) -> bool:
    """bf16 in hardware (compute capability 8.0 and later: A100, L4, RTX 30/40, H100). torch.cuda.is_bf16_supported()
    also counts the emulation that T4 and V100 get (pytorch/pytorch#148322), slower there than fp16."""
    return torch.cuda.get_device_capability(index)[0] >= 8


def describe() -> dict:
    """The machine as config.json records it. Free memory is read for this process's GPU only: asking another GPU
    would create a CUDA context of about 0.5 GiB on it, on the device of another rank."""
    machine = {
        "platform": platform.platform(),
        "cpu_cores": usable_cores(),
        "memory_bytes": psutil.virtual_memory().total,
        "cpu_bf16": cpu_supports_bf16(),
        "cuda_devices": [],
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if torch.cuda.is_available():
        current = torch.cuda.current_device()
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            machine["cuda_devices"].append({
                "name": props.name,
                "total_memory_bytes": props.total_memory,
                "free_memory_bytes": torch.cuda.mem_get_info(index)[0] if index == current else None,
                "compute_capability": f"{props.major}.{props.minor}",
                "bf16": cuda_native_bf16(index),
            })
    return machine


@dataclass(frozen=True)
class Device:
    """What a plan fits into: one process's device."""

    kind: str  # cuda, mps or cpu
    name: str
    memory_bytes: int  # free GPU memory, or available RAM on the CPU
    bf16: bool


def device_kind() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def native_bf16(kind: str) -> bool:
    """Whether this process's device of that kind computes bf16 natively (MPS autocast in bf16 is partial: no)."""
    if kind == "cuda":
        return cuda_native_bf16(torch.cuda.current_device())
    return kind == "cpu" and cpu_supports_bf16()


def current_device(local_processes: int = 1) -> Device:
    kind = device_kind()
    if kind == "cuda":
        index = torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return Device("cuda", torch.cuda.get_device_name(index), free, native_bf16(kind))
    memory = psutil.virtual_memory().available // max(1, local_processes)
    if kind == "mps":
        return Device("mps", "Apple MPS", memory, False)
    return Device("cpu", platform.processor() or platform.machine(), memory, native_bf16(kind))


def mixed_precision(spec: JobSpec, device: Device | None = None) -> str:
    """accelerate's mixed_precision value: under auto, bf16 where the device computes it natively, fp16 on a GPU
    without it (T4, V100: tensor cores in fp16 only), else full precision."""
    choice = spec.train.mixed_precision
    if choice != "auto":
        return choice
    # No memory query here: before accelerate picks each rank's GPU, every rank's current device is GPU 0.
    kind = device.kind if device is not None else device_kind()
    bf16 = device.bf16 if device is not None else native_bf16(kind)
    if bf16:
        return "bf16"
    # A CPU without AVX512-BF16 or AMX emulates bf16 (measured 12x slower than fp32); MPS autocast in bf16 is partial.
    return "fp16" if kind == "cuda" else "no"


# accelerate gives fp16 autocast and its gradient scaler to GPUs only: on the CPU it would train an fp16 base without
# autocast, and the first evaluation would mix dtypes.
FP16_DEVICES = ("cuda", "mps")


def check_precision(precision: str, kind: str) -> None:
    """Refuse a mixed precision the device cannot train in, in one line."""
    if precision == "fp16" and kind not in FP16_DEVICES:
        raise SpecError([f"train.mixed_precision: fp16 needs a GPU (accelerate has no fp16 autocast or gradient "
                         f"scaler on the {kind}); use bf16 or no"])


# torch.compile under train.compile: auto. Measured on the 2-core dev CPU in fp32 (benchmarks/RESULTS.md): no gain
# (1.00x) for about a minute of compiling, so never there. With bf16 autocast (GPU, or a CPU with native bf16) compiling
# fuses the casts and element-wise work; it costs about a minute once, so it is only assumed to pay from this many
# steps.
COMPILE_PAYS_FROM_STEPS = 500


def compile_choice(spec: JobSpec, precision: str, device_kind: str, total_steps: int) -> tuple[bool, str]:
    """Whether to torch.compile the training step, and why."""
    if spec.train.liger:
        # Liger's fused loss is silently wrong under torch.compile when labels hold ignored positions, as every packed
        # sequence's do (linkedin/Liger-Kernel PR #1338, open in 0.8.5).
        return False, "compile off: train.liger's fused loss is not safe under torch.compile"
    if spec.train.fsdp:
        return False, "compile off: the sharded step (train.fsdp) runs eagerly"
    if spec.train.compile != "auto":
        return spec.train.compile, (f"compile {'on' if spec.train.compile else 'off'}: "
                                    f"train.compile is {str(spec.train.compile).lower()}")
    if device_kind == "mps":
        return False, "compile off: torch.compile's MPS backend is not mature enough to trust with a long run"
    if device_kind == "cpu" and precision == "no":
        return False, ("compile off: on the CPU in full precision torch.compile measured no gain for about a minute of "
                       "compiling (benchmarks/RESULTS.md)")
    if total_steps < COMPILE_PAYS_FROM_STEPS:
        return False, (f"compile off: {total_steps} steps are too few to earn back about a minute of compiling "
                       f"(auto compiles from {COMPILE_PAYS_FROM_STEPS} steps)")
    return True, (f"compile on: {total_steps} steps in {precision} on {device_kind} earn back about a minute of "
                  "compiling")


def use_deterministic_algorithms() -> None:
    """train.deterministic: torch's deterministic kernels everywhere (an error where an op has none). cuBLAS needs its
    workspace setting before its first use, so this comes before any CUDA work."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def base_dtype(precision: str) -> torch.dtype:
    """The frozen base weights are stored in the compute precision; the adapter stays in fp32 (peft upcasts it)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def compute_dtype(spec: JobSpec, precision: str) -> str:
    """The dtype 4-bit weights are dequantized to: quantization.compute_dtype, or under auto the mixed precision's."""
    if spec.quantization.compute_dtype != "auto":
        return spec.quantization.compute_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def cpu_threads(spec: JobSpec, local_processes: int) -> int:
    # Processes on one machine share its cores: two ranks with all threads each slow each other down several times.
    return spec.train.cpu_threads or max(1, usable_cores() // max(1, local_processes))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# The model's shape -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a model, read from its config without loading a weight."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int
    gated_mlp: bool
    linear_params: int  # weights of the decoder's linear layers: what 8bit and 4bit quantize
    linear_rows: int  # their output features (8-bit keeps one scale a row)
    linear_inputs_per_layer: int  # their input features in one layer (8-bit keeps its own copy of each input)
    other_params: int  # embeddings, norms, biases and the output head: never quantized
    lora_params: int
    lora_modules_per_layer: float
    saved_params: int  # lora.modules_to_save, trained in full

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def model_config(spec: JobSpec):
    """The base model's transformers config: the built-in tiny one, or the model folder's config.json."""
    if spec.model.path == model.BUILTIN_TINY:
        return model.tiny_config(spec)
    source = model.model_source(spec, spec.run_dir)
    if source.gguf is not None and not (source.folder / "config.json").is_file():
        return model.gguf_config(source.gguf)  # not converted yet: the run's first start converts it
    folder = source.folder
    model.check_model_folder(folder, spec.model.trust_remote_code)
    return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=spec.model.trust_remote_code)


def model_shape(config, spec: JobSpec) -> ModelShape:
    """Count parameters and find the linear layers by building the model on the meta device (no memory, no weights)."""
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    hidden = int(text.hidden_size)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    head = skeleton.get_output_embeddings()
    linears = [(name, module) for name, module in skeleton.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head]
    targets = spec.lora.target_modules
    lora = [m for name, m in linears
            if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)]
    saved = {id(p): p.numel() for name, module in skeleton.named_modules()
             if any(name == s or name.endswith("." + s) for s in spec.lora.modules_to_save)
             for p in module.parameters()}
    all_params = {id(p): p.numel() for p in skeleton.parameters()}  # tied weights count once
    linear_params = sum(m.weight.numel() for _, m in linears)
    # A gated MLP (SwiGLU: gate, up, down) has two linear layers per layer that widen to the MLP width.
    widening = sum(1 for _, m in linears if m.out_features == intermediate) / layers
    return ModelShape(
        model_type=str(getattr(config, "model_type", "unknown")),
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        vocab=int(text.vocab_size),
        max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
        gated_mlp=widening >= 2,
        linear_params=linear_params,
        linear_rows=sum(m.out_features for _, m in linears),
        linear_inputs_per_layer=round(sum(m.in_features for _, m in linears) / layers),
        other_params=sum(all_params.values()) - linear_params,
        lora_params=sum(spec.lora.r * (m.in_features + m.out_features) for m in lora),
        lora_modules_per_layer=len(lora) / layers,
        saved_params=sum(saved.values()),
    )


# The estimate ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One candidate the planner weighs."""

    context_length: int
    micro_batch_size: int
    gradient_checkpointing: bool
    quantization: str  # none, 8bit, 4bit


def estimate_memory(shape: ModelShape, setting: Setting, spec: JobSpec, precision: str,
                    device_kind: str, shards: int = 1) -> dict[str, int]:
    """Predicted peak bytes of one training step by part on one device (what torch allocates; 'total' sums them),
    with the weights, the adapter and its optimizer state sharded over `shards` devices (train.fsdp)."""
    half = precision in ("bf16", "fp16")
    width = 2 if half else 4
    coefficients = ACTIVATION_BYTES["half" if half else "fp32"]
    if setting.quantization == "none":
        weights = shape.params * width
    else:
        # peft's prepare_model_for_kbit_training upcasts every parameter bitsandbytes left unquantized to fp32.
        if setting.quantization == "8bit":
            quantized = shape.linear_params + 4 * shape.linear_rows
        else:
            # NF4/FP4: half a byte a weight and one constant per block of 64, itself 8-bit (plus an fp32 per 256
            # blocks) under double quantization, or fp32 without.
            constants = shape.linear_params / 64 * ((1 + 4 / 256) if spec.quantization.double_quant else 4)
            quantized = shape.linear_params / 2 + constants
        weights = quantized + 4 * shape.other_params
    # fp32 weight, gradient and AdamW's two moments, and the optimizer step's temporaries.
    trainable = 20 * (shape.lora_params + shape.saved_params)

    tokens = setting.context_length * setting.micro_batch_size
    per_layer = (coefficients["hidden"] * shape.hidden
                 + coefficients["gated" if shape.gated_mlp else "plain"] * shape.intermediate
                 + coefficients["rank"] * spec.lora.r * shape.lora_modules_per_layer)
    if spec.lora.dropout > 0:
        per_layer += coefficients["dropout_hidden"] * shape.hidden + coefficients["dropout_mlp"] * shape.intermediate
    if setting.quantization == "8bit":
        per_layer += 2 * shape.linear_inputs_per_layer  # LLM.int8 keeps an fp16 copy of every input
    # Packed files are masked from each other: a boolean mask of context entries a token, kept by every layer.
    per_layer += 4 * setting.context_length
    # The logits, their fp32 copy for the loss, and its log-softmax and gradients alive at once in the backward pass.
    logits = tokens * shape.vocab * (8 + width)
    if setting.gradient_checkpointing:
        # Only each layer's input is kept. One layer at a time is recomputed in the backward pass, after the loss's
        # gradients are freed: the peak is the larger of the two (measured: benchmarks/memory.py).
        activations = tokens * shape.layers * shape.hidden * width
        logits = max(logits, tokens * per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    if shards > 1:
        # FSDP2 keeps 1/shards of every weight, and gathers one layer whole for its pass while it fetches the next;
        # the root's own weights (embeddings, output head) stay whole through the forward pass.
        root = (width if setting.quantization == "none" else 4) * shape.other_params
        layer_weights = (weights - root) / shape.layers
        weights = weights / shards + 2 * layer_weights + root * (shards - 1) / shards
        trainable = trainable / shards
    parts = {"weights": int(weights), "trainable": int(trainable), "activations": int(activations),
             "logits": int(logits)}
    parts["total"] = sum(parts.values())
    return parts


# The plan --------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The choices a run trains with, and why; config.json keeps it, and later starts reuse it unchanged."""

    context_length: int
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    quantization: str
    compute_dtype: str
    mixed_precision: str
    predicted_peak_bytes: int  # the estimate (torch's allocations)
    predicted_parts: dict[str, int]
    overhead_bytes: int  # what the estimate leaves out (CUDA context, or the process itself on the CPU)
    budget_bytes: int  # memory_fraction of the device's free memory
    fits: bool
    device: dict
    reasons: list[str] = field(default_factory=list)
    compile: bool | None = None  # decided once the step count is known (job.train), then kept like the rest
    processes: int = 1  # training together at the first start: grad_accum is per process, for that many

    @property
    def sequences_per_step(self) -> int:
        """The global batch: it stays when a resume has another number of processes (grad_accum follows)."""
        return self.micro_batch_size * self.grad_accum * self.processes

    def to_dict(self) -> dict:
        return asdict(self)


def context_tiers(spec: JobSpec, shape: ModelShape) -> list[int]:
    """Candidate contexts, longest first: the spec's, or every power-of-two tier up to the caps."""
    if spec.data.context_length != "auto":
        return [spec.data.context_length]
    cap = min(spec.data.max_context_length, shape.max_positions or spec.data.max_context_length)
    tiers, tier = [], CONTEXT_TIERS_FROM
    while tier <= cap:
        tiers.append(tier)
        tier *= 2
    return sorted(tiers or [cap], reverse=True)


def make_plan(spec: JobSpec, shape: ModelShape, device: Device, processes: int = 1) -> Plan:
    """Choose, in this order, the longest context, the lightest quantization, no gradient checkpointing if possible,
    then the largest micro-batch that fit in memory_fraction of the device; the accumulation follows."""
    precision = mixed_precision(spec, device)
    check_precision(precision, device.kind)
    overhead = OVERHEAD_BYTES.get(device.kind, OVERHEAD_BYTES["cpu"])
    budget = int(device.memory_bytes * spec.train.memory_fraction)
    if spec.train.liger:
        if device.kind != "cuda":
            raise SpecError([f"train.liger: Liger Kernel runs on CUDA GPUs only; this is {device.kind} {device.name}"])
        if spec.train.compile is True:
            raise SpecError(["train.compile: true cannot go with train.liger "
                             "(its fused loss is wrong under torch.compile)"])
        if "lm_head" in spec.lora.target_modules:
            raise SpecError(["lora.target_modules: with train.liger the fused loss reads lm_head's frozen weight, "
                             "so an adapter there would never train"])
    if spec.data.context_length != "auto" and shape.max_positions and spec.data.context_length > shape.max_positions:
        raise SpecError([f"data.context_length: {spec.data.context_length} is more than the model's "
                         f"{shape.max_positions} trained positions (max_position_embeddings)"])
    if spec.train.fsdp and precision == "fp16":
        raise SpecError(["train.fsdp: a sharded run trains in bf16 or full precision, not fp16 (set "
                         "train.mixed_precision to bf16 or no)"])
    quantizations = [spec.quantization.mode]
    if spec.quantization.mode == "auto":
        # On the CPU, auto goes from none straight to 4-bit: LLM.int8 there casts every input to fp16 on the way and
        # saves half what 4-bit does. 8-bit weights cannot be sharded.
        quantizations = (["none", "8bit", "4bit"] if device.kind == "cuda" and not spec.train.fsdp
                         else ["none", "4bit"])
    checkpointing = ([False, True] if spec.train.gradient_checkpointing == "auto"
                     else [spec.train.gradient_checkpointing])
    fixed_micro = spec.train.micro_batch_size if spec.train.micro_batch_size != "auto" else None

    shards = processes if spec.train.fsdp else 1

    def peak(setting: Setting) -> int:
        return estimate_memory(shape, setting, spec, precision, device.kind, shards)["total"]

    def fits(setting: Setting) -> bool:
        return peak(setting) + overhead <= budget

    chosen, reasons = None, []
    contexts = context_tiers(spec, shape)
    for context in contexts:
        for quantization in quantizations:
            for recompute in checkpointing:
                candidate = Setting(context, fixed_micro or 1, recompute, quantization)
                if fits(candidate):
                    chosen = candidate
                    break
            if chosen:
                break
        if chosen:
            break
    fitted = chosen is not None
    if chosen is None:
        # Nothing fits: train with the smallest candidate; the out-of-memory retry and its message take it from there.
        chosen = Setting(contexts[-1], fixed_micro or 1, checkpointing[-1], quantizations[-1])
    if fixed_micro is None and fitted:
        micro, most = 1, MAX_AUTO_MICRO_BATCH
        if spec.train.tokens_per_step is not None:
            # A micro-batch past the step's tokens would overshoot train.tokens_per_step.
            most = max(1, min(most, spec.train.tokens_per_step // (chosen.context_length * processes)))
        while micro * 2 <= most and fits(Setting(chosen.context_length, micro * 2, chosen.gradient_checkpointing,
                                                 chosen.quantization)):
            micro *= 2
        chosen = Setting(chosen.context_length, micro, chosen.gradient_checkpointing, chosen.quantization)

    if spec.train.grad_accum == "auto":
        per_step = chosen.context_length * chosen.micro_batch_size * processes
        accum = max(1, round(spec.train.tokens_per_step / per_step))
    else:
        accum = spec.train.grad_accum
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    parts = estimate_memory(shape, chosen, spec, precision, device.kind, shards)
    where = (f"{device.kind} {device.name} with {gib(device.memory_bytes)} free, "
             f"of which train.memory_fraction {spec.train.memory_fraction} = {gib(budget)}")
    if spec.data.context_length == "auto":
        cap = min(spec.data.max_context_length, shape.max_positions or spec.data.max_context_length)
        longer = [c for c in contexts if c > chosen.context_length]
        reasons.append(f"context {chosen.context_length}: the longest tier up to {cap} (data.max_context_length and "
                       f"the model's {shape.max_positions} positions)"
                       + (f" that fits; {longer[-1]} does not" if longer else ""))
    if spec.quantization.mode == "auto":
        lighter = quantizations[:quantizations.index(chosen.quantization)]
        reasons.append(f"quantization {chosen.quantization}: " + ("the base model fits unquantized" if not lighter
                       else f"{', '.join(lighter)} does not fit at context {chosen.context_length}"))
    if spec.train.gradient_checkpointing == "auto":
        reasons.append("gradient checkpointing " + ("on: without it even one sequence does not fit"
                                                    if chosen.gradient_checkpointing
                                                    else "off: the activations fit without recomputing them"))
    if spec.train.micro_batch_size == "auto":
        reasons.append(f"micro-batch {chosen.micro_batch_size}: the most (a power of two, at most "
                       f"{MAX_AUTO_MICRO_BATCH} and within train.tokens_per_step) that fits")
    if spec.train.grad_accum == "auto":
        reasons.append(f"accumulation {accum}: {accum} x {chosen.micro_batch_size} x {chosen.context_length} tokens "
                       f"x {processes} process(es) = "
                       f"{accum * chosen.micro_batch_size * chosen.context_length * processes} tokens a step, "
                       f"nearest to train.tokens_per_step {spec.train.tokens_per_step}")
    if precision == "bf16" and not device.bf16:
        reasons.append(f"bf16: {device.kind} {device.name} has no native bf16 and emulates it, several times slower "
                       "than " + ("fp16" if device.kind == "cuda" else "full precision"))
    compiled = None
    if spec.train.epochs is None:  # else the step count waits for the data, and so does the choice
        compiled, why = compile_choice(spec, precision, device.kind, spec.train.max_steps)
        reasons.append(why)
    if shards > 1:
        reasons.append(f"sharded over {shards} processes (train.fsdp): each device holds 1/{shards} of the weights, "
                       f"the adapter and its optimizer state, and gathers one layer at a time: "
                       f"{gib(parts['weights'])} of weights a device")
    predicted = parts["total"] + overhead
    reasons.append(f"predicted peak {gib(parts['total'])} allocated + {gib(overhead)} overhead = {gib(predicted)} "
                   f"on {where}"
                   + ("" if predicted <= budget else ": does NOT fit; expect an out-of-memory retry"))
    return Plan(
        context_length=chosen.context_length,
        micro_batch_size=chosen.micro_batch_size,
        grad_accum=accum,
        gradient_checkpointing=chosen.gradient_checkpointing,
        quantization=chosen.quantization,
        compute_dtype=compute_dtype(spec, precision),
        mixed_precision=precision,
        predicted_peak_bytes=parts["total"],
        predicted_parts={k: v for k, v in parts.items() if k != "total"},
        overhead_bytes=overhead,
        budget_bytes=budget,
        fits=predicted <= budget,
        device=asdict(device),
        reasons=reasons,
        compile=compiled,
        processes=processes,
    )


def resolve(spec: JobSpec, plan: Plan, processes: int | None = None) -> JobSpec:
    """The spec with every auto field replaced by the plan's choice (and what depends on it resolved again), with the
    accumulation that keeps the plan's global batch on `processes` processes (default: the plan's)."""
    tree = spec_to_dict(spec)
    tree["data"]["context_length"] = plan.context_length
    tree["train"]["micro_batch_size"] = plan.micro_batch_size
    tree["train"]["grad_accum"] = grad_accum_for(plan, processes or plan.processes)
    tree["train"]["gradient_checkpointing"] = plan.gradient_checkpointing
    tree["quantization"]["mode"] = plan.quantization
    tree["quantization"]["compute_dtype"] = plan.compute_dtype
    tree["train"]["tokens_per_step"] = None  # spent on grad_accum: the resolved spec states the accumulation itself
    return build_spec(tree)


def plan_from_dict(raw: dict) -> Plan | None:
    """A plan config.json kept, or None for a run from before plans were kept."""
    # A run planned before train.compile existed trained eagerly, and goes on that way.
    raw = {"compile": False, "processes": 1, **raw}
    try:
        return Plan(**{name: raw[name] for name in Plan.__dataclass_fields__})
    except (KeyError, TypeError):
        return None


def grad_accum_for(plan: Plan, processes: int) -> int:
    """This start's accumulation: the plan's global batch over `processes` processes of plan.micro_batch_size each."""
    per_micro_step = plan.micro_batch_size * processes
    if plan.sequences_per_step % per_micro_step:
        fits = [n for n in range(1, plan.sequences_per_step // plan.micro_batch_size + 1)
                if plan.sequences_per_step % (plan.micro_batch_size * n) == 0]
        raise SpecError([f"train.grad_accum: this run takes {plan.sequences_per_step} sequences a step "
                         f"({plan.micro_batch_size} a micro-batch x {plan.grad_accum} x {plan.processes} process(es)), "
                         f"which {processes} processes cannot share; resume with "
                         f"{', '.join(map(str, fits))} process(es)"])
    return plan.sequences_per_step // per_micro_step


def plan_for(spec: JobSpec, device: Device | None = None, processes: int = 1) -> Plan:
    """The plan of this spec on this machine (or a described one), from the model's config alone."""
    return make_plan(spec, model_shape(model_config(spec), spec), device or current_device(processes), processes)


def describe_plan(plan: Plan) -> str:
    """job plan's output: the choices, the predicted peak by part, and the reason for each decision."""
    lines = [
        f"device:                 {plan.device['kind']} {plan.device['name']} "
        f"({plan.device['memory_bytes'] / GiB:.2f} GiB free)",
        f"data.context_length:    {plan.context_length}",
        f"train.micro_batch_size: {plan.micro_batch_size}",
        f"train.grad_accum:       {plan.grad_accum}",
        f"train.gradient_checkpointing: {str(plan.gradient_checkpointing).lower()}",
        f"quantization.mode:      {plan.quantization}"
        + (f" (compute {plan.compute_dtype})" if plan.quantization == "4bit" else ""),
        f"mixed precision:        {plan.mixed_precision}",
        "train.compile:          "
        f"{'decided from the step count at the start' if plan.compile is None else str(plan.compile).lower()}",
        "predicted peak:         " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.predicted_parts.items())
        + f" = {plan.predicted_peak_bytes / GiB:.2f} GiB (+ {plan.overhead_bytes / GiB:.2f} GiB overhead; "
          f"budget {plan.budget_bytes / GiB:.2f} GiB)",
        f"fits:                   {'yes' if plan.fits else 'NO'}",
        "why:",
    ]
    lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB', '80 G', '512MiB' or a plain number of bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
             "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abgikmtb")  # noqa: B005 - every trailing unit letter, whatever the unit
    unit = cleaned[len(number):]
    try:
        value = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"{text!r} is not a size (examples: 24GiB, 80GB, 512MiB)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)

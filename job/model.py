"""The base model (a local Hugging Face folder or the built-in tiny Llama), LoRA, the LoRA+ optimizer, the schedule."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from job.rundir import file_sha256, write_json_atomic
from job.spec import JobSpec, SpecError

# transformers' models and tokenizers, and peft, are imported inside the functions that use them: `job validate` and
# `job plan` import this module, and those imports would add about 3 s to their answer; peft's import would also load
# bitsandbytes (see leave_out_bitsandbytes) before a start could leave it out. bitsandbytes and liger-kernel are
# optional packages.

BUILTIN_TINY = "builtin:tiny"
TINY_EOS = "<|endoftext|>"
# The group order create_loraplus_optimizer builds; named so that logs and plots say which rate is which.
LORAPLUS_GROUP_NAMES = ["lora_A", "embedding", "lora_B", "lora_B_no_decay"]
PROGRESS_BAR = re.compile(r"\d+%\|")  # a tqdm bar's line: "  14%|█▍   | 39/272 [...]"


@dataclass
class ModelSource:
    folder: Path  # the Hugging Face model folder the run loads
    builtin: bool
    gguf: Path | None = None  # the llama.cpp file the folder is converted from, once, on the run's first start


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def model_source(spec: JobSpec, run_dir: Path) -> ModelSource:
    if spec.model.path == BUILTIN_TINY:
        return ModelSource(run_dir / "model", builtin=True)
    if is_gguf(spec.model.path):
        return ModelSource(run_dir / "model", builtin=False, gguf=Path(spec.model.path))
    return ModelSource(Path(spec.model.path), builtin=False)


def gguf_config(path: Path):
    """The transformers config of a llama.cpp GGUF file, once transformers is known to read its architecture and
    every tensor type in it can be dequantized; a SpecError names the file and the reason."""
    from transformers import AutoConfig

    where = f"model.path: {path}"
    if not path.is_file():
        raise SpecError([f"{where} does not exist" if not path.exists() else f"{where} is not a file"])
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise SpecError([f"{where} is not a GGUF file ({err})"]) from None
    unreadable = []
    for kind in sorted({tensor.tensor_type for tensor in reader.tensors}, key=lambda kind: kind.name):
        # One tensor of each type, through gguf's own dequantizer (the one transformers calls on loading).
        sample = next(tensor for tensor in reader.tensors if tensor.tensor_type == kind)
        try:
            gguf.quants.dequantize(sample.data, kind)
        except NotImplementedError:
            unreadable.append(kind.name)
    if unreadable:
        raise SpecError([f"{where} has tensors of type {', '.join(unreadable)}, which the gguf package "
                         f"{importlib.metadata.version('gguf')} cannot dequantize; use a file of another quantization "
                         "type (Q8_0, Q4_K_M, F16, ...)"])
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError) as err:
        raise SpecError([f"{where}: transformers cannot read it ({str(err).splitlines()[0]})"]) from None


@contextlib.contextmanager
def no_progress_bars():
    """transformers' progress bars kept off stderr, where they would interleave with the job's JSON log lines. Its
    switch turns off its own bars; its GGUF loader draws one with plain tqdm, which writes to whatever sys.stderr
    is when it starts, so stderr is captured and written back without the bars."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
        sys.stderr.write("".join(line for line in captured.getvalue().splitlines(keepends=True)
                                 if "\r" not in line and not PROGRESS_BAR.search(line)))


def convert_gguf(path: Path, folder: Path) -> None:
    """Dequantize a GGUF file into a plain model folder (fp32 safetensors, config, tokenizer) with source.json saying
    where it came from. transformers reads GGUF but will not save a model it loaded from one, so its weights move
    into a model built from the same config."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = gguf_config(path)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with no_progress_bars():
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        with init_empty_weights():
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    write_json_atomic(tmp / "source.json", {
        "gguf": str(path.resolve()),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "model_type": config.model_type,
        "converted_by": {"transformers": importlib.metadata.version("transformers"),
                         "gguf": importlib.metadata.version("gguf")},
    })
    tmp.rename(folder)


def check_model_folder(folder: Path, trust_remote_code: bool) -> dict:
    """The folder's config.json, after the checks that need no weights; a SpecError says what is wrong."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = f"model.path: {folder}"
    if not folder.exists():
        raise SpecError([f"{where} does not exist"])
    if not folder.is_dir():
        raise SpecError([f"{where} is not a folder"])
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SpecError([f"{where} has no config.json (not a Hugging Face model folder)"])
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise SpecError([f"{config_path}: not valid JSON ({err})"]) from None
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        if "auto_map" in config:
            raise SpecError([f"{where} needs its own Python code (auto_map in config.json); "
                             "set model.trust_remote_code: true only if you trust it"])
        raise SpecError([f"{where}: model_type {model_type!r} is not an architecture this transformers version knows"])
    if not any(folder.glob("*.safetensors")):
        raise SpecError([f"{where} has no .safetensors weights (only safetensors are loaded, never pickles)"])
    return config


def train_tiny_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the given texts, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TINY_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS, pad_token=TINY_EOS)


def create_tiny_model(spec: JobSpec, folder: Path, train_texts: list[str]) -> None:
    """Write the built-in tiny Llama and its tokenizer to folder, initialized from the run's seed."""
    from transformers import LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(train_texts, spec.model.tiny.vocab_size)
    config = tiny_config(spec, vocab_size=len(tokenizer))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    # fork_rng: the model's initialization must not disturb the run's own random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.run.seed)
        model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)


def tiny_config(spec: JobSpec, vocab_size: int | None = None, context_length: int | None = None):
    """The built-in tiny Llama's config (the same the run writes, given its tokenizer's vocabulary)."""
    from transformers import LlamaConfig

    tiny = spec.model.tiny
    context = context_length or (spec.data.context_length if spec.data.context_length != "auto" else 0)
    return LlamaConfig(
        vocab_size=vocab_size or tiny.vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=max(2048, context),
        bos_token_id=None,
    )


def load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SpecError([f"model.path: {folder}: the tokenizer cannot be loaded "
                         f"({str(err).splitlines()[0]})"]) from None
    if tokenizer.eos_token_id is None:
        raise SpecError([f"model.path: {folder}: the tokenizer has no end-of-sequence token to separate files"])
    return tokenizer


def quantization_config(spec: JobSpec, storage: torch.dtype | None = None):
    """transformers' BitsAndBytesConfig for quantization.mode 8bit or 4bit (resolved by the plan), else None; 4-bit
    weights packed into `storage` elements when given (FSDP shards them as tensors of that dtype)."""
    from transformers import BitsAndBytesConfig

    quantization = spec.quantization
    if quantization.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization.mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
            bnb_4bit_quant_storage=storage or torch.uint8,
        )
    return None


def load_base_model(folder: Path, spec: JobSpec, dtype: torch.dtype, device: torch.device):
    """The frozen base model, quantized on loading when the spec says so."""
    from transformers import AutoModelForCausalLM

    # Sharded, the packed 4-bit weights must share the dtype of the weights beside them (the QLoRA + FSDP recipe).
    quantization = quantization_config(spec, dtype if spec.train.fsdp else None)
    # Straight onto this process's device: loaded on the host first, every rank would hold a full copy there.
    extra = {"device_map": {"": device}}
    if quantization is not None:
        # LLM.int8 logs a warning at every matmul whose input is not fp16 (every one on the CPU): it casts, as intended.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        # bitsandbytes quantizes while loading, onto the device each weight is placed on.
        extra["quantization_config"] = quantization
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=spec.model.trust_remote_code,
            dtype=dtype,
            **extra,
        )
    if spec.quantization.mode == "4bit":
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # On a CPU with AVX512-BF16, an eval-mode forward without gradients repacks the 4-bit weights for
                # inference for good: training afterwards gets wrong gradients, and layers whose width is not a
                # multiple of 32 fail outright. Validation must never change training, so the repack stays off.
                module.support_avx512bf16_for_cpu = False
    return model


def apply_liger(base, spec: JobSpec) -> None:
    """Liger Kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy on the base model, before peft wraps it
    (on a PeftModel its patching looks in the wrong place). CUDA only; job.hardware refuses it elsewhere."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise SpecError(["train.liger: liger-kernel is not installed "
                         "(pip install -r requirements-cuda.txt; the CUDA image has it)"])
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError as err:
        raise SpecError([f"train.liger: liger-kernel cannot be imported ({err})"]) from None
    model_type = base.config.model_type
    # For a model type it has no kernels for, Liger only logs at INFO level and changes nothing.
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise SpecError([f"train.liger: Liger Kernel has no kernels for model_type {model_type!r} "
                         f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})"])
    # Its SwiGLU replaces the MLP's forward without looking at the activation.
    swiglu = getattr(base.config, "hidden_act", "silu") in ("silu", "swish")
    # cross_entropy=True would replace torch.nn.functional.cross_entropy for the whole process.
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=swiglu, cross_entropy=False,
                                    fused_linear_cross_entropy=True)


def build(folder: Path, spec: JobSpec, dtype: torch.dtype, device: torch.device, added_tokens: list[int] = ()):
    """The frozen base with the adapter on it, in the dtype and on the device the run trains with; added_tokens: ids
    the run added to the tokenizer, whose embedding rows the adapter trains."""
    if spec.quantization.mode == "none":
        leave_out_bitsandbytes()
    base = load_base_model(folder, spec, dtype, device)
    if added_tokens:
        add_token_rows(base, added_tokens, spec.run.seed)
    if spec.train.liger:
        apply_liger(base, spec)
    return add_lora(base, spec, added_tokens)


def add_token_rows(base, token_ids: list[int], seed: int = 0) -> None:
    """Rows for tokens added to the tokenizer, in the embeddings and an untied output layer, each drawn around the
    other rows' mean with their spread, so that the new tokens start apart; drawn from the seed alone, apart from the
    run's random state. The matrices grow where they are too small (transformers' mean resizing); a model whose
    matrices have spare rows already (padded to a multiple) keeps its size, and those rows are drawn alike. The
    adapter holds the trained rows: a base grown any other way loads it as well."""
    from transformers import modeling_utils

    embedding = base.get_input_embeddings().weight
    first, device = min(token_ids), embedding.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if max(token_ids) >= embedding.shape[0]:
            announced = modeling_utils.logger.level
            modeling_utils.logger.setLevel(logging.ERROR)  # transformers announces its mean resizing as a warning
            try:
                base.resize_token_embeddings(max(token_ids) + 1, mean_resizing=True)
            finally:
                modeling_utils.logger.setLevel(announced)
            return
        with torch.no_grad():
            # In a fixed order (a set's would change from process to process, and with it each row's draw), and a
            # weight tied to the embedding drawn once.
            layers = [base.get_input_embeddings()]
            output = base.get_output_embeddings()
            if output is not None and output.weight is not layers[0].weight:
                layers.append(output)
            for layer in layers:
                old = layer.weight[:first].float()
                drawn = old.mean(dim=0) + old.std(dim=0) * torch.randn(len(token_ids), old.shape[1], device=device)
                layer.weight[token_ids] = drawn.to(layer.weight.dtype)


def token_layers(base) -> list[str]:
    """The names of the input embedding and, if its weight is not tied to it, the output layer."""
    names = {module: name for name, module in base.named_modules()}
    embedding, output = base.get_input_embeddings(), base.get_output_embeddings()
    if output is None or output.weight is embedding.weight:
        return [names[embedding]]
    return [names[embedding], names[output]]


def leave_out_bitsandbytes() -> None:
    """Keep bitsandbytes unloaded in a process that quantizes nothing. peft imports it whenever it is installed, and
    its import compiles kernels: about 4 s of every start. A None entry in sys.modules is Python's own way to make a
    module unimportable; importlib.util.find_spec then reports it missing, and peft carries on without it."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def add_lora(model, spec: JobSpec, added_tokens: list[int] = ()):
    """The adapter on the frozen base; a quantized base is first prepared for training as QLoRA prescribes. The rows
    of added_tokens are trained in the input embedding and an untied output layer, the rest stays frozen."""
    from peft import LoraConfig, get_peft_model

    # peft still asks transformers' is_gradient_checkpointing, deprecated in transformers 5: a warning every start.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    if spec.quantization.mode in ("4bit", "8bit"):
        from peft import prepare_model_for_kbit_training

        # Checkpointing is turned on below, the same way for quantized and unquantized models.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no gradient on the inputs and keeps the RNG, so dropout recomputes alike.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trained_whole = {name.rsplit(".", 1)[-1] for name in spec.lora.modules_to_save}
    if added_tokens and trained_whole & {name.rsplit(".", 1)[-1] for name in token_layers(model)}:
        raise SpecError([f"lora.modules_to_save: {', '.join(sorted(trained_whole))} already trains the layer whose "
                         "added FIM token rows the adapter would train; leave it out, or set data.fim.rate to 0"])
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        modules_to_save=spec.lora.modules_to_save or None,
        trainable_token_indices={name: list(added_tokens) for name in token_layers(model)} if added_tokens else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    # Every trained weight keeps fp32 values, also those trained in full (lora.modules_to_save, copied from a bf16
    # base under mixed precision): an AdamW update is often below bf16's resolution. peft upcasts only the adapter.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def compile_for_training(model, spec: JobSpec):
    """torch.compile of the model for the training steps; it shares the model's parameters, so eval stays eager."""
    if spec.debug.compile_fails:
        def refusing_backend(graph, example_inputs):
            raise RuntimeError("debug.compile_fails: this backend refuses to compile")

        return torch.compile(model, backend=refusing_backend)
    return torch.compile(model)


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer can skip a step itself when told found_inf (fused AdamW), without the host deciding."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return bool(inner.defaults.get("fused")) and getattr(inner, "_step_supports_amp_scaling", False)


def make_optimizer(model, spec: JobSpec) -> torch.optim.Optimizer:
    """AdamW over the adapter; with LoRA+ the B matrices learn plus_ratio times faster than the A matrices.

    Fused AdamW (one kernel for all tensors, on the CPU and GPUs) where the parameters allow it: fewer passes over
    the optimizer state, and it skips a step on the device when told to (found_inf)."""
    from peft.optimizers import create_loraplus_optimizer

    betas = tuple(spec.optim.betas)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda", "mps", "xpu") for p in params)
    if spec.lora.plus_ratio is None:
        optimizer = torch.optim.AdamW(params, lr=spec.optim.lr, betas=betas, weight_decay=spec.optim.weight_decay,
                                      fused=fused)
        optimizer.param_groups[0]["name"] = "lora"
        return optimizer
    optimizer = create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=spec.optim.lr,
        loraplus_lr_ratio=spec.lora.plus_ratio,
        loraplus_weight_decay=spec.optim.weight_decay,
        # peft's default (1e-6) would freeze an embedding trained in full through lora.modules_to_save.
        loraplus_lr_embedding=spec.optim.lr,
        betas=betas,
        fused=fused,
    )
    for group, name in zip(optimizer.param_groups, LORAPLUS_GROUP_NAMES, strict=True):
        group["name"] = name
    return optimizer


def make_scheduler(optimizer: torch.optim.Optimizer, spec: JobSpec, total_steps: int):
    schedule = spec.schedule
    if schedule.kind == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            # One peak a group: a single number would give every group the same rate and erase the LoRA+ ratio.
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=schedule.pct_start,
            anneal_strategy="cos",
            div_factor=schedule.div_factor,
            final_div_factor=schedule.final_div_factor,
            # Momentum cycling would rewrite AdamW's betas every step; the spec's betas stay as given.
            cycle_momentum=False,
        )
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, round(schedule.warmup_ratio * total_steps), total_steps)


def group_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of every parameter group that holds parameters, by name."""
    return {group["name"]: group["lr"] for group in optimizer.param_groups if group["params"]}


def save_adapter(peft_model, tokenizer, folder: Path, info: dict[str, dict] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter in peft's own format (loadable by PeftModel.from_pretrained), the tokenizer and any info JSON
    files beside it; the folder it replaces stays whole until the new one is. state_dict: the weights gathered
    whole, for a sharded model."""
    finish_interrupted_swap(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # The base's embeddings are grown only for added FIM tokens, whose rows the adapter holds: peft would otherwise
    # save both whole embedding matrices into every adapter.
    peft_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, save_embedding_layers=False)
    tokenizer.save_pretrained(tmp)
    for name, value in (info or {}).items():
        write_json_atomic(tmp / name, value)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def finish_interrupted_swap(folder: Path) -> None:
    """A stop inside save_adapter's swap: put <folder>.old back if the new folder never arrived, else drop it."""
    old = folder.with_name(folder.name + ".old")
    if old.is_dir():
        if folder.exists():
            shutil.rmtree(old)
        else:
            old.rename(folder)

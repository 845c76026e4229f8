"""job export: a run's adapter in the forms that serve completions: merged into its base model, or the adapter alone
as vLLM loads it. Reads the run folder, never writes it; the output folder appears whole or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from job.spec import SpecError

FORMATS = ("merged", "adapter")
# The layers vLLM's LoRA support applies an adapter to (its packed attention and MLP projections, by their names
# in the transformers models it serves).
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj", "dense", "fc1", "fc2", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn",
                "c_proj", "c_fc", "Wqkv", "out_proj"}


def adapter_folder(run_dir: Path, best: bool) -> Path:
    """The run's final adapter, or best/: a SpecError says why there is none to export."""
    if not (run_dir / "config.json").is_file():
        raise SpecError([f"{run_dir}: not a run folder (no config.json)"])
    folder = run_dir / ("best" if best else "adapter")
    if not (folder / "adapter_config.json").is_file():
        why = "no validation has improved yet" if best else "the run has not completed (job status says where it is)"
        raise SpecError([f"{folder}: no adapter to export: {why}"])
    return folder


def base_folder(config: dict, adapter: Path, run_dir: Path) -> Path:
    """The base model the adapter (config: its adapter_config.json) was trained on: the folder peft recorded (the
    run's model/ for the built-in model and GGUF files)."""
    recorded = config.get("base_model_name_or_path")
    base = Path(recorded) if recorded else run_dir / "model"
    if not (base / "config.json").is_file():
        raise SpecError([f"{base}: the base model the adapter was trained on is not there (it was recorded in "
                         f"{adapter / 'adapter_config.json'})"])
    return base


def vllm_problems(config: dict) -> list[str]:
    """What keeps vLLM from serving an adapter (config: its adapter_config.json) as a LoRA module (its --enable-lora
    path)."""
    problems = []
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    # peft records "all-linear" as each module's full path: the layer's own name is what matters.
    unsupported = sorted({target.rsplit(".", 1)[-1] for target in targets} - VLLM_TARGETS)
    if unsupported:
        problems.append(f"lora.target_modules: vLLM applies LoRA to attention and MLP projections only, not to "
                        f"{', '.join(unsupported)}")
    if config.get("trainable_token_indices"):
        problems.append("data.fim: the run added FIM tokens and trained their embedding rows, which vLLM's LoRA "
                        "loading does not take; export --format merged instead")
    if config.get("modules_to_save"):
        problems.append(f"lora.modules_to_save: {', '.join(config['modules_to_save'])} are trained whole, and vLLM "
                        "loads no full-size module copies with an adapter; export --format merged instead")
    return problems


def export(run_dir: Path, form: str, out: Path, best: bool = False) -> list[str]:
    """Write the export into out (which must not exist yet); returns what a server needs, line by line."""
    if form not in FORMATS:
        raise SpecError([f"--format: {form} is not one of {', '.join(FORMATS)}"])
    adapter = adapter_folder(run_dir, best)
    if out.exists():
        raise SpecError([f"--out: {out} exists; an export never overwrites anything (name a new folder)"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = base_folder(config, adapter, run_dir)
    if form == "adapter":
        problems = vllm_problems(config)
        if problems:
            raise SpecError(problems)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if form == "merged":
        write_merged(adapter, base, tmp)
    else:
        shutil.copytree(adapter, tmp)
    tmp.rename(out)
    if form == "merged":
        return [f"a transformers model folder: AutoModelForCausalLM.from_pretrained({str(out)!r})",
                f"vLLM: vllm serve {out}"]
    return [f"vLLM: vllm serve {base} --enable-lora --lora-modules {run_dir.name}={out} "
            f"--max-lora-rank {max(16, config.get('r', 16))}"]


def write_merged(adapter: Path, base: Path, out: Path) -> None:
    """The base with the adapter merged into its weights, in the base's own dtype, and the tokenizer, into out.
    The merge is done in fp32 (a QLoRA adapter goes onto the unquantized base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from job.model import add_token_rows, no_progress_bars

    dtype = getattr(AutoConfig.from_pretrained(base, local_files_only=True), "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base,
                                              local_files_only=True)
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, use_safetensors=True,
                                                     dtype=torch.float32)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            add_token_rows(model, len(tokenizer))  # tokens the run added: the adapter holds their rows
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

"""job export: a run's adapter in the forms that serve completions: merged into its base model, that model as a GGUF
file for llama.cpp and Ollama, or the adapter alone as vLLM loads it. Reads the run folder, never writes it; the
output folder appears whole or not at all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from job.spec import SpecError

FORMATS = ("merged", "gguf", "adapter")
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
# Ollama's infill templates for the FIM conventions whose tokens are not plain text (CodeLlama's carry a "▁").
OLLAMA_FIM_TEMPLATES = {
    ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"): "<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>",
}
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


def default_converter() -> Path:
    """Where scripts/llama-cpp-converter.sh puts llama.cpp's converter for this Python (the image's too)."""
    return Path(sys.prefix) / "share" / "llama.cpp"


def export(run_dir: Path, form: str, out: Path, best: bool = False, outtype: str = "f16",
           converter: Path | None = None) -> list[str]:
    """Write the export into out (which must not exist yet); returns what a server needs, line by line."""
    if form not in FORMATS:
        raise SpecError([f"--format: {form} is not one of {', '.join(FORMATS)}"])
    if outtype not in GGUF_TYPES:
        raise SpecError([f"--outtype: {outtype} is not one of {', '.join(GGUF_TYPES)}"])
    converter = converter or default_converter()
    if form == "gguf" and not (converter / "convert_hf_to_gguf.py").is_file():
        raise SpecError([f"--converter: llama.cpp's convert_hf_to_gguf.py is not in {converter} (install it with "
                         "scripts/llama-cpp-converter.sh; make test and the image do)"])
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
    elif form == "gguf":
        name = write_gguf(adapter, base, tmp, run_dir, outtype, converter)
    else:
        shutil.copytree(adapter, tmp)
    tmp.rename(out)
    if form == "merged":
        return [f"a transformers model folder: AutoModelForCausalLM.from_pretrained({str(out)!r})",
                f"vLLM: vllm serve {out}"]
    if form == "gguf":
        return [f"llama.cpp: llama-server -m {out / name} (infill: POST /infill with input_prefix and input_suffix)",
                f"Ollama: ollama create {run_dir.name} -f {out / 'Modelfile'}"]
    return [f"vLLM: vllm serve {base} --enable-lora --lora-modules {run_dir.name}={out} "
            f"--max-lora-rank {max(16, config.get('r', 16))}"]


def write_merged(adapter: Path, base: Path, out: Path) -> None:
    """The base with the adapter merged into its weights, in the base's own dtype, and the tokenizer, into out.
    The merge is done in fp32 (a QLoRA adapter goes onto the unquantized base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from job.model import add_token_rows, leave_out_bitsandbytes, no_progress_bars

    leave_out_bitsandbytes()  # a QLoRA adapter merges onto the unquantized base: nothing is quantized here

    dtype = getattr(AutoConfig.from_pretrained(base, local_files_only=True), "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base,
                                              local_files_only=True)
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, use_safetensors=True,
                                                     dtype=torch.float32)
        added = json.loads((adapter / "adapter_config.json").read_text()).get("trainable_token_indices") or {}
        if added:  # tokens the run added: the adapter holds their rows, the base needs room for them
            add_token_rows(model, sorted({i for ids in added.values() for i in ids}))
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def write_gguf(adapter: Path, base: Path, out: Path, run_dir: Path, outtype: str, converter: Path) -> str:
    """The merged model as one GGUF file written by llama.cpp's own converter, and an Ollama Modelfile beside it
    with the run's FIM template and stop tokens; returns the file's name."""
    from transformers import AutoTokenizer

    merged = out / "merged"
    write_merged(adapter, base, merged)
    name = f"{run_dir.name}.{outtype}.gguf"
    result = subprocess.run([sys.executable, "-m", "job.llama_cpp", str(converter), str(merged), "--outfile",
                             str(out / name), "--outtype", outtype], capture_output=True, text=True)
    if result.returncode != 0:
        problem = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no message")
        shutil.rmtree(out)
        raise SpecError([f"--format gguf: llama.cpp's converter refused this model: {problem}"])
    tokenizer = AutoTokenizer.from_pretrained(merged, local_files_only=True)
    shutil.rmtree(merged)
    (out / "Modelfile").write_text(modelfile(name, tokenizer, *fim_prompt(run_dir, tokenizer)))
    return name


def fim_prompt(run_dir: Path, tokenizer) -> tuple[tuple[str, str, str] | None, str]:
    """The FIM tokens and prompt order a run trained with (config.json's), else the tokens of the tokenizer's
    convention, if any, in PSM order."""
    from job.data import detect_fim_tokens

    trained = (json.loads((run_dir / "config.json").read_text()).get("data") or {}).get("fim")
    if trained:
        return tuple(trained["tokens"]), trained.get("prompt_order", "psm")
    return detect_fim_tokens(tokenizer), "psm"


def modelfile(gguf_name: str, tokenizer, fim: tuple[str, str, str] | None, order: str = "psm") -> str:
    """An Ollama Modelfile: the prompt as it is (a completion model), or, where the editor sends the code after the
    cursor (.Suffix), the model's FIM prompt in the run's prompt order; generation stops at the end of text and at
    any FIM or file token."""
    if fim is None:
        template = "{{ .Prompt }}"
    else:
        infill = OLLAMA_FIM_TEMPLATES.get(fim, f"{fim[0]}{{{{ .Prompt }}}}{fim[1]}{{{{ .Suffix }}}}{fim[2]}")
        if order == "spm":  # StarCoder's SPM, as the job trains it: the middle goes on from the prefix
            # CodeLlama's tokens carry a "▁": the space before each is what makes it that token.
            pre, suf, mid = (token.replace("\u2581", " ") for token in fim)
            infill = f"{pre}{suf}{{{{ .Suffix }}}}{mid}{{{{ .Prompt }}}}".lstrip()
        template = f"{{{{- if .Suffix }}}}{infill}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}"
    vocabulary = tokenizer.get_vocab()
    stops = [tokenizer.eos_token, *(fim or ()),
             *(token for token in ("<file_sep>", "<|file_sep|>", "<|fim_pad|>") if token in vocabulary)]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""',
             *(f"PARAMETER stop {json.dumps(stop.replace(chr(0x2581), ' ').strip())}" for stop in dict.fromkeys(stops))]
    return "\n".join(lines) + "\n"

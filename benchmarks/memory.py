"""The plan's memory estimate against measured peak memory of real training steps.

For each setting (context, micro-batch, quantization, gradient checkpointing) it builds the model with random
weights, saves it to a temporary folder and loads it through the job's own loading path (job.model:
load_base_model with bitsandbytes for 4-bit, add_lora, make_optimizer), trains a few steps with the job's loss,
and compares the estimate (job.hardware.estimate_memory) with the measured peak of torch's allocations:

  - on a CUDA GPU: torch.cuda.max_memory_allocated over the timed steps;
  - on the CPU (no allocator statistics there): the bytes held at the start of a step (weights, quantization
    constants, adapter, optimizer state) plus the highest point of the profiler's allocation record
    (torch.profiler, profile_memory=True) during one whole step: forward, backward and the optimizer step.

Also prints the tokens per second of the timed steps. The CPU default is the built-in tiny model of the default
job; on CUDA the default is a Phi-2-shaped model (2.7B parameters, random weights) in bf16 and 4-bit QLoRA.

    .venv/bin/python benchmarks/memory.py [--model tiny|phi2] [--contexts 256 512 1024] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from job import hardware, model  # noqa: E402
from job.evaluate import loss_sum  # noqa: E402
from job.spec import build_spec  # noqa: E402


def model_config(name: str):
    from transformers import LlamaConfig, PhiConfig

    if name == "phi2":
        return PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, partial_rotary_factor=0.4,
                         tie_word_embeddings=False)
    # The default job's model (examples/default.yaml), with the tokenizer's vocabulary.
    return LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)


def held_bytes(peft_model, optimizer) -> int:
    """Bytes of every tensor a training step starts with: parameters, buffers, 4-bit constants, optimizer state."""
    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for tensor in list(peft_model.parameters()) + list(peft_model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=True).values():
                if isinstance(value, torch.Tensor):
                    add(value)
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                add(value)
    return total


def profiled_step_peak(step) -> int:
    """Highest allocation level above the start, over one call of step, from the profiler's memory record."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    level = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def measure(folder: Path, spec, steps: int, device: torch.device) -> tuple[int, float]:
    """(peak bytes, tokens per second) of training steps of the spec's setting."""
    precision = hardware.mixed_precision(spec)
    base = model.load_base_model(folder, spec, hardware.base_dtype(precision), device)
    peft_model = model.add_lora(base, spec)  # the base was loaded onto the device
    optimizer = model.make_optimizer(peft_model, spec)
    peft_model.train()
    context, micro = spec.data.context_length, spec.train.micro_batch_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (micro, context), generator=generator).to(device)
    positions = torch.arange(context).repeat(micro, 1)
    positions[:, context // 2:] -= context // 2  # two packed files a sequence, as the job's packing makes
    positions = positions.to(device)
    autocast = torch.autocast(device.type, dtype=hardware.base_dtype(precision), enabled=precision != "no")

    def step():
        with autocast:
            total, _ = loss_sum(peft_model, ids, positions, ids)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from the first step on
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = held_bytes(peft_model, optimizer) + profiled_step_peak(step)
    return peak, steps * context * micro / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--model", choices=["tiny", "phi2"], default="phi2" if on_gpu else "tiny")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048] if on_gpu else [256, 512, 1024])
    parser.add_argument("--micro-batch", type=int, default=4 if not on_gpu else 2)
    parser.add_argument("--quantizations", nargs="+", default=["none", "4bit"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if on_gpu else "cpu")
    config = model_config(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
        for quantization in args.quantizations:
            for checkpointing in (False, True):
                for context in args.contexts:
                    spec = build_spec({"train": {"max_steps": 1, "micro_batch_size": args.micro_batch,
                                                 "gradient_checkpointing": checkpointing},
                                       "data": {"context_length": context}, "quantization": {"mode": quantization},
                                       "lora": {"r": 16, "dropout": 0.05}})
                    shape = hardware.model_shape(config, spec)
                    # as a run does
                    spec = hardware.resolve(spec, hardware.make_plan(spec, shape, hardware.current_device()))
                    setting = hardware.Setting(context, args.micro_batch, checkpointing, quantization)
                    predicted = hardware.estimate_memory(shape, setting, spec, hardware.mixed_precision(spec),
                                                         device.type)["total"]
                    measured, speed = measure(folder, spec, args.steps, device)
                    rows.append((quantization, checkpointing, context, predicted, measured, speed))
                    print(f"{quantization} checkpointing={checkpointing} context={context}: "
                          f"predicted {predicted / 2**20:.0f} MiB, "
                          f"measured {measured / 2**20:.0f} MiB ({100 * (predicted - measured) / measured:+.1f}%), "
                          f"{speed:,.0f} tokens/s",
                          file=sys.stderr, flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if on_gpu else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\n`{' '.join([Path(sys.executable).name, *sys.argv])}` on {time.strftime('%Y-%m-%d')}, {name}, "
          f"model {args.model}, micro-batch {args.micro_batch}, LoRA r 16 on all linear layers, dropout 0.05, "
          f"precision {hardware.mixed_precision(spec)}:\n")
    print("| quantization | gradient checkpointing | context | predicted peak | measured peak | error | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for quantization, checkpointing, context, predicted, measured, speed in rows:
        print(f"| {quantization} | {'on' if checkpointing else 'off'} | {context} | {predicted / 2**20:,.0f} MiB "
              f"| {measured / 2**20:,.0f} MiB "
              f"| {100 * (predicted - measured) / measured:+.1f}% | {speed:,.0f} |")
    errors = [abs(p - m) / m for _, _, _, p, m, _ in rows]
    print(f"\nlargest error {100 * max(errors):.1f}%, median {100 * sorted(errors)[len(errors) // 2]:.1f}%")


if __name__ == "__main__":
    main()

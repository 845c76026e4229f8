"""LoRA fine-tuning throughput of the job against the Hugging Face Trainer + PEFT recipe and a plain torch loop.

Every variant trains the same base model (a tiny 4-layer Llama with random weights on the CPU; on a CUDA machine a
Phi-2-shaped model in bf16) on the same files (those the job itself trains on: its own split of --corpus, by
default the installed peft package's source) with the same LoRA (rank r, alpha 2r, dropout 0.05, every linear
layer), micro-batch and learning rate, each in a fresh process, round-robin over the repeats so that a noisy
machine slows all alike:

  - trainer-naive: the common recipe, one example per file, truncated and padded to the context, Trainer + PEFT;
  - trainer-packed, trainer-packed-bf16: run_clm's packing (all files + eos concatenated, cut into blocks);
  - loop-compile-bf16, loop-compile-fp32, loop-eager-fp32: a plain torch loop over the same blocks with fused AdamW,
    with or without torch.compile and bf16 autocast: the ceiling of what a hand-written loop gets;
  - loop-eager-fp32-per-file: that loop over the job's own packing, where each file attends only to itself
    (position ids restarting at every file, no attention mask): what the per-file mask costs;
  - job, job-compile: `python -m job run` on a spec written here (job-compile adds train.compile: true).

Per optimizer step it takes the useful tokens (targets that are not padding) and the wall time from the end of the
previous step to the end of this one, skipping the warm-up steps. It reports the median per-step useful tokens/s
and the overall rate, the job's speed over each variant's, the share of the matmul limit (the measured fp32
torch.mm rate at the model's shapes over the training FLOPs per token; on CUDA also the model-FLOPs utilisation
against the bf16 rate), the share of the corpus a variant trains on in an epoch, the time from launching the
process to the end of its first step, and the process's peak resident memory (os.wait4's ru_maxrss).

    .venv/bin/python benchmarks/throughput.py [--quick] [--variants job,trainer-packed,...] [--model tiny|phi2]
        [--corpus DIR] [--context 256] [--micro-batch 4] [--rank 16] [--steps 20] [--repeats 3] [--json PATH]
        [--md PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

VARIANTS = ["trainer-naive", "trainer-packed", "trainer-packed-bf16", "loop-compile-bf16", "loop-compile-fp32",
            "loop-eager-fp32", "loop-eager-fp32-per-file", "job", "job-compile"]
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- the worker side

def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def train_texts(work: Path) -> list[str]:
    with (work / "split" / "train.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


def packed_blocks(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """run_clm's group_texts: every file's tokens and eos concatenated, cut into blocks, the remainder dropped."""
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    return [stream[i:i + context] for i in range(0, len(stream) - context + 1, context)]


def naive_examples(tokenizer, texts: list[str], context: int) -> list[dict]:
    examples = []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=context, padding="max_length")
        labels = [t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"], encoded["attention_mask"])]
        examples.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                         "labels": labels})
    return examples


def clock(device: torch.device) -> tuple[float, float]:
    """(perf_counter for durations, time.time for the launch-to-first-step figure) once the device is idle."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.time()


def step_record(stamps: list[tuple[float, float]], tokens: list[int], steps: int) -> dict:
    if len(stamps) < steps + 1 or len(tokens) < steps:
        raise RuntimeError(f"{len(stamps) - 1} optimizer steps recorded, {steps} expected")
    seconds = [stamps[i + 1][0] - stamps[i][0] for i in range(steps)]
    return {"tokens": tokens[:steps], "seconds": seconds, "first_step_end": stamps[1][1]}


def load_reference_model(args, variant: str):
    from transformers import AutoModelForCausalLM

    # As the job does (hardware.base_dtype), the frozen base is half width under bf16 on a GPU; on the CPU the bf16
    # variants autocast over fp32 weights, as the job would.
    dtype = torch.bfloat16 if variant.endswith("bf16") and torch.cuda.is_available() else torch.float32
    return AutoModelForCausalLM.from_pretrained(Path(args.work) / "model", dtype=dtype)


def run_trainer(args, variant: str) -> dict:
    from peft import get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    work, cuda = Path(args.work), torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    texts = train_texts(work)
    if variant == "trainer-naive":
        examples = naive_examples(tokenizer, texts, args.context)
    else:
        examples = [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)}
                    for b in packed_blocks(tokenizer, texts, args.context)]
    if not examples:
        raise RuntimeError(f"the train files make no example of {args.context} tokens")
    torch.manual_seed(0)
    peft_model = get_peft_model(load_reference_model(args, variant), lora_config(args.rank))

    useful: list[int] = []

    def collate(features):
        # With gradient accumulation 1, batch i is step i: the counts line up with the step stamps, even though
        # accelerate's loader fetches one batch ahead.
        batch = default_data_collator(features)
        useful.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return batch

    stamps: list[tuple[float, float]] = []

    class Stamps(TrainerCallback):  # the Trainer's only way in between steps
        def on_train_begin(self, *_, **__):
            stamps.append(clock(device))

        def on_step_end(self, *_, **__):
            stamps.append(clock(device))

    training_args = TrainingArguments(
        output_dir=str(work / f"out-{variant}-{args.repeat}"), per_device_train_batch_size=args.micro_batch,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, save_strategy="no", eval_strategy="no",
        report_to="none", logging_steps=10**6, disable_tqdm=True, use_cpu=not cuda, dataloader_num_workers=0, seed=0,
        bf16=variant.endswith("bf16"),
    )
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=examples, data_collator=collate,
                      callbacks=[Stamps()])
    trainer.train()
    return step_record(stamps, useful, args.warmup + args.steps)


def run_loop(args, variant: str) -> dict:
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import AutoTokenizer

    work = Path(args.work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    if variant.endswith("-per-file"):
        from job import data

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        packed = data.pack(data.encode(tokenizer, train_texts(work)), args.context, pad_id)
        blocks, positions, targets = packed.input_ids, packed.position_ids, packed.labels
    else:
        blocks = torch.tensor(packed_blocks(tokenizer, train_texts(work), args.context), dtype=torch.long)
        positions, targets = None, blocks
    if len(blocks) == 0:
        raise RuntimeError(f"the train files make no block of {args.context} tokens")
    torch.manual_seed(0)
    peft_model = get_peft_model(load_reference_model(args, variant), lora_config(args.rank)).to(device)
    peft_model.train()
    forward = torch.compile(peft_model) if "compile" in variant else peft_model
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.endswith("bf16"))
    total = args.warmup + args.steps
    generator = torch.Generator().manual_seed(0)
    epochs = -(-total * args.micro_batch // len(blocks))
    order = torch.cat([torch.randperm(len(blocks), generator=generator) for _ in range(epochs)])

    stamps, tokens = [clock(device)], []
    for step in range(total):
        rows = order[step * args.micro_batch:(step + 1) * args.micro_batch]
        batch, labels = blocks[rows].to(device), targets[rows].to(device)
        position_ids = positions[rows].to(device) if positions is not None else None
        with autocast:
            logits = forward(input_ids=batch, position_ids=position_ids, attention_mask=None, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(clock(device))
        tokens.append(int((labels[:, 1:] != IGNORE_INDEX).sum()))
    return step_record(stamps, tokens, total)


def matmul_rates(args) -> dict:
    """GFLOP/s of torch.mm at every linear shape of the model, forward (x W^T) and input gradient (g W)."""
    shapes = json.loads((Path(args.work) / "linears.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = args.micro_batch * args.context
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if device.type == "cuda" else {})}
    result = {}
    for name, dtype in dtypes.items():
        ops, flops, seconds = [], 0.0, 0.0
        for fan_in, fan_out, count in shapes:
            weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
            for label, left, right in (("forward", torch.randn(rows, fan_in, device=device, dtype=dtype), weight.t()),
                                       ("input gradient", torch.randn(rows, fan_out, device=device, dtype=dtype),
                                        weight)):
                once = best_mm_seconds(left, right, device)
                op_flops = 2 * rows * left.shape[1] * right.shape[1]
                ops.append({"shape": [rows, left.shape[1], right.shape[1]], "op": label, "count": count,
                            "gflop_per_s": op_flops / once / 1e9})
                flops += op_flops * count
                seconds += once * count
        # Weighted by how often each shape occurs in the model: the rate of the model's own mix of matmuls.
        result[name] = {"gflop_per_s": flops / seconds / 1e9, "ops": ops}
    return result


def best_mm_seconds(left: torch.Tensor, right: torch.Tensor, device: torch.device, repeats: int = 10) -> float:
    def timed(n: int) -> float:
        began = clock(device)[0]
        for _ in range(n):
            torch.mm(left, right)
        return clock(device)[0] - began

    timed(3)  # warm-up: thread pools, kernel selection
    # Many short timings rather than a few long ones: on a shared machine the best of them is the one that ran alone.
    calls = max(1, int(0.02 / max(timed(1), 1e-7)))
    return min(timed(calls) / calls for _ in range(repeats))


def worker(args) -> int:
    torch.set_num_threads(args.threads)
    # peft imports bitsandbytes whenever it is installed (about 4 s of kernel compiling at every start); the job
    # keeps it out too (job.model.leave_out_bitsandbytes), so start-up times compare recipes, not installed packages.
    sys.modules.setdefault("bitsandbytes", None)
    try:
        if args.worker == "matmul":
            result = matmul_rates(args)
        elif args.worker.startswith("trainer-"):
            result = run_trainer(args, args.worker)
        else:
            result = run_loop(args, args.worker)
    except Exception as err:  # noqa: BLE001 - a failing variant is a row of the table, not the end of the run
        traceback.print_exc()
        result = {"error": one_line(err)}
    Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# ---------------------------------------------------------------------------------------------- the parent side

@dataclass
class Setup:
    corpus: Path
    files: int
    corpus_tokens: int  # every train file's tokens + eos
    corpus_share: dict[str, float]  # per variant kind: tokens trained on in one epoch / corpus_tokens
    linears: list[list[int]]  # [fan_in, fan_out, count] of the model's linear layers
    flops_per_token: float
    flops_parts: dict[str, int]


@dataclass
class Launched:
    returncode: int
    launched_at: float
    wall_seconds: float  # launch to exit
    peak_rss_bytes: int
    log_tail: str


def job_spec(args, work: Path, variant: str, repeat: int) -> dict:
    train = {"max_steps": args.warmup + args.steps, "micro_batch_size": args.micro_batch, "cpu_threads": args.threads}
    if variant == "job-compile":
        train["compile"] = True
    # The job's default LoRA+ stays on: it is what a user of the job gets.
    return {
        "run": {"name": "bench", "output_dir": str(work / f"runs-{variant}-{repeat}")},
        "data": {"repo": str(args.corpus), "context_length": args.context},
        "model": {"path": str(work / "model")},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05, "target_modules": "all-linear"},
        "optim": {"lr": args.lr},
        "train": train,
        "eval": {"every_steps": 1_000_000, "samples": 0, "max_batches": 1},
        "checkpoint": {"every_steps": 1_000_000, "every_minutes": None},
        "log": {"every_steps": 1, "plots_every_minutes": 1000},
    }


def model_config(args, vocab_size: int):
    from transformers import LlamaConfig, PhiConfig

    if args.model == "phi2":
        # The tiny tokenizer's ids all fall inside Phi-2's vocabulary, so it serves unchanged.
        return PhiConfig(vocab_size=max(51200, vocab_size), hidden_size=2560, intermediate_size=10240,
                         num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                         partial_rotary_factor=0.4, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)


def prepare(args, work: Path) -> Setup:
    """The job's train files, a tokenizer trained on them and the base model, written once into work."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from job import data, model
    from job.spec import build_spec

    transformers_logging.disable_progress_bar()

    for stale in ("split", "model"):
        shutil.rmtree(work / stale, ignore_errors=True)
    spec = build_spec(job_spec(args, work, "job", 0))
    split, _ = data.build_split(spec.data, spec.run.seed, work / "split")
    texts = [f.text for f in split.train]
    tokenizer = model.train_tiny_tokenizer(texts, args.vocab_size)
    config = model_config(args, len(tokenizer))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    if args.model == "phi2":
        # Built where it will train and in bf16: 2.7B fp32 parameters on the CPU would take minutes to initialize.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        from transformers import LlamaForCausalLM

        base = LlamaForCausalLM(config)
    base.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")

    shapes: dict[tuple[int, int], int] = {}
    frozen = lora = 0
    for module in base.modules():
        if isinstance(module, torch.nn.Linear):
            shapes[(module.in_features, module.out_features)] = (
                shapes.get((module.in_features, module.out_features), 0) + 1)
            frozen += module.in_features * module.out_features
            if module is not base.get_output_embeddings():  # peft's all-linear leaves the output layer out
                lora += args.rank * (module.in_features + module.out_features)
    attention = config.num_hidden_layers * config.hidden_size * args.context
    del base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the workers need the GPU's memory; this process only waits for them from here on

    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    corpus_tokens = sum(n + 1 for n in lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = data.pack(data.encode(tokenizer, texts), args.context, pad_id)
    labels = packed.labels.flatten()
    # pack() pads only the tail, and the last real token (an eos) is always a target: what follows it is padding.
    job_tokens = int((labels != IGNORE_INDEX).nonzero().max()) + 1
    return Setup(
        corpus=args.corpus, files=len(texts), corpus_tokens=corpus_tokens,
        corpus_share={"naive": sum(min(n, args.context) for n in lengths) / corpus_tokens,
                      "packed": corpus_tokens // args.context * args.context / corpus_tokens,
                      "job": job_tokens / corpus_tokens},
        linears=[[i, o, c] for (i, o), c in shapes.items()],
        flops_per_token=4 * frozen + 6 * lora + 12 * attention,
        flops_parts={"frozen_linear_weights": frozen, "lora_weights": lora, "layers_x_hidden_x_context": attention},
    )


def corpus_share(setup: Setup, variant: str) -> float:
    if variant == "trainer-naive":
        return setup.corpus_share["naive"]
    return setup.corpus_share["job" if variant.startswith("job") or variant.endswith("-per-file") else "packed"]


def launch(command: list[str], log_path: Path, env: dict, timeout: float) -> Launched:
    """Run a process to its end; its own peak resident memory from os.wait4
    (RUSAGE_CHILDREN is a max over all children)."""
    with log_path.open("w") as log:
        launched_at = time.time()
        process = subprocess.Popen(command, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline, killed = time.monotonic() + timeout, False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                killed = True
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.1)
    # Reaped here, so Popen must not try to reap it again.
    process.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace")[-20_000:]
    if killed:
        tail += f"\nerror: killed after {timeout:.0f} s (--timeout)"
    return Launched(process.returncode, launched_at, time.time() - launched_at, usage.ru_maxrss * 1024, tail)


def last_error(log_tail: str, returncode: int) -> str:
    """The one line that says why a process failed: the CLI's `error:` line, a logged error, or the last line."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()[:300]
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("level") in ("error", "critical"):
                return " ".join(str(record.get(k, "")) for k in ("event", "error") if record.get(k))[:300]
    return (lines[-1] if lines else f"exit code {returncode}")[:300]


def environment(work: Path, run: str) -> dict:
    # A compile cache of its own per run: every repeat compiles from cold, as the first run on a machine does.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
            "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor" / run)}


def worker_command(args, work: Path, variant: str, repeat: int, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--result", str(result),
            "--work", str(work), "--model", args.model, "--context", str(args.context),
            "--micro-batch", str(args.micro_batch), "--rank", str(args.rank), "--lr", str(args.lr),
            "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--repeat", str(repeat)]


def run_reference(args, work: Path, variant: str, repeat: int) -> dict:
    result_path = work / "results" / f"{variant}-{repeat}.json"
    result_path.unlink(missing_ok=True)
    launched = launch(worker_command(args, work, variant, repeat, result_path),
                      work / "logs" / f"{variant}-{repeat}.log",
                      environment(work, f"{variant}-{repeat}"), args.timeout)
    result = (json.loads(result_path.read_text()) if result_path.is_file()
              else {"error": last_error(launched.log_tail, launched.returncode)})
    return finish(result, launched, args.warmup)


def run_job(args, work: Path, variant: str, repeat: int) -> dict:
    import yaml

    from job.spec import SpecError, build_spec

    raw = job_spec(args, work, variant, repeat)
    spec_path = work / f"{variant}-{repeat}.yaml"
    try:
        # The CLI's own validation: a field this version of the job does not know is reported without a start.
        build_spec(raw, source=str(spec_path))
    except SpecError as err:
        return {"error": err.problems[0]}
    shutil.rmtree(work / f"runs-{variant}-{repeat}", ignore_errors=True)  # else the job says it is already complete
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    launched = launch([sys.executable, "-m", "job", "run", "--spec", str(spec_path)],
                      work / "logs" / f"{variant}-{repeat}.log",
                      environment(work, f"{variant}-{repeat}"), args.timeout)
    if launched.returncode != 0:
        return finish({"error": last_error(launched.log_tail, launched.returncode)}, launched, args.warmup)
    metrics = work / f"runs-{variant}-{repeat}" / "bench" / "metrics.jsonl"
    records = {}
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if record.get("split") == "train":
            records[record["step"]] = record
    train = [records[step] for step in sorted(records)]
    if len(train) < args.warmup + args.steps:
        return finish({"error": f"{len(train)} train records in {metrics}, {args.warmup + args.steps} expected"},
                      launched, args.warmup)
    # The same clock as the other variants: from the end of the previous step (its record's time) to the end of
    # this one, which includes what the job does between steps. The first step has no previous record; its own
    # window (tokens / tokens_per_s) stands in, and it is a warm-up step anyway unless --warmup 0.
    seconds = ([train[0]["tokens"] / train[0]["tokens_per_s"]]
               + [b["time"] - a["time"] for a, b in zip(train, train[1:])])
    result = {"tokens": [r["tokens"] for r in train], "seconds": seconds, "first_step_end": train[0]["time"],
              "job_reported_median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[args.warmup:])}
    return finish(result, launched, args.warmup)


def finish(result: dict, launched: Launched, warmup: int) -> dict:
    """A repeat's figures from its steps: the timed ones only, after the warm-up."""
    result = {**result, "returncode": launched.returncode, "process_seconds": launched.wall_seconds,
              "peak_rss_bytes": launched.peak_rss_bytes}
    if "error" in result:
        return result
    tokens, seconds = result["tokens"][warmup:], result["seconds"][warmup:]
    rates = [t / s for t, s in zip(tokens, seconds) if s > 0]
    if not rates:
        return {**result, "error": "no timed step (raise --steps)"}
    result.update(median_tokens_per_s=statistics.median(rates), overall_tokens_per_s=sum(tokens) / sum(seconds),
                  timed_tokens=sum(tokens), timed_seconds=sum(seconds),
                  time_to_first_step_s=result["first_step_end"] - launched.launched_at)
    return result


def summarize(variant: str, repeats: list[dict], setup: Setup, limit: float, bf16_rate: float | None) -> dict:
    done = [r for r in repeats if "error" not in r]
    summary = {"repeats": repeats, "corpus_share": corpus_share(setup, variant),
               "errors": [r["error"] for r in repeats if "error" in r]}
    if not done:
        return {**summary, "error": summary["errors"][0]}
    medians = [r["median_tokens_per_s"] for r in done]
    summary.update(
        median_tokens_per_s=statistics.median(medians), min_tokens_per_s=min(medians), max_tokens_per_s=max(medians),
        overall_tokens_per_s=sum(r["timed_tokens"] for r in done) / sum(r["timed_seconds"] for r in done),
        time_to_first_step_s=statistics.median(r["time_to_first_step_s"] for r in done),
        peak_rss_mib=statistics.median(r["peak_rss_bytes"] for r in done) / 2**20,
        limit_share=statistics.median(medians) / limit if limit else None,
    )
    if bf16_rate:
        summary["mfu"] = summary["median_tokens_per_s"] * setup.flops_per_token / (bf16_rate * 1e9)
    return summary


def machine() -> str:
    from job.hardware import usable_cores

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu}, {usable_cores()} cores"


def command_line() -> str:
    python = Path(sys.executable)
    shown = os.path.relpath(python, PROJECT) if python.is_relative_to(PROJECT) else str(python)
    return shlex.join([shown, "benchmarks/throughput.py", *sys.argv[1:]])


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: dict) -> str:
    variants, cuda = report["variants"], report["cuda"]
    job = variants.get("job", {}).get("median_tokens_per_s")
    s = report["settings"]
    lines = [f"Model {s['model']}, context {s['context']}, micro-batch {s['micro_batch']}, LoRA r {s['rank']} "
             f"(alpha {2 * s['rank']}, "
             f"dropout 0.05, all linear layers), lr {s['lr']}, torch threads {s['threads']}, "
             f"{s['warmup']} warm-up + {s['steps']} timed steps, "
             f"{s['repeats']} repeat(s); {report['corpus']['files']} train files of {report['corpus']['path']}, "
             f"{report['corpus']['tokens']:,} tokens.", "",
             "| variant | useful tokens/s, median [min–max over repeats] | overall tokens/s | job ÷ variant "
             "| share of matmul limit "
             f"| corpus share per epoch | time to first step | peak RSS |{' MFU (bf16) |' if cuda else ''}",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else "")]
    for name, v in variants.items():
        if "error" in v:
            lines.append(f"| {name} | failed: {cell(v['error'])} | | | | {v['corpus_share']:.1%} | | |"
                         + (" |" if cuda else ""))
            continue
        spread = f" [{v['min_tokens_per_s']:,.0f}–{v['max_tokens_per_s']:,.0f}]" if len(v["repeats"]) > 1 else ""
        failed = f" ({len(v['errors'])} failed: {cell(v['errors'][0])})" if v["errors"] else ""
        ratio = f"{job / v['median_tokens_per_s']:.2f}×" if job else "—"
        lines.append(f"| {name} | {v['median_tokens_per_s']:,.0f}{spread}{failed} | {v['overall_tokens_per_s']:,.0f} "
                     f"| {ratio} "
                     f"| {v['limit_share']:.1%} | {v['corpus_share']:.1%} | {v['time_to_first_step_s']:.1f} s "
                     f"| {v['peak_rss_mib']:,.0f} MiB |"
                     + (f" {v['mfu']:.1%} |" if cuda else ""))
    m, parts = report["matmul"], report["flops_parts"]
    if "error" in m:
        lines += ["", f"matmul limit: failed: {m['error']}"]
    else:
        lines += ["", f"Matmul limit: {m['fp32']['gflop_per_s']:,.1f} GFLOP/s fp32 "
                      f"(torch.mm at the model's linear shapes, "
                      f"torch threads {s['threads']}) ÷ {report['flops_per_token'] / 1e6:,.1f} MFLOP a token "
                      f"(4 × {parts['frozen_linear_weights']:,} frozen linear weights "
                      f"+ 6 × {parts['lora_weights']:,} LoRA weights + 12 × {parts['layers_x_hidden_x_context']:,} "
                      f"layers × hidden × context) = {report['limit_tokens_per_s']:,.0f} tokens/s."
                      + (f" bf16 matmul rate {m['bf16']['gflop_per_s']:,.1f} GFLOP/s." if "bf16" in m else "")]
    lines += ["", f"`{report['command']}` on {report['date']}, {report['machine']}, torch threads {s['threads']}, "
                  f"torch {report['torch']}"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--model", choices=["tiny", "phi2"], default=None, help="default: phi2 on CUDA, tiny elsewhere")
    parser.add_argument("--corpus", type=Path, default=None, help="default: the installed peft package's source")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the model, logs and run folders here (default: a temporary folder)")
    parser.add_argument("--context", type=int, default=None, help="default: 2048 for phi2, 256 for tiny")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every variant (default: the usable cores)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3, --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, --quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3, --quick 1")
    parser.add_argument("--quick", action="store_true", help="1 warm-up step, 3 timed steps, 1 repeat")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one variant's process may run")
    parser.add_argument("--json", type=Path, default=None, help="write every number, per repeat too, here")
    parser.add_argument("--md", type=Path, default=None, help="write the table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("phi2" if torch.cuda.is_available() else "tiny")
    args.context = args.context or (2048 if args.model == "phi2" else 256)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.threads is None:
        from job.hardware import usable_cores

        args.threads = usable_cores()
    if args.corpus is None:
        args.corpus = Path(importlib.util.find_spec("peft").submodule_search_locations[0])
    args.corpus = args.corpus.resolve()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown and not args.worker:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    temporary = None if args.work else tempfile.TemporaryDirectory(prefix="job-throughput-")
    work = (args.work or Path(temporary.name)).resolve()
    try:
        for folder in ("results", "logs"):
            (work / folder).mkdir(parents=True, exist_ok=True)
        began = time.time()
        setup = prepare(args, work)
        (work / "linears.json").write_text(json.dumps(setup.linears))
        print(f"setup: {setup.files} train files, {setup.corpus_tokens:,} tokens, {time.time() - began:.1f} s",
              file=sys.stderr, flush=True)

        launched = launch(worker_command(args, work, "matmul", 0, work / "results" / "matmul.json"),
                          work / "logs" / "matmul.log",
                          environment(work, "matmul"), args.timeout)
        matmul_path = work / "results" / "matmul.json"
        matmul = (json.loads(matmul_path.read_text()) if matmul_path.is_file()
                  else {"error": last_error(launched.log_tail, launched.returncode)})
        limit = matmul["fp32"]["gflop_per_s"] * 1e9 / setup.flops_per_token if "fp32" in matmul else 0.0
        print(f"matmul: {matmul.get('fp32', {}).get('gflop_per_s', 0):,.1f} GFLOP/s fp32, limit {limit:,.0f} tokens/s",
              file=sys.stderr, flush=True)

        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for repeat in range(1, args.repeats + 1):
            for variant in args.variants:
                run = run_job if variant.startswith("job") else run_reference
                result = {**run(args, work, variant, repeat), "repeat": repeat}
                runs[variant].append(result)
                said = (f"failed: {result['error']}" if "error" in result else
                        f"{result['median_tokens_per_s']:,.0f} tokens/s (median), "
                        f"first step after {result['time_to_first_step_s']:.1f} s, "
                        f"peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB, "
                        f"process {result['process_seconds']:.1f} s")
                print(f"repeat {repeat} {variant}: {said}", file=sys.stderr, flush=True)
    finally:
        if temporary is not None:
            temporary.cleanup()

    bf16_rate = matmul.get("bf16", {}).get("gflop_per_s")
    variants = {v: summarize(v, runs[v], setup, limit, bf16_rate) for v in args.variants}
    job = variants.get("job", {}).get("median_tokens_per_s")
    for v in variants.values():
        if job and v.get("median_tokens_per_s"):
            v["job_ratio"] = job / v["median_tokens_per_s"]
    report = {
        "command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "settings": {k: getattr(args, k) for k in ("model", "context", "micro_batch", "rank", "lr", "threads",
                                                   "vocab_size", "warmup", "steps", "repeats")},
        "corpus": {"path": str(setup.corpus), "files": setup.files, "tokens": setup.corpus_tokens,
                   "share_per_epoch": setup.corpus_share},
        "flops_per_token": setup.flops_per_token, "flops_parts": setup.flops_parts, "matmul": matmul,
        "limit_tokens_per_s": limit,
        "variants": variants,
    }
    table = markdown(report)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

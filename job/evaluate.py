"""Validation: token-weighted loss and perplexity, and sample completions of validation code with a syntax verdict."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from job import syntax
from job.data import IGNORE_INDEX, Packed, SourceFile

FILE_START_LINES = 8  # a file without a function to complete is prompted with (at most) its first lines


def loss_sum(model, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
             fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy and the number of target tokens.

    attention_mask=None with restarting position_ids is what makes transformers mask each packed file on its own;
    use_cache=False because a cache silently turns that detection off. fused: a model patched by Liger Kernel
    (train.liger) computes the loss chunk by chunk without the logits; num_items_in_batch=1 makes its mean a sum.
    """
    targets = labels[:, 1:]
    if fused:
        out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False, labels=labels,
                    num_items_in_batch=1, skip_logits=True, return_dict=True)
        return out.loss, (targets != IGNORE_INDEX).sum()
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False).logits
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (targets != IGNORE_INDEX).sum()


@torch.no_grad()
def validate(model, packed: Packed, batch_size: int, max_batches: int | None, device, rank: int = 0, world: int = 1,
             reduce=None) -> dict:
    """Validation loss as total loss over total tokens (not a mean of batch means), and its perplexity."""
    was_training = model.training
    model.eval()
    starts = list(range(0, len(packed), batch_size))
    if max_batches is not None and len(starts) > max_batches:
        # Spread over every validation file (packed in path order), not the first files only: the figure must not
        # hinge on which file happens to sort first.
        starts = [starts[i * len(starts) // max_batches] for i in range(max_batches)]
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in starts[rank::world]:
        rows = slice(start, start + batch_size)
        batch_loss, batch_tokens = loss_sum(
            model, packed.input_ids[rows].to(device), packed.position_ids[rows].to(device),
            packed.labels[rows].to(device)
        )
        total += batch_loss.double()
        tokens += batch_tokens.double()
    if reduce is not None:
        total, tokens = reduce(total), reduce(tokens)
    model.train(was_training)
    loss = (total / tokens.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens.item())}


# Sample completions -----------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A natural point in a validation file: the model reads text[context_start:prompt_end] and continues it."""

    file: SourceFile
    kind: str  # "function": complete a function's body; "file_start": continue a file's first lines
    context_start: int  # a line start at or before the header: the file's text above it, as much as fits
    header_start: int
    prompt_end: int
    end: int  # where the original construct ends; a completion replaces text[prompt_end:end] for the syntax check

    @property
    def header(self) -> str:
        return self.file.text[self.header_start:self.prompt_end]


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def choose_prompts(files: list[SourceFile], count: int, seed: int, tokenizer, context_length: int,
                   max_new_tokens: int) -> list[Prompt]:
    """The same `count` prompts for every evaluation of a run: functions whose real body fits the token budget,
    one file at a time in a seeded order, then file starts if the validation files hold too few functions."""
    if count == 0:
        return []
    rng = random.Random(seed)
    order = sorted(files, key=lambda f: f.path)
    rng.shuffle(order)
    room = context_length - max_new_tokens - 1  # tokens of model input, less the beginning-of-sequence token
    candidates = []
    for source in order:
        fitting = [c for c in syntax.functions(source.language, source.text)
                   if _token_count(tokenizer, source.text[c.header_end:c.end]) <= max_new_tokens
                   and _token_count(tokenizer, source.text[c.start:c.header_end]) <= room]
        rng.shuffle(fitting)
        candidates.append(fitting)
    chosen: list[Prompt] = []
    while len(chosen) < count and any(candidates):
        for source, fitting in zip(order, candidates):
            if fitting and len(chosen) < count:
                c = fitting.pop()
                start = _widest_context(tokenizer, source.text, c.start, c.header_end, room)
                chosen.append(Prompt(source, "function", start, c.start, c.header_end, c.end))
    for source in order:
        if len(chosen) >= count:
            break
        if any(p.file is source for p in chosen):
            continue
        lines = syntax.lines_of(source.text)[:FILE_START_LINES]
        while lines and _token_count(tokenizer, "".join(lines)) > room:
            lines.pop()
        if lines:
            end = len("".join(lines).rstrip("\r\n"))  # the last newline is left to the model, as for a function
            chosen.append(Prompt(source, "file_start", 0, 0, end, len(source.text)))
    return chosen


def _widest_context(tokenizer, text: str, header_start: int, prompt_end: int, room: int) -> int:
    """The earliest line start whose text up to prompt_end still fits in room tokens (binary search: counts grow)."""
    starts = [0] + [i + 1 for i, ch in enumerate(text[:header_start]) if ch == "\n"]
    low, high = 0, len(starts) - 1  # starts[-1] is header_start, which fits
    while low < high:
        middle = (low + high) // 2
        if _token_count(tokenizer, text[starts[middle]:prompt_end]) <= room:
            high = middle
        else:
            low = middle + 1
    return starts[low]


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, temperature: float, top_p: float,
                     seed: int, step: int, device) -> list[dict]:
    """Complete every prompt (one left-padded batch), cut each completion where its construct ends, check it parses.

    Evaluation must never change training: the model is put back in its mode, and sampling draws from a
    generator forked from (and then restored to) the training one, seeded by the step alone.
    """
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != eos else None
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt.file.text[prompt.context_start:prompt.prompt_end], add_special_tokens=False)
        # a file start, as trained
        encoded.append(([bos] if prompt.context_start == 0 and bos is not None else []) + ids)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)

    def completion_of(row: int, new_ids: list[int]) -> tuple[str, int | None, bool]:
        hit_eos = eos in new_ids
        text = tokenizer.decode(new_ids[:new_ids.index(eos)] if hit_eos else new_ids)
        prompt = prompts[row]
        cut = syntax.completion_end(prompt.file.language, prompt.header, text) if prompt.kind == "function" else None
        return text, cut, hit_eos

    class ConstructEnded(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            done = [completion_of(row, ids[row, width:].tolist())[1] is not None for row in range(ids.shape[0])]
            return torch.tensor(done, dtype=torch.bool, device=ids.device)

    was_training = model.training
    model.eval()
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                else {"do_sample": False})
    begin = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + step)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                stopping_criteria=StoppingCriteriaList([ConstructEnded()]), pad_token_id=pad,
                                eos_token_id=eos, **sampling)
    model.train(was_training)
    seconds = round(time.perf_counter() - begin, 4)
    records = []
    for row, prompt in enumerate(prompts):
        new_ids = output[row, width:].tolist()
        completion, cut, hit_eos = completion_of(row, new_ids)
        ended = "construct" if cut is not None else ("end_of_text" if hit_eos else "token_budget")
        if cut is not None:
            completion = completion[:cut]
        elif ended == "token_budget" and prompt.kind == "file_start":
            completion = completion[:completion.rfind("\n") + 1]  # a file start goes on: keep its whole lines
        verdict, problem = _verdict(prompt, completion, ended, max_new_tokens)
        records.append({
            "index": row,
            "path": prompt.file.path,
            "language": prompt.file.language,
            "kind": prompt.kind,
            "prompt": prompt.header,
            "completion": completion,
            "ended": ended,
            "new_tokens": len(new_ids[:new_ids.index(eos)] if eos in new_ids else new_ids),
            "verdict": verdict,
            "error": problem or None,
            "seconds": seconds,  # of the whole batch
        })
    return records


def _verdict(prompt: Prompt, completion: str, ended: str, max_new_tokens: int) -> tuple[str, str]:
    if prompt.kind == "function" and ended == "token_budget":
        # Prompts are functions whose real body fits the budget: one still open at its end is not a success,
        # even where the truncated text happens to parse.
        return "unfinished", f"the function did not end within {max_new_tokens} new tokens"
    ok, problem = check_sample(prompt, completion)
    return {True: "parses", False: "syntax_error", None: "unsupported"}[ok], problem


def check_sample(prompt: Prompt, completion: str) -> tuple[bool | None, str]:
    """Does the file parse with the completion in place of the original text? None: no checker for the language."""
    text = prompt.file.text
    if prompt.kind == "file_start":
        return syntax.parses(prompt.file.language, text[:prompt.prompt_end] + completion)
    if prompt.file.language == "python" and not completion.endswith("\n"):
        completion += "\n"  # the file's next line must not be glued to a completion that stopped mid-line
    return syntax.parses(prompt.file.language, text[:prompt.prompt_end] + completion + text[prompt.end:])


def syntax_rate(records: list[dict]) -> tuple[float | None, int]:
    """Share of samples in a supported language that parse (unfinished functions count as failing), and how
    many samples that share is of."""
    checked = [r for r in records if r["verdict"] != "unsupported"]
    if not checked:
        return None, 0
    return sum(r["verdict"] == "parses" for r in checked) / len(checked), len(checked)

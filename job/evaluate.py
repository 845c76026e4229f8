"""Validation: token-weighted loss and perplexity, and sample completions of validation code with a syntax verdict."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from job import syntax
from job.data import IGNORE_INDEX, FileHeaders, Fim, Packed, SourceFile, begin_tokens, encode_texts

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
             reduce=None, lockstep: bool = False) -> dict:
    """Validation loss as total loss over total tokens (not a mean of batch means), and its perplexity. lockstep:
    every process runs as many forward passes (a sharded model's pass is one of all of them); the extra ones count
    nothing."""
    was_training = model.training
    model.eval()
    starts = list(range(0, len(packed), batch_size))
    if max_batches is not None and len(starts) > max_batches:
        # Spread over every validation file (packed in path order), not the first files only: the figure must not
        # hinge on which file happens to sort first.
        starts = [starts[i * len(starts) // max_batches] for i in range(max_batches)]
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    mine = starts[rank::world]
    passes = -(-len(starts) // world) if lockstep else len(mine)
    for index in range(passes):
        counted = index < len(mine)
        rows = slice(mine[index] if counted else 0, (mine[index] if counted else 0) + batch_size)
        batch_loss, batch_tokens = loss_sum(
            model, packed.input_ids[rows].to(device), packed.position_ids[rows].to(device),
            packed.labels[rows].to(device)
        )
        if counted:
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
    return len(code_tokens(tokenizer, text))


def code_tokens(tokenizer, text: str) -> list[int]:
    """The tokens of code as training encodes it: a special token written in it is its characters."""
    return encode_texts(tokenizer, [text])[0][0]


def header_tokens(tokenizer, header: str) -> list[int]:
    return encode_texts(tokenizer, [header], as_text=False)[0][0] if header else []


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
    chosen = [Prompt(source, "function", _widest_context(tokenizer, source.text, c.start, c.header_end, room),
                     c.start, c.header_end, c.end) for source, c in _in_turn(order, candidates, count)]
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


def _in_turn(sources: list[SourceFile], candidates: list[list], count: int) -> list[tuple[SourceFile, object]]:
    """Up to count picks, one file at a time in order, each the last of that file's (shuffled) candidates."""
    picked = []
    while len(picked) < count and any(candidates):
        for source, fitting in zip(sources, candidates):
            if fitting and len(picked) < count:
                picked.append((source, fitting.pop()))
    return picked


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


def prompt_context(context_length: int, tokenizer, files: list[SourceFile], headers: FileHeaders | None) -> int:
    """The context a prompt's text may fill: a prompt from a file's start carries its header, so the longest is
    kept clear."""
    if headers is None:
        return context_length
    return context_length - max((len(header_tokens(tokenizer, headers.of(f.path))) for f in files), default=0)


def file_prompt(tokenizer, file: SourceFile, start: int, end: int, headers: FileHeaders | None) -> list[int]:
    """The tokens of file.text[start:end]; from the file's start, with the beginning and the header it was trained
    with."""
    if start > 0:
        return code_tokens(tokenizer, file.text[start:end])
    header = header_tokens(tokenizer, headers.of(file.path)) if headers else []
    return begin_tokens(tokenizer) + header + code_tokens(tokenizer, file.text[:end])


def left_padded(encoded: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch for generate(): padded on the left, with the attention mask."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return input_ids, attention_mask


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, temperature: float, top_p: float,
                     seed: int, step: int, device, headers: FileHeaders | None = None) -> list[dict]:
    """Complete every prompt (one left-padded batch), cut each completion where its construct ends, check it parses.

    Evaluation must never change training: the model is put back in its mode, and sampling draws from a
    generator forked from (and then restored to) the training one, seeded by the step alone.
    """
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [file_prompt(tokenizer, prompt.file, prompt.context_start, prompt.prompt_end, headers)
               for prompt in prompts]
    input_ids, attention_mask = left_padded(encoded, pad, device)
    width = input_ids.shape[1]

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


# Completion accuracy -------------------------------------------------------------------------------------------
# As the repository-level benchmarks measure it (RepoBench, CrossCodeEval, RepoEval): exact match of a whitespace-
# normalized line, edit similarity, and identifier F1.


def normalized(code: str) -> str:
    return " ".join(code.split())


def edit_similarity(prediction: str, reference: str) -> float:
    """1 - Levenshtein distance / the longer length, of the two stripped texts (1.0: equal)."""
    a, b = prediction.strip(), reference.strip()
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def levenshtein(a: str, b: str) -> int:
    """Edit distance by Myers' bit-parallel algorithm (Hyyrö's form), a column of a's length in one Python integer:
    a sample of a few hundred characters takes well under a millisecond where the table would take tens."""
    if not a or not b:
        return len(a) + len(b)
    positions: dict[str, int] = {}
    for i, char in enumerate(a):
        positions[char] = positions.get(char, 0) | 1 << i
    mask, last = (1 << len(a)) - 1, 1 << (len(a) - 1)
    plus, minus, distance = mask, 0, len(a)  # vertical +1 and -1 deltas of the current column
    for char in b:
        equal = positions.get(char, 0)
        vertical = equal | minus
        horizontal = (((equal & plus) + plus) ^ plus) | equal
        h_plus, h_minus = minus | ~(horizontal | plus), plus & horizontal
        distance += 1 if h_plus & last else -1 if h_minus & last else 0
        h_plus, h_minus = (h_plus << 1) | 1, h_minus << 1
        plus, minus = (h_minus | ~(vertical | h_plus)) & mask, h_plus & vertical & mask
    return distance


def identifier_f1(predicted: list[str], reference: list[str]) -> float:
    """F1 of the identifiers written against the real ones, counted with repeats (1.0 when both have none)."""
    if not predicted and not reference:
        return 1.0
    common = sum((Counter(predicted) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def body_scores(sample: dict, prompt: Prompt) -> dict:
    """A function sample's body against the real one: edit similarity and identifier F1 (None for a file start,
    or identifiers in a language without a parser)."""
    if prompt.kind != "function":
        return {"edit_sim": None, "identifier_f1": None}
    real = prompt.file.text[prompt.prompt_end:prompt.end]
    written, expected = (syntax.identifiers(prompt.file.language, code) for code in (sample["completion"], real))
    return {"edit_sim": round(edit_similarity(sample["completion"], real), 4),
            "identifier_f1": None if expected is None else round(identifier_f1(written, expected), 4)}


@dataclass
class LineTask:
    """Next-line completion: the model reads the file up to the end of the line above (text[context_start:
    line_start - 1], without its newline, which is left to the model as for a function) and writes the next line."""

    file: SourceFile
    context_start: int
    line_start: int
    line_end: int  # without the newline

    @property
    def prompt(self) -> str:
        return self.file.text[self.context_start:self.line_start - 1]

    @property
    def target(self) -> str:
        return self.file.text[self.line_start:self.line_end]


def choose_next_lines(files: list[SourceFile], count: int, seed: int, tokenizer, context_length: int,
                      max_new_tokens: int) -> list[LineTask]:
    """The same `count` lines for every evaluation of a run: lines of at least 4 non-blank characters (not a file's
    first) that fit the token budget, one file at a time in a seeded order, each with as much of the file above it
    as fits the context."""
    if count == 0:
        return []
    rng = random.Random(seed * 1_000_003 + 1)  # a stream of its own: the sample prompts use random.Random(seed)
    order = sorted(files, key=lambda f: f.path)
    rng.shuffle(order)
    room = context_length - max_new_tokens - 1
    candidates = []
    for source in order:
        lines = syntax.lines_of(source.text)
        starts = syntax.line_starts(lines)
        # A line whose line above fits the room: the prompt holds at least that one.
        fitting = [(starts[i], starts[i] + len(line.rstrip("\r\n"))) for i, line in enumerate(lines)
                   if i > 0 and len(line.strip()) >= 4 and _token_count(tokenizer, line) < max_new_tokens
                   and _token_count(tokenizer, lines[i - 1]) <= room]
        rng.shuffle(fitting)
        candidates.append(fitting)
    chosen = []
    for source, (start, end) in _in_turn(order, candidates, count):
        above = source.text.rfind("\n", 0, start - 1) + 1
        chosen.append(LineTask(source, _widest_context(tokenizer, source.text, above, start - 1, room), start, end))
    return chosen


@torch.no_grad()
def complete_lines(model, tokenizer, tasks: list[LineTask], max_new_tokens: int, device,
                   headers: FileHeaders | None = None) -> list[dict]:
    """Greedily write the next line of every task (one left-padded batch, stopped once every row has a newline),
    and score it: exact match after whitespace normalization, and edit similarity."""
    if not tasks:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [file_prompt(tokenizer, task.file, task.context_start, task.line_start - 1, headers) for task in tasks]
    input_ids, attention_mask = left_padded(encoded, pad, device)
    width = input_ids.shape[1]

    def line_of(new_ids: list[int]) -> tuple[str, bool]:
        """The line written after the newline that ends the line above, and whether it has ended."""
        text = tokenizer.decode(new_ids)
        text = text[1:] if text.startswith("\n") else text
        return text.split("\n", 1)[0], "\n" in text

    class LineEnded(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            return torch.tensor([line_of(row[width:])[1] for row in ids.tolist()], dtype=torch.bool,
                                device=ids.device)

    was_training = model.training
    model.eval()
    begin = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, stopping_criteria=StoppingCriteriaList([LineEnded()]),
                            pad_token_id=pad, eos_token_id=eos)
    model.train(was_training)
    seconds = round(time.perf_counter() - begin, 4)
    records = []
    for row, task in enumerate(tasks):
        new_ids = output[row, width:].tolist()
        written = new_ids[:new_ids.index(eos)] if eos in new_ids else new_ids
        line, ended = line_of(written)
        exact = normalized(line) == normalized(task.target)
        records.append({
            "index": row, "path": task.file.path, "language": task.file.language, "kind": "next_line",
            "prompt": task.prompt.rsplit("\n", 1)[-1], "completion": line,
            "ended": "line_end" if ended else "end_of_text" if eos in new_ids else "token_budget",
            "new_tokens": len(written), "verdict": "exact" if exact else "differs", "error": None,
            "seconds": seconds, "target": task.target, "edit_sim": round(edit_similarity(line, task.target), 4),
        })
    return records


@dataclass
class InfillTask:
    """Fill-in-the-middle: the model reads the prefix text[context_start:middle_start] and the suffix text[middle_end:
    context_end] in its FIM format and writes the middle: one whole line held out with the line break before it,
    the break after it left to the suffix (a tokenizer joins a break to the indentation after it, so the cuts fall
    where the next-line tasks' do)."""

    file: SourceFile
    context_start: int
    middle_start: int
    middle_end: int
    context_end: int

    @property
    def target(self) -> str:
        return self.file.text[self.middle_start:self.middle_end]

    @property
    def suffix(self) -> str:
        return self.file.text[self.middle_end:self.context_end]


def choose_infills(files: list[SourceFile], count: int, seed: int, tokenizer, context_length: int,
                   max_new_tokens: int) -> list[InfillTask]:
    """The same `count` held-out lines for every evaluation of a run (as choose_next_lines picks them), each between
    as much of the file above as fits three quarters of the room (the line above at least) and as much below as
    fits the rest."""
    if count == 0:
        return []
    rng = random.Random(seed * 1_000_003 + 2)  # a stream of its own, apart from the samples' and the next lines'
    order = sorted(files, key=lambda f: f.path)
    rng.shuffle(order)
    room = context_length - max_new_tokens - 4  # less the beginning-of-sequence token and the three FIM tokens
    above_room = room * 3 // 4
    candidates = []
    for source in order:
        lines = syntax.lines_of(source.text)
        starts = syntax.line_starts(lines)
        fitting = [(starts[i - 1], starts[i] - 1, starts[i + 1] - 1) for i, line in enumerate(lines)
                   if 0 < i < len(lines) - 1 and len(line.strip()) >= 4
                   and _token_count(tokenizer, line) < max_new_tokens
                   and _token_count(tokenizer, lines[i - 1]) <= above_room]
        rng.shuffle(fitting)
        candidates.append(fitting)
    chosen = []
    for source, (above, start, end) in _in_turn(order, candidates, count):
        context_start = _widest_context(tokenizer, source.text, above, start, above_room)
        used = _token_count(tokenizer, source.text[context_start:start])
        context_end = _deepest_context(tokenizer, source.text, end, room - used)
        chosen.append(InfillTask(source, context_start, start, end, context_end))
    return chosen


def _deepest_context(tokenizer, text: str, begin: int, room: int) -> int:
    """The latest line end after begin whose text from begin still fits in room tokens (at least begin)."""
    ends = [begin] + [i + 1 for i, ch in enumerate(text[begin:], begin) if ch == "\n"] + [len(text)]
    low, high = 0, len(ends) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if _token_count(tokenizer, text[begin:ends[middle]]) <= room:
            low = middle
        else:
            high = middle - 1
    return ends[low]


@torch.no_grad()
def complete_infills(model, tokenizer, tasks: list[InfillTask], fim: Fim, max_new_tokens: int, device,
                     headers: FileHeaders | None = None) -> list[dict]:
    """Greedily write the middle of every task (one left-padded batch) until the end-of-sequence token, and score
    the whole middle written, and the middle trimmed as an editor shows it: exact match after whitespace
    normalization, and edit similarity."""
    if not tasks:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = []
    for task in tasks:
        text = task.file.text
        # As training puts a file's start: its bos and its header (file_prompt's, of no code), then the FIM tokens
        # around the code.
        lead = file_prompt(tokenizer, task.file, 0, 0, headers) if task.context_start == 0 else []
        encoded.append(lead + fim.prompt(code_tokens(tokenizer, text[task.context_start:task.middle_start]),
                                         code_tokens(tokenizer, task.suffix)))
    input_ids, attention_mask = left_padded(encoded, pad, device)
    width = input_ids.shape[1]
    was_training = model.training
    model.eval()
    begin = time.perf_counter()
    # Any FIM token ends a middle too: a model that never learned the format writes them instead of stopping.
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad, eos_token_id=[eos, *fim.ids])
    model.train(was_training)
    seconds = round(time.perf_counter() - begin, 4)
    records = []
    for row, task in enumerate(tasks):
        new_ids = output[row, width:].tolist()
        stop = next((i for i, t in enumerate(new_ids) if t in (eos, *fim.ids)), None)
        written = new_ids[:stop] if stop is not None else new_ids
        middle = tokenizer.decode(written)
        exact = normalized(middle) == normalized(task.target)
        trimmed = trimmed_at_suffix(middle, task.suffix)
        records.append({
            "index": row, "path": task.file.path, "language": task.file.language, "kind": "infill",
            # The line above, the middle (from its line break) and the line below (with its break), as read.
            "prompt": task.file.text[:task.middle_start].rsplit("\n", 1)[-1],
            "completion": middle, "suffix": "\n".join(task.file.text[task.middle_end:].split("\n", 2)[:2]),
            "ended": "end_of_text" if stop is not None else "token_budget", "new_tokens": len(written),
            "verdict": "exact" if exact else "differs", "error": None, "seconds": seconds, "target": task.target,
            "edit_sim": round(edit_similarity(middle, task.target), 4),
            "trimmed": trimmed,
            "trimmed_verdict": "exact" if normalized(trimmed) == normalized(task.target) else "differs",
            "trimmed_edit_sim": round(edit_similarity(trimmed, task.target), 4),
        })
    return records


def trimmed_at_suffix(middle: str, suffix: str) -> str:
    """The middle as an editor shows it: cut before its first line that repeats the line below the cursor (the
    suffix's first line after a break), whitespace aside, as Continue's autocomplete stops (stopAtSimilarLine)."""
    below = normalized(suffix.split("\n", 2)[1]) if "\n" in suffix else ""
    if not below:
        return middle
    lines = middle.split("\n")
    repeat = next((i for i, line in enumerate(lines) if normalized(line) == below), len(lines))
    return "\n".join(lines[:repeat])


def completion_figures(samples: list[dict], lines: list[dict], infills: list[dict] = ()) -> dict:
    """The val record's completion accuracy: next lines and infills (exact match, edit similarity) and function
    bodies (edit similarity, identifier F1), each with the number of tasks behind it (None: no task; infill figures
    only in a run that trains FIM)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return (round(sum(values) / len(values), 4), len(values)) if values else (None, 0)

    exact, line_tasks = mean([float(r["verdict"] == "exact") for r in lines])
    line_edit, _ = mean([r["edit_sim"] for r in lines])
    body_edit, body_tasks = mean([s.get("edit_sim") for s in samples])
    body_f1, f1_tasks = mean([s.get("identifier_f1") for s in samples])
    figures = {"next_line_exact": exact, "next_line_edit_sim": line_edit, "next_line_tasks": line_tasks,
               "body_edit_sim": body_edit, "body_tasks": body_tasks, "body_identifier_f1": body_f1,
               "body_identifier_tasks": f1_tasks}
    if infills:
        figures["infill_exact"], figures["infill_tasks"] = mean([float(r["verdict"] == "exact") for r in infills])
        figures["infill_edit_sim"], _ = mean([r["edit_sim"] for r in infills])
        figures["infill_trimmed_exact"], _ = mean([float(r["trimmed_verdict"] == "exact") for r in infills])
        figures["infill_trimmed_edit_sim"], _ = mean([r["trimmed_edit_sim"] for r in infills])
    return figures


def syntax_rate(records: list[dict]) -> tuple[float | None, int]:
    """Share of samples in a supported language that parse (unfinished functions count as failing), and how
    many samples that share is of."""
    checked = [r for r in records if r["verdict"] != "unsupported"]
    if not checked:
        return None, 0
    return sum(r["verdict"] == "parses" for r in checked) / len(checked), len(checked)

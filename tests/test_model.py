import json

import pytest
import torch

from job import model
from job.data import pack
from job.spec import SpecError, build_spec

from .conftest import TINY

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
         "for i in range(10):\n    print(i * i)\n"] * 5


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama and tokenizer saved as an ordinary local Hugging Face folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    spec = build_spec({"train": {"max_steps": 1}, "model": {"tiny": TINY}, "data": {"context_length": 32}})
    model.create_tiny_model(spec, folder, TEXTS)
    return folder


def spec_with(**sections):
    raw = {"train": {"max_steps": 10}, "model": {"tiny": TINY}}
    raw.update(sections)
    return build_spec(raw)


def test_local_folder_loads_with_safetensors_only(tiny_folder):
    assert (tiny_folder / "model.safetensors").is_file()
    config = model.check_model_folder(tiny_folder, trust_remote_code=False)
    assert config["model_type"] == "llama"
    base = model.load_base_model(tiny_folder, spec_with(), torch.float32, torch.device("cpu"))
    tokenizer = model.load_tokenizer(tiny_folder, False)
    assert base.config.vocab_size == len(tokenizer)
    assert tokenizer.decode(tokenizer.encode("def add(a, b):", add_special_tokens=False)) == "def add(a, b):"


def test_builtin_model_is_fixed_by_the_seed(tmp_path, tiny_folder):
    spec = build_spec({"train": {"max_steps": 1}, "model": {"tiny": TINY}, "data": {"context_length": 32}})
    model.create_tiny_model(spec, tmp_path / "again", TEXTS)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("no_config", "has no config.json"),
    ("remote_code", "needs its own Python code"),
    ("unknown_type", "is not an architecture"),
    ("no_safetensors", "has no .safetensors weights"),
])
def test_model_folder_problems_are_named(tmp_path, tiny_folder, case, expected):
    folder = tmp_path / "m"
    if case == "file":
        folder.write_text("not a folder")
    elif case != "missing":
        folder.mkdir()
    if case == "remote_code":
        (folder / "config.json").write_text(json.dumps({"model_type": "my_own_arch",
                                                        "auto_map": {"AutoConfig": "x.Config"}}))
    if case == "unknown_type":
        (folder / "config.json").write_text(json.dumps({"model_type": "my_own_arch"}))
    if case == "no_safetensors":
        (folder / "config.json").write_text((tiny_folder / "config.json").read_text())
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SpecError) as caught:
        model.check_model_folder(folder, trust_remote_code=False)
    (message,) = caught.value.problems
    assert message.startswith(f"model.path: {folder}") and expected in message


def test_loraplus_groups_keep_the_ratio_through_the_schedule(tiny_folder):
    spec = spec_with(lora={"plus_ratio": 16}, optim={"lr": 1e-3})
    peft_model = model.add_lora(model.load_base_model(tiny_folder, spec_with(), torch.float32, torch.device("cpu")),
                                spec)
    optimizer = model.make_optimizer(peft_model, spec)
    names = {g["name"]: g for g in optimizer.param_groups if g["params"]}
    assert set(names) == {"lora_A", "lora_B"}
    assert all("lora_A" in n for n, p in peft_model.named_parameters()
               if any(p is q for q in names["lora_A"]["params"]))
    scheduler = model.make_scheduler(optimizer, spec, total_steps=10)
    for _ in range(10):
        rates = model.group_rates(optimizer)
        assert rates["lora_B"] == pytest.approx(16 * rates["lora_A"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_plain_lora_has_one_group(tiny_folder):
    spec = spec_with(lora={"plus_ratio": None})
    optimizer = model.make_optimizer(
        model.add_lora(model.load_base_model(tiny_folder, spec_with(), torch.float32, torch.device("cpu")), spec), spec)
    assert list(model.group_rates(optimizer)) == ["lora"]


def test_one_cycle_shape():
    peak, total = 1e-3, 100
    spec = spec_with(optim={"lr": peak}, lora={"plus_ratio": None},
                     schedule={"pct_start": 0.3, "div_factor": 25, "final_div_factor": 1e4})
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=peak)
    optimizer.param_groups[0]["name"] = "lora"
    scheduler = model.make_scheduler(optimizer, spec, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(peak / 25)
    assert max(rates) == pytest.approx(peak)
    assert rates.index(max(rates)) == pytest.approx(0.3 * total, abs=1)
    assert rates[-1] == pytest.approx(peak / (25 * 1e4))
    assert all(a <= b for a, b in zip(rates[:29], rates[1:30])) and all(a >= b for a, b in zip(rates[30:], rates[31:]))


def test_cosine_with_warmup():
    spec = spec_with(optim={"lr": 1e-3}, schedule={"kind": "cosine", "warmup_ratio": 0.1})
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    scheduler = model.make_scheduler(optimizer, spec, 50)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and rates[5] == pytest.approx(1e-3) and rates[-1] < 1e-5


def test_packed_files_do_not_attend_to_each_other(tiny_folder):
    """The fact packing relies on: restarting position ids with no attention mask isolate each file."""
    from job.evaluate import loss_sum

    base = model.load_base_model(tiny_folder, spec_with(), torch.float32, torch.device("cpu")).eval()
    tokenizer = model.load_tokenizer(tiny_folder, False)
    docs = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in TEXTS[:3]]
    packed = pack(docs, sum(map(len, docs)), tokenizer.eos_token_id)
    with torch.no_grad():
        together = base(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                        use_cache=False).logits[0]
        offset = 0
        for doc in docs:
            alone = base(input_ids=torch.tensor([doc]), use_cache=False).logits[0]
            # float32 logits of size about 1, from matmuls and attention of other shapes: each reduction may round in
            # another order, a few units of 2^-24 (6e-8) per layer and sum; 1e-5 is over a hundred of them.
            assert torch.allclose(together[offset:offset + len(doc)], alone, atol=1e-5)
            offset += len(doc)
        # and the loss counts every target token but the first of each file
        _, count = loss_sum(base, packed.input_ids, packed.position_ids, packed.labels)
    assert int(count) == sum(map(len, docs)) - len(docs)

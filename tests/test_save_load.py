"""Slim models survive save_pretrained / from_pretrained: remote code in a Python without hf_hesso, registered
classes, stock export, bf16, generation with a KV cache, a second round trip, re-pruning, and shape errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from fixtures import DECODERS, PREFIX, tiny_batch, tiny_model
from fresh_process import run_fresh
from safetensors.torch import load_file, save_file
from slim_helpers import CASES, expected_shapes, outputs, zero_random_groups
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_hesso.groups import KV_GROUP, MLP_CHANNEL, QUERY_SLOT, build_groups
from hf_hesso.modeling import register_auto_classes
from hf_hesso.slim import current_layer_shapes, slim_model, to_stock

register_auto_classes()  # what `import hf_hesso` does

AUTO = {
    "Model": "AutoModel",
    "ForCausalLM": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
}
CODE_FILES = {"modeling_hesso.py", "configuration_hesso.py", "architectures.py", "journal.py"}
GEN_TOKENS = 6


def generate(model, batch):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0, use_cache=True)


def uniform_prune(model, kv_groups=(), slots=(), heads=(), mlp=()):
    """Zero the same groups in every layer (so the slim model has one shape)."""
    groups = build_groups(model)
    chosen = []
    for b in groups.blocks:
        wanted = {KV_GROUP: kv_groups, QUERY_SLOT: slots, "head": heads, MLP_CHANNEL: mlp}[b.kind]
        chosen += [b.offset + i for i in wanted]
    groups.zero_(model, chosen)
    return groups


# A script run by a fresh `python -I` in which `import hf_hesso` is made impossible: everything it loads comes
# from the saved directories (remote code) or from stock transformers.
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family x head: a masked-dense model, slimmed and saved; references computed before slimming."""
    root = tmp_path_factory.mktemp("slim")
    entries = {}
    for name, head in CASES:
        model = tiny_model(name, head, perturb=0.1, eval_mode=True)
        groups = build_groups(model)
        zero_random_groups(model, groups, seed=len(name) * 7 + len(head))
        batch = tiny_batch(name)
        ref = {"logits": outputs(model, batch)}
        if head == "ForCausalLM":
            # Padded positions differ between eager and sdpa (fully masked rows): one reference per implementation.
            for impl in ("eager", "sdpa"):
                model.set_attn_implementation(impl)
                ref["logits_" + impl] = outputs(model, batch)
                ref["generate_" + impl] = generate(model, batch)
            model.set_attn_implementation("sdpa")
        slim_model(model, groups)
        directory = root / f"{name}-{head}"
        model.save_pretrained(directory)
        torch.save(batch, root / f"{name}-batch.pt")
        entries[(name, head)] = {"dir": directory, "batch": batch, "ref": ref, "model": model}
    return root, entries


def test_saved_files(saved):
    _, entries = saved
    for (name, head), entry in entries.items():
        files = set(os.listdir(entry["dir"]))
        assert CODE_FILES | {"config.json", "model.safetensors"} <= files, (name, head, files)
        config = json.loads((entry["dir"] / "config.json").read_text())
        assert config["model_type"] == "hesso_" + entry["model"].config.model_type.removeprefix("hesso_")
        assert config["auto_map"] == {
            "AutoConfig": f"configuration_hesso.Hesso{type(entry['model'].config).__name__[5:]}",
            AUTO[head]: f"modeling_hesso.Hesso{PREFIX[name]}{head}",
        }
        assert len(config["hesso_layer_shapes"]) == config["num_hidden_layers"]
        # The stock fields keep the original uniform sizes.
        assert config["num_attention_heads"] == 4 and config["intermediate_size"] == 96


@pytest.mark.slow
def test_fresh_process_without_hf_hesso(saved, tmp_path):
    root, entries = saved
    jobs = []
    for (name, head), entry in entries.items():
        gen = GEN_TOKENS if head == "ForCausalLM" else 0
        impls = ["eager", "sdpa"] if head == "ForCausalLM" else ["sdpa"]
        batch_file = str(root / f"{name}-batch.pt")
        jobs.append(
            dict(dir=str(entry["dir"]), auto=AUTO[head], remote=True, batch=batch_file, impls=impls, generate=gen)
        )
    # Stock exports load with stock classes, no remote code.
    stock_dirs = {}
    for name, kw in (("llama", dict(kv_groups=[1], mlp=range(0, 90, 3))), ("mistral", dict(slots=[0], mlp=[5]))):
        model = tiny_model(name, "ForCausalLM", perturb=0.1, eval_mode=True)
        groups = uniform_prune(model, **kw)
        batch = tiny_batch(name)
        ref = outputs(model, batch)
        slim_model(model, groups)
        to_stock(model)
        d = tmp_path / f"stock-{name}"
        model.save_pretrained(d)
        assert not any(f.endswith(".py") for f in os.listdir(d))
        config = json.loads((d / "config.json").read_text())
        assert config["model_type"] == name and "auto_map" not in config and "hesso_layer_shapes" not in config
        stock_dirs[str(d)] = ref
        jobs.append(
            dict(dir=str(d), auto="AutoModelForCausalLM", remote=False, batch=str(root / f"{name}-batch.pt"),
                 impls=["sdpa"], generate=0)
        )  # fmt: skip

    results = run_fresh(jobs, tmp_path)

    for (name, head), entry in entries.items():
        got = results[str(entry["dir"])]
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith(f"Hesso{PREFIX[name]}{head}")
        for key, value in got.items():
            if key.startswith("logits_"):
                ref = entry["ref"].get(key, entry["ref"]["logits"])
                assert (value - ref).abs().max().item() <= 1e-5, (name, head, key)
            elif key.startswith("generate_"):
                assert torch.equal(value, entry["ref"][key]), (name, head, key)
        if head == "ForCausalLM":
            assert {"generate_eager", "generate_sdpa", "logits_eager"} <= set(got)
    for d, ref in stock_dirs.items():
        got = results[d]
        assert got["class"].startswith("transformers.models.")
        assert (got["logits_sdpa"] - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,head", CASES)
def test_registered_load_matches(saved, name, head):
    entry = saved[1][(name, head)]
    loaded = getattr(transformers, AUTO[head]).from_pretrained(entry["dir"]).eval()
    assert type(loaded) is type(entry["model"])
    assert current_layer_shapes(loaded) == current_layer_shapes(entry["model"])
    assert (outputs(loaded, entry["batch"]) - entry["ref"]["logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", DECODERS)
def test_generate_after_reload(saved, name):
    entry = saved[1][(name, "ForCausalLM")]
    for impl in ("eager", "sdpa"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(entry["dir"], attn_implementation=impl).eval()
        assert torch.equal(generate(loaded, entry["batch"]), entry["ref"]["generate_" + impl])


@pytest.mark.parametrize("name,head", [("llama", "ForCausalLM"), ("qwen3", "ForCausalLM"), ("bert", "ForMaskedLM")])
def test_bf16_load(saved, name, head):
    entry = saved[1][(name, head)]
    loaded = getattr(transformers, AUTO[head]).from_pretrained(entry["dir"], dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    cast = getattr(transformers, AUTO[head]).from_pretrained(entry["dir"]).eval().to(torch.bfloat16)
    # Not bit-equal: `.to()` also casts the rotary `inv_freq` buffer, which bf16 loading keeps in fp32.
    torch.testing.assert_close(outputs(loaded, entry["batch"]), outputs(cast, entry["batch"]), rtol=0.02, atol=0.02)
    assert (outputs(loaded, entry["batch"]).float() - entry["ref"]["logits"]).abs().max().item() < 0.1


def _load_causal(directory, remote: bool):
    if not remote:
        return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    # With hf_hesso imported, transformers 5.24 prefers the registered local classes even with
    # `trust_remote_code=True`; load the copied code explicitly to exercise the remote-code classes in this process.
    cls = get_class_from_dynamic_module("modeling_hesso.HessoQwen2ForCausalLM", str(directory))
    return cls.from_pretrained(directory).eval()


@pytest.mark.parametrize("remote", [False, True])
def test_second_round_trip_and_repruning(saved, tmp_path, monkeypatch, remote):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    entry = saved[1][("qwen2", "ForCausalLM")]
    batch = entry["batch"]
    model = _load_causal(entry["dir"], remote)
    module = type(model).__module__
    assert module.startswith("transformers_modules.") if remote else module == "hf_hesso.modeling.modeling_hesso"
    # Second round trip, unchanged.
    model.save_pretrained(tmp_path / "again")
    assert CODE_FILES <= set(os.listdir(tmp_path / "again"))
    again = _load_causal(tmp_path / "again", remote)
    assert (outputs(again, batch) - entry["ref"]["logits"]).abs().max().item() <= 1e-5
    # Group, prune and slim the reloaded slim model again.
    groups = build_groups(again)
    chosen = zero_random_groups(again, groups, seed=11, full_layer=1)
    dense = outputs(again, batch)
    before = current_layer_shapes(again)
    summary = slim_model(again, groups)
    assert type(again).__module__.startswith("transformers_modules.") == remote
    assert summary.layers == expected_shapes(groups, chosen, before)
    assert (outputs(again, batch) - dense).abs().max().item() <= 1e-5
    again.save_pretrained(tmp_path / "third")
    third = _load_causal(tmp_path / "third", remote)
    assert current_layer_shapes(third) == summary.layers
    assert (outputs(third, batch) - dense).abs().max().item() <= 1e-5
    assert torch.equal(generate(third, batch), generate(again, batch))


@pytest.mark.parametrize(
    "name,head,kw,heads",
    [
        ("mistral", "ForSequenceClassification", dict(heads=[2], mlp=[0, 1]), 3),  # 3 heads: mistral stores head_dim
        ("qwen2", "Model", dict(kv_groups=[0], slots=[1]), 1),
        ("qwen3", "ForCausalLM", dict(slots=[1], mlp=[7]), 2),
        ("bert", "ForSequenceClassification", dict(mlp=[1, 2, 3]), 4),  # BERT: only a narrower MLP is stock
        ("roberta", "ForMaskedLM", dict(mlp=[4]), 4),
    ],
)
def test_stock_export(tmp_path, name, head, kw, heads):
    overrides = {"num_key_value_heads": 4} if "heads" in kw else {}
    model = tiny_model(name, head, perturb=0.1, eval_mode=True, **overrides)
    groups = uniform_prune(model, **kw)
    batch = tiny_batch(name)
    ref = outputs(model, batch)
    slim_model(model, groups)
    to_stock(model)
    assert type(model) is getattr(transformers, PREFIX[name] + head)
    assert type(model.config) is type(model.config).__mro__[0] and model.config.model_type == name
    assert model.config.num_attention_heads == heads
    model.save_pretrained(tmp_path)
    assert not any(f.endswith(".py") for f in os.listdir(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == name and "auto_map" not in config and "hesso_layer_shapes" not in config
    # Stock classes, no trust_remote_code (the hesso registrations cannot be involved: the model_type is stock).
    loaded = getattr(transformers, AUTO[head]).from_pretrained(tmp_path).eval()
    assert type(loaded).__module__.startswith("transformers.models.")
    assert (outputs(loaded, batch) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name,head,kw,match",
    [
        ("llama_mha", "ForCausalLM", dict(heads=[1]), r"stock `LlamaConfig` requires `hidden_size % num_attention_heads"),
        ("bert", "Model", dict(heads=[0]), r"stock BERT derives the head size from `hidden_size / num_attention_heads"),
        ("roberta", "Model", dict(heads=[3], mlp=[1]), r"stock RoBERTa derives the head size"),
    ],
)  # fmt: skip
def test_stock_export_errors(name, head, kw, match):
    model = tiny_model(name, head, perturb=0.1, eval_mode=True)
    slim_model(model, uniform_prune(model, **kw))
    cls, config = type(model), model.config.to_dict()
    with pytest.raises(ValueError, match=match):
        to_stock(model)
    assert type(model) is cls and model.config.to_dict() == config  # unchanged


def test_stock_export_uneven_layers_error():
    model = tiny_model("mistral", "ForCausalLM", perturb=0.1, eval_mode=True)
    groups = build_groups(model)
    mlp = next(b for b in groups.blocks if b.kind == MLP_CHANNEL and b.layer == 1)
    groups.zero_(model, [mlp.offset])
    slim_model(model, groups)
    with pytest.raises(ValueError, match=r"its layers have 2 different shapes .* a stock config holds one size"):
        to_stock(model)
    assert model.config.model_type == "hesso_mistral"  # slimmed, but kept as a slim model


def test_slim_model_stock_is_deprecated_for_to_stock():
    """`slim_model(..., stock=True)` is `slim_model` then `to_stock`: it still works, with a FutureWarning naming the
    route."""
    results = []
    for deprecated in (False, True):
        model = tiny_model("mistral", "ForCausalLM", perturb=0.1, eval_mode=True)
        groups = uniform_prune(model, slots=[0], mlp=[5])
        if deprecated:
            with pytest.warns(FutureWarning, match=r"stock=True\)` is deprecated.*`to_stock\(model\)` after"):
                slim_model(model, groups, stock=True)
        else:
            slim_model(model, groups)
            to_stock(model)
        results.append(model)
    assert type(results[0]) is type(results[1]) and results[1].config.model_type == "mistral"
    assert results[0].config.to_dict() == results[1].config.to_dict()
    batch = tiny_batch("mistral")
    torch.testing.assert_close(outputs(results[0], batch), outputs(results[1], batch), rtol=0, atol=0)


def _edit_config(directory: Path, fn) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    fn(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("ignore", [False, True])
def test_mismatched_checkpoint_names_layer_and_tensor(saved, tmp_path, ignore):
    entry = saved[1][("llama", "ForCausalLM")]
    model = transformers.AutoModelForCausalLM.from_pretrained(entry["dir"])
    model.save_pretrained(tmp_path)
    width = model.config.hesso_layer_shapes[1]["intermediate_size"]
    _edit_config(tmp_path, lambda c: c["hesso_layer_shapes"][1].update(intermediate_size=width - 1))
    with pytest.raises(ValueError, match=r"layer 1: tensor `model\.layers\.1\.mlp\.down_proj\.weight` has shape"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore)


def test_missing_tensor_names_layer_and_tensor(saved, tmp_path):
    entry = saved[1][("bert", "ForSequenceClassification")]
    entry["model"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["bert.encoder.layer.0.attention.self.key.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"layer 0: tensor `bert\.encoder\.layer\.0\.attention\.self\.key\.weight` is"
    ):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_bad_layer_shapes_in_config(saved, tmp_path):
    entry = saved[1][("qwen3", "Model")]
    entry["model"].save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda c: c["hesso_layer_shapes"].pop())
    with pytest.raises(ValueError, match=r"`hesso_layer_shapes` has 1 entries but `num_hidden_layers` is 2"):
        transformers.AutoModel.from_pretrained(tmp_path)


def test_static_cache_generate_after_reload(saved):
    # A static cache is sized per layer from the key/value tensors, so uneven kv heads work too.
    entry = saved[1][("llama", "ForCausalLM")]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(entry["dir"]).eval()
    with torch.no_grad():
        out = loaded.generate(
            **entry["batch"], max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0, cache_implementation="static"
        )
    assert torch.equal(out, entry["ref"]["generate_sdpa"])

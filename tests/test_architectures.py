"""Every family of the layout table beyond the original six: tiny random config -> zero random groups of every kind
(or a few HESSO steps) -> slim_model -> logits equal to the masked dense model -> save_pretrained -> reload (registered
classes here; remote code in a fresh process where hf_hesso cannot be imported) -> to_stock where the stock config
can express the result."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import transformers
from arch_families import FAMILIES, GQA, STOCK_HEADS, batch_for, logits, make
from fresh_process import run_fresh
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from slim_helpers import check_runtime_attributes, expected_param_count, expected_shapes, zero_random_groups

from hf_hesso import HESSO
from hf_hesso.groups import (
    EXPERT_CHANNEL,
    HEAD,
    MLP_CHANNEL,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
    build_groups,
)
from hf_hesso.groups.table import TABLE_END, TABLE_START, architecture_table
from hf_hesso.modeling import register_auto_classes
from hf_hesso.modeling.architectures import ARCHITECTURES
from hf_hesso.slim import current_layer_shapes, slim_model, to_stock

register_auto_classes()


def test_every_family_is_covered():
    # Layouts inferred for other model types (registered by `build_groups` in this process) are tested elsewhere.
    table = {name for name, layout in ARCHITECTURES.items() if not layout.inferred}
    assert set(FAMILIES) | {"bert", "llama", "mistral", "qwen2", "qwen3", "roberta"} == table


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kinds(name):
    groups = build_groups(make(name))
    for layer in range(2):
        assert {b.kind for b in groups.blocks if b.layer == layer} == FAMILIES[name][2]


@pytest.fixture(scope="module")
def slimmed(tmp_path_factory):
    """Every family: zeroed random groups, references taken on the masked dense model, slimmed, saved."""
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for name in sorted(FAMILIES):
        model = make(name)
        groups = build_groups(model)
        chosen = zero_random_groups(model, groups, seed=len(name))
        batch = batch_for(name)
        before = current_layer_shapes(model)
        params_before = sum(p.numel() for p in model.parameters())
        impls = ["eager", "sdpa"] if model._supports_sdpa else ["eager"]  # Gemma-2 (soft-capping): eager only
        ref = {}
        for impl in impls:
            model.set_attn_implementation(impl)
            ref["logits_" + impl] = logits(model, batch)
        summary = slim_model(model, groups)
        directory = root / name
        model.save_pretrained(directory)
        torch.save(batch, root / f"{name}-batch.pt")
        out[name] = dict(model=model, groups=groups, chosen=chosen, before=before, params_before=params_before,
                         summary=summary, dir=directory, batch=batch, ref=ref, impls=impls)  # fmt: skip
    return root, out


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.slow
def test_slim_matches_masked_dense(slimmed, name):
    e = slimmed[1][name]
    model, summary = e["model"], e["summary"]
    want = expected_shapes(e["groups"], e["chosen"], e["before"])
    assert summary.layers == want == current_layer_shapes(model)
    assert want != e["before"]
    assert type(model).__name__ == "Hesso" + type(model).__mro__[2].__name__
    assert summary.params_after == sum(p.numel() for p in model.parameters())
    assert summary.params_after == expected_param_count(model, e["before"], want, e["params_before"])
    check_runtime_attributes(model, want)
    for impl in e["impls"]:
        model.set_attn_implementation(impl)
        assert (logits(model, e["batch"]) - e["ref"]["logits_" + impl]).abs().max().item() <= 1e-5, impl


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_registered_reload(slimmed, name):
    e = slimmed[1][name]
    config = json.loads((e["dir"] / "config.json").read_text())
    assert config["model_type"] == "hesso_" + name and len(config["hesso_layer_shapes"]) == 2
    assert {"modeling_hesso.py", "configuration_hesso.py", "architectures.py"} <= set(os.listdir(e["dir"]))
    auto = getattr(transformers, FAMILIES[name][1])
    loaded = auto.from_pretrained(e["dir"]).eval()
    assert type(loaded) is type(e["model"])
    assert current_layer_shapes(loaded) == e["summary"].layers
    impl = e["impls"][-1]
    loaded.set_attn_implementation(impl)
    assert (logits(loaded, e["batch"]) - e["ref"]["logits_" + impl]).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_fresh_process_without_hf_hesso(slimmed, tmp_path):
    root, entries = slimmed
    jobs = [
        dict(dir=str(e["dir"]), auto=FAMILIES[name][1], remote=True, batch=str(root / f"{name}-batch.pt"),
             impls=e["impls"], generate=0)
        for name, e in entries.items()
    ]  # fmt: skip
    results = run_fresh(jobs, tmp_path)
    for name, e in entries.items():
        got = results[str(e["dir"])]
        assert got["class"].startswith("transformers_modules."), (name, got["class"])
        for impl in e["impls"]:
            assert (got["logits_" + impl] - e["ref"]["logits_" + impl]).abs().max().item() <= 1e-5, (name, impl)


def _uniform_zero(model, kinds: dict[str, list[int]]):
    """Zero the same groups of the given kinds in every layer."""
    groups = build_groups(model)
    chosen = [b.offset + i for b in groups.blocks for i in kinds.get(b.kind, ())]
    groups.zero_(model, chosen)
    return groups


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_to_stock(name, tmp_path):
    # Narrower MLPs (and one query slot / head fewer where the stock config stores the head size).
    model = make(name)
    kinds = {MLP_CHANNEL: [1, 5], EXPERT_CHANNEL: [2], SHARED_EXPERT_CHANNEL: [0, 3]}
    if name in STOCK_HEADS:
        kinds[QUERY_SLOT] = [1]
    groups = _uniform_zero(model, kinds)
    batch = batch_for(name)
    ref = logits(model, batch)
    slim_model(model, groups)
    to_stock(model)
    assert model.config.model_type == name and type(model).__module__.startswith("transformers.models.")
    model.save_pretrained(tmp_path)
    assert not any(f.endswith(".py") for f in os.listdir(tmp_path))
    loaded = getattr(transformers, FAMILIES[name][1]).from_pretrained(tmp_path).eval()
    assert type(loaded).__module__.startswith("transformers.models.")
    assert (logits(loaded, batch) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(FAMILIES.keys() - STOCK_HEADS))
def test_to_stock_refuses_removed_heads(name):
    model = make(name)
    slim_model(model, _uniform_zero(model, {HEAD: [1], QUERY_SLOT: [1]}))
    rule = r"derives the head size|sizes `q_layernorm`|requires `hidden_size % num_attention_heads"
    with pytest.raises(ValueError, match=r"cannot be converted to the stock .*(" + rule + ")"):
        to_stock(model)
    assert model.config.model_type == "hesso_" + name


@pytest.mark.parametrize("name", ["mixtral", "gpt2"])
@pytest.mark.slow
def test_hesso_steps_then_slim(name):
    """A few real HESSO steps (not hand-zeroed groups) on a MoE and a Conv1D model, then an exact slim."""
    model = make(name).train()
    groups = build_groups(model)
    opt = HESSO(torch.optim.AdamW(model.parameters(), lr=1e-3), groups, target_group_sparsity=0.3,
                start_pruning_step=1, pruning_periods=1, pruning_steps=2)  # fmt: skip
    batch = batch_for(name)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(3, 128, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    zero = groups.zero_mask(model)
    assert int(zero.sum()) >= int(0.25 * len(groups))
    ref = logits(model, batch)
    summary = slim_model(model, groups)
    assert summary.removed_groups == int(zero.sum())
    assert (logits(model, batch) - ref).abs().max().item() <= 1e-5


def test_moe_router_is_untouched():
    # An expert-channel group is 8 channels of every expert (grouped_mm alignment); the router keeps every expert.
    model = make("qwen2_moe")
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    groups = _uniform_zero(model, {EXPERT_CHANNEL: [0, 4], SHARED_EXPERT_CHANNEL: [4]})
    slim_model(model, groups)
    mlp = model.model.layers[0].mlp
    assert torch.equal(mlp.gate.weight, router)
    assert tuple(mlp.experts.gate_up_proj.shape) == (4, 2 * 32, 64)
    assert tuple(mlp.experts.down_proj.shape) == (4, 64, 32)
    assert mlp.shared_expert.down_proj.in_features == 79
    assert model.config.hesso_layer_shapes[0]["shared_intermediate_size"] == 79


@pytest.mark.slow
def test_random_seeds_stay_exact():
    # Uneven random zeroing with several seeds on the fused/interleaved families.
    for name in ("gpt_neox", "gpt2", "modernbert"):
        for seed in range(3):
            model = make(name, seed=seed)
            groups = build_groups(model)
            zero_random_groups(model, groups, seed=random.Random(seed).randint(0, 99), full_layer=seed % 2)
            batch = batch_for(name)
            ref = logits(model, batch)
            slim_model(model, groups)
            assert (logits(model, batch) - ref).abs().max().item() <= 1e-5, (name, seed)


def test_docs_table_is_generated_from_the_layout_table():
    text = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START) + 1, text.index(TABLE_END)
    assert text[start:end] == architecture_table(), "regenerate the table in docs/architectures.md"
    for model_type in ARCHITECTURES:
        assert f"| `{model_type}` |" in text


def test_moe_with_dense_layers(tmp_path):
    # Qwen2-MoE `mlp_only_layers`: layer 1 is a dense gated MLP (mlp_channel groups), layer 0 sparse.
    config = FAMILIES["qwen2_moe"][0]()
    config.mlp_only_layers = [1]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    groups = build_groups(model)
    assert {b.kind for b in groups.blocks if b.layer == 1} == GQA | {MLP_CHANNEL}
    zero_random_groups(model, groups, seed=4)
    batch = batch_for("qwen2_moe")
    ref = logits(model, batch)
    summary = slim_model(model, groups)
    assert summary.layers[1].shared_intermediate_size is None and summary.layers[1].intermediate_size < 96
    assert (logits(model, batch) - ref).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(loaded, batch) - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"its layers (have 2 different shapes|mix MLP kinds)"):
        to_stock(loaded)


def test_missing_expert_tensor_is_named(slimmed, tmp_path):
    e = slimmed[1]["mixtral"]
    e["model"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.experts.down_proj"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer 1: tensor `model\.layers\.1\.mlp\.experts\.down_proj` is missing"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_lora_on_conv1d_is_refused():
    model = get_peft_model(make("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"LoRA layer around a Conv1D; hf_hesso groups LoRA adapters on `nn.Linear`"):
        build_groups(model)

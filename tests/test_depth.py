"""Whole sublayers: `attention_sublayer` / `mlp_sublayer` groups, emptied sublayers sliced out, layers dropped.

Each family: a 4-layer tiny model; attention zeroed in layers 0 and 2, MLP zeroed in layers 1 and 2 (so layer 2 is
empty), random width groups zeroed in layer 3 -> `slim_model` -> logits and cached greedy generation equal to the
masked dense model -> `save_pretrained` -> reload in a fresh process without hf_hesso (remote code) -> same again.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import resources
import torch
import transformers
from arch_families import FAMILIES
from fixtures import tiny_batch, tiny_config
from fresh_process import run_fresh

from hf_hesso import HESSO
from hf_hesso.export.card import PruningReport, render_model_card
from hf_hesso.groups import (
    ATTENTION_SUBLAYER,
    HIDDEN_CHANNEL,
    KINDS,
    KV_GROUP,
    MLP_CHANNEL,
    MLP_SUBLAYER,
    build_groups,
)
from hf_hesso.modeling.architectures import LAYER_SHAPES_KEY, LayerShape, get_layout
from hf_hesso.modeling.modeling_hesso import RemovedSublayer, SkippedLayer, layer_modules
from hf_hesso.slim import slim_copy, slim_model, to_stock
from hf_hesso.slim.core import uniform_stock_problem

_PREFIX = {
    "llama": "Llama",
    "llama_mha": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "bert": "Bert",
}
# Every kind but the model-wide hidden channels (tests/test_hidden.py), which LayerNorm families refuse.
ALL_BUT_HIDDEN = [k for k in KINDS if k != HIDDEN_CHANNEL]
BASIC = ["llama", "qwen2", "qwen3", "mistral", "bert"]
MORE = ["gemma2", "starcoder2", "gpt2", "phi", "gpt_neox", "qwen3_moe", "modernbert"]


def build(name: str, layers: int = 4, seed: int = 0):
    """A tiny model of family `name` with `layers` layers and random biases / norm weights."""
    torch.manual_seed(seed)
    if name in _PREFIX:
        config = tiny_config(name, num_hidden_layers=layers)
        head = "ForSequenceClassification" if name == "bert" else "ForCausalLM"
    else:
        factory, auto, _ = FAMILIES[name]
        config = factory()
        setattr(config, "n_layer" if name == "gpt2" else "num_hidden_layers", layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % 2] for i in range(layers)]
    if name in _PREFIX:
        model = getattr(transformers, _PREFIX[name] + head)(config).eval()
    else:
        # Gemma-2's attention logit soft-capping runs in eager attention only; the default implementation differs
        # between transformers versions, and the fresh-process reload below uses eager.
        impl = {"attn_implementation": "eager"} if name == "gemma2" else {}
        model = getattr(transformers, auto).from_config(config, **impl).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def is_decoder(name: str) -> bool:
    return name not in ("bert", "modernbert")


def zero_depth_pattern(model, seed: int = 0):
    """Attention of layers 0 and 2, MLP of layers 1 and 2, random width groups of layer 3; returns the groups."""
    groups = build_groups(model, kinds=ALL_BUT_HIDDEN)
    rng = random.Random(seed)
    chosen = []
    for b in groups.blocks:
        if (b.kind == ATTENTION_SUBLAYER and b.layer in (0, 2)) or (b.kind == MLP_SUBLAYER and b.layer in (1, 2)):
            chosen.append(b.offset)
        elif b.layer == 3 and b.n > 1:
            chosen += [b.offset + i for i in rng.sample(range(b.n), rng.randint(1, b.n - 1))]
    groups.zero_(model, chosen)
    return groups


def logits(model, batch):
    with torch.no_grad():
        return model(**batch)[0]


def greedy(model, batch, new: int = 6):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=True)


def batch_for(name: str):
    return tiny_batch("bert" if not is_decoder(name) else "llama")


@pytest.mark.parametrize("name", BASIC + MORE)
@pytest.mark.slow
def test_removed_sublayers_match_masked_model(name, tmp_path):
    model = build(name)
    layout = get_layout(model.config.model_type)
    groups = zero_depth_pattern(model)
    batch = batch_for(name)
    ref = logits(model, batch)
    ref_gen = greedy(model, batch) if is_decoder(name) else None
    summary = slim_model(model, groups)

    shapes = summary.layers
    assert [s.has_attention for s in shapes] == [False, True, False, True]
    assert [s.has_mlp for s in shapes] == [True, False, False, True]
    layers = layer_modules(model)
    if layout.pre_norm:
        assert isinstance(layers[2], SkippedLayer) and not list(layers[2].parameters())
        assert summary.removed_sublayers()["layers"] == [2]
    else:  # post-norm: the LayerNorms after each sublayer stay, so the layer cannot be dropped
        assert not isinstance(layers[2], SkippedLayer)
    assert isinstance(layers[0].get_submodule(layout.attention.module), RemovedSublayer)
    recorded = getattr(model.config, LAYER_SHAPES_KEY)
    assert recorded[0]["num_attention_heads"] == 0 and recorded[1]["intermediate_size"] == 0
    assert "removed sublayers: attention in layers [0, 2], mlp in layers [1, 2]" in str(summary)
    assert (logits(model, batch) - ref).abs().max() <= 1e-5
    if ref_gen is not None:
        assert torch.equal(greedy(model, batch), ref_gen)

    model.save_pretrained(tmp_path / "slim")
    torch.save(batch, tmp_path / "batch.pt")
    auto = (
        "AutoModelForSequenceClassification" if name == "bert" else FAMILIES.get(name, (0, "AutoModelForCausalLM"))[1]
    )
    job = dict(dir=str(tmp_path / "slim"), auto=auto, remote=True, batch=str(tmp_path / "batch.pt"),
               impls=["eager" if name in ("gemma2",) else "sdpa"], generate=6 if is_decoder(name) else 0)  # fmt: skip
    out = run_fresh([job], tmp_path)[job["dir"]]
    impl = job["impls"][0]
    assert (out["logits_" + impl] - ref).abs().max() <= 1e-5
    if ref_gen is not None:
        assert torch.equal(out["generate_" + impl], ref_gen)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@pytest.mark.slow
def test_removed_first_attention_counts_tokens_in_every_cache(name):
    """Layer 0 without attention: transformers reads the cache length from layer 0, so its slot must still count.

    Each kind of cache a user or `generate` can bring (`DynamicCache(config=...)`, a bare `DynamicCache()` that grows
    layer by layer, the static cache of `generate`) gives the masked dense model's logits and greedy tokens, on a
    left-padded batch, and reports the length a real attention layer would. gemma2's layer 0 is a sliding-window
    layer; GPT-2 is a family whose layers take the cache positionally in some transformers versions.
    """
    model = build(name)
    groups = zero_depth_pattern(model)
    batch = batch_for(name)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dense = copy.deepcopy(model)
    slim_model(model, groups)
    assert isinstance(layer_modules(model)[0].get_submodule(get_layout(model.config.model_type).attention.module),
                      RemovedSublayer)  # fmt: skip
    nxt = torch.randint(3, 128, (ids.shape[0], 1), generator=torch.Generator().manual_seed(1))
    full_mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        want = dense(input_ids=torch.cat([ids, nxt], dim=1), attention_mask=full_mask, use_cache=False).logits[:, -1]
        for cache in (transformers.DynamicCache(config=model.config), transformers.DynamicCache()):
            # The cache is filled in place (`past_key_values=` is the keyword every supported version accepts).
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            assert cache.get_seq_length() == ids.shape[1]
            step = model(input_ids=nxt, attention_mask=full_mask, past_key_values=cache, use_cache=True).logits[:, -1]
            assert (step - want).abs().max() <= 1e-5
            assert cache.get_seq_length() == ids.shape[1] + 1
    with torch.no_grad():
        for implementation in ("dynamic", "static"):
            settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation=implementation)
            assert torch.equal(model.generate(**batch, **settings), dense.generate(**batch, **settings))


def test_attention_emptied_by_heads_keeps_its_bias():
    """Every key/value group of a layer zero: the attention goes, and its output bias is still added."""
    model = build("starcoder2", layers=2)
    groups = build_groups(model)
    chosen = [b.offset + i for b in groups.blocks if b.kind == KV_GROUP and b.layer == 0 for i in range(b.n)]
    chosen += [b.offset + i for b in groups.blocks if b.kind == MLP_CHANNEL and b.layer == 1 for i in range(b.n)]
    groups.zero_(model, chosen)
    batch = batch_for("starcoder2")
    ref, ref_gen = logits(model, batch), greedy(model, batch)
    copy, summary = slim_copy(model, groups)
    assert summary.layers[0] == LayerShape(0, 0, 96, attention_bias=True)
    assert summary.layers[1] == LayerShape(4, 2, 0, mlp_bias=True)
    attn = layer_modules(copy)[0].self_attn
    assert isinstance(attn, RemovedSublayer) and attn.bias is not None
    assert (logits(copy, batch) - ref).abs().max() <= 1e-5
    assert torch.equal(greedy(copy, batch), ref_gen)


@pytest.mark.slow
def test_hesso_chooses_sublayers_under_a_param_budget_and_keeps_one():
    """With only sublayer kinds and a budget near everything, HESSO removes sublayers but never every one."""
    model = build("llama", layers=4)
    groups = build_groups(model, kinds=[ATTENTION_SUBLAYER, MLP_SUBLAYER])
    assert len(groups) == 8 and all(b.n == 1 for b in groups.blocks)
    opt = HESSO(torch.optim.SGD(model.parameters(), lr=0.0), groups, target_param_sparsity=0.6,
                start_pruning_step=0, pruning_periods=1, pruning_steps=2)  # fmt: skip
    batch = batch_for("llama")
    for _ in range(3):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    zero = groups.zero_mask()
    kinds = groups.kinds()
    assert zero.any()
    for kind in (ATTENTION_SUBLAYER, MLP_SUBLAYER):
        assert not all(z for z, k in zip(zero.tolist(), kinds, strict=True) if k == kind)
    summary = slim_model(model, groups)
    assert any(not s.has_attention or not s.has_mlp for s in summary.layers)


def test_selection_never_removes_every_sublayer_of_a_kind():
    """The capacity limit: with every attention sublayer but one gone, the budget cannot take the last one."""
    model = build("llama", layers=2)
    groups = build_groups(model, kinds=[ATTENTION_SUBLAYER])
    with pytest.raises(ValueError, match="at most"):
        HESSO(torch.optim.SGD(model.parameters(), lr=0.0), groups, target_param_sparsity=0.9,
              start_pruning_step=0, pruning_periods=1, pruning_steps=2)  # fmt: skip


def test_card_shows_removed_sublayers():
    before = [LayerShape(4, 2, 96)] * 3
    after = [LayerShape(0, 0, 96), LayerShape(4, 2, 0, mlp_bias=True), LayerShape(0, 0, 0)]
    card = render_model_card(PruningReport("base", "slim", 10, 5, before, after))
    assert "| 0 | 0 / 4 | 0 / 2 | 96 / 96 | attention |" in card
    assert "| 1 | 4 / 4 | 2 / 2 | 0 / 96 | MLP (output bias kept) |" in card
    assert "| 2 | 0 / 4 | 0 / 2 | 0 / 96 | whole layer |" in card


UNIFORM_KINDS = [KV_GROUP, "query_slot", MLP_CHANNEL, ATTENTION_SUBLAYER, MLP_SUBLAYER]


def run_uniform_hesso(model, kinds, target: float, batch, steps: int = 4, divisible: int = 1):
    groups = build_groups(model, kinds=kinds)
    opt = HESSO(torch.optim.SGD(model.parameters(), lr=1e-3), groups, target_param_sparsity=target,
                start_pruning_step=0, pruning_periods=2, pruning_steps=4, layer_shapes="uniform",
                group_divisible=divisible, importance_criteria={"magnitude": 1.0})  # fmt: skip
    for _ in range(steps + 1):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return groups


@pytest.mark.parametrize("name", ["mistral", "llama", "qwen3"])
@pytest.mark.slow
def test_uniform_run_exports_stock_and_reloads_without_hf_hesso(name, tmp_path):
    model = build(name, layers=4)
    with torch.no_grad():  # make layer 1 the least salient, so that HESSO drops it whole
        for p in layer_modules(model)[1].parameters():
            if p.dim() == 2:
                p.mul_(1e-3)
    batch = batch_for(name)
    groups = run_uniform_hesso(model, UNIFORM_KINDS, 0.6, batch)
    ref, ref_gen = logits(model, batch), greedy(model, batch)
    summary = slim_model(model, groups)
    to_stock(model)
    kept = [s for s in summary.layers if not s.empty]
    assert summary.removed_sublayers()["layers"] == [1]
    assert len(set(kept)) == 1 and kept[0] != summary.layers_before[0]  # narrower, and the same everywhere
    assert type(model).__name__ == _PREFIX[name] + "ForCausalLM" and model.config.num_hidden_layers == 3
    assert [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")][-1] == 2
    assert (logits(model, batch) - ref).abs().max() <= 1e-5
    assert torch.equal(greedy(model, batch), ref_gen)

    model.save_pretrained(tmp_path / "stock")
    torch.save(batch, tmp_path / "batch.pt")
    job = dict(dir=str(tmp_path / "stock"), auto="AutoModelForCausalLM", remote=False, batch=str(tmp_path / "batch.pt"),
               impls=["sdpa"], generate=6)  # fmt: skip
    out = run_fresh([job], tmp_path)[job["dir"]]
    assert out["class"] == f"transformers.models.{name}.modeling_{name}.{_PREFIX[name]}ForCausalLM"
    assert (out["logits_sdpa"] - ref).abs().max() <= 1e-5
    assert torch.equal(out["generate_sdpa"], ref_gen)


@pytest.mark.slow
def test_uniform_mode_keeps_widths_tied_without_sublayer_kinds():
    model = build("qwen2", layers=3)
    groups = run_uniform_hesso(model, [KV_GROUP, MLP_CHANNEL], 0.3, batch_for("qwen2"))
    summary = slim_model(model, groups)
    assert len(set(summary.layers)) == 1 and summary.layers[0] != summary.layers_before[0]


def test_uniform_refuses_counts_the_stock_config_cannot_hold_before_training():
    model = build("llama_mha", layers=2)  # 4 heads, hidden 64: 3 kept heads break `hidden_size % heads`
    groups = build_groups(model, kinds=["head", MLP_CHANNEL])
    problem = uniform_stock_problem(model, groups, 1)
    assert "(3, 3)" in problem and "group_divisible=2" in problem and "LlamaConfig" in problem
    assert uniform_stock_problem(model, groups, 2) is None
    assert uniform_stock_problem(model, build_groups(model, kinds=[MLP_CHANNEL]), 1) is None
    bert = build("bert", layers=2)
    assert "cannot express" in uniform_stock_problem(bert, build_groups(bert), 1)


def test_uniform_needs_both_sublayer_kinds():
    model = build("llama", layers=2)
    groups = build_groups(model, kinds=[MLP_CHANNEL, ATTENTION_SUBLAYER])
    with pytest.raises(ValueError, match="needs both `attention_sublayer` and `mlp_sublayer`"):
        HESSO(torch.optim.SGD(model.parameters(), lr=0.0), groups, target_param_sparsity=0.2, pruning_steps=2,
              layer_shapes="uniform")  # fmt: skip


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(not resources.data_packages_available(), reason="needs requirements-data.txt packages")
def test_llama_recipe_uniform_with_sublayer_kinds_writes_a_stock_model(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = tmp_path / "slim"
    flags = ["--tiny", "--output_dir", str(out), "--max_steps", "6", "--start_pruning_step", "1", "--pruning_steps",
             "4", "--pruning_periods", "2", "--seq_len", "32", "--train_blocks", "64", "--eval_blocks", "4",
             "--layer_shapes", "uniform", "--prune_kinds", "kv_group", "query_slot", "mlp_channel",
             "attention_sublayer", "mlp_sublayer"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(root / "recipes" / "llama_prune.py"), *flags], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "hesso_layer_shapes" not in config
    assert "Removed sublayers: attention in layers none, MLP in layers none; 2 of 2 layers kept (stock export)" in (
        proc.stdout
    )


def test_param_counter_counts_a_sublayer_once_and_selection_skips_its_width_groups():
    from hf_hesso.optim.selection import ParamCounter, select_redundant

    model = build("llama", layers=2)
    groups = build_groups(model, kinds=ALL_BUT_HIDDEN)
    counter = ParamCounter(groups)
    attn = next(b for b in groups.blocks if b.kind == ATTENTION_SUBLAYER and b.layer == 0)
    inner = [b for b in groups.blocks if b.layer == 0 and b.kind in (KV_GROUP, "query_slot")]
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[attn.offset] = True
    alone = counter.count(mask)
    assert alone == attn.group_numel == sum(p.numel() for n, p in model.named_parameters()
                                            if "layers.0.self_attn" in n)  # fmt: skip
    for b in inner:
        mask[b.offset : b.offset + b.n] = True
    assert counter.count(mask) == alone  # the width groups inside add nothing
    # Total: every projection parameter once.
    projections = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)
    assert counter.total == projections

    selected = torch.zeros(len(groups), dtype=torch.bool)
    selected[attn.offset] = True
    scores = torch.rand(len(groups), dtype=torch.float64)
    new = select_redundant(scores, selected, groups, groups.numel.double(), counter.total * 0.5, counter.count)
    assert not any(bool(new[b.offset : b.offset + b.n].any()) for b in inner)
    assert counter.count(selected | new) <= counter.total * 0.5

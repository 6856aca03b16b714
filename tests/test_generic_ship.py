"""Model types outside the layout table, end to end with no extra call: `HESSOTrainer` infers and checks the layout
by itself, and the slim model ships it (config.json `hesso_layout`), so it loads in a fresh process with only torch
and transformers (`trust_remote_code=True`) with the same logits; `to_stock`, `push_to_hub`, resume and the card
work as for table types."""

from __future__ import annotations

import json
import logging

import huggingface_hub.constants
import pytest
import torch
import transformers
import transformers.utils.hub
from fixtures import hesso_args, lm_dataset, tiny_batch, tiny_tokenizer
from fresh_process import run_fresh
from helpers import card_figures, check_pruned, reference_logits, reload_in_fresh_process
from hub_server import HubServer

from hf_hesso import build_groups, save_slim, slim_model, to_stock
from hf_hesso.groups import HEAD, KV_GROUP, MLP_CHANNEL, QUERY_SLOT
from hf_hesso.modeling.architectures import ARCHITECTURES, LAYOUT_KEY
from hf_hesso.trainer import HESSOTrainer

_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
# Outside the layout table, each with another convention the inference reads: Granite (Llama-like with scaling
# multipliers, grouped-query attention), OPT (`fc1`/`fc2`, `out_proj`, biases), XLM-RoBERTa (post-norm encoder,
# `intermediate.dense`/`output.dense`), Phi-3 (fused `qkv_proj` and `gate_up_proj`: heads fail the check).
CONFIGS = {
    "granite": lambda: transformers.GraniteConfig(
        **_SIZES, num_key_value_heads=2, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.0
    ),  # fmt: skip
    "opt": lambda: transformers.OPTConfig(**{**_SIZES, "intermediate_size": None}, ffn_dim=96, word_embed_proj_dim=64),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(**{**_SIZES, "pad_token_id": 1}, num_labels=3),
    "phi3": lambda: transformers.Phi3Config(**_SIZES, num_key_value_heads=4),
}
AUTO = {"xlm-roberta": "AutoModelForSequenceClassification"}
EXACT = {"granite": {KV_GROUP, QUERY_SLOT, MLP_CHANNEL}, "opt": {HEAD, MLP_CHANNEL}, "xlm-roberta": {HEAD, MLP_CHANNEL},
         "phi3": {MLP_CHANNEL}}  # fmt: skip


def make(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    auto = getattr(transformers, AUTO.get(model_type, "AutoModelForCausalLM"))
    return auto.from_config(CONFIGS[model_type]()).eval()


def batch():
    return tiny_batch("llama")  # a left-padded row


def assert_same(got, expected):
    """Equal outputs where they are defined (an LM's outputs at padded positions depend on the attention code)."""
    if got.dim() == 3:
        keep = batch()["attention_mask"].bool()
        got, expected = got[keep], expected[keep]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_table():
    # Each test starts with only the written table, as a new process would (the check's per-class cache stays).
    written = {k: v for k, v in ARCHITECTURES.items() if not v.inferred}
    yield
    ARCHITECTURES.clear()
    ARCHITECTURES.update(written)


@pytest.mark.slow
def test_trainer_prunes_and_ships_a_type_outside_the_table(tmp_path, caplog):
    assert "granite" not in ARCHITECTURES
    caplog.set_level(logging.INFO, logger="hf_hesso")
    out = tmp_path / "out"
    trainer = HESSOTrainer(model=make("granite"), args=hesso_args(str(out)), train_dataset=lm_dataset(),
                           processing_class=tiny_tokenizer())  # fmt: skip
    trainer.train()  # no check_architecture call: the Trainer's build_groups runs the check
    check_pruned(trainer)
    assert {b.kind for b in trainer.groups.blocks} == {KV_GROUP, QUERY_SLOT, MLP_CHANNEL}
    assert "is not in hf_hesso's layout table" in caplog.text
    assert "Exact kinds: mlp_channel, kv_group, query_slot" in caplog.text
    expected = reference_logits(trainer.model, batch())
    trainer.save_model()

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hesso_granite"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hesso.HessoGraniteForCausalLM"
    assert config[LAYOUT_KEY]["inferred"] and config[LAYOUT_KEY]["attention"]["module"] == "self_attn"
    card = (out / "README.md").read_text()
    assert "`granite` is not in hf_hesso's layout table" in card and "checked numerically" in card
    assert "Group kinds offered: `mlp_channel`, `kv_group`, `query_slot`" in card
    assert "import hf_hesso` first" not in card  # the inferred layout needs the shipped code
    assert card_figures(out)["layout"]["source"] == "inferred and checked"

    reloaded = reload_in_fresh_process(str(out), "lm", batch(), tmp_path)
    assert not reloaded["hf_hesso_imported"] and reloaded["cls"] == "HessoGraniteForCausalLM"
    assert reloaded["params"] == card_figures(out)["params_after"] < trainer.model.num_parameters()
    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=1e-5)


def _zero_first_groups(model, kinds=None):
    groups = build_groups(model, kinds=kinds)
    groups.zero_(model, [b.offset + (i % b.n) for i, b in enumerate(groups.blocks)])
    return groups


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_slim_model_of_an_inferred_layout_loads_in_a_fresh_process(model_type, tmp_path):
    model = make(model_type)
    groups = _zero_first_groups(model)
    assert {b.kind for b in groups.blocks} == EXACT[model_type]
    slim_model(model, groups)
    with torch.no_grad():
        expected = model(**batch())[0]
    saved = save_slim(model, tmp_path / "slim")
    assert f"`{model_type}` is not in hf_hesso's layout table" in (tmp_path / "slim" / "README.md").read_text()
    torch.save(batch(), tmp_path / "batch.pt")
    job = {"dir": str(tmp_path / "slim"), "auto": AUTO.get(model_type, "AutoModelForCausalLM"), "remote": True,
           "batch": str(tmp_path / "batch.pt"), "impls": ["eager"], "generate": 0}  # fmt: skip
    got = run_fresh([job], tmp_path)[job["dir"]]
    assert got["class"].endswith(".Hesso" + type(model).__name__.removeprefix("Hesso"))
    assert_same(got["logits_eager"], expected)
    assert saved.summary.params_after == sum(p.numel() for p in model.parameters())
    assert saved.summary.params_after < sum(p.numel() for p in make(model_type).parameters())


@pytest.mark.slow
def test_to_stock_of_an_inferred_layout(tmp_path):
    # The same MLP channel removed in every layer: the stock OPT config (`ffn_dim`) expresses it.
    model = make("opt")
    groups = build_groups(model, kinds=[MLP_CHANNEL])
    groups.zero_(model, [b.offset + 5 for b in groups.blocks])
    with torch.no_grad():
        expected = model(**batch())[0]
    save_slim(model, tmp_path / "stock", stock=True)
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == "opt" and config["ffn_dim"] == 95
    assert LAYOUT_KEY not in config and "auto_map" not in config
    torch.save(batch(), tmp_path / "batch.pt")
    job = {"dir": str(tmp_path / "stock"), "auto": "AutoModelForCausalLM", "remote": False,
           "batch": str(tmp_path / "batch.pt"), "impls": ["eager"], "generate": 0}  # fmt: skip
    got = run_fresh([job], tmp_path)[job["dir"]]
    assert got["class"] == "transformers.models.opt.modeling_opt.OPTForCausalLM"
    assert_same(got["logits_eager"], expected)
    # Heads removed: the stock OPT derives the head size from hidden / heads, so it refuses, naming why.
    slim = make("opt")
    slim_model(slim, _zero_first_groups(slim, kinds=[HEAD]))
    with pytest.raises(ValueError, match="cannot be converted to the stock `opt` class"):
        to_stock(slim)


@pytest.mark.slow
def test_reloaded_slim_model_prunes_again_and_resumes(tmp_path):
    # A slim checkpoint of an inferred layout, loaded back (remote code) in a process where its type is unknown:
    # its recorded layout is used, without a new check, to prune it further and save again.
    model = make("opt")
    slim_model(model, _zero_first_groups(model))
    model.save_pretrained(tmp_path / "a")
    ARCHITECTURES.pop("opt")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True).eval()
    groups = build_groups(loaded)
    assert {b.kind for b in groups.blocks} == {HEAD, MLP_CHANNEL}
    groups.zero_(loaded, [b.offset for b in groups.blocks])
    with torch.no_grad():
        expected = loaded(**batch())[0]
    summary = slim_model(loaded, groups)
    assert [s.num_attention_heads for s in summary.layers] == [2, 2]
    loaded.save_pretrained(tmp_path / "b")
    torch.save(batch(), tmp_path / "batch.pt")
    job = {"dir": str(tmp_path / "b"), "auto": "AutoModelForCausalLM", "remote": True,
           "batch": str(tmp_path / "batch.pt"), "impls": ["eager"], "generate": 0}  # fmt: skip
    got = run_fresh([job], tmp_path)[job["dir"]]
    assert_same(got["logits_eager"], expected)


@pytest.mark.slow
def test_trainer_resume_of_an_inferred_layout(tmp_path):
    full = HESSOTrainer(model=make("opt"), train_dataset=lm_dataset(),
                        args=hesso_args(str(tmp_path / "full"), save_strategy="steps", save_steps=4))  # fmt: skip
    full.train()
    ARCHITECTURES.pop("opt")  # the resumed run infers it again (from the per-class cache)
    resumed = HESSOTrainer(model=make("opt", seed=123), args=hesso_args(str(tmp_path / "resumed")),
                           train_dataset=lm_dataset())  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.hesso_optimizer.pruned_groups.tolist() == full.hesso_optimizer.pruned_groups.tolist()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


TOKEN = "hf_fake_test_token"


@pytest.mark.slow
def test_push_to_hub_of_an_inferred_layout(tmp_path, monkeypatch):
    with HubServer(token=TOKEN) as hub:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        model = make("xlm-roberta")
        slim_model(model, _zero_first_groups(model))
        with torch.no_grad():
            expected = model(**batch()).logits
        save_slim(model, tmp_path / "out", push_to_hub=True, hub_model_id="testuser/xlmr", hub_token=TOKEN)
        repo = hub.state.repos["testuser/xlmr"]
        assert {"config.json", "model.safetensors", "README.md", "modeling_hesso.py", "architectures.py"} <= set(
            repo.files
        )
        assert json.loads(repo.files["config.json"])[LAYOUT_KEY]["layers"] == "encoder.layer"
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home_reader"), "HF_TOKEN": TOKEN,
               "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
        reloaded = reload_in_fresh_process("testuser/xlmr", "cls", batch(), tmp_path, env=env)
    assert not reloaded["hf_hesso_imported"] and reloaded["cls"] == "HessoXLMRobertaForSequenceClassification"
    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "exact", "mlp_module"),
    [
        ("olmoe", ["expert_channel", "mlp_sublayer"], "mlp"),  # routed experts in fused 3-D tensors
        ("codegen", ["mlp_channel", "head", "mlp_sublayer"], "mlp"),  # `fc_in`/`fc_out`, `rotary_dim` capped
        ("ctrl", ["mlp_channel", "head", "mlp_sublayer"], "ffn"),  # `Wq`/`Wk`/`Wv`, `nn.Sequential` MLP
        ("marian", ["mlp_channel", "head", "mlp_sublayer"], ""),  # the decoder of an encoder-decoder family
    ],
)
def test_inference_reads_more_conventions(model_type, exact, mlp_module):
    from hf_hesso import check_architecture
    from hf_hesso.slim.selfcheck import tiny_config

    report = check_architecture(tiny_config(transformers.AutoConfig.for_model(model_type)))
    assert report.error is None
    assert [k for k in report.exact_kinds if k != "attention_sublayer"] == exact
    assert report.layout.mlps[0].module == mlp_module


def test_parameters_owned_by_the_attention_module_itself_are_named():
    # GraniteSWA's attention holds per-head `sinks` directly (no submodule): the check excludes the head kinds and
    # names that parameter instead of crashing.
    from hf_hesso import check_architecture
    from hf_hesso.slim.selfcheck import tiny_config

    report = check_architecture(tiny_config(transformers.AutoConfig.for_model("granite_swa")))
    kinds = {k.kind: k for k in report.kinds}
    assert kinds["mlp_channel"].exact and not kinds["kv_group"].exact
    assert "`self_attn.sinks` (4,)" in kinds["query_slot"].reason


def test_a_check_that_cannot_run_refuses_the_model_type_with_the_reason(monkeypatch):
    from hf_hesso.slim import selfcheck

    def broken(model, **kwargs):
        raise RuntimeError("shape mismatch in the tiny model")

    monkeypatch.setattr(selfcheck, "check_architecture", broken)
    model = make("opt")
    monkeypatch.delitem(selfcheck._CHECKED, type(model), raising=False)
    with pytest.raises(ValueError, match=r"cannot prune `model_type` 'opt' \(OPTForCausalLM\): the check failed "
                       r"\(RuntimeError: shape mismatch in the tiny model\)"):  # fmt: skip
        build_groups(model)
    monkeypatch.delitem(selfcheck._CHECKED, type(model))

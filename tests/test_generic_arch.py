"""The generic path: a model type outside the layout table (a small custom `PreTrainedModel`, registered with its own
model_type here) gets a layout inferred from its module tree, each group kind accepted only after the numerical
check; an inexact kind is excluded with the reason; an unknown structure gets an error naming what was not found."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from hf_hesso import build_groups, check_architecture, slim_model
from hf_hesso.check import main as check_main
from hf_hesso.groups import HEAD, MLP_CHANNEL
from hf_hesso.modeling.architectures import ARCHITECTURES
from hf_hesso.slim import selfcheck


class ToyConfig(PretrainedConfig):
    model_type = "toyformer"

    def __init__(self, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, norm_over_heads=False, mlp_names=("fc1", "fc2"), qkv_name="qkv",
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.norm_over_heads = norm_over_heads
        self.mlp_names = list(mlp_names)
        self.qkv_name = qkv_name


class ToyAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_name = config.qkv_name
        setattr(self, config.qkv_name, nn.Linear(config.hidden_size, 3 * config.hidden_size))
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # A norm over all heads' queries together: removing a head changes every other head's normalisation.
        self.q_norm = nn.LayerNorm(config.hidden_size) if config.norm_over_heads else None

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = getattr(self, self.qkv_name)(x).split(self.num_heads * self.head_dim, dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q, k, v = (z.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~(causal & mask[:, None, None, :].bool()), torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        return self.out_proj(out)


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        first, second = config.mlp_names
        setattr(self, first, nn.Linear(config.hidden_size, config.intermediate_size))
        setattr(self, second, nn.Linear(config.intermediate_size, config.hidden_size))
        self.names = (first, second)

    def forward(self, x):
        first, second = (getattr(self, n) for n in self.names)
        return second(nn.functional.gelu(first(x)))


class ToyLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = ToyAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = ToyMLP(config)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ToyModel(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ToyLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return (self.norm(x),)


class ToyForCausalLM(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids, attention_mask)[0])
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


transformers.AutoConfig.register("toyformer", ToyConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)


@pytest.fixture(autouse=True)
def _forget_inferred_layout():
    selfcheck._CHECKED.pop(ToyForCausalLM, None)
    yield
    ARCHITECTURES.pop("toyformer", None)
    selfcheck._CHECKED.pop(ToyForCausalLM, None)


def batch():
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_unlisted_model_type_is_grouped_without_a_second_call(caplog):
    model = ToyForCausalLM(ToyConfig()).eval()
    with caplog.at_level(logging.WARNING, logger="hf_hesso"):
        groups = build_groups(model)
    assert {b.kind for b in groups.blocks} == {HEAD, MLP_CHANNEL}
    assert "'toyformer' is not in hf_hesso's layout table" in caplog.text
    assert "Exact kinds: mlp_channel, head, attention_sublayer, mlp_sublayer. Excluded kinds: none." in caplog.text
    assert "architectures.py" not in caplog.text
    # Checked once per model class in the process: a second model of the class is grouped without a check or log.
    caplog.clear()
    ARCHITECTURES.pop("toyformer")
    with caplog.at_level(logging.INFO, logger="hf_hesso"):
        assert len(build_groups(ToyForCausalLM(ToyConfig()))) == len(groups)
    assert caplog.text == ""


def test_excluded_kinds_are_logged_with_the_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_hesso"):
        groups = build_groups(ToyForCausalLM(ToyConfig(norm_over_heads=True)))
    assert {b.kind for b in groups.blocks} == {MLP_CHANNEL}
    assert re.search(r"Excluded kinds: head \(.*sized by these groups but not part of them: `attn.q_norm.weight` "
                     r"\(64,\)", caplog.text)  # fmt: skip


def test_unlisted_model_type_is_inferred_checked_and_prunable(tmp_path):
    model = ToyForCausalLM(ToyConfig()).eval()
    report = check_architecture(model)

    assert not report.in_table and report.error is None
    assert report.exact_kinds == [MLP_CHANNEL, HEAD, "attention_sublayer", "mlp_sublayer"]
    kinds = {k.kind: k for k in report.kinds}
    assert kinds[HEAD].found == 8 and kinds[MLP_CHANNEL].found == 192
    # The fused `qkv` was read as [q; k; v] (the concatenated candidate passed the check).
    assert report.layout.attention.projections[0].path == "attn.qkv"
    assert not report.layout.attention.projections[0].interleaved
    assert ("attn.num_heads", "heads") in report.layout.attention.attributes
    # to_stock: a narrower MLP fits the stock config; fewer heads does not (head size = hidden / heads).
    assert kinds[MLP_CHANNEL].stock_uniform is None
    assert "derives the head size" in kinds[HEAD].stock_uniform
    text = str(report)
    assert "inferred from the module tree" in text and "head" in text and "exact" in text

    # Registered: the model itself can now be grouped, pruned, sliced, saved and loaded in this process.
    groups = build_groups(model)
    assert {b.kind for b in groups.blocks} == {HEAD, MLP_CHANNEL}
    groups.zero_(model, [b.offset for b in groups.blocks])
    ref = model(**batch()).logits
    slim_model(model, groups)
    assert model.model.layers[0].attn.num_heads == 3
    assert (model(**batch()).logits - ref).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert (loaded(**batch()).logits - ref).abs().max().item() <= 1e-5


def test_inexact_kind_is_excluded_with_reason():
    report = check_architecture(ToyConfig(norm_over_heads=True))
    kinds = {k.kind: k for k in report.kinds}
    assert kinds[MLP_CHANNEL].exact
    assert not kinds[HEAD].exact
    assert "`attn.q_norm.weight` (64,)" in kinds[HEAD].reason
    assert "spans all heads" in kinds[HEAD].reason
    assert report.layout.excluded == ((HEAD, kinds[HEAD].reason),)
    groups = build_groups(ToyForCausalLM(ToyConfig(norm_over_heads=True)))
    assert {b.kind for b in groups.blocks} == {MLP_CHANNEL}  # the excluded kind is not offered


def test_unknown_mlp_leaves_the_attention_prunable():
    # An MLP of no known form no longer refuses the model type: the attention is covered, the MLP left as it is.
    report = check_architecture(ToyConfig(mlp_names=("ffn_in", "ffn_out")))
    assert report.error is None
    assert report.exact_kinds == [HEAD, "attention_sublayer"]
    assert report.absent == ["the MLP of layers 0, 1 of 2 (not of the layout's form)"]
    assert "not pruned: the MLP of layers 0, 1 of 2" in str(report)
    model = ToyForCausalLM(ToyConfig(mlp_names=("ffn_in", "ffn_out"))).eval()
    groups = build_groups(model)
    assert {b.kind for b in groups.blocks} == {HEAD}
    mlp = {k: v.clone() for k, v in model.model.layers[0].mlp.state_dict().items()}
    groups.zero_(model, [b.offset for b in groups.blocks])
    ref = model(**batch()).logits
    slim_model(model, groups)
    assert model.model.layers[0].attn.num_heads == 3
    assert (model(**batch()).logits - ref).abs().max().item() <= 1e-5
    after = model.model.layers[0].mlp.state_dict()
    assert all(torch.equal(after[k], v) for k, v in mlp.items())  # the unknown MLP is untouched


def test_unknown_structure_names_what_is_missing():
    config = ToyConfig(mlp_names=("ffn_in", "ffn_out"), qkv_name="mix")
    report = check_architecture(config)
    assert report.error is not None and not report.kinds
    assert "not recognised: attention projections" in report.error and "MLP projections" in report.error
    assert "mlp.ffn_in (64, 96)" in report.error and "attn.mix (64, 192)" in report.error
    assert "register_layout(model_type, layout" in report.error
    assert "architectures.py" not in report.error  # never asks to edit the installed library
    assert "not supported" in str(report)
    ARCHITECTURES.pop("toyformer", None)
    with pytest.raises(ValueError, match=r"cannot prune `model_type` 'toyformer' \(ToyForCausalLM\).*not recognised: "
                       r"attention projections"):  # fmt: skip
        build_groups(ToyForCausalLM(config))


def test_table_family_check_and_command(capsys):
    report = check_architecture(transformers.Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128))  # fmt: skip
    assert report.in_table
    assert report.exact_kinds == [MLP_CHANNEL, "kv_group", "query_slot", "attention_sublayer", "mlp_sublayer"]
    assert all(k.stock_uniform is None for k in report.kinds)
    assert check_main(["gpt2"]) == 0
    out = capsys.readouterr().out
    assert "model_type 'gpt2' (layout table)" in out
    assert "to_stock, head removed alike in every layer: no (stock GPT-2 derives the head size" in out
    assert check_main(["no-such-type"]) == 2


def test_command_on_a_slim_checkpoint(tmp_path, capsys):
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    groups = build_groups(model)
    groups.zero_(model, [b.offset for b in groups.blocks])
    slim_model(model, groups)
    model.save_pretrained(tmp_path)
    assert check_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model_type 'qwen2' (layout table)" in out and "kv_group" in out


@pytest.mark.slow
def test_command_in_fresh_processes():
    # Fresh processes: a slim Mixtral is the first model saved there (transformers' checkpoint renaming of fused
    # experts must not apply to slim checkpoints), and Phi-3 is outside the table (fused `qkv_proj`, which its code
    # splits with sizes read from the config: head removal fails the check and is excluded).
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = {}
    for model_type in ("mixtral", "phi3"):
        proc = subprocess.run([sys.executable, "-m", "hf_hesso.check", model_type], capture_output=True, text=True,
                              timeout=300, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        out[model_type] = proc.stdout
    assert re.search(r"expert_channel +24  exact", out["mixtral"])
    assert "(inferred from the module tree)" in out["phi3"]
    assert re.search(r"mlp_channel +192  exact", out["phi3"]) and re.search(r"head +8  excluded: ", out["phi3"])

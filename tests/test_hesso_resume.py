"""HESSO with real base optimizers: exact resume, zeroed base state, Accelerate, LR schedulers, closures."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from fixtures import tiny_batch, tiny_config
from transformers import AutoModelForCausalLM

from hf_hesso.groups import build_groups
from hf_hesso.optim import HESSO

SCHEDULE = dict(target_group_sparsity=0.4, start_pruning_step=2, pruning_periods=2, pruning_steps=8)
TOTAL_STEPS = 13


def adamw_no_decay(model):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-3
    )


def sgd_momentum(model):
    return torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9, weight_decay=0.01)


BASES = {
    "adamw_no_decay": adamw_no_decay,
    "sgd_momentum": sgd_momentum,
    "adamw_fused": lambda m: torch.optim.AdamW(m.parameters(), lr=5e-3, fused=True),
    "adam_foreach_off": lambda m: torch.optim.Adam(m.parameters(), lr=5e-3, foreach=False),
}


def build(base: str, name: str = "llama_mha", **schedule):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name))
    opt = HESSO(BASES[base](model), build_groups(model), **{**SCHEDULE, **schedule})
    return model, opt


def run(model, opt, steps: range) -> None:
    for n in steps:
        batch = tiny_batch("llama", seed=n)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("base", ["adamw_no_decay", "sgd_momentum"])
@pytest.mark.parametrize("stop", [4, 7])  # inside period 0 (fading), and in period 1 right after its selection
def test_resume_mid_period_matches_uninterrupted_run(base, stop):
    model, opt = build(base)
    run(model, opt, range(TOTAL_STEPS))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, opt = build(base)
    run(model, opt, range(stop))
    model_state, opt_state = round_trip(model.state_dict()), round_trip(opt.state_dict())
    del model, opt
    model, opt = build(base)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    assert opt.num_steps == stop
    run(model, opt, range(stop, TOTAL_STEPS))
    diff = max((p.detach() - reference[n]).abs().max().item() for n, p in model.named_parameters())
    assert diff <= 1e-6
    assert len(opt.pruned_groups) == round(0.4 * len(opt.groups))


@pytest.mark.parametrize("stop", [2, 6])  # inside the first and the second selection's window
def test_resume_inside_saliency_window_matches_uninterrupted_run(stop):
    # Selections at steps 3 and 7; saliency_steps=2 also scores steps 2 and 6: the running sum must survive a resume.
    schedule = dict(saliency_steps=2, saliency_direction="gradient")
    model, opt = build("adamw_no_decay", **schedule)
    run(model, opt, range(TOTAL_STEPS))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    selected = opt.redundant_groups.tolist()

    model, opt = build("adamw_no_decay", **schedule)
    run(model, opt, range(stop))
    assert opt.state_dict()["hesso"]["saliency_sum"].any()
    model_state, opt_state = round_trip(model.state_dict()), round_trip(opt.state_dict())
    model, opt = build("adamw_no_decay", **schedule)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    run(model, opt, range(stop, TOTAL_STEPS))
    assert opt.redundant_groups.tolist() == selected
    diff = max((p.detach() - reference[n]).abs().max().item() for n, p in model.named_parameters())
    assert diff <= 1e-6


@pytest.mark.parametrize("base", list(BASES))
def test_pruned_groups_zero_in_weights_and_base_state(base):
    model, opt = build(base)
    run(model, opt, range(TOTAL_STEPS))
    groups = opt.groups
    assert torch.equal(
        groups.zero_mask(), torch.zeros(len(groups), dtype=torch.bool).index_fill_(0, opt.pruned_groups, True)
    )
    pruned = torch.zeros(len(groups), dtype=torch.bool).index_fill_(0, opt.pruned_groups, True)
    params = groups.parameters()
    checked = 0
    for block in groups.blocks:
        idx = pruned[block.offset : block.offset + block.n].nonzero().squeeze(1)
        for sl in block.slices:
            p = params[sl.param]
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    rows = sl.view(value).index_select(sl.dim + 1, idx)
                    assert torch.equal(rows, torch.zeros_like(rows)), (sl.param, key)
                    checked += 1
    assert checked > 0


def test_state_dict_is_plain_and_rejects_mismatch():
    model, opt = build("adamw_no_decay")
    run(model, opt, range(4))
    state = round_trip(opt.state_dict())  # weights_only=True
    assert state["hesso"]["num_steps"] == 4
    other_model, other = build("adamw_no_decay", pruning_steps=10)
    # The default `saliency_steps` is min(4, start_pruning_step + 1, period length) = 3 here.
    with pytest.raises(ValueError, match=r"schedule .* = \[2, 2, 8, 3\].*\[2, 2, 10, 3\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="no 'hesso' entry"):
        other.load_state_dict(other.optimizer.state_dict())


def test_skipped_steps_keep_schedule_and_state():
    model, opt = build("adamw_no_decay")
    run(model, opt, range(3))
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    opt.zero_grad()
    for _ in range(3):
        opt.step()  # as after a skipped micro-batch: no gradient anywhere
    assert opt.num_steps == 3 and opt.current_period == 0
    assert all(torch.equal(v, state[k]) for k, v in opt.state[next(model.parameters())].items())


def test_closure_returns_loss():
    model, opt = build("sgd_momentum")
    batch = tiny_batch("llama")

    def closure():
        opt.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss

    reference, ref_opt = build("sgd_momentum")
    ref_loss = reference(**batch, labels=batch["input_ids"]).loss
    ref_loss.backward()
    ref_opt.step()
    loss = opt.step(closure)
    # The closure ran under grad mode inside the no-grad step, its loss came back, and the step used its gradients.
    assert torch.equal(loss.detach(), ref_loss.detach()) and opt.num_steps == 1
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_base_optimizer():
    model, opt = build("adamw_no_decay")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    assert all(g["initial_lr"] == 5e-3 for g in opt.optimizer.param_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for n in range(3):
            run(model, opt, range(n, n + 1))
            scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 / 4)
    assert opt.num_steps == 3


def test_accelerate_wrapping_round_trip():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(cpu=True)
        model, opt = build("adamw_no_decay")
        model, wrapped = accelerator.prepare(model, opt)
        assert wrapped.optimizer is opt
        for n in range(5):
            batch = tiny_batch("llama", seed=n)
            accelerator.backward(model(**batch, labels=batch["input_ids"]).loss)
            wrapped.step()
            wrapped.zero_grad()
        assert opt.num_steps == 5 and len(opt.redundant_groups) > 0
        state = round_trip(wrapped.state_dict())
        model2, opt2 = build("adamw_no_decay")
        model2.load_state_dict(model.state_dict())
        _, wrapped2 = accelerator.prepare(model2, opt2)
        wrapped2.load_state_dict(state)
        assert opt2.num_steps == 5 and torch.equal(opt2.redundant_groups, opt.redundant_groups)
        assert wrapped2.param_groups is opt2.optimizer.param_groups
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


class Drift(torch.optim.SGD):
    """An optimizer outside the known fixed-point set: it moves every weight, even with a zero gradient."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)


def test_unknown_optimizer_still_holds_zeros():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    opt = HESSO(Drift(model.parameters(), lr=1e-2), build_groups(model), **SCHEDULE)
    run(model, opt, range(TOTAL_STEPS))
    zero = opt.groups.zero_mask()
    assert int(zero.sum()) == len(opt.pruned_groups) == round(0.4 * len(opt.groups))

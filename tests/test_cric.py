"""CRIC: termination, the indispensable structure it exists for, resume mid-cycle, config errors, Trainer run."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from fixtures import hesso_args, lm_dataset, tiny_batch, tiny_config, tiny_model, tiny_tokenizer

from hf_hesso import build_groups
from hf_hesso.optim import CRIC, HESSO

KW = dict(target_group_sparsity=0.4, start_pruning_step=2, pruning_steps=4, sampling_steps=3)


def run_loop(model, opt, steps: int, first: int = 0) -> list[float]:
    """Hand-written loop with the one extra call CRIC needs (`observe_loss`); batch `n` is fixed by its seed."""
    losses = []
    for n in range(first, steps):
        batch = tiny_batch("llama", seed=n)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def make(seed: int = 0, **kwargs):
    model = tiny_model("llama", seed=seed)
    groups = build_groups(model)
    opt = CRIC(torch.optim.AdamW(model.parameters(), lr=5e-3), groups, **{**KW, **kwargs})
    return model, groups, opt


@pytest.mark.slow
@pytest.mark.parametrize("tolerance,max_cycles", [(0, 4), (5, 6), (10_000, 4)])
def test_search_ends_and_projects_its_final_set(tolerance, max_cycles, caplog):
    caplog.set_level(logging.INFO, logger="hf_hesso.optim.cric")
    model, groups, opt = make(tolerance=tolerance, max_cycles=max_cycles)
    run_loop(model, opt, opt.pruning_end_step + 1)
    log = opt.cycle_log
    assert opt.phase == "done"
    # Theorem 3.3 / Corollary 3.4: bounded by max_cycles and by N // (tolerance + 1) + 1.
    assert 1 <= len(log) <= opt.max_cycles_bound <= max_cycles
    # The history only grows, by exactly the new violating groups of each cycle, and is bounded by N.
    sizes = [e["history"] for e in log]
    assert sizes == sorted(sizes) and sizes[-1] <= len(groups)
    assert [b - a for a, b in zip([0] + sizes, sizes, strict=False)] == [e["new"] for e in log]
    # Projection on the final set: target reached, exactly those groups are zero.
    assert len(opt.pruned_groups) == round(0.4 * len(groups))
    assert groups.zero_mask().nonzero().squeeze(1).tolist() == opt.pruned_groups.tolist()
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CRIC cycle")]
    assert len(messages) == len(log)
    metrics = opt.metrics()
    assert metrics["cric/cycles"] == len(log) and metrics["cric/history_groups"] == sizes[-1]
    assert "cric/probe_loss_ratio/layer_0/kv_group" in metrics and metrics["hesso/group_sparsity"] == 0.4


def test_observe_loss_required():
    model, groups, opt = make()
    run_loop(model, opt, 2)  # warm-up steps need no loss
    batch = tiny_batch("llama")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with pytest.raises(RuntimeError, match=r"needs the loss of optimizer step 3.*observe_loss"):
        opt.step()


@pytest.mark.slow
def test_probes_restore_weights_exactly_on_every_block_kind():
    # Probes zero heads, key/value groups and query slots through the Block/Slice views, then restore them.
    model, groups, opt = make(start_pruning_step=0)
    assert {b.kind for b in groups.blocks} == {"mlp_channel", "kv_group", "query_slot"}
    run_loop(model, opt, 1)
    cached = {k: v.clone() for k, v in opt._cache.items()}
    for k in range(opt._num_probes()):
        b, r = divmod(k, len(opt.trial_ratios))
        block = groups.blocks[b]
        zero = groups.zero_mask()[block.offset : block.offset + block.n]
        assert int(zero.sum()) == min(max(1, int(opt.trial_ratios[r] * block.n)), block.n - 1)
        assert not bool(groups.zero_mask()[: block.offset].any())
        run_loop(model, opt, k + 2, first=k + 1)
    params = groups.parameters()
    for name, value in cached.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=0)
    assert not bool(opt.probe_loss_ratios.isnan().any())


# ---- The reason CRIC exists ----

CRITICAL = 7  # MLP channel of layer 0
TARGET_TOKEN = 9
SIGNAL, CONST = 0, 1  # hidden dimensions


def indispensable_model():
    """A LLaMA whose layer-0 MLP channel 7 has the smallest weights of all groups, yet the loss depends on it.

    The channel reads a constant input dimension and writes a tiny value into dimension SIGNAL, which nothing else
    writes to; the final norm's weight on SIGNAL (outside every group) amplifies it into a large logit of the token
    that every label asks for. Magnitude saliency sees a group 10x smaller than any other; removing it sends the loss
    from ~0 to ~ln(vocab).
    """
    torch.manual_seed(0)
    config = tiny_config("llama", tie_word_embeddings=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    inner = model.model
    with torch.no_grad():
        inner.embed_tokens.weight[:, SIGNAL] = 0
        inner.embed_tokens.weight[:, CONST] = 0.5
        for layer in inner.layers:
            layer.self_attn.o_proj.weight[SIGNAL] = 0
            layer.mlp.down_proj.weight[SIGNAL] = 0
        mlp = inner.layers[0].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[CRITICAL] = 0
            proj.weight[CRITICAL, CONST] = 0.05
        mlp.down_proj.weight[:, CRITICAL] = 0
        mlp.down_proj.weight[SIGNAL, CRITICAL] = 0.01
        inner.norm.weight[SIGNAL] = 1500.0
        model.lm_head.weight[:, SIGNAL] = 0
        model.lm_head.weight[TARGET_TOKEN, SIGNAL] = 1.0
    return model


def target_batch(seed: int) -> dict:
    batch = tiny_batch("llama", seed=seed)
    return {**batch, "labels": torch.full_like(batch["input_ids"], TARGET_TOKEN)}


def train(opt_cls, steps: int | None = None, **kwargs):
    model = indispensable_model()
    groups = build_groups(model)
    # A small learning rate: with Adam's per-element steps, a larger one lets the other channels rewrite the amplified
    # dimension within these few steps (measured: lr=1e-3 recovers fully), and this test is about the selection.
    base = torch.optim.AdamW(model.parameters(), lr=1e-5)
    crit = {"magnitude": 1.0}
    opt = opt_cls(base, groups, target_group_sparsity=0.3, importance_criteria=crit, pruning_steps=4, **kwargs)
    for n in range(steps or opt.pruning_end_step + 2):
        batch = target_batch(n)
        loss = model(**batch).loss
        loss.backward()
        if isinstance(opt, CRIC):
            opt.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        final = float(model(**target_batch(999)).loss)
    return model, groups, opt, final


def critical_index(groups) -> int:
    block = next(b for b in groups.blocks if b.layer == 0 and b.kind == "mlp_channel")
    return block.offset + CRITICAL


@pytest.mark.slow
def test_cric_keeps_indispensable_channel_that_hesso_removes():
    model = indispensable_model()
    groups = build_groups(model)
    index = critical_index(groups)
    with torch.no_grad():
        intact = float(model(**target_batch(999)).loss)
        groups.zero_(model, [index])
        broken = float(model(**target_batch(999)).loss)
    assert intact < 1e-3 and broken > 3.0, (intact, broken)

    _, _, hesso, hesso_loss = train(HESSO, start_pruning_step=2)
    # One-step magnitude saliency ranks the channel lowest of all: plain HESSO prunes it and the loss collapses.
    assert int(hesso.last_scores.argmin()) == index
    assert index in hesso.pruned_groups.tolist()
    assert hesso_loss > 0.3, hesso_loss

    _, groups, cric, cric_loss = train(CRIC, start_pruning_step=2, sampling_steps=2, max_cycles=2)
    # The probe that zeroes the lowest quarter of layer 0's MLP takes the channel and multiplies the loss.
    ratios = cric.probe_loss_ratios
    block = groups.block_ids[index]
    assert float(ratios[block, 0]) > 50, ratios
    assert index not in cric.pruned_groups.tolist()
    assert len(cric.pruned_groups) == round(0.3 * len(groups))
    assert cric_loss < 1e-3 and hesso_loss > 1e4 * cric_loss, (cric_loss, hesso_loss)
    print(
        f"intact {intact:.4g} broken {broken:.4g} hesso {hesso_loss:.4g} cric {cric_loss:.4g} ratio {ratios[block, 0]:.4g}"
    )


@pytest.mark.slow
def test_resume_mid_cycle_matches_uninterrupted(tmp_path):
    model, groups, opt = make(max_cycles=3)
    total = opt.pruning_end_step + 2
    run_loop(model, opt, total)
    # Stop in the middle of the second cycle (candidate set half faded), save weights-only, resume in a fresh run.
    middle = opt._probe_end + 3 + 1
    model2, groups2, opt2 = make(max_cycles=3)
    run_loop(model2, opt2, middle)
    assert opt2.phase == "cycles" and bool(opt2._candidates.any()) and opt2._cache is not None
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model3, groups3, opt3 = make(seed=123, max_cycles=3)
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    run_loop(model3, opt3, total, first=middle)
    assert opt3.cycle_log == opt.cycle_log and opt3.pruned_groups.tolist() == opt.pruned_groups.tolist()
    a, b = model.state_dict(), model3.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("cric_sampling_steps", 1, r"`cric_sampling_steps` must be an integer >= 2"),
        ("cric_max_cycles", 0, r"`cric_max_cycles` must be an integer >= 1"),
        ("cric_tolerance", -1, r"`cric_tolerance` must be an integer >= 0"),
        ("cric_start_step", -3, r"`cric_start_step` must be an integer >= 0"),
        ("cric_trial_ratios", [0.5, 1.0], r"`cric_trial_ratios` must be a non-empty list of fractions in \(0, 1\)"),
        ("cric_trial_ratios", [], r"`cric_trial_ratios` must be a non-empty list"),
        ("cric_loss_weight", -1.0, r"`cric_loss_weight` must be a finite number >= 0"),
        ("pruning_periods", 2, r"`cric=True` projects the final set in one period"),
    ],
)
def test_bad_cric_config(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        hesso_args(str(tmp_path), **{"cric": True, "pruning_periods": 1, "pruning_steps": 8, field: value})


def test_cric_direct_errors():
    model = tiny_model("llama")
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"`sampling_steps` must be an integer >= 2"):
        CRIC(base, build_groups(model), target_group_sparsity=0.3, sampling_steps=1)


@pytest.mark.slow
def test_trainer_schedule_must_fit_worst_case(tmp_path):
    from hf_hesso.trainer import HESSOTrainer

    args = hesso_args(str(tmp_path), cric=True, pruning_periods=1, pruning_steps=4, start_pruning_step=0)
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
    with pytest.raises(ValueError, match=r"With `cric=True` pruning may end as late as optimizer step 73"):
        trainer.train()


# A CRIC run of the Trainer on the tiny LLaMA: 6 blocks x 1 ratio = 6 probe steps; the worst case ends at
# 1 + 1 + 6 + 2 x 2 + 4 = 16 <= 20 steps.
CRIC_RUN = dict(
    max_steps=20,
    cric=True,
    pruning_periods=1,
    pruning_steps=4,
    start_pruning_step=1,
    cric_sampling_steps=2,
    cric_max_cycles=2,
    cric_trial_ratios=[0.5],
    gradient_accumulation_steps=2,
    per_device_train_batch_size=4,
)


@pytest.mark.slow
def test_trainer_end_to_end_gqa(tmp_path, caplog):
    from helpers import check_pruned, reference_logits, reload_in_fresh_process

    from hf_hesso.trainer import HESSOTrainer

    caplog.set_level(logging.INFO, logger="hf_hesso.optim.cric")
    args = hesso_args(
        str(tmp_path / "out"),
        **CRIC_RUN,
    )
    trainer = HESSOTrainer(
        model=tiny_model("llama"), args=args, train_dataset=lm_dataset(), processing_class=tiny_tokenizer()
    )
    trainer.train()
    cric = trainer.hesso_optimizer
    assert isinstance(cric, CRIC) and cric.phase == "done"
    check_pruned(trainer)
    assert len(cric.pruned_groups) == round(0.4 * len(trainer.groups))
    assert not bool(cric.probe_loss_ratios.isnan().any())
    assert any(r.getMessage().startswith("CRIC cycle") for r in caplog.records)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert any("cric/cycles" in e for e in logged) and any("cric/probe_loss_ratio_max" in e for e in logged)
    batch = tiny_batch("llama")
    expected = reference_logits(trainer.model, batch)
    trainer.save_model()
    reloaded = reload_in_fresh_process(str(tmp_path / "out"), "lm", batch, tmp_path)
    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=1e-5)
    assert reloaded["params"] < trainer.model.num_parameters()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `cric` | `True` |" in card and "| `cric_trial_ratios` | `[0.5]` |" in card


@pytest.mark.slow
def test_probes_read_the_task_loss_under_distillation(tmp_path, monkeypatch):
    """With a teacher, CRIC's reference and probe losses are the task term of the loss, not the mixed loss."""
    from hf_hesso.trainer import HESSOTrainer

    observed: dict[int, float] = {}
    original = CRIC.observe_loss

    def observe(self, loss):
        step = self.num_steps + 1  # the optimizer step the value belongs to (the Trainer's next global_step)
        observed[step] = observed.get(step, 0.0) + float(loss)
        original(self, loss)

    monkeypatch.setattr(CRIC, "observe_loss", observe)
    args = hesso_args(
        str(tmp_path / "out"),
        **CRIC_RUN,
        distill=True,
        distill_alpha=0.5,
    )
    trainer = HESSOTrainer(
        model=tiny_model("llama"), args=args, train_dataset=lm_dataset(), teacher_model=tiny_model("llama", seed=3)
    )
    trainer.train()
    cric = trainer.hesso_optimizer
    assert isinstance(cric, CRIC) and cric.phase == "done"
    logs = {e["step"]: e for e in trainer.state.log_history if "distill/task" in e}
    probes = cric.probe_loss_ratios.numel()
    assert len(observed) == 1 + probes  # the reference step and one step per probe
    for step, value in observed.items():
        entry = logs[step]
        assert math.isclose(value, entry["distill/task"], rel_tol=1e-6), (step, value, entry)
        # The mixed loss differs (the teacher is another model): the probes would read something else.
        assert abs(entry["loss"] - entry["distill/task"]) > 0.05
    first = min(observed)
    assert math.isclose(cric._ref_loss, observed[first], rel_tol=1e-6)
    ratios = [observed[step] / observed[first] for step in sorted(observed)[1:]]
    torch.testing.assert_close(cric.probe_loss_ratios.flatten(), torch.tensor(ratios, dtype=torch.float64))


def test_start_pruning_step_is_hesso_s_name_and_the_old_one_warns_for_one_release():
    model = tiny_model("llama")
    groups = build_groups(model)
    base = dict(target_group_sparsity=0.4, pruning_steps=4, sampling_steps=3)
    new = CRIC(torch.optim.AdamW(model.parameters(), lr=5e-3), groups, start_pruning_step=2, **base)
    with pytest.warns(FutureWarning, match=r"`CRIC\(start_step=...\)` is renamed `start_pruning_step`, as in `HESSO`"):
        old = CRIC(torch.optim.AdamW(model.parameters(), lr=5e-3), groups, start_step=2, **base)
    assert old.cric_start_step == new.cric_start_step == 2
    assert old.pruning_end_step == new.pruning_end_step
    with pytest.raises(TypeError, match=r"Pass `start_pruning_step` only: `start_step` is its former name"):
        CRIC(torch.optim.AdamW(model.parameters(), lr=5e-3), groups, start_step=2, start_pruning_step=2, **base)
    with pytest.raises(ValueError, match=r"`start_pruning_step` must be an integer >= 0"):
        CRIC(torch.optim.AdamW(model.parameters(), lr=5e-3), groups, start_pruning_step=-1, **base)


def test_settings_record_cric_s_own_as_the_card_shows_them(tmp_path):
    """`CRIC.settings()`, the card's one source: HESSO's settings with CRIC's start and its `cric_*` settings, so that
    `save_slim(model, dir, optimizer=cric)` records the same as the Trainer's card of a `cric=True` run."""
    from hf_hesso import save_slim

    model, groups, opt = make(max_cycles=3, tolerance=1, trial_ratios=(0.5,), loss_weight=0.5)
    settings = opt.settings()
    assert settings["start_pruning_step"] == 2  # CRIC's start, not the worst-case start of its HESSO period
    assert {k: settings[k] for k in settings if k.startswith("cric")} == {
        "cric": True,
        "cric_sampling_steps": 3,
        "cric_max_cycles": 3,
        "cric_tolerance": 1,
        "cric_trial_ratios": [0.5],
        "cric_loss_weight": 0.5,
    }
    assert settings["target_group_sparsity"] == 0.4 and settings["pruning_periods"] == 1
    card = save_slim(model, tmp_path / "out", optimizer=opt).report.settings
    recorded = {k: v for k, v in settings.items() if v is not None}  # the card leaves out unset values
    assert {k: card[k] for k in recorded} == recorded

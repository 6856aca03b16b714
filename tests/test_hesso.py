"""HESSO optimizer: schedule, saliency criteria, global selection, GQA units, parameter budget, errors, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import tiny_batch, tiny_model
from torch import nn

from hf_hesso.groups import MLP_CHANNEL, Block, GroupSet, Slice, build_groups
from hf_hesso.optim import HESSO
from hf_hesso.optim.saliency import CRITERIA, GroupStatistics

ENCODERS = ("bert", "roberta")  # trained as masked LMs here


def train_step(model, opt, name="llama", seed=0):
    batch = tiny_batch(name, seed=seed)
    labels = batch["input_ids"]
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def group_norms(groups: GroupSet) -> torch.Tensor:
    params = {n: p.detach() for n, p in groups.parameters().items()}
    return torch.cat([b.squared_norms(params) for b in groups.blocks]).sqrt()


# ---- Schedule ----


def test_schedule_selects_fades_linearly_and_holds_zeros():
    # lr = 0: only the projection moves the weights, so the fading is exactly the schedule's.
    model = tiny_model()
    groups = build_groups(model)
    start, periods, steps = 3, 2, 10  # T = 5; periods cover steps 4..8 and 9..13
    opt = HESSO(
        torch.optim.SGD(model.parameters(), lr=0.0),
        groups,
        target_group_sparsity=0.5,
        start_pruning_step=start,
        pruning_periods=periods,
        pruning_steps=steps,
    )
    assert opt.pruning_end_step == 13
    initial = group_norms(groups)
    selected_at, history = {}, []
    for n in range(1, 17):
        before = len(opt.redundant_groups)
        train_step(model, opt, seed=n)
        assert opt.num_steps == n
        if len(opt.redundant_groups) != before:
            selected_at[n] = len(opt.redundant_groups) - before
        history.append((n, opt.current_period, group_norms(groups), opt._selection_period.clone()))
    # One selection at the first step of each period, each taking half of the target (100 of 200 groups).
    assert selected_at == {4: 50, 9: 50}
    assert [p for _, p, _, _ in history] == [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    for n, _, norms, sel in history:
        for period, first in ((0, 4), (1, 9)):
            mine = sel == period
            if not mine.any() or n < first:
                continue
            t = n - first  # 0 at the selection step, T - 1 = 4 at the period's last step
            expected = initial[mine] * max(0, 4 - t) / 4
            if t >= 4:
                assert torch.equal(norms[mine], torch.zeros_like(norms[mine])), (n, period)
            else:
                torch.testing.assert_close(norms[mine], expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(norms[sel < 0], initial[sel < 0])
    assert len(opt.pruned_groups) == 100
    assert torch.equal(groups.zero_mask(), opt._selection_period >= 0)


def test_zeros_held_with_real_updates_and_final_sparsity():
    model = tiny_model()
    groups = build_groups(model)
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        groups,
        target_group_sparsity=0.3,
        start_pruning_step=2,
        pruning_periods=3,
        pruning_steps=11,  # T = 3, the last period takes 5 steps and ends at step 13
    )
    pruned_counts = []
    for n in range(1, 19):
        train_step(model, opt, seed=n)
        zero = groups.zero_mask()
        assert torch.equal(zero, torch.zeros_like(zero).index_fill_(0, opt.pruned_groups, True))
        pruned_counts.append(len(opt.pruned_groups))
    target = round(0.3 * len(groups))  # 60
    assert pruned_counts[4] == 20 and pruned_counts[7] == 40 and pruned_counts[12] == target
    assert pruned_counts[11] == 40 and pruned_counts[-1] == target
    assert opt.metrics()["hesso/group_sparsity"] == pytest.approx(0.3)


def test_skipped_steps_do_not_advance():
    model = tiny_model()
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        build_groups(model),
        target_group_sparsity=0.5,
        pruning_steps=4,
    )
    train_step(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    opt.step()  # no gradients at all: nothing happens
    assert opt.num_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- Saliency ----


def _toy_groups():
    """Three MLP-like channels: row i of `0.weight` (3 x 2) and column i of `1.weight` (2 x 3)."""
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False))
    block = Block(0, MLP_CHANNEL, 3, (Slice("0.weight", 0, 1, 3, 1), Slice("1.weight", 1, 1, 3, 1)), 4, 0)
    return model, GroupSet([block], "toy", {"0.weight": (3, 2), "1.weight": (2, 3)}, model=model)


# Hand-made case: x_g after the step and d_g, as [row of W1 (2), column of W2 (2)].
X = [[1.0, 2.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [2.0, 0.0, 1.0, 0.0]]
D = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
# ||x||^2 = 6, 2, 5; ||d||^2 = 2, 2, 3; <x, d> = 1, 2, 3.
EXPECTED = {
    "magnitude": [math.sqrt(6) / math.sqrt(13), math.sqrt(2) / math.sqrt(13), math.sqrt(5) / math.sqrt(13)],
    "avg_magnitude": [math.sqrt(6) / math.sqrt(13), math.sqrt(2) / math.sqrt(13), math.sqrt(5) / math.sqrt(13)],
    "cosine_similarity": [
        v / math.sqrt((1 / math.sqrt(12) + 1) ** 2 + 4 + (3 / math.sqrt(15) + 1) ** 2)
        for v in (1 / math.sqrt(12) + 1, 2.0, 3 / math.sqrt(15) + 1)
    ],
    "taylor_first_order": [1 / math.sqrt(14), 2 / math.sqrt(14), 3 / math.sqrt(14)],
    "taylor_second_order": [1 / math.sqrt(98), 4 / math.sqrt(98), 9 / math.sqrt(98)],
    # x and d are non-negative here, so sum |x * d| = <x, d>.
    "taylor_elementwise": [1 / math.sqrt(14), 2 / math.sqrt(14), 3 / math.sqrt(14)],
}


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c != "activation"])  # activation: forward-only
@pytest.mark.parametrize("lr", [1.0, 0.0])
def test_each_criterion_on_hand_computed_case(criterion, lr):
    model, groups = _toy_groups()
    x, d = torch.tensor(X), torch.tensor(D)
    with torch.no_grad():
        # With SGD at lr 1 the step moves x + d to x, so the direction the optimizer reports is exactly d; at lr 0
        # the weights stay at x and the direction falls back to the gradient, d as well.
        model[0].weight.copy_(x[:, :2] + lr * d[:, :2])
        model[1].weight.copy_((x[:, 2:] + lr * d[:, 2:]).T)
    model[0].weight.grad = d[:, :2].clone()
    model[1].weight.grad = d[:, 2:].T.clone()
    opt = HESSO(
        torch.optim.SGD(model.parameters(), lr=lr),
        groups,
        target_group_sparsity=0.34,
        pruning_steps=2,
        importance_criteria={criterion: 1.0},
    )
    opt.step()
    torch.testing.assert_close(opt.last_scores, torch.tensor(EXPECTED[criterion], dtype=torch.float64))
    assert opt.redundant_groups.tolist() == [int(torch.tensor(EXPECTED[criterion]).argmin())]


def _score_toy(x: torch.Tensor, grad: torch.Tensor, base, **kw) -> tuple[HESSO, torch.Tensor]:
    """One scoring step of HESSO on the toy channels from weights `x` and gradient `grad`; returns it and `x` after."""
    model, groups = _toy_groups()
    with torch.no_grad():
        model[0].weight.copy_(x[:, :2])
        model[1].weight.copy_(x[:, 2:].T)
    model[0].weight.grad = grad[:, :2].clone()
    model[1].weight.grad = grad[:, 2:].T.clone()
    opt = HESSO(base(model.parameters()), groups, target_group_sparsity=0.34, pruning_steps=2, **kw)
    opt.step()
    after = torch.cat([model[0].weight.detach(), model[1].weight.detach().T], dim=1)
    return opt, after


def test_taylor_elementwise_does_not_cancel_signs():
    # Group 2: x = (2, 0, -1, 0), d = (1, 1, 1, 0): <x, d> = 1 but sum |x * d| = 3.
    x = torch.tensor([[1.0, -2.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [2.0, 0.0, -1.0, 0.0]])
    d = torch.tensor(D)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.0)  # noqa: E731
    first, _ = _score_toy(x, d, sgd, importance_criteria={"taylor_first_order": 1.0})
    torch.testing.assert_close(first.last_scores, torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) / math.sqrt(6))
    elementwise, _ = _score_toy(x, d, sgd, importance_criteria={"taylor_elementwise": 1.0})
    expected = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / math.sqrt(14)
    torch.testing.assert_close(elementwise.last_scores, expected)
    assert elementwise.redundant_groups.tolist() == [0]


@pytest.mark.parametrize("criterion", ["taylor_first_order", "taylor_elementwise", "cosine_similarity"])
def test_gradient_direction_scores_the_raw_gradient(criterion):
    # AdamW's first step is lr * sign(grad)-like: the update direction differs from the gradient.
    x = torch.tensor(X)
    grad = torch.tensor([[0.5, -3.0, 0.1, 2.0], [1.0, 1.0, -4.0, 0.2], [-0.3, 2.0, 1.0, 1.0]])
    adamw = lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.0)  # noqa: E731
    opt, after = _score_toy(x, grad, adamw, importance_criteria={criterion: 1.0}, saliency_direction="gradient")
    stats = GroupStatistics(
        xx=(after * after).sum(1).double(),
        dd=(grad * grad).sum(1).double(),
        xd=(after * grad).sum(1).double(),
        axd=(after * grad).abs().sum(1).double(),
        numel=torch.full((3,), 4.0, dtype=torch.float64),
    )
    values = CRITERIA[criterion](stats)
    torch.testing.assert_close(opt.last_scores, values / values.norm())
    update, _ = _score_toy(x, grad, adamw, importance_criteria={criterion: 1.0})
    assert not torch.allclose(update.last_scores, opt.last_scores)


def test_saliency_steps_average_the_scores_of_the_window():
    # lr = 0: the weights stay at X, so every step's elementwise Taylor score is |X * g_step| summed per channel.
    # Channel 2 has the lowest score on the selection step alone, channel 0 on the mean over the three steps.
    x = torch.tensor(X)
    grads = [
        torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 4.0, 0.0, 4.0], [3.0, 0.0, 3.0, 0.0]]),
        torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 4.0, 0.0, 4.0], [3.0, 0.0, 3.0, 0.0]]),
        torch.tensor([[4.0, 4.0, 4.0, 4.0], [0.0, 4.0, 0.0, 4.0], [1.0, 0.0, 1.0, 0.0]]),
    ]

    def run(saliency_steps: int) -> HESSO:
        model, groups = _toy_groups()
        with torch.no_grad():
            model[0].weight.copy_(x[:, :2])
            model[1].weight.copy_(x[:, 2:].T)
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

    per_step = [(x * g).abs().sum(1).double() for g in grads]
    per_step = [v / v.norm() for v in per_step]
    one = run(1)
    torch.testing.assert_close(one.last_scores, per_step[-1])
    assert one.redundant_groups.tolist() == [2]
    window = run(3)
    torch.testing.assert_close(window.last_scores, sum(per_step) / 3)
    assert window.redundant_groups.tolist() == [0]
    assert not window.state_dict()["hesso"]["saliency_sum"].any()  # cleared once used


def test_saliency_window_steps_precede_every_selection():
    # start 2, 2 periods of 3 steps: selections at steps 3 and 6; with saliency_steps 2 the windows are {2, 3} and
    # {5, 6}. Every scored step is recorded; the others are plain base steps.
    model = tiny_model()
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        build_groups(model),
        target_group_sparsity=0.3,
        start_pruning_step=2,
        pruning_periods=2,
        pruning_steps=6,
        saliency_steps=2,
        saliency_direction="gradient",
    )
    scored = []
    inner = opt.score_step

    def spy():
        scored.append(opt.num_steps + 1)
        return inner()

    opt.score_step = spy
    for n in range(10):
        train_step(model, opt, seed=n)
    assert scored == [2, 3, 5, 6]
    assert len(opt.pruned_groups) == round(0.3 * len(opt.groups))


def test_criteria_raw_values_and_weighted_sum():
    stats = GroupStatistics(
        xx=torch.tensor([4.0, 9.0, 0.0]),
        dd=torch.tensor([1.0, 4.0, 1.0]),
        xd=torch.tensor([-2.0, 3.0, 0.0]),
        axd=torch.tensor([2.5, 3.0, 1.0]),
        numel=torch.tensor([2.0, 3.0, 4.0]),
    )
    torch.testing.assert_close(CRITERIA["magnitude"](stats), torch.tensor([2.0, 3.0, 0.0]))
    torch.testing.assert_close(CRITERIA["avg_magnitude"](stats), torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(CRITERIA["cosine_similarity"](stats), torch.tensor([0.0, 1.5, 1.0]))
    torch.testing.assert_close(CRITERIA["taylor_first_order"](stats), torch.tensor([2.0, 3.0, 0.0]))
    torch.testing.assert_close(CRITERIA["taylor_second_order"](stats), torch.tensor([2.0, 4.5, 0.0]))
    torch.testing.assert_close(CRITERIA["taylor_elementwise"](stats), torch.tensor([2.5, 3.0, 1.0]))
    from hf_hesso.optim.saliency import saliency_scores

    both = saliency_scores(stats, {"magnitude": 0.5, "avg_magnitude": 2.0})
    expected = 0.5 * torch.tensor([2.0, 3.0, 0.0]) / math.sqrt(13) + 2.0 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    torch.testing.assert_close(both, expected)


# ---- Selection ----


def _fill_groups(groups: GroupSet, indices: list[int], value: float) -> None:
    """Set every element of the given groups to `value` (a small constant makes them the least salient)."""
    params = groups.parameters()
    with torch.no_grad():
        for index in indices:
            for name, (dim, idx) in groups[index].indices().items():
                params[name].index_fill_(dim, idx, value)


def _magnitude_opt(model, groups, target, **kw):
    return HESSO(
        torch.optim.SGD(model.parameters(), lr=0.0),
        groups,
        target_group_sparsity=target,
        pruning_steps=2,
        importance_criteria={"magnitude": 1.0},
        **kw,
    )


def test_global_ranking_across_layers_and_kinds_never_empties_a_block():
    model = tiny_model()
    groups = build_groups(model)
    blocks = {(b.layer, b.kind): b for b in groups.blocks}
    mlp0, mlp1, kv0, kv1 = (
        blocks[(0, "mlp_channel")],
        blocks[(1, "mlp_channel")],
        blocks[(0, "kv_group")],
        blocks[(1, "kv_group")],
    )
    # Small constant weights in a few groups of different layers and kinds, the smallest in both kv groups of
    # layer 0 (so that only one of them may go).
    weak = {
        kv0.offset: 1e-4,
        kv0.offset + 1: 1e-4,
        mlp0.offset + 3: 1e-3,
        mlp1.offset + 50: 2e-3,
        kv1.offset + 1: 3e-3,
    }
    for index, value in weak.items():
        _fill_groups(groups, [index], value)
    opt = _magnitude_opt(model, groups, target=5 / len(groups))
    train_step(model, opt)
    # Layer 0 keeps one kv group, so the next weakest group anywhere is taken instead.
    chosen = set(opt.redundant_groups.tolist())
    assert len(chosen) == 5
    assert {mlp0.offset + 3, mlp1.offset + 50, kv1.offset + 1} <= chosen
    assert len(chosen & {kv0.offset, kv0.offset + 1}) == 1


def test_group_divisible_keeps_multiples():
    model = tiny_model()
    groups = build_groups(model)
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        groups,
        target_group_sparsity=0.4,
        pruning_periods=2,
        pruning_steps=4,
        group_divisible=8,
    )
    for n in range(5):
        train_step(model, opt, seed=n)
    sel = opt._selection_period >= 0
    for b in groups.blocks:
        kept = b.n - int(sel[b.offset : b.offset + b.n].sum())
        assert kept == b.n or (kept % 8 == 0 and kept >= 8), (b.kind, kept)
    # Within one chunk (8 groups) of the target, never above it.
    assert round(0.4 * len(groups)) - 8 < int(sel.sum()) <= round(0.4 * len(groups))


def test_gqa_units_zero_the_right_rows_and_columns():
    model = tiny_model("llama")  # 4 query heads, 2 kv heads, head_dim 16
    groups = build_groups(model, kinds=["kv_group", "query_slot"])
    kv0 = next(b for b in groups.blocks if b.kind == "kv_group" and b.layer == 0)
    qs1 = next(b for b in groups.blocks if b.kind == "query_slot" and b.layer == 1)
    _fill_groups(groups, [kv0.offset + 1, qs1.offset + 0], 1e-4)
    opt = _magnitude_opt(model, groups, target=2 / len(groups))
    train_step(model, opt)
    train_step(model, opt)
    assert opt.pruned_groups.tolist() == [kv0.offset + 1, qs1.offset]
    hd, rep = 16, 2
    attn0 = model.model.layers[0].self_attn
    attn1 = model.model.layers[1].self_attn
    # kv group 1 of layer 0: k/v rows of kv head 1, q rows of query heads 2 and 3, their o columns.
    for w in (attn0.k_proj.weight, attn0.v_proj.weight):
        assert torch.equal(w[hd : 2 * hd], torch.zeros_like(w[hd : 2 * hd])) and w[:hd].abs().sum() > 0
    q_rows = slice(rep * hd, 2 * rep * hd)
    assert torch.equal(attn0.q_proj.weight[q_rows], torch.zeros_like(attn0.q_proj.weight[q_rows]))
    assert torch.equal(attn0.o_proj.weight[:, q_rows], torch.zeros_like(attn0.o_proj.weight[:, q_rows]))
    assert attn0.q_proj.weight[: rep * hd].abs().sum() > 0
    # Query slot 0 of layer 1: query heads 0 and 2 (slot 0 of kv groups 0 and 1); k/v untouched.
    for head in (0, 2):
        rows = slice(head * hd, (head + 1) * hd)
        assert torch.equal(attn1.q_proj.weight[rows], torch.zeros_like(attn1.q_proj.weight[rows]))
        assert torch.equal(attn1.o_proj.weight[:, rows], torch.zeros_like(attn1.o_proj.weight[:, rows]))
    for head in (1, 3):
        assert attn1.q_proj.weight[head * hd : (head + 1) * hd].abs().sum() > 0
    assert attn1.k_proj.weight.abs().sum(1).min() > 0


def test_overlapping_kv_group_and_query_slot_fade_together():
    # Layer 0: kv group 1 (query heads 2, 3) and query slot 1 (query heads 1, 3) fade in the same period; head 3
    # belongs to both, so its q rows / o columns fade by the product of the two linear schedules.
    model = tiny_model("llama")  # 4 query heads, 2 kv heads, head_dim 16
    groups = build_groups(model, kinds=["kv_group", "query_slot"])
    kv0 = next(b for b in groups.blocks if b.kind == "kv_group" and b.layer == 0)
    qs0 = next(b for b in groups.blocks if b.kind == "query_slot" and b.layer == 0)
    _fill_groups(groups, [kv0.offset + 1, qs0.offset + 1], 1e-3)
    opt = HESSO(
        torch.optim.SGD(model.parameters(), lr=0.0),
        groups,
        target_group_sparsity=2 / len(groups),
        pruning_steps=5,
        importance_criteria={"magnitude": 1.0},
    )
    attn = model.model.layers[0].self_attn
    hd = 16
    q0, o0, k0 = (w.detach().clone() for w in (attn.q_proj.weight, attn.o_proj.weight, attn.k_proj.weight))
    for t in range(5):  # one period of 5 steps: step 1 selects; after step t + 1 a fading group keeps (4 - t) / 4
        train_step(model, opt)
        single = (4 - t) / 4
        for head, expected in ((0, 1.0), (1, single), (2, single), (3, single**2)):
            rows = slice(head * hd, (head + 1) * hd)
            torch.testing.assert_close(attn.q_proj.weight[rows], q0[rows] * expected, rtol=1e-6, atol=0)
            torch.testing.assert_close(attn.o_proj.weight[:, rows], o0[:, rows] * expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(attn.k_proj.weight[hd:], k0[hd:] * single, rtol=1e-6, atol=0)
        assert torch.equal(attn.k_proj.weight[:hd], k0[:hd])
    assert opt.pruned_groups.tolist() == [kv0.offset + 1, qs0.offset + 1]
    assert torch.equal(attn.q_proj.weight[hd:], torch.zeros_like(attn.q_proj.weight[hd:]))


def _coverage(groups: GroupSet) -> dict[str, torch.Tensor]:
    """Per parameter, True where some group owns the element."""
    params = groups.parameters()
    cover = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    for b in groups.blocks:
        for s in b.slices:
            s.view(cover[s.param]).fill_(True)
    return cover


@pytest.mark.parametrize("name", ["llama", "llama_mha", "bert"])
@pytest.mark.parametrize("target", [0.25, 0.6])
def test_param_budget_lands_within_one_group(name, target):
    model = tiny_model(name, head="AutoModelForMaskedLM" if name in ENCODERS else None)
    groups = build_groups(model)
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        groups,
        target_param_sparsity=target,
        pruning_periods=2,
        pruning_steps=4,
    )
    for n in range(5):
        train_step(model, opt, name=name, seed=n)
    cover = _coverage(groups)
    params = groups.parameters()
    prunable = sum(int(c.sum()) for c in cover.values())
    removed = sum(int((cover[n] & (p == 0)).sum()) for n, p in params.items())
    budget = target * prunable
    assert budget - int(groups.numel.max()) < removed <= budget + 1e-6
    metrics = opt.metrics()
    assert metrics["hesso/params_removed"] == removed  # overlapping GQA slices counted once
    assert metrics["hesso/param_sparsity"] == pytest.approx(removed / prunable)


def test_param_budget_ranks_by_score_per_parameter_relative_to_its_kind():
    # Equal weights everywhere except a few weak groups. A head (4096 parameters) has sqrt(4096 / 192) times the
    # norm of an MLP channel (192) but 21x its size: ranked by raw saliency per parameter, every head would go
    # before any channel. Relative to its kind, a group is only weak when it is weaker than its peers, so the weak
    # head and the weak channels go first, and the rest of the budget is spread over both kinds.
    model = tiny_model("llama_mha")
    groups = build_groups(model)
    with torch.no_grad():
        for p in groups.parameters().values():
            p.fill_(0.01)
    heads = [g for g in groups if g.kind == "head"]
    channels = [b for b in groups.blocks if b.kind == MLP_CHANNEL]
    weak = [groups.blocks[heads[1].block].offset + heads[1].index] + list(
        range(channels[1].offset, channels[1].offset + 10)
    )
    _fill_groups(groups, weak, 0.001)
    opt = HESSO(
        torch.optim.SGD(model.parameters(), lr=0.0),
        groups,
        target_param_sparsity=0.2,
        pruning_steps=2,
        importance_criteria={"magnitude": 1.0},
    )
    train_step(model, opt, name="llama_mha")
    chosen = set(opt.redundant_groups.tolist())
    assert set(weak) <= chosen
    kinds = groups.kinds()
    removed_heads = sum(kinds[i] == "head" for i in chosen)
    removed_channels = sum(kinds[i] == "mlp_channel" for i in chosen)
    # Raw per-parameter ranking would take 3 heads (all the budget allows) and 8 channels. Here the other heads
    # stand further above their kind's mean (one weak head of 8 lowers it more than 10 weak channels of 192 lower
    # theirs), so channels fill the budget: 20% of 69632 = 13926 = 4096 (weak head) + 51 x 192 + 38.
    assert removed_heads == 1 and removed_channels == 51


# ---- Errors ----


@pytest.mark.parametrize("name", ["llama", "llama_mha", "qwen3", "bert"])
def test_gradient_of_fully_zero_groups_is_exactly_zero_except_query_slot_outputs(name):
    # The claim `hold_zeros="auto"` rests on: once every slice of a group is zero, backprop gives exactly zero
    # gradient on all of it, except the output columns of a query slot.
    model = tiny_model(name, head="AutoModelForMaskedLM" if name in ENCODERS else None)
    groups = build_groups(model)
    # One group per block: a query slot then still reads the values of a kept key/value group.
    chosen = [b.offset for b in groups.blocks]
    groups.zero_(model, chosen)
    batch = tiny_batch(name)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in groups.parameters().items()}
    for index in chosen:
        group = groups[index]
        for s in group.slices:
            dim, rows = group.indices()[s.param]
            g = grads[s.param].index_select(dim, rows)
            if group.kind == "query_slot" and s.dim == 1:
                assert g.abs().max() > 0, (group, s.param)
            else:
                assert torch.equal(g, torch.zeros_like(g)), (group, s.param)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    ],
)
def test_hold_zeros_auto_matches_always(make_opt):
    runs = {}
    for mode in ("auto", "always"):
        torch.manual_seed(0)
        model = tiny_model()
        groups = build_groups(model)
        opt = HESSO(
            make_opt(model.parameters()),
            groups,
            target_group_sparsity=0.4,
            start_pruning_step=1,
            pruning_periods=2,
            pruning_steps=6,
            hold_zeros=mode,
        )
        for n in range(1, 16):
            train_step(model, opt, seed=n)
            assert torch.equal(
                groups.zero_mask(), torch.zeros(len(groups), dtype=torch.bool).index_fill_(0, opt.pruned_groups, True)
            )
        runs[mode] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in runs["always"].items():
        assert torch.equal(runs["auto"][key], value), key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_group_sparsity": 1.2}, r"`target_group_sparsity` must lie in \(0, 1\), got 1.2"),
        ({"target_param_sparsity": 0.0}, r"`target_param_sparsity` must lie in \(0, 1\), got 0.0"),
        ({"target_group_sparsity": 0.5, "target_param_sparsity": 0.5}, "Set exactly one of"),
        ({}, "Set exactly one of"),
        ({"target_group_sparsity": 0.5, "pruning_steps": 3, "pruning_periods": 2}, r"T >= 2.*at least 4"),
        ({"target_group_sparsity": 0.5, "importance_criteria": {"norm": 1.0}}, r"unknown criteria \['norm'\]"),
        ({"target_group_sparsity": 0.5, "importance_criteria": {"magnitude": -1.0}}, "must be finite and >= 0"),
        ({"target_group_sparsity": 0.5, "importance_criteria": {"magnitude": float("nan")}}, "must be finite"),
        ({"target_group_sparsity": 0.5, "importance_criteria": {"magnitude": 0.0}}, "at least one > 0"),
        ({"target_group_sparsity": 0.5, "group_divisible": 0}, "`group_divisible` must be an integer >= 1"),
        ({"target_group_sparsity": 0.5, "saliency_direction": "grad"}, "`saliency_direction` must be 'update'"),
        ({"target_group_sparsity": 0.5, "start_pruning_step": -1}, "`start_pruning_step` must be an integer >= 0"),
        ({"target_group_sparsity": 0.99}, r"at most 194 can go.*Lower `target_group_sparsity` to at most 0.970"),
        ({"target_group_sparsity": 0.001}, "removes nothing"),
        ({"target_group_sparsity": 0.5, "saliency_steps": 0}, "`saliency_steps` must be an integer >= 1, got 0"),
        (
            {"target_group_sparsity": 0.5, "saliency_steps": 3, "start_pruning_step": 1},
            r"only 1 warm-up steps.*Raise `start_pruning_step` to at least 2",
        ),
        (
            {"target_group_sparsity": 0.5, "saliency_steps": 3, "start_pruning_step": 4, "pruning_periods": 2},
            r"`saliency_steps`=3 is longer than a pruning period \(2 steps",
        ),
        (
            {"target_group_sparsity": 0.5, "hold_zeros": "never"},
            "`hold_zeros` must be 'auto' or 'always', got 'never'",
        ),
    ],
)
def test_invalid_hyper_parameters(kwargs, match):
    model = tiny_model()
    kwargs = {"pruning_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        HESSO(torch.optim.AdamW(model.parameters()), build_groups(model), **kwargs)


def test_groups_must_belong_to_the_optimizer():
    model, other = tiny_model(), tiny_model()
    with pytest.raises(ValueError, match="`groups` slice parameters that `optimizer` does not update"):
        HESSO(torch.optim.AdamW(other.parameters()), build_groups(model), target_group_sparsity=0.5, pruning_steps=2)
    frozen = [p for n, p in model.named_parameters() if "mlp" not in n]
    with pytest.raises(ValueError, match="mlp"):
        HESSO(torch.optim.AdamW(frozen), build_groups(model), target_group_sparsity=0.5, pruning_steps=2)
    with pytest.raises(TypeError, match="`optimizer` must be a `torch.optim.Optimizer`"):
        HESSO(object(), build_groups(model), target_group_sparsity=0.5, pruning_steps=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_steps": 4.0}, r"`pruning_steps` must be an integer >= 1, got 4.0 \(float\)"),
        ({"start_pruning_step": "2"}, r"`start_pruning_step` must be an integer >= 0, got '2' \(str\)"),
        ({"pruning_periods": True}, r"`pruning_periods` must be an integer >= 1, got True \(bool\)"),
        ({"saliency_steps": 1.5}, r"`saliency_steps` must be an integer >= 1"),
        ({"group_divisible": 2.0}, r"`group_divisible` must be an integer >= 1"),
        ({"importance_criteria": [("magnitude", 1.0)]}, r"`importance_criteria` must be a dict"),
        ({"importance_criteria": {"magnitude": "1"}}, r"`importance_magnitude` must be a number"),
        ({"target_group_sparsity": "0.5"}, r"`target_group_sparsity` must be a number"),
    ],
)
def test_wrong_types_raise_type_error(kwargs, match):
    model = tiny_model()
    kwargs = {"target_group_sparsity": 0.5, "pruning_steps": 4, **kwargs}
    with pytest.raises(TypeError, match=match):
        HESSO(torch.optim.AdamW(model.parameters()), build_groups(model), **kwargs)
    with pytest.raises(TypeError, match="`groups` must be a `GroupSet`"):
        HESSO(
            torch.optim.AdamW(model.parameters()),
            list(build_groups(model)),
            target_group_sparsity=0.5,
            pruning_steps=4,
        )


def test_pruning_steps_is_required():
    model = tiny_model()
    with pytest.raises(TypeError, match="pruning_steps"):
        HESSO(torch.optim.AdamW(model.parameters()), build_groups(model), target_group_sparsity=0.5)


def test_metrics_are_flat_floats():
    model = tiny_model()
    groups = build_groups(model)
    opt = HESSO(torch.optim.AdamW(model.parameters(), lr=1e-2), groups, target_group_sparsity=0.5, pruning_steps=3)
    for n in range(2):
        train_step(model, opt, seed=n)
    m = opt.metrics()
    assert all(k.startswith("hesso/") and isinstance(v, float) for k, v in m.items())
    assert m["hesso/selected_groups"] == 100 and m["hesso/pruned_groups"] == 0
    assert m["hesso/norm_redundant"] > 0 and m["hesso/norm_important"] > 0
    train_step(model, opt, seed=3)
    m = opt.metrics()
    assert m["hesso/pruned_groups"] == 100 and m["hesso/norm_redundant"] == 0.0 and m["hesso/group_sparsity"] == 0.5
    per_kind = sum(m[f"hesso/pruned_groups/{k}"] for k in ("mlp_channel", "kv_group", "query_slot"))
    per_layer = m["hesso/pruned_groups/layer_0"] + m["hesso/pruned_groups/layer_1"]
    assert per_kind == per_layer == 100


def test_saliency_scores_per_kind_normalisation():
    from hf_hesso.optim.saliency import saliency_scores

    xx = torch.tensor([1.0, 9.0, 100.0, 900.0], dtype=torch.float64)
    stats = GroupStatistics(
        xx=xx,
        dd=torch.ones(4, dtype=torch.float64),
        xd=torch.zeros(4, dtype=torch.float64),
        axd=torch.zeros(4, dtype=torch.float64),
        numel=torch.tensor([2.0, 2.0, 50.0, 50.0], dtype=torch.float64),
    )
    kinds = torch.tensor([0, 0, 1, 1])
    # magnitude 1, 3 | 10, 30: each kind divided by its RMS (sqrt(5) and 10 sqrt(5)) gives the same relative scores.
    scores = saliency_scores(stats, {"magnitude": 1.0}, kinds=kinds)
    torch.testing.assert_close(scores, torch.tensor([1, 3, 1, 3], dtype=torch.float64) / math.sqrt(5))
    # The paper's all-groups norm keeps the kinds on one scale.
    paper = saliency_scores(stats, {"magnitude": 1.0})
    torch.testing.assert_close(paper, torch.tensor([1, 3, 10, 30], dtype=torch.float64) / math.sqrt(1010))

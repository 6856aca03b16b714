"""Distillation in `HESSOTrainer`: the loss formula, the frozen teacher, resume, LoRA, accumulation, validation."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from fixtures import cls_dataset, hesso_args, lm_dataset, tiny_model
from transformers import TrainerCallback

from hf_hesso import HESSOConfig, HESSOTrainer
from hf_hesso.distill import TEACHER_WEIGHTS_NAME, distillation_kl


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _dataset(name: str):
    return lm_dataset() if name == "llama" else cls_dataset()


def _hand_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """`sum_c p_t(c) * (log p_t(c) - log p_s(c))` per row, written out with exp/sum."""
    t, s = t.double() / temperature, s.double() / temperature
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    p_s = s.exp() / s.exp().sum(-1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(-1)


def _hand_top_k_kl(s: torch.Tensor, t: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    """Per row, the KL between the `k + 1`-way distributions: the teacher's top k classes and the rest, both
    softmaxes over all classes, the rest as `1 - sum of the top k` (float64)."""
    t, s = t.double() / temperature, s.double() / temperature
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    p_s = s.exp() / s.exp().sum(-1, keepdim=True)
    index = t.topk(k, dim=-1).indices
    q_t, q_s = p_t.gather(-1, index), p_s.gather(-1, index)
    q_t = torch.cat([q_t, 1 - q_t.sum(-1, keepdim=True)], -1)
    q_s = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    return (q_t * (q_t.log() - q_s.log())).sum(-1)


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_kl_matches_a_hand_computation_with_mask_and_top_k():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    kl, count = distillation_kl(s, t, temperature=2.0, mask=mask)
    assert count.item() == 4
    torch.testing.assert_close(kl.double(), _hand_kl(s[mask], t[mask], 2.0).sum(), rtol=1e-5, atol=1e-6)
    # Top-k: the teacher's 3 largest logits of each position and one bucket for the other 4 classes.
    kl_k, _ = distillation_kl(s, t, temperature=2.0, top_k=3, mask=mask)
    expected = _hand_top_k_kl(s[mask], t[mask], 2.0, 3).sum()
    torch.testing.assert_close(kl_k.double(), expected, rtol=1e-5, atol=1e-6)
    # Equal logits: zero, with and without top_k.
    assert distillation_kl(t, t)[0].abs().item() < 1e-6
    assert distillation_kl(t, t, top_k=3)[0].abs().item() < 1e-6
    # top_k = classes - 1 (the rest bucket is one class) and top_k >= classes: the full KL.
    full = distillation_kl(s, t, 2.0)[0]
    torch.testing.assert_close(distillation_kl(s, t, 2.0, top_k=6)[0], full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distillation_kl(s, t, 2.0, top_k=7)[0], full)
    # Grouping classes never raises a KL: every top-k KL is at most the full one.
    for k in range(1, 6):
        assert distillation_kl(s, t, 2.0, top_k=k)[0] <= full + 1e-6


def test_top_k_kl_counts_the_student_mass_outside_the_teachers_top_k():
    """A student that matches the teacher on the teacher's top 5 up to a constant, but puts 99% of its mass on the
    other classes: renormalised over the top 5 the two agree (KL 0, no gradient on the other logits); the top-k KL
    sees the 99%."""
    vocab, k = 50, 5
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, vocab, generator=g)
    top = t.topk(k, dim=-1).indices
    t = t.scatter_add(-1, top, torch.full((3, k), 4.0))  # the teacher's mass is mostly on its top 5
    outside = torch.ones_like(t, dtype=torch.bool).scatter(-1, top, False)
    top_mass = (t.exp() * ~outside).sum(-1, keepdim=True)
    rest_mass = (t.exp() * outside).sum(-1, keepdim=True)
    s = (t + (99 * top_mass / rest_mass).log() * outside).requires_grad_()
    torch.testing.assert_close((s.detach().softmax(-1) * outside).sum(-1), torch.full((3,), 0.99))
    kl, count = distillation_kl(s, t, top_k=k)
    torch.testing.assert_close(kl.double(), _hand_top_k_kl(s.detach(), t, 1.0, k).sum(), rtol=1e-5, atol=1e-6)
    # About log(100) per position from the teacher's top-k mass (over 0.9 here) that the student misses.
    assert count.item() == 3 and kl.item() / 3 > 3.5
    kl.backward()
    # Every logit outside the top k gets a gradient that pushes its mass down.
    assert bool((s.grad[outside] > 0).all())


@pytest.mark.parametrize("case", ["random", "student_rest_empty", "student_all_outside", "teacher_rest_empty"])
def test_top_k_kl_is_finite_with_bf16_logits(case):
    vocab, k = 128, 8
    g = torch.Generator().manual_seed(1)
    t = 30 * torch.randn(6, vocab, generator=g)
    s = 30 * torch.randn(6, vocab, generator=g)
    top = t.topk(k, dim=-1).indices
    outside = torch.ones_like(t, dtype=torch.bool).scatter(-1, top, False)
    if case == "student_rest_empty":
        s = s.masked_fill(outside, -1e4)
    elif case == "student_all_outside":
        s = s.masked_fill(~outside, -1e4)
    elif case == "teacher_rest_empty":
        t = t.masked_fill(outside, -1e4)
    s = s.bfloat16().requires_grad_()
    t = t.bfloat16()
    kl, _ = distillation_kl(s, t, temperature=2.0, top_k=k)
    assert kl.dtype == torch.float32 and math.isfinite(kl.item()) and kl.item() >= 0
    kl.backward()
    assert bool(s.grad.isfinite().all())
    # The same KL as from the bf16 values in fp32 (the KL is computed in fp32).
    torch.testing.assert_close(kl, distillation_kl(s.detach().float(), t.float(), 2.0, top_k=k)[0])


def test_kl_refuses_different_output_spaces():
    with pytest.raises(ValueError, match=r"teacher's logits have shape \(2, 5\) but the student's \(2, 4\)"):
        distillation_kl(torch.zeros(2, 4), torch.zeros(2, 5))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_training_loss_is_the_hand_computed_formula(name, tmp_path):
    """`compute_loss` = alpha * T^2 * KL + (1 - alpha) * task loss, on the positions the task loss counts."""
    model = _no_dropout(tiny_model(name))  # the hand computation runs its own forward pass
    alpha, temperature = 0.3, 2.0
    args = hesso_args(str(tmp_path), distill=True, distill_alpha=alpha, distill_temperature=temperature)
    trainer = HESSOTrainer(model=model, args=args, train_dataset=_dataset(name))
    # A student that differs from the teacher, and labels masked in places (ignored positions must not count).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = _dataset(name)
    batch = {k: torch.tensor(ds[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    if name == "llama":
        batch["labels"][0, 5:9] = -100
        batch["labels"][2, :3] = -100
    model.train()
    loss = trainer.compute_loss(model, dict(batch))

    with torch.no_grad():
        out = model(**batch)
        teacher_logits = trainer.distiller.teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        s, t = out.logits, teacher_logits.logits
        if name == "llama":
            valid = batch["labels"][:, 1:] != -100
            s, t = s[:, :-1][valid], t[:, :-1][valid]
        kl = _hand_kl(s, t, temperature).mean()
        expected = alpha * temperature**2 * kl + (1 - alpha) * out.loss.double()
    assert kl > 0
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_alpha_zero_trains_exactly_like_no_distillation(tmp_path):
    runs = []
    for extra in ({}, dict(distill=True, distill_alpha=0.0)):
        trainer = HESSOTrainer(
            model=tiny_model("llama"),
            args=hesso_args(str(tmp_path / str(len(runs))), **extra),
            train_dataset=lm_dataset(),
        )
        trainer.train()
        runs.append(trainer)
    plain, distilled = (_state(t.model) for t in runs)
    for key in plain:
        torch.testing.assert_close(distilled[key], plain[key], rtol=0, atol=0)
    assert runs[0].hesso_optimizer.pruned_groups.tolist() == runs[1].hesso_optimizer.pruned_groups.tolist()


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.slow
def test_teacher_is_frozen_unchanged_and_apart_from_the_student(name, tmp_path):
    model = tiny_model(name)
    start = _state(model)
    args = hesso_args(str(tmp_path / "out"), distill=True, distill_alpha=0.7, logging_steps=1)
    trainer = HESSOTrainer(model=model, args=args, train_dataset=_dataset(name))
    teacher = trainer.distiller.teacher
    trainer.train()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for key, value in _state(teacher).items():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    # The student moved and was pruned; the teacher is not a part of it.
    assert len(trainer.hesso_optimizer.pruned_groups) > 0
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in trainer.model.parameters())
    # Both terms are logged, and the logged loss is their weighted sum.
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == args.max_steps
    for entry in logged:
        assert entry["distill/kl"] >= 0
        expected = 0.7 * entry["distill/kl"] + 0.3 * entry["distill/task"]
        assert math.isclose(entry["loss"], expected, rel_tol=1e-4, abs_tol=1e-6), entry
    # The slim model holds no teacher weights; its card records the distillation.
    trainer.save_model(str(tmp_path / "slim"))
    card = (tmp_path / "slim" / "README.md").read_text()
    assert "| `distill_alpha` | `0.7` |" in card and "| `saliency` | `taylor` |" in card
    assert not any("teacher" in f for f in os.listdir(tmp_path / "slim"))


@pytest.mark.slow
def test_resumed_run_distils_from_the_same_teacher(tmp_path):
    """Resume from step 7 of 14 equals the uninterrupted run, even when the resumed trainer starts from another
    model: the teacher comes back from the checkpoint."""
    extra = dict(distill=True, distill_alpha=0.6, distill_temperature=2.0, save_strategy="steps", save_steps=7)
    full = HESSOTrainer(
        model=tiny_model("llama"), args=hesso_args(str(tmp_path / "a"), **extra), train_dataset=lm_dataset()
    )
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-7"
    assert (checkpoint / TEACHER_WEIGHTS_NAME).is_file()
    # The checkpoint's model weights are the student's only.
    from safetensors.torch import load_file

    student_keys = set(load_file(str(checkpoint / "model.safetensors")))
    assert student_keys <= set(full.model.state_dict())

    other = tiny_model("llama", seed=1)  # a different start: its copy would be the wrong teacher
    resumed = HESSOTrainer(model=other, args=hesso_args(str(tmp_path / "b"), **extra), train_dataset=lm_dataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = _state(full.model), _state(resumed.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    for key, value in _state(resumed.distiller.teacher).items():
        torch.testing.assert_close(value, _state(full.distiller.teacher)[key], rtol=0, atol=0)


def _accumulation_args(tmp_path, batch: int, accumulation: int, **extra):
    """Distillation at alpha 0.5 with `batch` examples per micro-batch and `accumulation` micro-batches per step."""
    return hesso_args(
        str(tmp_path / f"ga{accumulation}"),
        distill=True,
        distill_alpha=0.5,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        **extra,
    )


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    runs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        args = _accumulation_args(tmp_path, batch, accumulation)
        trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
        trainer.train()
        runs.append(trainer)
    a, b = (_state(t.model) for t in runs)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    # The logged terms are per optimizer step, on the same scale either way.
    kl = [[e["distill/kl"] for e in t.state.log_history if "distill/kl" in e] for t in runs]
    torch.testing.assert_close(torch.tensor(kl[1]), torch.tensor(kl[0]), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_top_k_and_bf16_train(tmp_path):
    """bf16 training with `distill_top_k` stays finite, and the top-k KL is the one logged: on the first step (same
    student, teacher and batch) it is below the full KL, as grouping classes lowers a KL."""
    kl = {}
    for top_k in (8, None):
        args = hesso_args(str(tmp_path / str(top_k)), distill=True, distill_top_k=top_k, bf16=True)
        trainer = HESSOTrainer(
            model=tiny_model("llama"), args=args, train_dataset=lm_dataset(), teacher_model=tiny_model("llama", seed=3)
        )
        trainer.train()
        kl[top_k] = [e["distill/kl"] for e in trainer.state.log_history if "distill/kl" in e]
        assert len(kl[top_k]) == args.max_steps and all(math.isfinite(v) and v >= 0 for v in kl[top_k])
    assert kl[8][0] < 0.95 * kl[None][0]


class _FirstStepGradients(TrainerCallback):
    """Keeps the gradients of the first optimizer step (after accumulation, before the step), then stops."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_gradient_accumulation_keeps_the_distillation_mix(name, tmp_path):
    """Batch 4 and 2 x 2 accumulated give the same gradients and the same two terms, so `alpha` means the same.

    The LLaMA normalises its loss by the Trainer's `num_items_in_batch`; BERT's sequence classifier accepts
    `**kwargs` but ignores it (its loss is the micro-batch mean), so the Trainer divides neither term by the
    accumulation steps and the task term alone would count twice at 2 steps.
    """
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        args = _accumulation_args(tmp_path, batch, accumulation, max_grad_norm=0.0)
        spy = _FirstStepGradients()
        teacher = _no_dropout(tiny_model(name, seed=3))
        if name == "bert":
            with torch.no_grad():  # a confident teacher: the fresh heads' logits are close to 0
                teacher.classifier.weight.mul_(30)
        trainer = HESSOTrainer(
            model=_no_dropout(tiny_model(name)),
            args=args,
            train_dataset=_dataset(name),
            teacher_model=teacher,
            callbacks=[spy],
        )
        trainer.train()
        logged = [e for e in trainer.state.log_history if "distill/kl" in e]
        assert trainer.state.global_step == 1 and len(logged) == 1
        runs.append((spy.grads, logged[0]))
    (grads, log), (grads_ga, log_ga) = runs
    assert log["distill/kl"] > 0.01 and log["distill/task"] > 0.1
    for key in ("distill/kl", "distill/task"):
        assert math.isclose(log_ga[key], log[key], rel_tol=1e-5), (key, log_ga[key], log[key])
    assert grads.keys() == grads_ga.keys()
    for key, value in grads.items():
        torch.testing.assert_close(grads_ga[key], value, rtol=1e-4, atol=1e-7, msg=key)


def test_teacher_model_argument(tmp_path):
    student = tiny_model("llama")
    teacher = tiny_model("llama", seed=3)
    expected = _state(teacher)
    trainer = HESSOTrainer(
        model=student,
        args=hesso_args(str(tmp_path / "a"), distill=True),
        train_dataset=lm_dataset(),
        teacher_model=teacher,
    )
    assert trainer.distiller.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    for key, value in _state(teacher).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    # A path is loaded with the student's class.
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = HESSOTrainer(
        model=tiny_model("llama"),
        args=hesso_args(str(tmp_path / "b"), distill=True),
        train_dataset=lm_dataset(),
        teacher_model=str(tmp_path / "teacher"),
    )
    for key, value in _state(trainer.distiller.teacher).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_lora_teacher_is_the_merged_start_model(tmp_path):
    from peft import LoraConfig

    model = tiny_model("llama")
    batch = {"input_ids": torch.tensor(lm_dataset()[:2]["input_ids"])}
    with torch.no_grad():
        expected = model(**batch).logits
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    args = hesso_args(str(tmp_path), distill=True, learning_rate=1e-2)
    trainer = HESSOTrainer(model=model, args=args, train_dataset=lm_dataset(), peft_config=lora)
    teacher = trainer.distiller.teacher
    assert not any("lora" in name for name, _ in teacher.named_parameters())
    trainer.train()
    # HESSO faded and zeroed frozen base slices of the student; the teacher still computes the start model.
    assert len(trainer.hesso_optimizer.pruned_groups) > 0
    with torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(distill=True, distill_alpha=1.5), r"`distill_alpha` must lie in \[0, 1\], got 1.5"),
        (dict(distill=True, distill_temperature=0.0), r"`distill_temperature` must be > 0, got 0.0"),
        (dict(distill=True, distill_top_k=0), r"`distill_top_k` must be a positive integer or None, got 0"),
    ],
)
def test_config_errors(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        hesso_args(str(tmp_path), **kwargs)


def test_trainer_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"`teacher_model` was given but `args.distill` is False"):
        HESSOTrainer(model=model, args=hesso_args(str(tmp_path)), teacher_model=copy.deepcopy(model))
    with pytest.raises(ValueError, match=r"`teacher_model` shares \d+ parameter tensor\(s\) with the model"):
        HESSOTrainer(model=model, args=hesso_args(str(tmp_path), distill=True), teacher_model=model)
    with pytest.raises(ValueError, match=r"`teacher_model` must be a model or a path"):
        HESSOTrainer(model=model, args=hesso_args(str(tmp_path), distill=True), teacher_model=3)
    assert isinstance(hesso_args(str(tmp_path), distill=True), HESSOConfig)

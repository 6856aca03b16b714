"""Distillation in `HESSOTrainer`: the loss formula, the frozen teacher, resume, LoRA, accumulation, validation."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from dist_train_worker import cls_dataset, hesso_args, lm_dataset, tiny_model

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


def test_kl_matches_a_hand_computation_with_mask_and_top_k():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    kl, count = distillation_kl(s, t, temperature=2.0, mask=mask)
    assert count.item() == 4
    torch.testing.assert_close(kl.double(), _hand_kl(s[mask], t[mask], 2.0).sum(), rtol=1e-5, atol=1e-6)
    # Top-k: both distributions renormalised over the teacher's 3 largest logits of each position.
    kl_k, _ = distillation_kl(s, t, temperature=2.0, top_k=3, mask=mask)
    idx = t[mask].topk(3, dim=-1).indices
    expected = _hand_kl(s[mask].gather(-1, idx), t[mask].gather(-1, idx), 2.0).sum()
    torch.testing.assert_close(kl_k.double(), expected, rtol=1e-5, atol=1e-6)
    # Equal logits: zero; top_k >= classes: the full KL.
    assert distillation_kl(t, t)[0].abs().item() < 1e-6
    torch.testing.assert_close(distillation_kl(s, t, 2.0, top_k=7)[0], distillation_kl(s, t, 2.0)[0])


def test_kl_refuses_different_output_spaces():
    with pytest.raises(ValueError, match=r"teacher's logits have shape \(2, 5\) but the student's \(2, 4\)"):
        distillation_kl(torch.zeros(2, 4), torch.zeros(2, 5))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_training_loss_is_the_hand_computed_formula(name, tmp_path):
    """`compute_loss` = alpha * T^2 * KL + (1 - alpha) * task loss, on the positions the task loss counts."""
    model = tiny_model(name)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the hand computation runs its own forward pass
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


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    runs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        args = hesso_args(
            str(tmp_path / f"ga{accumulation}"),
            distill=True,
            distill_alpha=0.5,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
        trainer.train()
        runs.append(trainer)
    a, b = (_state(t.model) for t in runs)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    # The logged terms are per optimizer step, on the same scale either way.
    kl = [[e["distill/kl"] for e in t.state.log_history if "distill/kl" in e] for t in runs]
    torch.testing.assert_close(torch.tensor(kl[1]), torch.tensor(kl[0]), rtol=1e-3, atol=1e-6)


def test_top_k_and_bf16_train(tmp_path):
    args = hesso_args(str(tmp_path), distill=True, distill_top_k=8, bf16=True)
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
    trainer.train()
    kl = [e["distill/kl"] for e in trainer.state.log_history if "distill/kl" in e]
    assert len(kl) == args.max_steps and all(math.isfinite(v) and v >= 0 for v in kl)


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

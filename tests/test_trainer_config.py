"""`HESSOConfig`: defaults and every cross-field rule, each with its documented error."""

from __future__ import annotations

import pytest

from hf_hesso.config import HESSOConfig


def make(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=2000,
        target_group_sparsity=0.4,
        start_pruning_step=200,
        pruning_periods=10,
        pruning_steps=1000,
        report_to="none",
    )
    base.update(kwargs)
    return HESSOConfig(**base)


def test_issue_example_and_defaults(tmp_path):
    args = make(tmp_path)
    assert args.pruning_end_step == 1200
    # The measured best: elementwise Taylor on the gradient, averaged over 4 batches.
    assert args.saliency == "taylor" and args.saliency_steps == 4
    assert args.importance_criteria == {
        "magnitude": 0.0,
        "avg_magnitude": 0.0,
        "cosine_similarity": 0.0,
        "taylor_first_order": 0.0,
        "taylor_second_order": 0.0,
        "taylor_elementwise": 1.0,
        "activation": 0.0,
    }
    # The direction is the preset's, resolved by HESSO (gradient; the update direction with LoRA).
    assert args.saliency_direction is None
    # The paper's mix is one flag away.
    paper = make(tmp_path, saliency="paper")
    assert paper.importance_criteria == {
        "magnitude": 0.2,
        "avg_magnitude": 0.2,
        "cosine_similarity": 0.2,
        "taylor_first_order": 0.2,
        "taylor_second_order": 0.2,
        "taylor_elementwise": 0.0,
        "activation": 0.0,
    }
    # Weights set by hand: `custom`, the others count 0.
    custom = make(tmp_path, importance_magnitude=1.0)
    assert custom.saliency == "custom" and custom.importance_criteria["magnitude"] == 1.0
    assert sum(custom.importance_criteria.values()) == 1.0
    assert args.prune_kinds is None and args.group_divisible == 1
    # The schedule may end exactly at the last step.
    make(tmp_path, max_steps=1200)
    # Epoch-based runs are checked by the trainer once the number of steps is known.
    make(tmp_path, max_steps=-1, num_train_epochs=1)


def test_hf_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(HESSOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "100",
            "--target_param_sparsity",
            "0.3",
            "--pruning_steps",
            "40",
            "--pruning_periods",
            "4",
            "--prune_kinds",
            "mlp_channel",
            "kv_group",
            "--report_to",
            "none",
        ]
    )
    assert args.target_param_sparsity == 0.3 and args.target_group_sparsity is None
    assert args.prune_kinds == ["mlp_channel", "kv_group"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_group_sparsity=None), r"Set exactly one of `target_group_sparsity` and `target_param_sparsity`"),
        (
            dict(target_param_sparsity=0.2),
            r"Set exactly one of .*target_group_sparsity=0.4, target_param_sparsity=0.2",
        ),
        (dict(target_group_sparsity=1.0), r"`target_group_sparsity` must lie in \(0, 1\), got 1.0"),
        (dict(target_group_sparsity=None, target_param_sparsity=0.0), r"`target_param_sparsity` must lie in \(0, 1\)"),
        (dict(start_pruning_step=-1), r"`start_pruning_step` must be an integer >= 0, got -1"),
        (
            dict(saliency_direction="sign"),
            r"`saliency_direction` must be 'update' or 'gradient' \(the base optimizer's step, the paper's; or the raw gradient\), got 'sign'",
        ),
        (dict(pruning_periods=0), r"`pruning_periods` must be an integer >= 1, got 0"),
        (dict(pruning_steps=None), r"`pruning_steps` is required"),
        (
            dict(pruning_steps=15),
            r"`pruning_steps` \(15\) // `pruning_periods` \(10\) = 1 optimizer steps per period, but a period needs at "
            r"least 2 \(T >= 2\).*Raise `pruning_steps` to at least 20",
        ),
        (
            dict(max_steps=1000),
            r"ends at optimizer step `start_pruning_step` \+ `pruning_steps` = 200 \+ 1000 = 1200, after `max_steps` "
            r"\(1000; optimizer steps count after gradient accumulation\)\. Lower .* at most 1000",
        ),
        (dict(importance_magnitude=-0.1), r"importance weights .* must be finite and >= 0 with at least one > 0"),
        (
            dict(
                importance_magnitude=0,
                importance_avg_magnitude=0,
                importance_cosine_similarity=0,
                importance_taylor_first_order=0,
                importance_taylor_second_order=0,
            ),
            r"importance weights .* must be finite and >= 0 with at least one > 0",
        ),
        (
            dict(saliency="best"),
            r"`saliency` must be one of \['activation', 'paper', 'taylor', 'custom'\], got 'best'",
        ),
        (
            dict(saliency="paper", importance_magnitude=1.0),
            r"`saliency='paper'` sets the criteria weights itself, but weights were also given",
        ),
        (dict(saliency="custom"), r"`saliency='custom'` needs the criteria weights"),
        (
            dict(saliency="activation", cric=True, pruning_periods=1, max_steps=5000),
            r"activation criterion .* which CRIC does not use",
        ),
        (dict(prune_kinds=["neuron"]), r"`prune_kinds` must be a non-empty list of kinds among .*got \['neuron'\]"),
        (dict(prune_kinds=[]), r"`prune_kinds` must be a non-empty list"),
        (
            dict(group_divisible=0),
            r"`group_divisible` must be an integer >= 1 \(use 1 for no rounding of the kept counts\), got 0",
        ),
        (dict(saliency_steps=0), r"`saliency_steps` must be an integer >= 1, got 0"),
        (
            dict(saliency_steps=202),
            r"`saliency_steps`=202 .* `start_pruning_step`=200 leaves only 200 warm-up steps\. Raise "
            r"`start_pruning_step` to at least 201",
        ),
        (dict(saliency_steps=101), r"`saliency_steps`=101 is longer than a pruning period \(100 steps"),
        (
            dict(saliency_steps=2, cric=True, pruning_periods=1),
            r"with `cric=True` CRIC accumulates its own scores.*Leave `saliency_steps` at 1",
        ),
        # The update direction is zero with no learning rate: the paper's mix would select on magnitude alone.
        (
            dict(saliency="paper", learning_rate=0.0),
            r"`saliency='paper'` scores groups with cosine_similarity, taylor_first_order, taylor_second_order on the "
            r"update direction .* `learning_rate` is 0: .* selected on magnitude, avg_magnitude alone\. Use "
            r"`saliency='taylor'` .* or `saliency_direction='gradient'`, or a positive `learning_rate`",
        ),
        (
            dict(importance_taylor_first_order=1.0, learning_rate=0),
            r"`saliency='custom'` scores groups with taylor_first_order .* selected on nothing \(ties\)",
        ),
    ],
)
def test_bad_config_raises(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path, **kwargs)


def test_zero_learning_rate_is_fine_where_the_direction_is_the_gradient_or_unused(tmp_path):
    assert make(tmp_path, learning_rate=0.0).saliency == "taylor"  # the raw gradient
    assert make(tmp_path, saliency="paper", saliency_direction="gradient", learning_rate=0.0).saliency == "paper"
    assert make(tmp_path, importance_magnitude=1.0, learning_rate=0.0).saliency == "custom"  # no direction read
    assert make(tmp_path, saliency="paper", learning_rate=1e-5).saliency == "paper"


def test_prune_kinds_string_becomes_list(tmp_path):
    assert make(tmp_path, prune_kinds="mlp_channel").prune_kinds == ["mlp_channel"]


def test_fields_are_grouped_documented_and_carry_help_and_choices():
    """trl's convention: every field has help, every field with a fixed set of values lists it as `choices`, and the
    docstring documents the fields in their order (grouped by topic)."""
    import dataclasses
    import re

    from transformers import TrainingArguments

    from hf_hesso.groups import KINDS
    from hf_hesso.optim.presets import SALIENCY_CHOICES

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(HESSOConfig) if f.name not in inherited]
    overridden = [f for f in dataclasses.fields(HESSOConfig) if f.name == "dataloader_pin_memory"]
    assert all(f.metadata.get("help") for f in own + overridden), [f.name for f in own if not f.metadata.get("help")]
    choices = {f.name: f.metadata["choices"] for f in own if "choices" in f.metadata}
    assert choices == {
        "saliency": list(SALIENCY_CHOICES),
        "saliency_direction": ["update", "gradient"],
        "prune_kinds": list(KINDS),
        "layer_shapes": ["free", "uniform"],
    }
    documented = re.findall(r"^        (\w+) \(`", HESSOConfig.__doc__, flags=re.M)
    assert documented == [f.name for f in own] + ["dataloader_pin_memory"]
    headings = re.findall(r"^        > ([^:\n]+)", HESSOConfig.__doc__, flags=re.M)
    assert headings[:6] == [
        "Targets and schedule",
        "Saliency",
        "Kinds and shapes",
        "CRIC",
        "Distillation",
        "Saving and resuming",
    ]

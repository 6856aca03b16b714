"""Saliency presets: named settings of the criteria weights and the direction, and the default `saliency_steps`.

- `"taylor"` (the default): the elementwise Taylor criterion `sum |x * g|` on the raw gradient `g`, averaged over
  `saliency_steps` batches. Measured best for full fine-tuning on SmolLM2-135M (`benchmarks/README.md`, *Earlier
  quality figures*: perplexity 44.9 at 20% where the paper's mix gave 117, and 146 at 50% against 613;
  `benchmarks/saliency_ranking.py` ranks it first by the loss of the pruned model). With LoRA the gradient of the
  effective weight `W0 + s * B @ A` is never formed, so the preset falls back to `taylor_first_order` on the base
  optimizer's update, the best update-direction setting that `benchmarks/saliency_ranking.py` measured (the LLaMA
  recipe's LoRA setting).
- `"paper"`: HESSO's mix, 0.2 each of `magnitude`, `avg_magnitude`, `cosine_similarity`, `taylor_first_order` and
  `taylor_second_order`, on the update direction (the paper's and the reference code's).
- `"activation"`: the magnitude of what each group outputs on the scoring batches (Minitron), forward-only; see
  `hf_hesso/optim/activation.py`.
- `"custom"`: the weights the user gives (missing ones weigh 0), on the update direction unless
  `saliency_direction` says otherwise.
"""

from __future__ import annotations

PAPER_WEIGHTS = {
    "magnitude": 0.2,
    "avg_magnitude": 0.2,
    "cosine_similarity": 0.2,
    "taylor_first_order": 0.2,
    "taylor_second_order": 0.2,
}
# preset -> (criteria weights, direction); the LoRA fallback of each preset where it differs.
SALIENCY_PRESETS: dict[str, tuple[dict[str, float], str]] = {
    "activation": ({"activation": 1.0}, "gradient"),
    "paper": (PAPER_WEIGHTS, "update"),
    "taylor": ({"taylor_elementwise": 1.0}, "gradient"),
}
LORA_FALLBACK: dict[str, tuple[dict[str, float], str]] = {
    "activation": ({"activation": 1.0}, "update"),
    "taylor": ({"taylor_first_order": 1.0}, "update"),
}
DEFAULT_SALIENCY = "taylor"
SALIENCY_CHOICES = (*sorted(SALIENCY_PRESETS), "custom")
# Batches every selection averages by default (`benchmarks/README.md`, *Schedule search*: 4 was measured better than
# 1), capped by the schedule (see `default_saliency_steps`).
DEFAULT_SALIENCY_STEPS = 4


def resolve_saliency(
    saliency: str | None, weights: dict[str, float] | None, direction: str | None, lora: bool
) -> tuple[str, dict[str, float], str]:
    """The preset name, criteria weights and direction to score with.

    Args:
        saliency (`str`, *optional*): a preset of `SALIENCY_CHOICES`; None: `"custom"` when `weights` are given,
            else `"taylor"`.
        weights (`dict[str, float]`, *optional*): explicit criteria weights (only with `"custom"` or None).
        direction (`str`, *optional*): `"update"` or `"gradient"`; None: the preset's (`"update"` for custom).
        lora (`bool`): whether the model has LoRA adapters (the gradient direction is then not available).
    """
    if saliency is None:
        saliency = "custom" if weights is not None else DEFAULT_SALIENCY
    if saliency not in SALIENCY_CHOICES:
        raise ValueError(
            f"`saliency` must be one of {list(SALIENCY_CHOICES)}, got {saliency!r}: 'taylor' (the default, elementwise "
            "Taylor on the gradient), 'paper' (HESSO's mix of five), 'activation' (output magnitude, as Minitron), or "
            "'custom' with your own `importance_*` weights."
        )
    if saliency == "custom":
        if weights is None:
            raise ValueError(
                "`saliency='custom'` needs the criteria weights (`importance_criteria=` for `HESSO`, the "
                "`importance_*` fields of `HESSOConfig`), e.g. `importance_magnitude=1.0`. Or choose a preset: "
                f"{sorted(SALIENCY_PRESETS)}."
            )
        # A non-dict is passed on as it is: `check_criteria` rejects it with its `TypeError`.
        return saliency, dict(weights) if isinstance(weights, dict) else weights, direction or "update"
    if weights is not None:
        raise ValueError(
            f"`saliency={saliency!r}` sets the criteria weights itself, but weights were also given: {weights}. Drop "
            "them, or set `saliency='custom'` to score with your own weights."
        )
    preset_weights, preset_direction = (LORA_FALLBACK if lora and saliency in LORA_FALLBACK else SALIENCY_PRESETS)[
        saliency
    ]
    return saliency, dict(preset_weights), direction or preset_direction


def default_saliency_steps(start_pruning_step: int, pruning_steps: int, pruning_periods: int) -> int:
    """`DEFAULT_SALIENCY_STEPS`, capped by the warm-up (`start_pruning_step + 1`) and, with several periods, by the
    period length, so that it always fits the schedule."""
    steps = min(DEFAULT_SALIENCY_STEPS, start_pruning_step + 1)
    if pruning_periods > 1:
        steps = min(steps, max(1, pruning_steps // pruning_periods))
    return max(1, steps)

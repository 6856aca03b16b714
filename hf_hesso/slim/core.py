"""Physical removal of zeroed groups, and the per-layer shape bookkeeping of slim models.

`slim_model` cuts every group whose slices are all exactly zero out of the model's tensors (nothing else), turns
the model into the matching `Hesso*` class (a subclass of its stock class) and records the per-layer sizes in
`config.hesso_layer_shapes`, so that `save_pretrained` writes a checkpoint that `from_pretrained` loads anywhere
(the model code travels with it). `to_stock` turns a slim model whose layers all ended with the same shape back
into the stock class and config, where the stock config can express that shape.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..groups import (
    ATTENTION_SUBLAYER,
    EXPERT_CHANNEL,
    HEAD,
    HIDDEN_CHANNEL,
    KV_GROUP,
    MLP_CHANNEL,
    MLP_SUBLAYER,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
    GroupSet,
    build_groups,
)
from ..modeling.architectures import (
    EXPERT_CHANNEL_UNIT,
    HESSO_PREFIX,
    HIDDEN_SIZE_KEY,
    KV,
    LAYER_SHAPES_KEY,
    LAYOUT_KEY,
    MLP,
    SHARED,
    LayerShape,
    Q,
    base_model_type,
    current_hidden_size,
    get_submodule,
    layout_of,
    layout_to_dict,
    normalize_config,
)
from ..modeling.configuration_hesso import HESSO_CONFIGS
from ..modeling.modeling_hesso import (
    EMBED,
    FINAL_NORM,
    HESSO_MODELS,
    READ_NORM,
    WRITE,
    RemovedSublayer,
    SkippedLayer,
    apply_hidden_size,
    apply_layer_shape,
    layer_modules,
    layer_sublayers,
    mlp_variant,
    projection_tensors,
    skip_layer,
    slim_class_of,
    space_sizes,
    stream_tensors,
)

__all__ = [
    "SlimSummary",
    "check_materialized",
    "current_layer_shapes",
    "keep_plan",
    "slim_copy",
    "slim_model",
    "to_stock",
    "uniform_stock_problem",
]


def check_materialized(model: nn.Module, what: str) -> None:
    """Raise a `ValueError` naming the fix when `model` holds tensors on the meta device (no values to slice)."""
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        shown = ", ".join(f"`{n}`" for n in meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"`{what}` needs the model's real weights, but {len(meta)} tensor(s) are on the meta device ({shown}): "
            "the model was built with `init_empty_weights()`/`torch.device('meta')` or loaded with offloading. Load "
            "the weights first, e.g. `AutoModelForCausalLM.from_pretrained(path)` without `device_map='meta'`, or "
            "`model.to_empty(device='cpu')` followed by `model.load_state_dict(state_dict)`."
        )


@dataclass
class SlimSummary:
    """What `slim_model` did.

    Attributes:
        params_before (`int`): parameters of the model before slimming (shared tensors counted once).
        params_after (`int`): parameters after slimming.
        layers (`list[LayerShape]`): the kept query heads, key/value heads and MLP channels of every layer.
        layers_before (`list[LayerShape]`): the same before slimming.
        removed_groups (`int`): number of groups (of the given `GroupSet`) found all-zero and removed.
        hidden_size (`int`, *optional*): the residual-stream width after slimming (None: hidden channels not grouped
            or none removed).
        hidden_size_before (`int`, *optional*): the width before, where `hidden_size` is set.
    """

    params_before: int
    params_after: int
    layers: list[LayerShape]
    layers_before: list[LayerShape]
    removed_groups: int
    hidden_size: int | None = None
    hidden_size_before: int | None = None

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_removed": self.params_removed,
            "removed_groups": self.removed_groups,
            "layers": [s.to_dict() for s in self.layers],
            "layers_before": [s.to_dict() for s in self.layers_before],
            "removed_sublayers": self.removed_sublayers(),
            **({"hidden_size": self.hidden_size, "hidden_size_before": self.hidden_size_before}
               if self.hidden_size is not None else {}),
        }  # fmt: skip

    def __str__(self) -> str:
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        lines = [
            f"parameters: {self.params_before:,} -> {self.params_after:,} ({ratio:.1%} kept), "
            f"{self.removed_groups} groups removed",
        ]
        if self.hidden_size is not None:
            lines.append(f"hidden size: {self.hidden_size}/{self.hidden_size_before}")
        lines.append("layer  heads      kv_heads   mlp_channels")
        for i, (a, b) in enumerate(zip(self.layers_before, self.layers, strict=True)):
            line = (
                f"{i:>5}  {b.num_attention_heads:>3}/{a.num_attention_heads:<6} {b.num_key_value_heads:>3}/"
                f"{a.num_key_value_heads:<6} {b.intermediate_size:>6}/{a.intermediate_size}"
            )
            gone = [name for name, had, has in (("attention", a.has_attention, b.has_attention),
                                                ("mlp", a.has_mlp, b.has_mlp)) if had and not has]  # fmt: skip
            if b.empty and not a.empty:
                line += "  layer removed"
            elif gone:
                line += "  removed: " + ", ".join(gone)
            lines.append(line)
        removed = self.removed_sublayers()
        if any(removed.values()):
            lines.append(
                f"removed sublayers: attention in layers {removed['attention'] or 'none'}, mlp in layers "
                f"{removed['mlp'] or 'none'}; whole layers {removed['layers'] or 'none'}"
            )
        return "\n".join(lines)

    def removed_sublayers(self) -> dict[str, list[int]]:
        """Layer indices whose attention / MLP / both are gone (removed by this slimming or before)."""
        return {
            "attention": [i for i, s in enumerate(self.layers) if not s.has_attention],
            "mlp": [i for i, s in enumerate(self.layers) if not s.has_mlp],
            "layers": [i for i, s in enumerate(self.layers) if s.empty],
        }


def _num_params(model: nn.Module) -> int:
    # `parameters()` yields a tensor shared by several modules (tied embeddings) once.
    return sum(p.numel() for p in model.parameters())


def current_layer_shapes(model: nn.Module) -> list[LayerShape]:
    """The per-layer sizes of `model`, read from its tensors (stock or slim)."""
    layout = layout_of(model.config)
    hd = normalize_config(model.config).head_dim
    shapes = []
    for layer in layer_modules(model):
        if isinstance(layer, SkippedLayer):
            shapes.append(layer.hesso_shape)
            continue
        sizes = space_sizes(layer, layout)
        bias = [
            bool(sub.projections)
            and isinstance(m := get_submodule(layer, sub.module), RemovedSublayer)
            and m.bias is not None
            for sub in layer_sublayers(layer, layout)
        ]
        # A sublayer this layer does not have (hybrid models, inferred layouts) keeps the config's sizes: unchanged.
        nominal = normalize_config(model.config, layout)
        shapes.append(LayerShape(sizes.get(Q, nominal.num_attention_heads * hd) // hd,
                                 sizes.get(KV, nominal.num_key_value_heads * hd) // hd,
                                 sizes.get(MLP, nominal.intermediate_size), sizes.get(SHARED), *bias))  # fmt: skip
    return shapes


def _slim_class(model: nn.Module) -> type | None:
    """The `Hesso*` class `model` becomes (None when it already is one)."""
    if model.config.model_type.startswith(HESSO_PREFIX):
        return None
    cls = type(model)
    slim = HESSO_MODELS.get(cls.__name__) or slim_class_of(cls)  # another head of the family (`BertLMHeadModel`)
    if slim is None or cls not in slim.__mro__:
        raise ValueError(
            f"`model` is a {cls.__name__}, which `slim_model` cannot convert. Supported classes: "
            f"{', '.join(sorted(HESSO_MODELS))}. Slim the plain transformers model (merge adapters first with "
            "`merge_and_unload()`)."
        )
    return slim


def keep_plan(
    model: nn.Module, groups: GroupSet, zero: torch.Tensor | None = None
) -> tuple[list[LayerShape], list[tuple[LayerShape, dict[str, torch.Tensor]]]]:
    """What `slim_model` keeps: the current layer shapes and, per layer, `(new shape, kept indices)`.

    The kept indices are per index space (`{"q": query rows / output columns, "kv": key/value rows, "mlp": MLP or
    expert channels, "shared": shared-expert channels}`); `zero`
    (default `groups.zero_mask(model)`) marks the groups to remove. Used as well to slice LoRA adapters alike.
    """
    hd = normalize_config(model.config).head_dim
    before = current_layer_shapes(model)
    if zero is None:
        zero = groups.zero_mask(model).cpu()
    keep: dict[int, dict[str, torch.Tensor]] = {}
    for block in groups.blocks:
        keep.setdefault(block.layer, {})[block.kind] = ~zero[block.offset : block.offset + block.n]

    layout = layout_of(model.config)
    plans = []
    for i, (layer, shape) in enumerate(zip(layer_modules(model), before, strict=True)):
        heads, kv_heads, width = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
        rep = heads // kv_heads if kv_heads else 0
        ks = keep.get(i, {})
        expected = {HEAD: heads, KV_GROUP: kv_heads, QUERY_SLOT: rep, MLP_CHANNEL: width,
                    SHARED_EXPERT_CHANNEL: shape.shared_intermediate_size, ATTENTION_SUBLAYER: 1, MLP_SUBLAYER: 1,
                    EXPERT_CHANNEL: width // math.gcd(width, EXPERT_CHANNEL_UNIT) if width else 0}  # fmt: skip
        for kind, mask in ks.items():
            if mask.numel() != expected[kind]:
                raise ValueError(
                    f"The groups give layer {i} {mask.numel()} `{kind}` groups but the model has {expected[kind]}: "
                    "the groups were built for another shape. Call `build_groups(model)` again."
                )
        if HEAD in ks:
            kv_keep = ks[HEAD]
            q_head_keep = ks[HEAD]
        else:
            kv_keep = ks.get(KV_GROUP, torch.ones(kv_heads, dtype=torch.bool))
            slot_keep = ks.get(QUERY_SLOT, torch.ones(rep, dtype=torch.bool))
            # Query head g * rep + j reads key/value head g and sits in slot j.
            q_head_keep = (kv_keep.view(-1, 1) & slot_keep.view(1, -1)).reshape(-1)
        if not bool(ks.get(ATTENTION_SUBLAYER, torch.ones(1, dtype=torch.bool)).all()) or not bool(q_head_keep.any()):
            # The whole attention is zero (its sublayer group, or every head): it goes, key/value heads with it.
            kv_keep, q_head_keep = torch.zeros_like(kv_keep), torch.zeros_like(q_head_keep)
        mlp_keep = ks.get(MLP_CHANNEL, torch.ones(width, dtype=torch.bool))
        if EXPERT_CHANNEL in ks:
            # One expert-channel group is `EXPERT_CHANNEL_UNIT` consecutive channels of every expert.
            mlp_keep = ks[EXPERT_CHANNEL].repeat_interleave(width // ks[EXPERT_CHANNEL].numel())
        shared_keep = None
        if shape.shared_intermediate_size is not None:
            shared_keep = ks.get(SHARED_EXPERT_CHANNEL, torch.ones(shape.shared_intermediate_size, dtype=torch.bool))
        mlp_gone = not bool(ks.get(MLP_SUBLAYER, torch.ones(1, dtype=torch.bool)).all())
        if mlp_gone:
            mlp_keep = torch.zeros_like(mlp_keep)
            shared_keep = None if shared_keep is None else torch.zeros_like(shared_keep)
        elif width and not bool(mlp_keep.any()) and shared_keep is not None and bool(shared_keep.any()):
            raise ValueError(
                f"Every routed-expert channel of layer {i} is zero but its shared expert is not: a mixture-of-experts "
                "layer without routed experts cannot run. Prune the whole MLP with the `mlp_sublayer` kind, or keep "
                "at least one expert-channel group."
            )
        kept = {
            Q: q_head_keep.repeat_interleave(hd).nonzero().squeeze(1),
            KV: kv_keep.repeat_interleave(hd).nonzero().squeeze(1),
            MLP: mlp_keep.nonzero().squeeze(1),
        }
        shared = None
        if shared_keep is not None:
            kept[SHARED] = shared_keep.nonzero().squeeze(1)
            shared = int(shared_keep.sum())
        heads_after, width_after = int(q_head_keep.sum()), int(mlp_keep.sum())
        attention, mlp = layer_sublayers(layer, layout)
        new_shape = LayerShape(
            heads_after,
            int(kv_keep.sum()),
            width_after,
            shared,
            attention_bias=shape.attention_bias or (shape.has_attention and not heads_after
                                                    and _bias_left(layer, attention)),
            mlp_bias=shape.mlp_bias or (shape.has_mlp and not (width_after or shared) and _bias_left(layer, mlp)),
        )  # fmt: skip
        plans.append((new_shape, kept))

    return before, plans


def _bias_left(layer: nn.Module, sub) -> bool:
    """Whether `sub`'s output projection, inside its module, has a bias that is not zero (a removed sublayer then
    keeps adding it)."""
    out = next((p for p in sub.projections if p.cols is not None), None)
    if out is None or not out.path.startswith(sub.module + "."):
        return False  # no output projection, or one outside the module, which stays (BERT)
    t = projection_tensors(layer, out)
    return t is not None and t.bias is not None and bool((t.bias != 0).any())


@dataclass
class _SlimPlan:
    """Everything `slim_model` and `slim_copy` decide before slicing: the layout, the kept indices per layer and the
    figures of the summary."""

    layout: object
    head_dim: int
    slim_cls: type | None
    plans: list
    before: list[LayerShape]
    params_before: int
    removed: int
    hidden_kept: torch.Tensor | None = None  # kept residual-stream channels, None when none is removed

    @classmethod
    def of(cls, model: nn.Module, groups: GroupSet | None, what: str) -> _SlimPlan:
        check_materialized(model, what)
        if groups is None:
            groups = build_groups(model)
        zero = groups.zero_mask(model).cpu()
        _, plans = keep_plan(model, groups, zero=zero)
        hidden_kept = None
        for b in groups.blocks:
            if b.kind == HIDDEN_CHANNEL:
                keep = ~zero[b.offset : b.offset + b.n]
                width = b.n * b.slices[0].inner
                if width != current_hidden_size(model.config):
                    raise ValueError(
                        f"The `hidden_channel` groups cover {width} channels but the model's hidden size is "
                        f"{current_hidden_size(model.config)}: the groups were built for another shape. Call "
                        "`build_groups(model)` again."
                    )
                if not bool(keep.any()):
                    raise ValueError(
                        "Every `hidden_channel` group is zero: the model would have no residual stream left. Keep at "
                        "least one group (HESSO always keeps `group_divisible` of every block)."
                    )
                if not bool(keep.all()):
                    hidden_kept = keep.repeat_interleave(b.slices[0].inner).nonzero().squeeze(1)
        return cls(
            layout=layout_of(model.config),
            head_dim=normalize_config(model.config).head_dim,
            slim_cls=_slim_class(model),
            plans=plans,
            before=current_layer_shapes(model),
            params_before=_num_params(model),
            removed=int(zero.sum()),
            hidden_kept=hidden_kept,
        )

    def slim_hidden(self, model: nn.Module) -> tuple[int, int] | None:
        """Remove the zero residual-stream channels (after the layers are sliced); `(before, after)` widths."""
        if self.hidden_kept is None:
            return None
        before = current_hidden_size(model.config)
        apply_hidden_size(model, self.hidden_kept, self.layout)
        rescale_stream(model, self.layout, (len(self.hidden_kept) / before) ** 0.5)
        return before, len(self.hidden_kept)

    def finish(self, model: nn.Module, hidden: tuple[int, int] | None = None) -> SlimSummary:
        return _finish(model, self.slim_cls, self.plans, self.before, self.params_before, self.removed, hidden)


def _scale_norm(weight: torch.Tensor, factor: float, offset: float) -> None:
    """Multiply the effective weight `offset + weight` of an RMSNorm by `factor`, in place."""
    w = weight.data
    w.copy_((w.to(_exact(w)) * factor + offset * (factor - 1)).to(w.dtype))


def _exact(t: torch.Tensor) -> torch.dtype:
    # float64 for the arithmetic of the rescaling, where the device has it (not MPS).
    return torch.float32 if t.device.type == "mps" else torch.float64


@torch.no_grad()
def rescale_stream(model: nn.Module, layout, s: float) -> None:
    """Multiply the residual stream by `s` and undo it in every norm that reads it, in place; the function is kept.

    With `s = sqrt(d' / d)`, the `d'` channels that survive hidden-size pruning have `sum(x^2) / d' = s^2 sum(x^2) /
    d'` = `sum(x^2) / d` once the stream is `s x`: every RMSNorm on the stream (and on a sublayer output that joins
    it, Gemma's post-norms) then computes over the kept channels exactly the root mean square it computed over all
    `d` channels with the zeros, with the same epsilon. So nothing in the config changes (Qwen3's and Gemma-3's q/k
    norms, which share `rms_norm_eps`, are untouched): the embedding and every writer (output rows and biases) are
    scaled by `s`, the norms that read the stream by `1 / s`, writer norms stay (their input is already scaled), and
    the final norm by `1 / s`, or `1 / s^2` when the LM head is the (scaled) embedding. Untied heads stay.
    """
    stream = layout.stream
    entries = stream_tensors(model, layout)
    embed = entries[0].tensor
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and getattr(output, "weight", None) is embed
    for e in entries:
        t = e.tensor
        if e.role in (EMBED, WRITE):
            t.data.copy_((t.data.to(_exact(t)) * s).to(t.dtype))
        elif e.role == READ_NORM:
            _scale_norm(t, 1 / s, stream.norm_offset)
        elif e.role == FINAL_NORM:
            _scale_norm(t, 1 / (s * s) if tied else 1 / s, stream.norm_offset)


def slim_model(model: nn.Module, groups: GroupSet | None = None, *, stock: bool = False) -> SlimSummary:
    """Physically remove every group whose slices are all exactly zero, in place: the route to a slim model in
    memory (to write one, `save_slim` or `HESSOTrainer.save_model()`; for the stock class, `to_stock` afterwards).

    Groups that are only partly zero are kept. With grouped-query attention a layer may have zeroed `kv_group`
    and `query_slot` groups at once: the kept query heads are those of kept key/value heads *and* kept slots, so
    the layer keeps `kept kv heads x kept slots per kv head` query heads.

    The model's class becomes the matching `Hesso*` subclass of its stock class (`HessoLlamaForCausalLM`), and
    `model.config` (the same object, so every module sees it) becomes the matching `Hesso*Config` with the per-layer
    sizes in `config.hesso_layer_shapes`; the stock fields keep their original values. `model.save_pretrained(d)`
    then writes the weights, the config with `auto_map` and the model code, loadable with
    `AutoModelFor*.from_pretrained(d, trust_remote_code=True)` anywhere, or without `trust_remote_code` once
    `import hf_hesso` has registered the classes.

    The sliced projections get new `nn.Parameter` objects: build the optimizer (and the groups) again before
    training the slim model further.

    Args:
        model (`nn.Module`): a supported transformers model (bare, `*ForCausalLM`, `*ForSequenceClassification`,
            `*ForMaskedLM`), stock or already slim.
        groups (`GroupSet`, *optional*): the groups to consider; default `build_groups(model)`. They must describe
            the model's current shapes (build them again after a previous slimming).
        stock (`bool`, *optional*, defaults to `False`): deprecated, call `to_stock(model)` afterwards instead
            (which this does, with a `FutureWarning`; removed in the next release).

    Returns:
        `SlimSummary`: parameter counts before/after and the kept sizes of every layer.

    A layer whose attention is entirely zero (its `attention_sublayer` group, or every head / key-value group)
    loses its attention module (no compute, no key/value cache entry); one whose MLP is entirely zero loses its MLP;
    their own norms go with them, and a layer left with neither is replaced by a pass-through `SkippedLayer` (in
    pre-norm families), keeping the indices of the others. `config.hesso_layer_shapes` records 0 heads / 0 width.

    Zero `hidden_channel` groups are cut out of every tensor along the residual stream, and the stream is rescaled by
    `sqrt(d' / d)` so that every RMSNorm over the kept channels computes what it computed over all of them (see
    `rescale_stream`; the config's epsilon is unchanged). The new width is recorded in `config.hesso_hidden_size`.

    Raises:
        `ValueError`: when the zeros cannot be sliced out exactly (e.g. every routed expert of a layer zero but not
            its shared expert), or when the model's weights are on the meta device; nothing is changed then.
    """
    # Decide everything before touching the model, so an error leaves it unchanged.
    plan = _SlimPlan.of(model, groups, "slim_model")
    layers = layer_modules(model)
    for i, (new_shape, kept) in enumerate(plan.plans):
        apply_layer_shape(layers[i], plan.layout, new_shape, plan.head_dim, kept)
        skip_layer(layers, i, plan.layout, new_shape)
    summary = plan.finish(model, plan.slim_hidden(model))
    if stock:
        warnings.warn(
            "`slim_model(..., stock=True)` is deprecated and will be removed in the next release: call "
            "`to_stock(model)` after `slim_model(model, groups)`, which is what it does.",
            FutureWarning,
            stacklevel=2,
        )
        to_stock(model)
    return summary


def _finish(model, slim_cls, plans, before, params_before: int, removed: int,
            hidden: tuple[int, int] | None = None) -> SlimSummary:  # fmt: skip
    """Swap in the slim class and config, record the per-layer shapes (and the hidden size); the summary."""
    config = model.config
    after = [shape for shape, _ in plans]
    if slim_cls is not None:
        # Swap classes in place: every submodule holds this same config object, and the model object stays the one
        # the caller (optimizer, Trainer) holds.
        config.__class__ = HESSO_CONFIGS[base_model_type(config.model_type)]
        # A config read from a file holds `model_type` as an instance attribute, which would hide the class's.
        config.__dict__.pop("model_type", None)
        model.__class__ = slim_cls
    setattr(config, LAYER_SHAPES_KEY, [s.to_dict() for s in after])
    if hidden is not None:
        setattr(config, HIDDEN_SIZE_KEY, hidden[1] if hidden[1] != config.hidden_size else None)
    layout = layout_of(config)
    if layout.inferred:
        # Outside the table: the checked layout travels in config.json, where the shipped code reads it.
        setattr(config, LAYOUT_KEY, layout_to_dict(layout))
    return SlimSummary(
        params_before=params_before,
        params_after=_num_params(model),
        layers=after,
        layers_before=before,
        removed_groups=removed,
        hidden_size=None if hidden is None else hidden[1],
        hidden_size_before=None if hidden is None else hidden[0],
    )


def cpu_copy_memo(module: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> dict[int, torch.Tensor]:
    """A `copy.deepcopy` memo that copies every parameter and buffer of `module` to the CPU (shared ones once),
    except those whose `id` is in `skip`."""
    memo: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        if id(p) not in memo and id(p) not in skip:
            memo[id(p)] = nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo and id(b) not in skip:
            memo[id(b)] = b.detach().to("cpu", copy=True)
    return memo


@torch.no_grad()
def slim_copy(model: nn.Module, groups: GroupSet | None = None) -> tuple[nn.Module, SlimSummary]:
    """A slim copy of `model` in CPU memory, built layer by layer; `model` itself is not changed.

    The lower level `save_slim` writes from: to write a slim model, call `save_slim` (or `HESSOTrainer.save_model()`);
    for a slim model in memory, `slim_model`.

    Nothing is allocated on `model`'s device but the zero test of the groups (O(groups)): every tensor outside the
    layers is copied to the CPU once, and each layer is copied to the CPU and sliced before the next one is copied,
    so the extra CPU memory peaks at the slim model plus one full-size layer, never at a second full model.

    Returns:
        `tuple[nn.Module, SlimSummary]`: the slim copy (as `slim_model` would leave `model`) and what was removed.

    Raises:
        `ValueError`: when the model's weights are on the meta device (load the real weights first).
    """
    plan = _SlimPlan.of(model, groups, "slim_copy")
    config, layout, hd, plans = model.config, plan.layout, plan.head_dim, plan.plans
    layers = layer_modules(model)
    # One config object for the whole copy (every module of a transformers model holds the same one).
    shared_config = {id(config): copy.deepcopy(config)}
    memo: dict[int, object] = dict(shared_config)
    for layer, (new_shape, kept) in zip(layers, plans, strict=True):
        small = copy.deepcopy(layer, {**cpu_copy_memo(layer), **shared_config})
        apply_layer_shape(small, layout, new_shape, hd, kept)
        holder = nn.ModuleList([small])
        skip_layer(holder, 0, layout, new_shape)
        memo[id(layer)] = holder[0]
    # Everything but the layers (embeddings, norms, heads), straight to the CPU.
    layer_tensors = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    memo.update(cpu_copy_memo(model, skip=layer_tensors))
    out = copy.deepcopy(model, memo)
    summary = plan.finish(out, plan.slim_hidden(out))
    return out, summary


def stock_rule(layout) -> str:
    """The rule of a family's stock config that limits `to_stock`, as text."""
    if layout.stock_rule:
        return layout.stock_rule
    if layout.head_dim_field is None:
        return (
            f"stock {layout.name} derives the head size from `hidden_size / num_attention_heads`, so it cannot express "
            "pruned heads (a model with all heads kept and only a narrower MLP can be stock)"
        )
    return f"the stock {layout.config_class} cannot express this shape"


def stock_updates(config, shape: LayerShape, layer_mlp) -> dict:
    """The stock config fields that give every layer `shape` (the head size is kept where the config stores it, and
    the hidden size is the slim one)."""
    layout = layout_of(config)
    norm = normalize_config(config)
    updates = {"num_attention_heads": shape.num_attention_heads}
    if norm.hidden_size != config.hidden_size:
        updates["hidden_size"] = norm.hidden_size
    if layout.kv_heads_field:
        updates[layout.kv_heads_field] = shape.num_key_value_heads
    if layout.head_dim_field:
        updates[layout.head_dim_field] = norm.head_dim
    updates[layer_mlp.width_field] = shape.intermediate_size
    if layer_mlp.shared_width_field:
        updates[layer_mlp.shared_width_field] = shape.shared_intermediate_size
    return updates


def _stock_base(cls: type) -> type:
    # The slim classes (ours, or loaded as remote code) subclass the stock class: the first class past them.
    return next(c for c in cls.__mro__ if not c.__name__.startswith(("Hesso", "_Hesso")))


def _per_layer_updates(config, kept: list[int]) -> dict:
    """The per-layer config lists (`layer_types`, `no_rope_layers`, ...) restricted to the `kept` layers, and the
    layer count, for a stock config without the dropped layers."""
    field = layout_of(config).layer_count_field
    n = getattr(config, field)
    updates: dict = {field: len(kept)}
    for key, value in config.to_dict().items():
        if key != LAYER_SHAPES_KEY and isinstance(value, list) and len(value) == n:
            updates[key] = [value[i] for i in kept]
    return updates


def _renamed(model: nn.Module, kept: list[int]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of `model` under the names they get once the dropped layers are gone."""
    layout = layout_of(model.config)
    new_index = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(r"(^|\.)" + re.escape(layout.layers) + r"\.(\d+)\.")

    def rename(name: str) -> str:
        return pattern.sub(lambda m: f"{m.group(1)}{layout.layers}.{new_index[int(m.group(2))]}.", name, count=1)

    return {rename(name): tuple(p.shape) for name, p in model.named_parameters()}


def _stock_problem(model: nn.Module, shape: LayerShape, kept: list[int] | None = None) -> tuple[dict, str | None]:
    """The stock config dict for `shape` (on the `kept` layers, default all), and why the stock classes cannot
    express it (None when they can).

    Decided by construction: the stock model is built from the candidate config on the meta device (no memory)
    and the shapes of all its parameters are compared with the slim model's.
    """
    config = model.config
    layout = layout_of(config)
    layers = layer_modules(model)
    kept = list(range(len(layers))) if kept is None else kept
    variants = {mlp_variant(layers[i], layout) for i in kept}
    if len(variants) != 1:
        return {}, f"its layers mix MLP kinds ({', '.join(sorted(v.module for v in variants))})"
    updates = stock_updates(config, shape, next(iter(variants)))
    if len(kept) != len(layers):
        if getattr(config, "mlp_only_layers", None):
            return updates, "its config lists `mlp_only_layers` by index, which dropping layers would renumber"
        updates.update(_per_layer_updates(config, kept))
    trial = config.to_dict()
    for key in (LAYER_SHAPES_KEY, HIDDEN_SIZE_KEY, LAYOUT_KEY, "auto_map", "model_type", "transformers_version"):
        trial.pop(key, None)
    trial.update(updates)
    stock_config_cls = _stock_base(type(config))
    try:
        stock_config = stock_config_cls.from_dict(trial)
        with torch.device("meta"):
            built = _stock_base(type(model))(stock_config)
    except (ValueError, TypeError, AttributeError, KeyError, StrictDataclassError) as error:
        # (AttributeError: a config field the stock class derives, e.g. Falcon's `head_dim` property)
        return updates, f"{stock_rule(layout)} ({type(error).__name__}: {error})"
    # Every tensor must come out the same shape (not only the projections: Phi sizes its q/k LayerNorm by
    # `hidden_size // num_attention_heads`).
    want = _renamed(model, kept)
    got = {name: tuple(p.shape) for name, p in built.named_parameters()}
    if got != want:
        return updates, stock_rule(layout)
    return updates, None


def _stock_layers(model: nn.Module) -> tuple[list[int], list[LayerShape], str | None]:
    """The layers a stock model keeps (all but the dropped ones), their distinct shapes, and why no stock config can
    hold them (None when one shape might)."""
    shapes = current_layer_shapes(model)
    dropped = [isinstance(layer, SkippedLayer) for layer in layer_modules(model)]
    kept = [i for i, d in enumerate(dropped) if not d]
    distinct = sorted({shapes[i] for i in kept}, key=lambda s: tuple(s.to_dict().values()))
    partial = [i for i in kept if not (shapes[i].has_attention and shapes[i].has_mlp)]
    if partial:
        return (
            kept,
            distinct,
            (
                f"layers {partial} lost their attention or their MLP but not both, and a stock layer has both (use "
                "`layer_shapes='uniform'`, which removes whole layers only)"
            ),
        )
    if len(distinct) != 1:
        return (
            kept,
            distinct,
            (
                f"its layers have {len(distinct)} different shapes ({', '.join(str(s.to_dict()) for s in distinct[:4])}), "
                "and a stock config holds one size per field"
            ),
        )
    return kept, distinct, None


def can_stock(model: nn.Module) -> str | None:
    """None when `to_stock(model)` would succeed, else the reason it cannot."""
    kept, distinct, problem = _stock_layers(model)
    if problem is not None:
        return problem
    return _stock_problem(model, distinct[0], kept)[1]


def _kept_counts(n: int, divisible: int) -> list[int]:
    """The counts a block of `n` groups can end with under `group_divisible`."""
    return sorted({n} | {k for k in range(divisible, n + 1, divisible)})


def uniform_stock_problem(model: nn.Module, groups: GroupSet, group_divisible: int = 1) -> str | None:
    """Before a `layer_shapes="uniform"` run: None when every uniform result these groups can reach loads as the
    stock class, else what cannot, with the fix.

    Every reachable head / key-value head count is tried by building a one-layer stock model of that shape on the
    meta device (MLP widths and dropped layers never trouble a stock config of the families in the table).
    """
    config = model.config
    layout = layout_of(config)
    kinds = {b.kind for b in groups.blocks}
    shape = current_layer_shapes(model)[0]
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    rep = heads // kv

    def candidates(div: int) -> set[tuple[int, int]]:
        if HEAD in kinds:
            return {(h, h) for h in _kept_counts(heads, div)}
        kvs = _kept_counts(kv, div) if KV_GROUP in kinds else [kv]
        slots = _kept_counts(rep, div) if QUERY_SLOT in kinds else [rep]
        return {(k * r, k) for k in kvs for r in slots}

    def failing(div: int) -> list[tuple[int, int]]:
        bad = []
        for h, k in sorted(candidates(div)):
            if (h, k) == (heads, kv):
                continue
            trial = config.to_dict()
            for key in (
                LAYER_SHAPES_KEY,
                HIDDEN_SIZE_KEY,
                LAYOUT_KEY,
                "auto_map",
                "model_type",
                "transformers_version",
            ):
                trial.pop(key, None)
            trial.update(stock_updates(config, LayerShape(h, k, shape.intermediate_size, shape.shared_intermediate_size),
                                       mlp_variant(layer_modules(model)[0], layout)))  # fmt: skip
            trial.update(_per_layer_updates(config, [0]))
            try:
                stock_config = _stock_base(type(config)).from_dict(trial)
                with torch.device("meta"):
                    built = _stock_base(type(model))(stock_config)
                got = current_layer_shapes(built)[0]
                ok = (got.num_attention_heads, got.num_key_value_heads) == (h, k) and (
                    normalize_config(built.config).head_dim == normalize_config(config).head_dim
                )
            except (ValueError, TypeError, StrictDataclassError):
                ok = False
            if not ok:
                bad.append((h, k))
        return bad

    bad = failing(group_divisible)
    if not bad:
        return _uniform_hidden_problem(model, groups, group_divisible, sorted(candidates(group_divisible)))
    fix = next((d for d in range(group_divisible + 1, max(heads, 2) + 1) if not failing(d)), None)
    attention_kinds = sorted(kinds & {HEAD, KV_GROUP, QUERY_SLOT})
    return (
        f"`layer_shapes='uniform'` with kinds {attention_kinds} can end with (query heads, key/value heads) in "
        f"{bad[:6]}{' ...' if len(bad) > 6 else ''}, which the stock {layout.config_class} cannot express "
        f"({stock_rule(layout)}). Fix: leave {attention_kinds} out of `prune_kinds` (prune MLP channels and whole "
        "layers only)"
        + (f", or set `group_divisible={fix}`" if fix else "")
        + ", or keep `layer_shapes='free'` (the slim model then ships its code)."
    )


def _uniform_hidden_problem(
    model: nn.Module, groups: GroupSet, group_divisible: int, head_counts: list[tuple[int, int]]
) -> str | None:
    """With `hidden_channel` groups: None when every reachable hidden size, with every reachable (query heads,
    key/value heads), makes a valid stock config (Llama and Gemma want `hidden_size % num_attention_heads == 0`),
    else the problem and a `hidden_channel_unit` that avoids it. Config validation only (the tensors of a stock model
    follow `hidden_size` wherever it is valid); each (hidden, heads, key/value heads) is tried once."""
    block = next((b for b in groups.blocks if b.kind == HIDDEN_CHANNEL), None)
    if block is None:
        return None
    config = model.config
    layout = layout_of(config)
    width, unit = current_hidden_size(config), block.slices[0].inner
    shape = current_layer_shapes(model)[0]
    variant = mlp_variant(layer_modules(model)[0], layout)
    base = config.to_dict()
    for key in (LAYER_SHAPES_KEY, HIDDEN_SIZE_KEY, "auto_map", "model_type", "transformers_version"):
        base.pop(key, None)
    base.update(_per_layer_updates(config, [0]))
    heads = sorted(set(head_counts) | {(shape.num_attention_heads, shape.num_key_value_heads)})
    valid: dict[tuple[int, int, int], bool] = {}

    def ok(d: int, h: int, k: int) -> bool:
        if (d, h, k) not in valid:
            trial = dict(base)
            trial.update(stock_updates(config, LayerShape(h, k, shape.intermediate_size, shape.shared_intermediate_size),
                                       variant))  # fmt: skip
            trial["hidden_size"] = d
            try:
                _stock_base(type(config)).from_dict(trial)
                valid[(d, h, k)] = True
            except (ValueError, TypeError, StrictDataclassError):
                valid[(d, h, k)] = False
        return valid[(d, h, k)]

    def failing(u: int, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` (hidden size, query heads) that fail with `u` channels per group."""
        bad: list[tuple[int, int]] = []
        for d in (u * c for c in _kept_counts(width // u, group_divisible)):
            for h, k in heads:
                if d != width and (d, h) not in bad and not ok(d, h, k):
                    bad.append((d, h))
                    if len(bad) >= limit:
                        return bad
        return bad

    bad = failing(unit, 7)
    if not bad:
        return None
    fix = next((u for u in range(2 * unit, width // 2 + 1, unit) if width % u == 0 and not failing(u, 1)), None)
    return (
        f"`layer_shapes='uniform'` with `hidden_channel` groups of {unit} channel(s) can end with (hidden size, query "
        f"heads) such as {bad[:6]}{' ...' if len(bad) > 6 else ''}, which the stock {layout.config_class} cannot express "
        f"({stock_rule(layout)}). Fix: "
        + (f"set `hidden_channel_unit={fix}` (`build_groups(..., hidden_unit={fix})`), or " if fix else "")
        + "leave `hidden_channel` out of `prune_kinds`, or keep `layer_shapes='free'` (the slim model then ships its "
        "code)."
    )


def to_stock(model: nn.Module) -> nn.Module:
    """Turn a slim model whose layers all have the same shape into the stock class and config, in place: the route
    to a stock model (on disk, a `layer_shapes="uniform"` run's `HESSOTrainer.save_model()` applies it).

    Then `save_pretrained` writes a stock `model_type` that loads with nothing imported and no remote code
    (serving engines too). Possible when every layer has the same shape and the stock config can express it, which
    is decided by building the stock model from the candidate config on the meta device. In practice:
    - families that store `head_dim` (Mistral, Qwen2/3, Gemma-2/3, SmolLM3, Starcoder2, Phi, Mixtral, Qwen-MoE): always;
    - Llama: `hidden_size % num_attention_heads == 0` for the kept head count (a stock `LlamaConfig` rule);
    - BERT, RoBERTa, GPT-2, GPT-NeoX, ModernBERT (head size = `hidden_size / num_attention_heads`): only when no head
      was removed, i.e. only the MLP is narrower; DeBERTa-v2: the kept head count must divide `hidden_size`.
    A pruned hidden size becomes the stock `hidden_size` (`head_dim` stays explicit); for Gemma the embedding is
    rescaled to the stock scale `sqrt(hidden_size)` (see docs/hidden.md).

    Returns:
        `nn.Module`: `model` itself.

    Raises:
        `ValueError`: naming why the shape cannot be expressed; the model is left unchanged.
    """
    config = model.config
    if not config.model_type.startswith(HESSO_PREFIX):
        return model
    model_type = base_model_type(config.model_type)
    norm = normalize_config(config)
    kept, distinct, problem = _stock_layers(model)
    if problem is not None:
        raise ValueError(
            f"`model` cannot be converted to the stock `{model_type}` class: {problem}. Save it as a slim model "
            "instead (`save_pretrained` writes the code it needs)."
        )
    shape = distinct[0]
    updates, problem = _stock_problem(model, shape, kept)
    if problem is not None:
        raise ValueError(
            f"`model` cannot be converted to the stock `{model_type}` class with {shape.num_attention_heads} heads "
            f"of size {norm.head_dim} and hidden size {norm.hidden_size}: {problem}. Save it as a slim model instead "
            "(`save_pretrained` writes the code it needs)."
        )
    layers = layer_modules(model)
    if len(kept) != len(layers):
        # Drop the skipped layers for good and renumber the others (their cache slots and attention types follow).
        layout = layout_of(config)
        parent_path, _, name = layout.layers.rpartition(".")
        remaining = nn.ModuleList([layers[i] for i in kept])
        for new, layer in enumerate(remaining):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
        setattr(get_submodule(model.base_model, parent_path), name, remaining)
    if "hidden_size" in updates:
        _stock_embed_scale(model, layout_of(config), config.hidden_size, updates["hidden_size"])
    config.__class__ = _stock_base(type(config))
    config.__dict__.pop("model_type", None)
    config.__dict__.pop(LAYER_SHAPES_KEY, None)
    config.__dict__.pop(HIDDEN_SIZE_KEY, None)
    config.__dict__.pop(LAYOUT_KEY, None)
    config.__dict__.pop("auto_map", None)
    for key, value in updates.items():
        setattr(config, key, value)
    model.__class__ = _stock_base(type(model))
    return model


@torch.no_grad()
def _stock_embed_scale(model: nn.Module, layout, before: int, after: int) -> None:
    """Gemma multiplies its embeddings by `sqrt(config.hidden_size)`: a slim config keeps the stock width `before`,
    the stock config gets `after`. Scale the embedding by `sqrt(before / after)` so that the stream is unchanged,
    set the module's scale, and, when the LM head is the embedding, undo the factor in the final norm."""
    stream = layout.stream
    if stream is None or not stream.embed_scale:
        return
    embed = model.base_model.get_input_embeddings()
    ratio = (before / after) ** 0.5
    embed.weight.data.copy_((embed.weight.data.to(_exact(embed.weight)) * ratio).to(embed.weight.dtype))
    scale = getattr(embed, "embed_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.fill_(after**0.5)
    if hasattr(embed, "scalar_embed_scale"):
        embed.scalar_embed_scale = after**0.5
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is embed.weight:
        final = get_submodule(model.base_model, stream.final_norm)
        _scale_norm(final.weight, 1 / ratio, stream.norm_offset)

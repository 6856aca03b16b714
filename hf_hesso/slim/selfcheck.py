"""Numerical self-check of an architecture: which group kinds are exact, on a tiny random instance.

For each group kind the layout offers, a tiny random model of the same config class (2 layers, hidden 64) gets some
groups of that kind zeroed (never a whole block), is sliced with `slim_model`, and must give the same logits as the
masked dense model on a padded batch; then it is saved and loaded again and must still give them. A kind that fails
is excluded, with the reason. The same check decides between the candidate layouts that `infer_layouts` returns for a
model type outside the table, and registers the best one (with its exclusions) so that `build_groups` and
`slim_model` work on it in this process.

It lives beside `slim_model` (not in `hf_hesso.groups`) because it slims.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import tempfile
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from ..groups import build_groups
from ..groups.infer import infer_layouts, set_layout_check
from ..groups.rules import InexpressibleKind, kind_partitions
from ..modeling.architectures import (
    ARCHITECTURES,
    HESSO_PREFIX,
    HIDDEN_CHANNEL,
    KINDS,
    LAYER_SHAPES_KEY,
    LAYOUT_KEY,
    ArchLayout,
    base_model_type,
    get_submodule,
    normalize_config,
)
from ..modeling.compat import Conv1D, auto_mapping
from ..modeling.modeling_hesso import layer_modules, layer_sublayers, register_layout, space_sizes
from .core import can_stock, slim_model

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
# Config fields set for the tiny instance, where the config has them.
TINY_FIELDS = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 96,
    "n_inner": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "num_attention_heads": 4,
    "head_dim": 16,
    "vocab_size": 128,
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size_per_layer_input": 128,  # Gemma-3n/4 per-layer embeddings (vocabulary x layers x this width)
    "hidden_size_per_layer_input": 16,
    "num_kv_shared_layers": 0,  # Gemma-3n: layers that reuse another layer's cache (none of the tiny layers)
    "index_num_heads": 2,  # Kolibri's indexer: at most the query heads of one key/value head
    "n_group": 1,  # DeepSeek-style grouped routing: one group of the tiny experts
    "topk_group": 1,
    "rotary_dim": 8,  # GPT-J/CodeGen: at most the tiny head size
    "d_head": 16,  # XLNet: hidden / heads
    "dim_head": 16,  # CPM-Ant: the head size and the MLP width
    "dim_ff": 96,
    # Encoder-decoder families (their causal LM is the decoder): `num_hidden_layers` maps to the encoder's count.
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 96,
    "decoder_ffn_dim": 96,
}


@dataclass
class KindReport:
    """One group kind: how many groups the tiny instance has, and whether slicing them out is exact."""

    kind: str
    found: int
    exact: bool
    reason: str | None = None
    stock_uniform: str | None = None  # None: `to_stock` can express a uniform result; else why not


@dataclass
class ArchitectureReport:
    """What `check_architecture` found."""

    model_type: str
    in_table: bool
    layout: ArchLayout | None
    kinds: list[KindReport] = field(default_factory=list)
    error: str | None = None
    # Sublayers some layers of the tiny instance do not have in the layout's form (hybrid models): left as they are.
    absent: list[str] = field(default_factory=list)

    @property
    def exact_kinds(self) -> list[str]:
        return [k.kind for k in self.kinds if k.exact]

    def __str__(self) -> str:
        source = "layout table" if self.in_table else "inferred from the module tree"
        lines = [f"model_type {self.model_type!r} ({source})"]
        if self.error:
            return "\n".join([*lines, f"  not supported: {self.error}"])
        lines.append(f"  {'kind':<22} {'found':>6}  result")
        for k in self.kinds:
            verdict = "exact" if k.exact else f"excluded: {k.reason}"
            lines.append(f"  {k.kind:<22} {k.found:>6}  {verdict}")
        for text in self.absent:
            lines.append(f"  not pruned: {text}")
        for k in self.kinds:
            if k.exact:
                stock = "yes" if k.stock_uniform is None else f"no ({k.stock_uniform})"
                lines.append(f"  to_stock, {k.kind} removed alike in every layer: {stock}")
        lines.append("  to_stock, layers of different shapes: no (a stock config holds one size per field; the slim "
                     "model saves with its own code instead)")  # fmt: skip
        return "\n".join(lines)


# Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): low ranks and head sizes for the tiny instance.
TINY_LATENT = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
               "qk_head_dim": 24}  # fmt: skip
# Fields of the head size and the head count of a state-space (Mamba-2) mixer, and the tiny head size.
MAMBA_HEAD_FIELDS = ("mamba_d_head", "mamba_headdim", "mamba_head_dim")
MAMBA_HEADS_FIELDS = ("mamba_n_heads", "n_mamba_heads", "mamba_num_heads")
TINY_MAMBA_HEAD = 16
# At most this many layers in the tiny instance of a model whose layers differ in kind (hybrid models).
TINY_MAX_LAYERS = 4


def _layer_indices(config, layers: int) -> list[int]:
    """The layers the tiny instance keeps: layer 0 and the first layer of every other kind that the config's
    per-layer lists and strings (`layer_types`, `layers_block_type`, `hybrid_override_pattern`) name, at most
    `TINY_MAX_LAYERS`; two layers where all layers are alike."""
    keep = [0]
    per_layer = list(vars(config).items())
    sections = _layer_sections(config, layers)
    if sections:  # the section each layer belongs to, as one more per-layer list
        per_layer.append(("(sections)", [key for key, count in sections for _ in range(count)]))
    for key, value in per_layer:
        if _is_layer_map(value, layers):
            # Layers that read another layer's keys/values: keep the first such layer and the layer it reads.
            reader = next(i for i, source in enumerate(value) if source != i)
            for i in (value[reader], reader):
                if i not in keep and len(keep) < TINY_MAX_LAYERS:
                    keep.append(i)
            continue
        if isinstance(value, (list, str)) and len(value) == layers and not _is_index_list(key, value, layers):
            seen = {_hashable(value[0])}
            for i, item in enumerate(value):
                if _hashable(item) not in seen and len(keep) < TINY_MAX_LAYERS:
                    seen.add(_hashable(item))
                    if i not in keep:
                        keep.append(i)
    if len(keep) == 1:
        keep.append(1)
    return sorted(keep)


def _is_layer_map(value, layers: int) -> bool:
    """A per-layer list naming, for every layer, an earlier layer or itself (Kolibri's `kv_source_layers`: the layer
    whose keys/values it reads), where some layer names another."""
    return (
        isinstance(value, list)
        and len(value) == layers
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= i for i, v in enumerate(value))
        and any(v != i for i, v in enumerate(value))
        and len(set(value)) > 2  # not a 0/1 flag per layer
    )


def _layer_sections(config, layers: int) -> list[tuple[str, int]]:
    """Consecutive sections of the layers counted by fields of their own (Dory: `n_input_layers`,
    `n_recurrent_layers`, `n_output_layers`, which must add up to `num_hidden_layers`), as `(field, count)` in order;
    empty where the config has no such fields."""
    found = [
        (key, value)
        for key, value in vars(config).items()
        if re.fullmatch(r"(n|num)_[a-z]+_layers", key) and key not in TINY_FIELDS and isinstance(value, int)
        and not isinstance(value, bool) and value >= 0
    ]  # fmt: skip
    return found if len(found) > 1 and sum(v for _, v in found) == layers else []


def _hashable(item):
    return repr(item) if isinstance(item, (list, dict)) else item


def _is_index_list(key: str, value, layers: int) -> bool:
    """A list of layer indices (`full_attn_idxs`, `hybrid_layer_ids`, `attn_layer_indices`, `index_layers`), not one
    entry per layer."""
    return (
        isinstance(value, list)
        and (
            any(word in key for word in ("idx", "ids", "indices", "index"))
            # Kolibri's `mlp_only_layers`: fewer increasing layer indices than layers
            or (key.endswith("_layers") and len(value) < layers and value == sorted(set(value)))
        )
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in value)
    )


def tiny_config(config):
    """A copy of `config` with tiny sizes (hidden 64, 4 heads, 2 key/value heads where there is GQA, 2 layers, or up
    to 4 so that a hybrid model keeps one layer of every kind its per-layer lists name)."""
    raw = config.to_dict()
    per_layer = raw.pop("per_layer_config", None)
    if per_layer:
        return _tiny_heterogeneous(config, raw, per_layer)
    return _tiny_uniform(config)


def _tiny_uniform(config):
    small = copy.deepcopy(config)
    layers = config.num_hidden_layers
    heads = getattr(config, "num_attention_heads", None)
    gqa = heads is not None and (getattr(config, "num_key_value_heads", None) or heads) < heads
    fields = dict(TINY_FIELDS)
    if getattr(config, "num_key_value_heads", None):
        fields["num_key_value_heads"] = 2 if gqa else 4
    if getattr(config, "qk_rope_head_dim", None):
        fields.update(TINY_LATENT)
        fields["head_dim"] = TINY_LATENT["qk_rope_head_dim"]  # latent attention: rotary size (DeepSeek-V3)
    indices = _layer_indices(config, layers)
    fields["num_hidden_layers"] = len(indices)
    start = 0
    for key, count in _layer_sections(config, layers):  # each section keeps the kept layers that fall in it
        fields[key] = sum(start <= i < start + count for i in indices)
        start += count
    # State-space mixers (Mamba-2 in Bamba, Zamba2, Falcon-H1): heads x head size = expand x hidden.
    expand = getattr(config, "mamba_expand", None) or 2
    fields.update({key: TINY_MAMBA_HEAD for key in MAMBA_HEAD_FIELDS})
    fields.update({key: expand * TINY_FIELDS["hidden_size"] // TINY_MAMBA_HEAD for key in MAMBA_HEADS_FIELDS})
    fields["mamba_d_ssm"] = expand * TINY_FIELDS["hidden_size"]  # Falcon-H1: heads x head size
    for key, value in fields.items():
        derived = getattr(type(config), key, None)
        if isinstance(derived, property) and (key != "num_hidden_layers" or derived.fset is None):
            # Derived from other fields (Falcon's `head_dim`); a layer count with a setter sets the field it derives
            # from (LongCat-Flash: `num_hidden_layers` is twice `num_layers`, its layers of two sublayers each).
            continue
        if getattr(config, key, None) is not None:
            capped = key.startswith("num_experts") or key.endswith("_per_layer_input")  # 0 stays 0
            setattr(small, key, min(value, getattr(config, key)) if capped else value)
    expand, ssm_heads = getattr(config, "expand", None), getattr(config, "num_heads", None)
    if isinstance(expand, int) and ssm_heads and config.hidden_size * expand == ssm_heads * config.head_dim:
        # Mamba-2: heads x head size = expand x hidden (its validator checks it).
        small.num_heads = expand * TINY_FIELDS["hidden_size"] // TINY_FIELDS["head_dim"]
    for key, value in (
        ("head_dim", TINY_FIELDS["head_dim"]),
        ("num_key_value_heads", TINY_FIELDS["num_attention_heads"]),
        ("num_experts_per_tok", TINY_FIELDS["num_experts_per_tok"]),
    ):
        if heads and key in vars(config) and getattr(config, key) is None:
            # Left unset in some default configs (Ministral, Nemotron, DeepSeek-V2) whose model code reads them.
            setattr(small, key, value)
    for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        # Special tokens must fall inside the tiny vocabulary (an embedding's `padding_idx` is checked).
        current = getattr(config, key, None)
        if isinstance(current, int) and current >= TINY_FIELDS["vocab_size"] or isinstance(current, list):
            setattr(small, key, value)
    for key, value in vars(config).items():
        if isinstance(getattr(type(config), key, None), property):
            continue
        if _is_index_list(key, value, layers):  # layer indices follow the kept layers
            setattr(small, key, [indices.index(i) for i in value if i in indices])
        elif _is_layer_map(value, layers):  # a kept layer names a kept layer, else itself
            setattr(small, key, [indices.index(value[i]) if value[i] in indices else n for n, i in enumerate(indices)])
        elif isinstance(value, (list, str)) and len(value) == layers:
            # Per-layer lists (`layer_types`, `no_rope_layers`) and strings (`hybrid_override_pattern`) follow the
            # kept layers.
            kept = [fields[key]] * len(indices) if key in fields else [value[i] for i in indices]  # Gemma-3n widths
            setattr(small, key, "".join(kept) if isinstance(value, str) else kept)
        elif key.endswith("_layer_period") and isinstance(value, int) and value > 2:
            setattr(small, key, 2)  # Jamba: attention / experts every `period` layers, from `offset`
        elif key.endswith("_layer_offset") and isinstance(value, int) and value > 1:
            setattr(small, key, 1)
    return type(config).from_dict(small.to_dict())


def _tiny_heterogeneous(config, raw: dict, per_layer: dict):
    """`tiny_config` of a config with per-layer overrides (`per_layer_config`, Gemma-4): the tiny sizes everywhere,
    and the kept layers' other overrides (attention kinds, windows) renumbered."""
    uniform = type(config).from_dict({**raw, "per_layer_config": {}})  # empty, not absent: Gemma-4 derives one
    small = _tiny_uniform(uniform)
    indices = _layer_indices(uniform, uniform.num_hidden_layers)
    sized = set(TINY_FIELDS) | set(TINY_LATENT) | {"num_key_value_heads"}
    kept = {}
    for key, overrides in per_layer.items():
        if int(key) in indices:
            rest = {k: v for k, v in overrides.items() if k not in sized}
            if rest:
                kept[indices.index(int(key))] = rest
    return type(config).from_dict({**small.to_dict(), "per_layer_config": kept})


def _stock_class(cls: type) -> type:
    """The stock class a slim (`Hesso*`) class subclasses."""
    return next(c for c in cls.__mro__ if not c.__name__.startswith(("Hesso", "_Hesso")))


def _auto_classes(config) -> list[tuple[type, str]]:
    """Stock classes to check a bare config with: the causal LM if there is one, else the masked LM, else bare."""
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel"):
        mapping = auto_mapping(auto)
        if type(config) in mapping:
            return [(mapping[type(config)], auto)]
    raise ValueError(f"No Auto class knows the config class {type(config).__name__}.")


def _auto_of(cls: type) -> str:
    """The Auto class that maps `cls.config_class` to `cls` (looked up by key: no other model is imported)."""
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification", "AutoModel"):
        mapping = auto_mapping(auto)
        if cls.config_class in mapping and mapping[cls.config_class] is cls:
            return auto
    raise ValueError(
        f"No Auto class maps {cls.config_class.__name__} to {cls.__name__}; register it first, e.g. "
        f"`AutoModelForCausalLM.register({cls.config_class.__name__}, {cls.__name__})`."
    )


def _fresh(cls: type, config, seed: int) -> nn.Module:
    """A tiny instance whose computation is far from degenerate: projections at unit gain (`1 / sqrt(fan in)`, not
    the config's small `initializer_range`, under which every attention is nearly uniform and a head mixed up with
    another changes the outputs by less than the tolerance), and biases and norms away from their initial values."""
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config)).eval()
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear):
                weight.normal_(0, weight.shape[1] ** -0.5)
            elif isinstance(module, Conv1D):  # GPT-2: (in, out)
                weight.normal_(0, weight.shape[0] ** -0.5)
        for name, p in model.named_parameters():
            if p.dim() == 3 and "experts" in name:  # fused experts: (experts, out, in)
                p.normal_(0, p.shape[-1] ** -0.5)
            elif name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)[0]


def _zero_some(model: nn.Module, groups, uniform: bool) -> int:
    rng = random.Random(0)
    chosen = []
    first = {}  # kind -> the first layer that has a block of it
    for b in groups.blocks:
        first.setdefault(b.kind, b.layer)
    for b in groups.blocks:
        if b.n == 1:  # a whole sublayer: removed in the first layer that has it only (never uniform)
            idx = [0] if b.layer == first[b.kind] and not uniform else []
        else:
            idx = [b.n - 1] if uniform else rng.sample(range(b.n), rng.randint(1, b.n - 1))
        chosen += [b.offset + i for i in idx]
    groups.zero_(model, chosen)
    return len(chosen)


def _uncovered(model: nn.Module, layout: ArchLayout, kind: str, groups) -> list[str]:
    """Parameters of the tiny model's first layer with groups, outside the groups, whose size follows the kind's index
    space."""
    layers = layer_modules(model)
    index = min((b.layer for b in groups.blocks), default=0)
    layer = layers[index]
    hd = normalize_config(model.config, layout).head_dim
    sizes = space_sizes(layer, layout)
    if "q" not in sizes:  # no attention in this layer: only MLP kinds
        sizes = {**sizes, "q": hd, "kv": hd}
    partition = kind_partitions(sizes, hd, sizes["q"] == sizes["kv"], layer_sublayers(layer, layout)[1].experts)
    spaces = next((p for k, p in partition.items() if k == kind), {})
    widths = {sizes[s] for s in spaces} | {sizes[s] // hd for s in spaces if s in ("q", "kv")}  # rows, or heads
    attention, mlp = layer_sublayers(layer, layout)
    sublayer = attention if set(spaces) & {"q", "kv"} else mlp
    if not sublayer.projections:
        return []
    grouped = {s.param.split(".")[-2] for b in groups.blocks for s in b.slices}
    # The layout's own projections are accounted for (another index space, or another kind): not suspects.
    prefix = f"{sublayer.module}." if sublayer.module else ""
    projected = {p.path.removeprefix(prefix) for sub in layer_sublayers(layer, layout) for p in sub.projections}
    found = []
    for name, p in get_submodule(layer, sublayer.module).named_parameters():
        owner = name.rpartition(".")[0]  # "" for a parameter of the sublayer module itself (attention sinks)
        if name in projected or owner in projected or owner.rpartition(".")[2] in grouped:
            continue
        if any(d in widths for d in p.shape):
            found.append(f"`{prefix}{name}` {tuple(p.shape)}")
    return found


def _check_kind(cls: type, config, layout: ArchLayout, kind: str, auto: str) -> KindReport:
    model = _fresh(cls, config, seed=1)
    try:
        groups = build_groups(model, kinds=[kind], layout=layout)
    except InexpressibleKind as error:
        return KindReport(kind, 0, False, str(error))
    found = len(groups)
    if not found:
        return KindReport(kind, 0, False, "no such groups in this architecture")
    batch = _batch()
    _zero_some(model, groups, uniform=False)
    ref = _outputs(model, batch)
    # Relative to the outputs' size (float32 rounding grows with it); `not diff <= tol` also rejects a NaN.
    tol = TOLERANCE * max(1.0, ref.abs().max().item())
    try:
        slim_model(model, groups)
        diff = (_outputs(model, batch) - ref).abs().max().item()
        why = f"slicing out zeroed groups changed the outputs by {diff:.2e}"
    except Exception as error:  # noqa: BLE001 - any failure of slicing or running excludes the kind, with its text
        diff, why = float("inf"), f"the slim model fails ({type(error).__name__}: {error})"
    if not diff <= tol:
        suspects = _uncovered(_fresh(cls, config, seed=1), layout, kind, groups)
        if suspects:
            why += (
                f"; sized by these groups but not part of them: {', '.join(suspects[:3])} (a norm or bias that spans "
                "all heads/channels makes their removal inexact)"
            )
        return KindReport(kind, found, False, why)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = getattr(transformers, auto).from_pretrained(directory).eval()
        diff = (_outputs(loaded, batch) - ref).abs().max().item()
    if not diff <= tol:
        return KindReport(kind, found, False, f"the saved slim model reloads with outputs off by {diff:.2e}")
    # Uniform removal: can the stock config express it?
    uniform = _fresh(cls, config, seed=2)
    groups = build_groups(uniform, kinds=[kind], layout=layout)
    _zero_some(uniform, groups, uniform=True)
    slim_model(uniform, groups)
    return KindReport(kind, found, True, stock_uniform=can_stock(uniform))


def _absent_sublayers(cls: type, config, layout: ArchLayout) -> list[str]:
    """The sublayers that some layers of a tiny instance lack in the layout's form (left as they are), as text."""
    if not layout.inferred:
        return []
    model = cls(copy.deepcopy(config))
    layers = layer_modules(model)
    missing = {"attention": [], "MLP": []}
    for index, layer in enumerate(layers):
        attention, mlp = layer_sublayers(layer, layout)
        for name, sub in (("attention", attention), ("MLP", mlp)):
            if not sub.projections:
                missing[name].append(index)
    return [
        f"the {name} of layers {', '.join(map(str, found))} of {len(layers)} (not of the layout's form)"
        for name, found in missing.items()
        if found and (name == "MLP" or layout.attention.projections)
    ]


def check_architecture(model_or_config, *, register: bool = True) -> ArchitectureReport:
    """Check which group kinds of an architecture are exact, on a tiny random instance of its config class.

    For a `model_type` in the layout table the table's layout is checked. For any other, a layout is inferred from
    the module tree (`hf_hesso.groups.infer.infer_layouts`), every candidate is checked, and the best one is
    registered in this process with the failing kinds excluded (their reasons kept in `layout.excluded`), so that
    `build_groups`, HESSO and `slim_model` then work on such models (`build_groups` calls this by itself, through
    `ensure_layout`). Slim models of an inferred layout record the layout in their config and ship the code that
    reads it: they load anywhere with `trust_remote_code=True`.

    Args:
        model_or_config (`PreTrainedModel` or `PretrainedConfig`): the model (its class is used) or its config
            (the causal LM, else masked LM, else bare class of the Auto factories is used).
        register (`bool`, *optional*, defaults to `True`): register an inferred layout (with exclusions).

    Returns:
        `ArchitectureReport`: per kind: groups found, exact or excluded and why, and whether `to_stock` can express
        a uniform result. `print(report)` shows it as a table.
    """
    if isinstance(model_or_config, nn.Module):
        config = model_or_config.config
        classes = [(type(model_or_config), _auto_of(type(model_or_config)))]
    else:
        config = model_or_config
        classes = _auto_classes(config)
    model_type = base_model_type(config.model_type)
    if config.model_type.startswith(HESSO_PREFIX):
        # A slim checkpoint: check its stock family.
        stock = config.to_dict()
        for key in (LAYER_SHAPES_KEY, LAYOUT_KEY, "auto_map", "model_type", "transformers_version"):
            stock.pop(key, None)
        config = next(c for c in type(config).__mro__ if not c.__name__.startswith(("Hesso", "_Hesso"))).from_dict(
            stock
        )
        if isinstance(model_or_config, nn.Module):
            stock_cls = _stock_class(type(model_or_config))
            classes = [(stock_cls, _auto_of(stock_cls))]
        else:
            classes = _auto_classes(config)
    small = tiny_config(config)
    cls, auto = classes[0]
    in_table = model_type in ARCHITECTURES and not ARCHITECTURES[model_type].inferred
    if in_table:
        candidates = [ARCHITECTURES[model_type]]
    else:
        try:
            candidates = infer_layouts(cls(copy.deepcopy(small)))
        except ValueError as error:
            return ArchitectureReport(model_type, False, None, error=str(error))
    best: ArchitectureReport | None = None
    previous = ARCHITECTURES.get(model_type)
    for layout in candidates:
        if not in_table:
            register_layout(model_type, layout, classes)
        report = ArchitectureReport(model_type, in_table, layout, absent=_absent_sublayers(cls, small, layout))
        known = dict(layout.excluded)  # kinds the inference already ruled out (latent attention), with the reason
        for kind in KINDS:
            if kind == HIDDEN_CHANNEL:  # needs a `Stream` entry, which only table layouts have (docs/hidden.md)
                continue
            if kind in known:
                report.kinds.append(KindReport(kind, 0, False, known[kind]))
                continue
            result = _check_kind(cls, small, layout, kind, auto)
            if result.found or result.reason != "no such groups in this architecture":
                report.kinds.append(result)
        if best is None or len(report.exact_kinds) > len(best.exact_kinds):
            best = report
        if all(k.exact for k in report.kinds):
            break
    if not in_table:
        excluded = tuple((k.kind, k.reason) for k in best.kinds if not k.exact)
        best.layout = ArchLayout(**{**best.layout.__dict__, "excluded": excluded, "exact": tuple(best.exact_kinds)})
        if register:
            register_layout(model_type, best.layout, classes)
        elif previous is None:
            ARCHITECTURES.pop(model_type, None)
    return best


# Model class -> the layout `ensure_layout` registered for it, or the reason there is none.
_CHECKED: dict[type, ArchLayout | str] = {}


def ensure_layout(model: nn.Module) -> ArchLayout:
    """The layout of a model outside the table, inferred and checked by `check_architecture` once per model class
    in this process and registered; logs the kinds that passed and those excluded, with the reason.

    `hf_hesso.build_groups` (and so HESSO and HESSOTrainer) calls this for any `model_type` the table lacks.

    Raises:
        `ValueError`: no layout could be inferred, or no group kind passed the check; the message says why.
    """
    cls = type(model)
    found = _CHECKED.get(cls)
    if found is None:
        bars = transformers.logging.is_progress_bar_enabled()
        transformers.logging.disable_progress_bar()  # the check saves and loads tiny models, several times
        try:
            report = check_architecture(model)
        except Exception as error:  # noqa: BLE001 - a check that cannot run refuses the model type, naming why
            report = ArchitectureReport(
                base_model_type(model.config.model_type),
                False,
                None,
                error=f"the check failed ({type(error).__name__}: {error})",
            )
        finally:
            if bars:
                transformers.logging.enable_progress_bar()
        if report.error is not None or not report.exact_kinds:
            found = f"hf_hesso cannot prune `model_type` {report.model_type!r} ({cls.__name__}): " + (
                report.error or "no group kind passed the numerical check: " + _kinds_text(report)
            )
        else:
            found = report.layout
            logger.warning(
                f"`model_type` {report.model_type!r} is not in hf_hesso's layout table: its layout was inferred from "
                f"the module tree of {cls.__name__} and checked numerically on a tiny instance. " + _kinds_text(report)
            )
        _CHECKED[cls] = found
    if isinstance(found, str):
        raise ValueError(found)
    model_type = base_model_type(model.config.model_type)
    if ARCHITECTURES.get(model_type) is not found:
        register_layout(model_type, found, [(cls, _auto_of(cls))])
    return found


def require_prunable(config) -> None:
    """Raise before any weights are loaded when hf_hesso cannot prune models of `config` (a model type outside the
    table whose layout cannot be inferred, or none of whose group kinds passes the check on a tiny instance).

    Raises:
        `ValueError`: with the check's report (what was not found, or each kind and why it was excluded).
    """
    if base_model_type(config.model_type) in ARCHITECTURES:
        return
    try:
        report = check_architecture(config)
    except Exception as error:  # noqa: BLE001 - a check that cannot run refuses the model type, naming why
        raise ValueError(
            f"hf_hesso cannot prune `model_type` {config.model_type!r}: the check failed ({type(error).__name__}: "
            f"{error})"
        ) from error
    if report.error is not None or not report.exact_kinds:
        raise ValueError(f"hf_hesso cannot prune `model_type` {config.model_type!r}:\n{report}")


def _kinds_text(report: ArchitectureReport) -> str:
    exact = ", ".join(report.exact_kinds) or "none"
    excluded = "; ".join(f"{k.kind} ({k.reason})" for k in report.kinds if not k.exact) or "none"
    return f"Exact kinds: {exact}. Excluded kinds: {excluded}."


set_layout_check(ensure_layout)

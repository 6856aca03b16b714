# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Per-architecture layout knowledge, as plain data.

This file travels with every saved slim model (it is imported by ``modeling_hesso.py`` through a relative
import), so it must only import ``torch`` and ``transformers``, never ``hf_hesso``.

A layer is described by its sublayers (attention, MLP), each a list of projections. A projection names, for its
output dimension, the *index spaces* it holds (concatenated in order, or interleaved per head) and, for its input
dimension, the one index space it reads. The index spaces of a layer are:

- `"q"`: query rows, `heads x head_dim` (head-major), also the input columns of the attention output projection;
- `"kv"`: key (and, separately, value) rows, `kv_heads x head_dim`;
- `"mlp"`: the channels of the MLP (of every expert, for a mixture-of-experts layer: the experts of one layer share
  one width because transformers stores them in fused 3-D tensors);
- `"shared"`: the channels of a shared expert (Qwen2-MoE).

Everything else (which rows a group owns, what to keep when slicing, the sizes of a slim layer) is derived from this
data by one code path, so a family differs from another by its table entry only. Adding an architecture whose
modules are laid out like a known family is one line in ``ARCHITECTURES``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

# Group kinds (re-exported by `hf_hesso.groups`; defined here so that the layout data can name them).
MLP_CHANNEL = "mlp_channel"
HEAD = "head"
KV_GROUP = "kv_group"
QUERY_SLOT = "query_slot"
EXPERT_CHANNEL = "expert_channel"
SHARED_EXPERT_CHANNEL = "shared_expert_channel"
# Whole sublayers: one group per layer holds every projection (and bias) of its attention or its MLP.
ATTENTION_SUBLAYER = "attention_sublayer"
MLP_SUBLAYER = "mlp_sublayer"
SUBLAYER_KINDS = (ATTENTION_SUBLAYER, MLP_SUBLAYER)
# Residual-stream channels: one group is one channel (or `unit` consecutive channels) of the hidden size, across the
# embedding, every writer into the stream, every reader of it and every norm on it (see `Stream`). Model-wide: its
# one block has layer `HIDDEN_LAYER`.
HIDDEN_CHANNEL = "hidden_channel"
HIDDEN_LAYER = -1
KINDS = (
    MLP_CHANNEL,
    HEAD,
    KV_GROUP,
    QUERY_SLOT,
    EXPERT_CHANNEL,
    SHARED_EXPERT_CHANNEL,
    *SUBLAYER_KINDS,
    HIDDEN_CHANNEL,
)
# Kinds offered only when asked for (`build_groups(kinds=...)`, `HESSOConfig(prune_kinds=...)`).
OPT_IN_KINDS = (*SUBLAYER_KINDS, HIDDEN_CHANNEL)

# Channels per `expert_channel` group. transformers runs fused experts with `grouped_mm`, whose kernels need every
# row of a weight to span a multiple of 16 bytes: 8 channels in bf16. Groups of 8 channels keep every slim width a
# multiple of 8 (when the original is), so a slim MoE runs the same kernels as the stock one.
EXPERT_CHANNEL_UNIT = 8

# Index spaces (see the module docstring).
Q, KV, MLP, SHARED = "q", "kv", "mlp", "shared"


@dataclass(frozen=True)
class Proj:
    """One projection of a layer.

    Attributes:
        path (`str`): dotted path relative to the layer, of an `nn.Linear`, a GPT-2 `Conv1D` (weight stored
            `(in, out)`), or a 3-D expert parameter `(experts, out, in)`.
        rows (`tuple[str, ...]`): the index spaces along the output dimension, concatenated in this order
            (`("q", "kv", "kv")` for a fused QKV, `("mlp", "mlp")` for a fused gate/up projection). The bias, where
            there is one, follows the output rows.
        cols (`str`, *optional*): the index space along the input dimension (`"q"` for the attention output
            projection, `"mlp"` for the MLP output projection).
        interleaved (`bool`): the output rows hold one block per head, `[part_0 of head h, part_1 of head h, ...]`
            (GPT-NeoX `query_key_value`), instead of one part after the other.
        optional (`bool`): the projection exists only for some configs (DeBERTa's `pos_key_proj`).
    """

    path: str
    rows: tuple[str, ...] = ()
    cols: str | None = None
    interleaved: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Sublayer:
    """The attention or the MLP of a layer.

    Attributes:
        module (`str`): dotted path of the sublayer module, relative to the layer.
        projections (`tuple[Proj, ...]`): every projection whose shape follows an index space.
        attributes (`tuple[tuple[str, str], ...]`): run-time attributes to keep in step with the sizes, as
            `(path relative to the layer, quantity)`; quantities: `heads`, `kv_heads`, `groups` (query heads per
            key/value head), `q_width` (heads x head_dim), `mlp`, `shared`.
        width_field (`str`, *optional*): for an MLP, the config field of its width (`to_stock`).
        shared_width_field (`str`, *optional*): the config field of the shared expert's width.
        experts (`bool`): an MLP whose `mlp` space is the channels of routed experts (kind `expert_channel`).
        norms (`tuple[str, ...]`): the norms only this sublayer uses (its pre-norm, and a norm applied to its output
            alone, e.g. Gemma-2's `post_attention_layernorm`), relative to the layer. A removed sublayer outputs zero,
            whatever its input, and a norm maps zero to zero, so these norms go with it. A norm on the residual
            path (BERT's `LayerNorm(x + sublayer(x))`) or shared with the other sublayer (Phi) is never listed.
        returns_tuple (`bool`): the module returns `(output, weights)` (attention modules) rather than a tensor.
    """

    module: str
    projections: tuple[Proj, ...]
    attributes: tuple[tuple[str, str], ...] = ()
    width_field: str | None = None
    shared_width_field: str | None = None
    experts: bool = False
    norms: tuple[str, ...] = ()
    returns_tuple: bool = False


@dataclass(frozen=True)
class Stream:
    """The residual stream of a pre-norm RMSNorm family, for `hidden_channel` groups.

    Every projection of the layout reads the stream (rows projections, through a norm) or writes it (the output
    projection of a sublayer); these fields name the rest. Paths are relative to the layer unless said otherwise.

    Attributes:
        reader_norms (`tuple[str, ...]`): RMSNorms that normalise the stream before a sublayer reads it.
        writer_norms (`tuple[str, ...]`): RMSNorms applied to a sublayer's output before it is added to the stream
            (Gemma's `post_attention_layernorm` / `post_feedforward_layernorm`).
        readers (`tuple[str, ...]`): other modules that read the normalised stream along their last weight dimension
            (a mixture-of-experts router, Qwen2-MoE's `shared_expert_gate`); absent ones are skipped.
        final_norm (`str`): the norm after the last layer, relative to the base model.
        norm_offset (`float`): the norms scale by `norm_offset + weight` (Gemma: 1.0).
        embed_scale (`bool`): the embeddings are multiplied by `sqrt(config.hidden_size)` (Gemma).
    """

    reader_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    writer_norms: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    final_norm: str = "norm"
    norm_offset: float = 0.0
    embed_scale: bool = False


# Why `hidden_channel` is not offered where `ArchLayout.stream` is None.
NO_STREAM_REASON = (
    "exact hidden-size pruning needs RMSNorm on the residual stream: a LayerNorm subtracts the mean over all d "
    "channels, so a zero channel still shifts the mean and the variance that every other channel is normalised with "
    "(and LayerNorm's bias writes it back as non-zero), and no rescaling of the d' kept channels reproduces that"
)


@dataclass(frozen=True)
class ArchLayout:
    """Where the prunable projections of one transformer layer live, and how the config names their sizes.

    Attributes:
        name (`str`): the family's display name.
        layers (`str`): dotted path of the `nn.ModuleList` of layers, relative to `model.base_model`.
        attention (`Sublayer`): the attention sublayer.
        mlps (`tuple[Sublayer, ...]`): the MLP variants, the first whose projections exist in a layer applies (a
            Qwen2-MoE layer is sparse or dense).
        config_class (`str`): the stock config class in `transformers`.
        model_classes (`tuple[tuple[str, str], ...]`): stock model classes that get a slim subclass, each with its
            Auto class.
        head_dim_field (`str`, *optional*): the config field of the head size; `None` when the stock code derives it
            as `hidden_size // num_attention_heads` (then the stock config cannot express removed heads).
        kv_heads_field (`str`, *optional*): the config field of the key/value head count (`None`: one per query head).
        stock_rule (`str`, *optional*): a rule of the stock config that `to_stock` cannot always meet, as text.
        notes (`str`): what the family brings, for the documentation.
        pre_norm (`bool`): every sublayer adds its output to the residual stream and nothing else touches the
            stream, so a layer whose attention and MLP are both removed is the identity and is dropped from the stack.
            False for post-norm encoders (BERT: `LayerNorm(x + sublayer(x))` is not `x` when the sublayer is zero,
            so their layers keep the LayerNorms after the sublayers are gone).
        excluded (`tuple[tuple[str, str], ...]`): group kinds not offered, each with the reason (an inferred layout
            whose numerical check failed for that kind).
        inferred (`bool`): inferred from a module tree (`check_architecture`), not written in this table.
        stream (`Stream`, *optional*): the residual stream's norms and extra readers, for `hidden_channel` groups;
            None where exact hidden-size pruning is impossible (LayerNorm families, see `NO_STREAM_REASON`).
        exact (`tuple[str, ...]`): for an inferred layout, the group kinds the numerical check found exact.
        layer_count_field (`str`): the config field that counts the entries of the layer list: `num_hidden_layers`,
            or `num_layers` where `num_hidden_layers` counts something else (LongCat-Flash: two attention sublayers
            to a layer).
    """

    name: str
    layers: str
    attention: Sublayer
    mlps: tuple[Sublayer, ...]
    config_class: str
    model_classes: tuple[tuple[str, str], ...]
    head_dim_field: str | None = "head_dim"
    kv_heads_field: str | None = "num_key_value_heads"
    stock_rule: str | None = None
    notes: str = ""
    pre_norm: bool = True
    excluded: tuple[tuple[str, str], ...] = ()
    inferred: bool = False
    stream: Stream | None = None
    exact: tuple[str, ...] = ()
    layer_count_field: str = "num_hidden_layers"

    @property
    def sublayers(self) -> tuple[Sublayer, ...]:
        return (self.attention, *self.mlps)

    # Paths of separate projections, for code that handles only the Llama/BERT shape of layer (GGUF export).
    def _path(self, projections: tuple[Proj, ...], rows: tuple[str, ...] = (), cols: str | None = None) -> str:
        found = [p.path for p in projections if p.rows == rows and p.cols == cols and not p.optional]
        if not found:
            raise ValueError(f"{self.name} has no separate projection with rows {rows} and columns {cols}.")
        return found[0]

    @property
    def q(self) -> str:
        return self._path(self.attention.projections, rows=(Q,))

    def _kv(self) -> list[str]:
        found = [p.path for p in self.attention.projections if p.rows == (KV,) and not p.optional]
        if len(found) != 2:
            raise ValueError(f"{self.name} has no separate key and value projections (they are fused).")
        return found

    @property
    def k(self) -> str:
        return self._kv()[0]

    @property
    def v(self) -> str:
        return self._kv()[1]

    @property
    def o(self) -> str:
        return self._path(self.attention.projections, cols=Q)

    @property
    def mlp_in(self) -> tuple[str, ...]:
        return tuple(p.path for p in self.mlps[0].projections if p.rows == (MLP,))

    @property
    def mlp_out(self) -> str:
        return self._path(self.mlps[0].projections, cols=MLP)


def _decoder_classes(prefix: str, model: str | None = None, causal: str | None = None) -> tuple:
    return (
        (model or prefix + "Model", "AutoModel"),
        (causal or prefix + "ForCausalLM", "AutoModelForCausalLM"),
        (prefix + "ForSequenceClassification", "AutoModelForSequenceClassification"),
    )


def _encoder_classes(prefix: str) -> tuple:
    return (
        (prefix + "Model", "AutoModel"),
        (prefix + "ForSequenceClassification", "AutoModelForSequenceClassification"),
        (prefix + "ForMaskedLM", "AutoModelForMaskedLM"),
    )


# Attention with separate q/k/v/o projections and grouped-query attention (`num_key_value_groups`).
def _llama_attention(
    o: str = "o_proj", module: str = "self_attn", norms: tuple[str, ...] = ("input_layernorm",)
) -> Sublayer:
    return Sublayer(
        module=module,
        projections=(
            Proj(f"{module}.q_proj", rows=(Q,)),
            Proj(f"{module}.k_proj", rows=(KV,)),
            Proj(f"{module}.v_proj", rows=(KV,)),
            Proj(f"{module}.{o}", cols=Q),
        ),
        attributes=((f"{module}.num_key_value_groups", "groups"),),
        norms=norms,
        returns_tuple=True,
    )


GATED_MLP = Sublayer(
    module="mlp",
    projections=(
        Proj("mlp.gate_proj", rows=(MLP,)),
        Proj("mlp.up_proj", rows=(MLP,)),
        Proj("mlp.down_proj", cols=MLP),
    ),
    attributes=(("mlp.intermediate_size", "mlp"),),
    width_field="intermediate_size",
    norms=("post_attention_layernorm",),
)
# Gemma-2/3: sandwich norms, each only on its sublayer's path (a norm of a zero output is zero).
GEMMA_MLP = replace(GATED_MLP, norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"))
GEMMA_ATTENTION = _llama_attention(norms=("input_layernorm", "post_attention_layernorm"))
GEMMA_STREAM = Stream(
    reader_norms=("input_layernorm", "pre_feedforward_layernorm"),
    writer_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_offset=1.0,
    embed_scale=True,
)


def _plain_mlp(
    fc: str,
    out: str,
    module: str = "mlp",
    width_field: str = "intermediate_size",
    norms: tuple[str, ...] = ("post_attention_layernorm",),
) -> Sublayer:
    return Sublayer(
        module=module,
        projections=(Proj(f"{module}.{fc}", rows=(MLP,)), Proj(f"{module}.{out}", cols=MLP)),
        width_field=width_field,
        norms=norms,
    )


def _experts(width_field: str, shared: bool = False) -> Sublayer:
    projections = [Proj("mlp.experts.gate_up_proj", rows=(MLP, MLP)), Proj("mlp.experts.down_proj", cols=MLP)]
    attributes = [("mlp.experts.intermediate_dim", "mlp")]
    if shared:
        projections += [
            Proj("mlp.shared_expert.gate_proj", rows=(SHARED,)),
            Proj("mlp.shared_expert.up_proj", rows=(SHARED,)),
            Proj("mlp.shared_expert.down_proj", cols=SHARED),
        ]
        attributes.append(("mlp.shared_expert.intermediate_size", "shared"))
    return Sublayer(
        module="mlp",
        projections=tuple(projections),
        attributes=tuple(attributes),
        width_field=width_field,
        shared_width_field="shared_expert_intermediate_size" if shared else None,
        experts=True,
        norms=("post_attention_layernorm",),
    )


LLAMA_LAYOUT = ArchLayout(
    name="Llama",
    layers="layers",
    attention=_llama_attention(),
    mlps=(GATED_MLP,),
    config_class="LlamaConfig",
    model_classes=_decoder_classes("Llama"),
    stock_rule="stock `LlamaConfig` requires `hidden_size % num_attention_heads == 0`, even with `head_dim` set",
    notes="q/k/v/o projections, gated MLP, grouped-query attention.",
    stream=Stream(),
)


def _llama_like(name: str, prefix: str, notes: str, **kwargs) -> ArchLayout:
    fields = dict(
        name=name,
        layers="layers",
        attention=_llama_attention(),
        mlps=(GATED_MLP,),
        config_class=prefix + "Config",
        model_classes=_decoder_classes(prefix),
        notes=notes,
        stream=Stream(),
    )
    fields.update(kwargs)
    return ArchLayout(**fields)


_BERT_SELF_ATTRIBUTES = (
    ("attention.self.num_attention_heads", "heads"),
    ("attention.self.all_head_size", "q_width"),
)


BERT_MLP = Sublayer(
    module="intermediate",
    # The MLP output projection is `output.dense`, a sibling of `intermediate`.
    projections=(Proj("intermediate.dense", rows=(MLP,)), Proj("output.dense", cols=MLP)),
    width_field="intermediate_size",
)


def _bert_like(name: str, prefix: str) -> ArchLayout:
    return ArchLayout(
        name=name,
        layers="encoder.layer",
        attention=Sublayer(
            module="attention.self",
            projections=(
                Proj("attention.self.query", rows=(Q,)),
                Proj("attention.self.key", rows=(KV,)),
                Proj("attention.self.value", rows=(KV,)),
                Proj("attention.output.dense", cols=Q),
            ),
            attributes=_BERT_SELF_ATTRIBUTES,
            returns_tuple=True,
        ),
        mlps=(BERT_MLP,),
        config_class=prefix + "Config",
        model_classes=_encoder_classes(prefix),
        head_dim_field=None,
        kv_heads_field=None,
        notes="Post-norm encoder; every projection has a bias.",
        pre_norm=False,
    )


BERT_LAYOUT = _bert_like("BERT", "Bert")

DEBERTA_V2_LAYOUT = ArchLayout(
    name="DeBERTa-v2",
    layers="encoder.layer",
    attention=Sublayer(
        module="attention.self",
        projections=(
            Proj("attention.self.query_proj", rows=(Q,)),
            Proj("attention.self.key_proj", rows=(KV,)),
            Proj("attention.self.value_proj", rows=(KV,)),
            # Disentangled attention: relative-position keys/queries are per head too (absent with share_att_key).
            Proj("attention.self.pos_key_proj", rows=(KV,), optional=True),
            Proj("attention.self.pos_query_proj", rows=(Q,), optional=True),
            Proj("attention.output.dense", cols=Q),
        ),
        attributes=_BERT_SELF_ATTRIBUTES,
        returns_tuple=True,
    ),
    mlps=(BERT_MLP,),
    pre_norm=False,
    config_class="DebertaV2Config",
    model_classes=_encoder_classes("DebertaV2"),
    head_dim_field="attention_head_size",
    kv_heads_field=None,
    stock_rule="stock DeBERTa-v2 requires `hidden_size % num_attention_heads == 0` (the head size may be set "
    "with `attention_head_size`)",
    notes="Disentangled relative attention: `pos_key_proj`/`pos_query_proj` rows (or the shared `key_proj`/"
    "`query_proj`) follow the heads.",
)

GPT2_LAYOUT = ArchLayout(
    name="GPT-2",
    layers="h",
    attention=Sublayer(
        module="attn",
        projections=(Proj("attn.c_attn", rows=(Q, KV, KV)), Proj("attn.c_proj", cols=Q)),
        attributes=(("attn.num_heads", "heads"), ("attn.split_size", "q_width")),
        norms=("ln_1",),
        returns_tuple=True,
    ),
    mlps=(_plain_mlp("c_fc", "c_proj", width_field="n_inner", norms=("ln_2",)),),
    config_class="GPT2Config",
    model_classes=(
        ("GPT2Model", "AutoModel"),
        ("GPT2LMHeadModel", "AutoModelForCausalLM"),
        ("GPT2ForSequenceClassification", "AutoModelForSequenceClassification"),
    ),
    head_dim_field=None,
    kv_heads_field=None,
    notes="`Conv1D` projections (weights stored `(in, out)`), fused `c_attn` = [q; k; v], biases everywhere.",
)

GPT_NEOX_LAYOUT = ArchLayout(
    name="GPT-NeoX",
    layers="layers",
    attention=Sublayer(
        module="attention",
        projections=(
            Proj("attention.query_key_value", rows=(Q, KV, KV), interleaved=True),
            Proj("attention.dense", cols=Q),
        ),
        norms=("input_layernorm",),
        returns_tuple=True,
    ),
    mlps=(_plain_mlp("dense_h_to_4h", "dense_4h_to_h"),),
    config_class="GPTNeoXConfig",
    model_classes=_decoder_classes("GPTNeoX"),
    head_dim_field=None,
    kv_heads_field=None,
    notes="Fused `query_key_value` interleaved per head ([q_h, k_h, v_h] for each head h), parallel residual, "
    "partial rotary.",
)

MODERNBERT_LAYOUT = ArchLayout(
    name="ModernBERT",
    layers="layers",
    attention=Sublayer(
        module="attn",
        projections=(Proj("attn.Wqkv", rows=(Q, KV, KV)), Proj("attn.Wo", cols=Q)),
        norms=("attn_norm",),
        returns_tuple=True,
    ),
    mlps=(
        Sublayer(
            module="mlp",
            projections=(Proj("mlp.Wi", rows=(MLP, MLP)), Proj("mlp.Wo", cols=MLP)),
            width_field="intermediate_size",
            norms=("mlp_norm",),
        ),
    ),  # fmt: skip
    config_class="ModernBertConfig",
    model_classes=_encoder_classes("ModernBert"),
    head_dim_field=None,
    kv_heads_field=None,
    notes="Fused `Wqkv` = [q; k; v] and fused gated `Wi` = [input; gate], alternating local/global attention.",
)

PHI_LAYOUT = _llama_like(
    "Phi",
    "Phi",
    "Output projection `dense`, plain MLP `fc1`/`fc2`, biases, parallel residual, partial rotary, optional per-head "
    "q/k LayerNorm.",
    # Parallel residual: both sublayers read the one `input_layernorm`, which stays while either is kept.
    attention=_llama_attention(o="dense", norms=()),
    mlps=(_plain_mlp("fc1", "fc2", norms=()),),
    stock_rule="stock Phi sizes `q_layernorm`/`k_layernorm` by `hidden_size // num_attention_heads`, so with "
    "`qk_layernorm=True` it cannot express removed heads",
    stream=None,  # LayerNorm
)

GEMMA2_LAYOUT = _llama_like(
    "Gemma-2",
    "Gemma2",
    "head_dim independent of hidden size, logit soft-capping, sandwich norms, alternating local/global attention.",
    attention=GEMMA_ATTENTION,
    mlps=(GEMMA_MLP,),
    stream=GEMMA_STREAM,
)
GEMMA3_TEXT_LAYOUT = _llama_like(
    "Gemma-3 (text)",
    "Gemma3Text",
    "Per-head q/k RMSNorm (shared over head_dim), sandwich norms, local/global attention.",
    model_classes=_decoder_classes("Gemma3Text", causal="Gemma3ForCausalLM"),
    attention=GEMMA_ATTENTION,
    mlps=(GEMMA_MLP,),
    stream=GEMMA_STREAM,
)
MIXTRAL_LAYOUT = _llama_like(
    "Mixtral",
    "Mixtral",
    "Mixture of experts in fused 3-D tensors, top-k router renormalised over the chosen experts.",
    mlps=(_experts("intermediate_size"),),
    stream=Stream(readers=("mlp.gate",)),
)
QWEN2_MOE_LAYOUT = _llama_like(
    "Qwen2-MoE",
    "Qwen2Moe",
    "Routed experts in fused 3-D tensors plus a sigmoid-gated shared expert; dense layers where `mlp_only_layers` "
    "says.",
    mlps=(_experts("moe_intermediate_size", shared=True), GATED_MLP),
    stream=Stream(readers=("mlp.gate", "mlp.shared_expert_gate")),
)
QWEN3_MOE_LAYOUT = _llama_like(
    "Qwen3-MoE",
    "Qwen3Moe",
    "Routed experts in fused 3-D tensors, per-head q/k RMSNorm.",
    mlps=(_experts("moe_intermediate_size"), GATED_MLP),
    stream=Stream(readers=("mlp.gate",)),
)
STARCODER2_LAYOUT = _llama_like(
    "Starcoder2",
    "Starcoder2",
    "Biases on every projection, plain MLP `c_fc`/`c_proj`.",
    mlps=(_plain_mlp("c_fc", "c_proj"),),
    stream=None,  # LayerNorm
)

# model_type -> layout. One entry per line, sorted.
ARCHITECTURES: dict[str, ArchLayout] = {
    "bert": BERT_LAYOUT,
    "deberta-v2": DEBERTA_V2_LAYOUT,
    "gemma2": GEMMA2_LAYOUT,
    "gemma3_text": GEMMA3_TEXT_LAYOUT,
    "gpt2": GPT2_LAYOUT,
    "gpt_neox": GPT_NEOX_LAYOUT,
    "llama": LLAMA_LAYOUT,
    "mistral": _llama_like("Mistral", "Mistral", "Llama layout with sliding-window attention."),
    "mixtral": MIXTRAL_LAYOUT,
    "modernbert": MODERNBERT_LAYOUT,
    "phi": PHI_LAYOUT,
    "qwen2": _llama_like("Qwen2", "Qwen2", "Llama layout with q/k/v biases."),
    "qwen2_moe": QWEN2_MOE_LAYOUT,
    "qwen3": _llama_like("Qwen3", "Qwen3", "Per-head q/k RMSNorm (shared over head_dim)."),
    "qwen3_moe": QWEN3_MOE_LAYOUT,
    "roberta": _bert_like("RoBERTa", "Roberta"),
    "smollm3": _llama_like("SmolLM3", "SmolLM3", "Llama layout; some layers without rotary embeddings."),
    "starcoder2": STARCODER2_LAYOUT,
}

# The config key under which a slim model records its per-layer sizes.
LAYER_SHAPES_KEY = "hesso_layer_shapes"
# The config key under which a slim model records its hidden size, when `hidden_channel` groups were removed (the
# stock `hidden_size` keeps the size before pruning, like every stock field of a slim config).
HIDDEN_SIZE_KEY = "hesso_hidden_size"
# The config key under which a slim model of a model type outside the table records its layout (inferred from the
# module tree and checked numerically), so that this file can build the slim model anywhere.
LAYOUT_KEY = "hesso_layout"
# Prefix of the model_type of a slim model whose layers differ (`hesso_llama`, `hesso_bert`, ...).
HESSO_PREFIX = "hesso_"


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one layer that pruning can change.

    `intermediate_size` is the MLP width: of the dense MLP, or of every routed expert in a mixture-of-experts layer.
    `shared_intermediate_size` is the width of a shared expert (Qwen2-MoE), `None` where there is none.

    Zero heads means the layer's attention is removed (no compute, no key/value cache entry); an MLP width of zero
    (and no shared expert width) means its MLP is removed. A removed sublayer whose output projection had a bias
    that was not zero still adds that constant bias to the residual stream: `attention_bias` / `mlp_bias` say so. A
    layer whose attention and MLP are both removed and that adds no bias is dropped from the stack (`dropped`), in
    families where that layer is then the identity (pre-norm).
    """

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    shared_intermediate_size: int | None = field(default=None)
    attention_bias: bool = field(default=False)
    mlp_bias: bool = field(default=False)

    @property
    def has_attention(self) -> bool:
        return self.num_attention_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate_size > 0 or bool(self.shared_intermediate_size)

    @property
    def empty(self) -> bool:
        """Attention and MLP both removed, and no constant bias left: the layer is the identity in pre-norm families."""
        return not (self.has_attention or self.has_mlp or self.attention_bias or self.mlp_bias)

    def to_dict(self) -> dict[str, int]:
        out = {
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
        }
        if self.shared_intermediate_size is not None:
            out["shared_intermediate_size"] = self.shared_intermediate_size
        if self.attention_bias:
            out["attention_bias"] = True
        if self.mlp_bias:
            out["mlp_bias"] = True
        return out

    def describe(self) -> str:
        """`"removed"`-aware one-line text of the layer's sizes."""
        if self.empty:
            return "layer removed"
        attention = (
            f"{self.num_attention_heads} heads / {self.num_key_value_heads} kv"
            if self.has_attention
            else ("attention removed" + (" (bias kept)" if self.attention_bias else ""))
        )
        mlp = (
            f"{self.intermediate_size} mlp channels"
            if self.has_mlp
            else ("mlp removed" + (" (bias kept)" if self.mlp_bias else ""))
        )
        return f"{attention}, {mlp}"

    def space_sizes(self, head_dim: int) -> dict[str, int]:
        """The size of every index space of a layer of this shape."""
        sizes = {Q: self.num_attention_heads * head_dim, KV: self.num_key_value_heads * head_dim,
                 MLP: self.intermediate_size}  # fmt: skip
        if self.shared_intermediate_size is not None:
            sizes[SHARED] = self.shared_intermediate_size
        return sizes


@dataclass(frozen=True)
class NormalizedConfig:
    """The config fields pruning needs, read the same way for every supported family."""

    model_type: str
    num_layers: int
    hidden_size: int  # the model's width now (`hesso_hidden_size` of a slim config where set)
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int


def base_model_type(model_type: str) -> str:
    """`hesso_llama` -> `llama`; stock types are returned unchanged."""
    return model_type[len(HESSO_PREFIX) :] if model_type.startswith(HESSO_PREFIX) else model_type


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def unsupported_message(model_type: str) -> str:
    return (
        f"No layout is known for `model_type` {model_type!r} in this process (the layout table has "
        f"{', '.join(supported_model_types())}). `build_groups(model)` infers one from the module tree and checks it "
        "numerically (and HESSO and HESSOTrainer call it); call it on this model first, or pass the groups it "
        "returned."
    )


def get_layout(model_type: str) -> ArchLayout:
    try:
        return ARCHITECTURES[base_model_type(model_type)]
    except KeyError:
        raise ValueError(unsupported_message(model_type)) from None


def current_hidden_size(config) -> int:
    """The width of the residual stream: a slim config's `hesso_hidden_size` where set, else `hidden_size`."""
    return int(getattr(config, HIDDEN_SIZE_KEY, None) or config.hidden_size)


def layout_to_dict(layout: ArchLayout) -> dict:
    """`layout` as plain JSON data (what a slim model of an inferred layout records in `config.hesso_layout`)."""
    return json.loads(json.dumps(asdict(layout)))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def layout_from_dict(data: dict) -> ArchLayout:
    """The `ArchLayout` that `layout_to_dict` wrote."""

    def build(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"`{LAYOUT_KEY}` has fields {sorted(unknown)} that this version of the model code does not know; "
                "load the model with the hf_hesso version that saved it."
            )
        return cls(**{key: _tuples(value) for key, value in values.items()})

    def sublayer(values: dict) -> Sublayer:
        return build(Sublayer, {**values, "projections": [build(Proj, p) for p in values["projections"]]})

    stream = data.get("stream")
    return build(
        ArchLayout,
        {
            **data,
            "attention": sublayer(data["attention"]),
            "mlps": [sublayer(m) for m in data["mlps"]],
            "stream": None if stream is None else build(Stream, stream),
        },
    )


def layout_of(config) -> ArchLayout:
    """The layout of a model with this config: the one it records (`config.hesso_layout`, a slim model of an
    inferred layout), else the table's (or one registered in this process).

    A recorded layout is also registered for its model type in this process when none is, so that code that looks
    layouts up by `model_type` finds it.
    """
    recorded = getattr(config, LAYOUT_KEY, None)
    if not recorded:
        return get_layout(config.model_type)
    layout = layout_from_dict(recorded)
    ARCHITECTURES.setdefault(base_model_type(config.model_type), layout)
    return layout


def mlp_width(config, width_field: str | None) -> int:
    # GPT-2's `n_inner` is None for the default 4 x hidden.
    value = getattr(config, width_field, None) if width_field else None
    if isinstance(value, (list, tuple)):  # one width per layer (Gemma-3n): the widest
        value = max(value)
    return int(value) if value else 4 * config.hidden_size


def normalize_config(config, layout: ArchLayout | None = None) -> NormalizedConfig:
    """Read heads, key/value heads, head size and MLP width of any supported config."""
    model_type = base_model_type(config.model_type)
    layout = layout or layout_of(config)
    heads = config.num_attention_heads
    kv_heads = (getattr(config, layout.kv_heads_field, None) if layout.kv_heads_field else None) or heads
    head_dim = getattr(config, layout.head_dim_field, None) if layout.head_dim_field else None
    return NormalizedConfig(
        model_type=model_type,
        num_layers=getattr(config, layout.layer_count_field),
        hidden_size=current_hidden_size(config),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or config.hidden_size // heads,
        intermediate_size=mlp_width(config, layout.mlps[0].width_field if layout.mlps else None),
    )


def layer_shape_from_dict(shape: dict) -> LayerShape:
    return LayerShape(**{k: (bool(v) if k in ("attention_bias", "mlp_bias") else (None if v is None else int(v)))
                         for k, v in shape.items()})  # fmt: skip


def layer_shapes_from_config(config) -> list[LayerShape]:
    """Per-layer sizes: the recorded ones of a slim config, else the uniform sizes of a stock config."""
    recorded = getattr(config, LAYER_SHAPES_KEY, None)
    if recorded:
        return [layer_shape_from_dict(shape) for shape in recorded]
    norm = normalize_config(config)
    uniform = LayerShape(norm.num_attention_heads, norm.num_key_value_heads, norm.intermediate_size)
    return [uniform] * norm.num_layers


def get_submodule(root, path: str):
    return root.get_submodule(path) if path else root

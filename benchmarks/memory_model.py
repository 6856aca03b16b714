"""Per-GPU memory model of HESSO + AdamW under FSDP2, checked against what the optimizers allocate.

Prints (1) the computed per-GPU memory of a Llama-3-8B-shaped model on 1, 2, 4, 8 GPUs with FSDP2 (`fully_shard`)
and AdamW, with and without HESSO, and (2) for a small LLaMA trained here on CPU for a few pruning periods, the
optimizer state bytes that AdamW and HESSO actually hold, next to what the model predicts for that small model.

    python benchmarks/memory_model.py

The model counts fp32 parameters, gradients and AdamW's two moments, sharded 1/W by FSDP2, plus the unsharded
parameters and gradients of the largest FSDP unit (one decoder layer or the embedding) during forward/backward.
Activations depend on batch and sequence length and are left out. HESSO adds persistent state O(number of groups):
per group the selecting period (int64) and the latest score (float64), and per pruned or fading block a factor
vector per slice (local rows under FSDP2). At the first step of each period it also holds, for that one step, a
copy of the grouped parameters' local shards (to form the update direction `p_before - p_after`) and the
`(4, num_groups)` partial sums.
"""

from __future__ import annotations

import argparse

import torch

GIB = 1024**3


def llama3_8b_shapes() -> dict:
    return dict(
        hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False
    )


def counts(c: dict) -> dict:
    """Parameter and group counts of a LLaMA-shaped decoder."""
    h, i, hd = c["hidden"], c["intermediate"], c["head_dim"]
    attn = h * c["heads"] * hd * 2 + h * c["kv_heads"] * hd * 2
    mlp = 3 * h * i
    layer = attn + mlp + 2 * h
    embed = c["vocab"] * h
    total = c["layers"] * layer + embed * (1 if c["tied"] else 2) + h
    grouped = c["layers"] * (attn + mlp)
    # GQA: key/value groups plus query slots (heads per key/value group); MHA: heads.
    gqa = c["kv_heads"] < c["heads"]
    groups_per_layer = (c["kv_heads"] + c["heads"] // c["kv_heads"] if gqa else c["heads"]) + i
    return dict(
        total=total,
        grouped=grouped,
        largest_unit=max(layer, embed),
        groups=c["layers"] * groups_per_layer,
        # Rows + columns a factor vector can cover per layer (q, k, v, gate, up rows; o, down columns): bounds the
        # per-slice factor vectors when every block has something pruned or fading.
        factor_elems=c["layers"] * (c["heads"] * hd * 2 + c["kv_heads"] * hd * 2 + 3 * i),
    )


def per_gpu(c: dict, world: int, bytes_per=4) -> dict:
    n = counts(c)
    sharded = n["total"] * bytes_per / world
    base = 4 * sharded + 2 * n["largest_unit"] * bytes_per  # params, grads, 2 moments; + one unsharded unit
    hesso_state = n["groups"] * (8 + 8) + n["factor_elems"] * bytes_per / world * 2  # pruned + fading factors
    scoring_peak = n["grouped"] * bytes_per / world + 3 * n["groups"] * 4
    return dict(adamw=base, hesso=base + hesso_state, hesso_state=hesso_state, scoring_peak=scoring_peak, **n)


def print_table() -> None:
    c = llama3_8b_shapes()
    n = counts(c)
    print(f"Llama-3-8B shape: {n['total'] / 1e9:.2f}B parameters, {n['groups']:,} prunable groups, fp32 AdamW")
    print(
        f"{'GPUs':>4} {'AdamW GiB/GPU':>14} {'+HESSO GiB/GPU':>15} {'HESSO state MiB':>16} {'scoring step +GiB':>18}"
    )
    for world in (1, 2, 4, 8):
        m = per_gpu(c, world)
        print(
            f"{world:>4} {m['adamw'] / GIB:>14.2f} {m['hesso'] / GIB:>15.2f} {m['hesso_state'] / 2**20:>16.1f} "
            f"{m['scoring_peak'] / GIB:>18.1f}"
        )


def measure(steps: int = 12) -> None:
    """Train a small LLaMA with HESSO(AdamW) through its pruning periods and count the bytes each optimizer holds."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_hesso import HESSO, build_groups

    cfg = dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, head_dim=32, vocab=512, tied=False)
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    groups = build_groups(model)
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        groups,
        target_group_sparsity=0.3,
        start_pruning_step=2,
        pruning_periods=2,
        pruning_steps=8,
    )
    ids = torch.randint(0, cfg["vocab"], (2, 16))
    peak_hesso = 0
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        peak_hesso = max(peak_hesso, hesso_bytes(opt))
    adamw = sum(v.nbytes for s in opt.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    params = sum(p.nbytes for p in model.parameters())
    n = counts(cfg)
    assert n["total"] * 4 == params, (n["total"] * 4, params)
    assert n["groups"] == len(groups), (n["groups"], len(groups))
    predicted = per_gpu(cfg, 1)["hesso_state"]
    print(
        f"\nMeasured on a small LLaMA ({params / 4 / 1e6:.2f}M parameters, {len(groups):,} groups, 1 process):\n"
        f"  AdamW state       {adamw / 2**20:8.2f} MiB = {adamw / params:.2f} x parameter bytes (model: 2.00)\n"
        f"  HESSO extra state {peak_hesso / 2**10:8.1f} KiB peak over the run = {peak_hesso / adamw:.4f} x AdamW "
        f"state (model bound: {predicted / 2**10:.1f} KiB = {predicted / adamw:.4f} x)"
    )


def hesso_bytes(opt) -> int:
    """Bytes of every tensor HESSO keeps between steps (its own state, not the base optimizer's)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen[id(t)] = t.nbytes

    add(opt._selection_period)
    add(opt.last_scores)
    for name in ("_pruned_slices", "_guarded_slices", "_pruned_index"):
        for _, t in getattr(opt, name, []):
            add(t)
    for _, _, t in getattr(opt, "_fading", []):
        add(t)
    for ops in opt._ops.values():
        add(ops.rows)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print_table()
    measure(args.steps)


if __name__ == "__main__":
    main()

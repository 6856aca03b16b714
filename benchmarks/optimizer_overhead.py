"""Overhead of `HESSO` over the plain base optimizer it wraps (torch AdamW), measured in one process.

Same model (a LLaMA config of about 20M parameters, grouped-query attention), same gradients, and the baseline
measured interleaved with HESSO so that both see the same machine load. Reported, each as a ratio against the
baseline of this process:

- median optimizer step while groups fade (the last period: earlier periods' groups held at zero, this period's
  fading), and after pruning (every selected group held at zero);
- the cost of a scoring step (the first step of a period: base step + direction + saliency + global selection);
- a full training iteration (forward + backward + step), while fading and after pruning, and amortised over a
  whole run including the scoring steps;
- optimizer state size (HESSO: base state + its own persistent state + cached index tensors) against AdamW's.

Usage:
    python benchmarks/optimizer_overhead.py [--device cuda] [--no-fused] [--threads 1] [--steps-per-period 16]
        [--hold-zeros auto|always]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_hesso.groups import build_groups
from hf_hesso.optim import HESSO

GOALS = {"fading step": 1.10, "pruned step": 1.10, "iteration (fading)": 1.03, "state size": 1.01}


def llama_20m() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1152,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-fused",
        dest="fused",
        action="store_false",
        help="torch's for-loop/foreach AdamW instead of the fused one (the Trainer's default since torch 2.8)",
    )
    parser.add_argument("--steps-per-period", type=int, default=16)
    parser.add_argument("--periods", type=int, default=4)
    parser.add_argument("--after", type=int, default=16, help="steps measured after pruning")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: least disturbed by other load)")
    parser.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="on CPU: process time (default) or wall time"
    )
    parser.add_argument("--hold-zeros", choices=["auto", "always"], default="auto", help="see `HESSO(hold_zeros=)`")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = LlamaForCausalLM(llama_20m()).to(device)
    baseline = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    groups = build_groups(model)
    print(f"model: {n_params / 1e6:.1f}M parameters, {len(groups)} groups, {groups.total_numel / 1e6:.1f}M prunable")
    print(
        f"device: {device}, threads: {torch.get_num_threads()}, clock: {args.clock}, fused AdamW: {args.fused}, hold_zeros: {args.hold_zeros}"
    )

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, fused=args.fused)

    t = args.steps_per_period
    start = 2
    hesso = HESSO(
        adamw(model),
        groups,
        target_group_sparsity=0.5,
        start_pruning_step=start,
        pruning_periods=args.periods,
        pruning_steps=args.periods * t,
        hold_zeros=args.hold_zeros,
    )
    plain = adamw(baseline)
    batch = torch.randint(0, 8192, (args.batch, args.seq), device=device)

    # One fixed set of gradients, restored before every step of both optimizers (HESSO zeroes pruned rows).
    loss = model(batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()

    def set_grads(m):
        for n, p in m.named_parameters():
            if p.grad is None:
                p.grad = grads[n].clone()
            else:
                p.grad.copy_(grads[n])

    clock = time.perf_counter if device.type == "cuda" or args.clock == "wall" else time.process_time

    def timed_step(m, opt) -> float:
        set_grads(m)
        sync(device)
        t0 = clock()
        opt.step()
        sync(device)
        return clock() - t0

    def timed_iteration(m, opt) -> float:
        sync(device)
        t0 = clock()
        m(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        sync(device)
        return clock() - t0

    # Each step, the baseline and HESSO run back to back (alternating which goes first) so that both see the same
    # machine load. While fading in the last period and after pruning, every other step is a full iteration.
    steps = {"plain": [], "fading": [], "pruned": [], "scoring": []}
    iters = {"plain": [], "fading": [], "pruned": []}
    last = hesso.pruning_end_step + args.after
    for n in range(1, last + 1):
        phase = hesso.schedule.phase(n)
        if phase is None:
            kind = "pruned" if n > hesso.pruning_end_step else "warm-up"
        elif phase[1] == 0:
            kind = "scoring"
        else:
            kind = "fading" if phase[0] == args.periods - 1 else "early fading"
        timer = timed_iteration if kind in iters and n % 2 == 0 else timed_step
        # Alternate who goes first within each kind of measurement (iterations happen on even steps only).
        if (n // 2 if timer is timed_iteration else n) % 2:
            tp, th = timer(baseline, plain), timer(model, hesso)
        else:
            th, tp = timer(model, hesso), timer(baseline, plain)
        if kind not in steps:
            continue
        bucket = iters if timer is timed_iteration else steps
        bucket["plain"].append(tp)
        bucket[kind].append(th)
    assert len(hesso.pruned_groups) == round(0.5 * len(groups))
    med = {k: statistics.median(v) for k, v in steps.items()}

    # Forward + backward alone, on the pruned model (zeros included) and the dense baseline: separates what the
    # model's exact zeros cost on this device (CPU math libraries take slow paths on some zero inputs) from what
    # the optimizer costs.
    def timed_fb(m) -> float:
        sync(device)
        t0 = clock()
        m(batch, labels=batch).loss.backward()
        sync(device)
        m.zero_grad()
        return clock() - t0

    fb_times = {"plain": [], "hesso": []}
    for _ in range(6):
        fb_times["plain"].append(timed_fb(baseline))
        fb_times["hesso"].append(timed_fb(model))
    fb_ratio = statistics.median(fb_times["hesso"]) / statistics.median(fb_times["plain"])
    it = {k: statistics.median(v) for k, v in iters.items()}
    # A whole run, from the medians: every step pays forward + backward; HESSO's steps by phase.
    fb = it["plain"] - med["plain"]
    # (the median fading step of the last period, the costliest, stands for every fading step)
    per_phase = {"scoring": args.periods, "fading": hesso.pruning_steps - args.periods, "pruned": args.after}
    total_steps = start + sum(per_phase.values())
    run_hesso = total_steps * fb + start * med["plain"] + sum(med[k] * v for k, v in per_phase.items())
    run_plain = total_steps * (fb + med["plain"])

    # State sizes: base state + HESSO's persistent entry + its cached per-block index tensors.
    plain_bytes = tensor_bytes(plain.state_dict()["state"])
    hesso_sd = hesso.state_dict()
    cached = tensor_bytes(
        [t for _, t in hesso._masks.pruned_index]
        + [t for _, t in hesso._masks.pruned_slices]
        + [t for _, _, t in hesso._masks.fading]
    )
    hesso_bytes = tensor_bytes(hesso_sd["state"]) + tensor_bytes(hesso_sd["hesso"]) + cached
    transient = sum(p.numel() * p.element_size() for p in groups.parameters().values())

    rows = [
        ("plain AdamW step (median)", med["plain"] * 1e3, None, "ms"),
        ("fading step", med["fading"] * 1e3, med["fading"] / med["plain"], "ms"),
        ("pruned step", med["pruned"] * 1e3, med["pruned"] / med["plain"], "ms"),
        ("scoring step", med["scoring"] * 1e3, med["scoring"] / med["plain"], "ms"),
        ("plain iteration (median)", it["plain"] * 1e3, None, "ms"),
        ("iteration (fading)", it["fading"] * 1e3, it["fading"] / it["plain"], "ms"),
        ("iteration (pruned)", it["pruned"] * 1e3, it["pruned"] / it["plain"], "ms"),
        ("fwd+bwd only, pruned vs dense model", statistics.median(fb_times["hesso"]) * 1e3, fb_ratio, "ms"),
        (f"whole run of {total_steps} steps (estimate)", run_hesso, run_hesso / run_plain, "s"),
        ("state size", hesso_bytes / 2**20, hesso_bytes / plain_bytes, "MiB"),
        ("AdamW state size", plain_bytes / 2**20, None, "MiB"),
        ("transient copy at scoring steps", transient / 2**20, None, "MiB"),
    ]
    print(f"{'measure':36s} {'value':>10s}  {'ratio':>7s}  goal")
    for name, value, ratio, unit in rows:
        goal = GOALS.get(name)
        r = f"{ratio:7.3f}" if ratio is not None else " " * 7
        g = f"<= {goal:.2f} {'ok' if ratio <= goal else 'MISSED'}" if goal else ""
        print(f"{name:36s} {value:8.2f}{unit:>3s} {r}  {g}")


if __name__ == "__main__":
    main()

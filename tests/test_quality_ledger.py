"""The quality campaign's runner (benchmarks/quality.py): the ledger, the skip logic, the tables, the baselines.

The campaign itself runs for hours on the real SmolLM2; these tests check the parts that decide what it records and
what it reports, on tiny models and synthetic rows.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import resources
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from common import removed_fraction  # noqa: E402 - benchmarks/ is put on the path just above

_spec = importlib.util.spec_from_file_location("quality_bench", BENCH / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _opts(*argv):
    """The runner's options with its defaults (parsed by its own parser through `--dry_run`)."""
    import argparse

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["opts"] = real(self, args, namespace)
        return captured["opts"]

    argparse.ArgumentParser.parse_args = grab
    try:
        quality.main(["--dry_run", "--ledger", "/nonexistent/ledger.jsonl", *argv])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["opts"]


def test_a_row_is_recorded_whole_or_not_at_all(tmp_path):
    ledger = tmp_path / "quality.jsonl"
    quality.append_row(ledger, {"run_key": "a", "ppl_bbc": 1.5})
    # A crash in the middle of a write leaves a line cut short: it is not a row, and the next row still parses.
    with open(ledger, "a") as f:
        f.write('{"run_key": "b", "ppl_b')
    quality.append_row(ledger, {"run_key": "c", "ppl_bbc": 2.5})
    rows = quality.read_ledger(ledger)
    assert [r["run_key"] for r in rows] == ["a", "c"]
    assert quality.read_ledger(tmp_path / "missing.jsonl") == []


def test_run_key_names_the_settings_not_the_order():
    a = {"method": "hesso", "seed": 0, "schedule": {"start": 16, "fade": 64}}
    b = {"schedule": {"fade": 64, "start": 16}, "seed": 0, "method": "hesso"}
    assert quality.run_key(a) == quality.run_key(b)
    assert quality.run_key(a) != quality.run_key({**a, "seed": 1})


def test_rerun_skips_what_the_ledger_holds(tmp_path, capsys):
    opts = _opts()
    ledger = tmp_path / "quality.jsonl"
    jobs = quality.protocol(opts)
    assert jobs[0] == ("pretrained", False, 0.0, 0, 0)
    # Paired seeds: every method of the 50% part runs on seeds 0, 1, 2, with and without distillation.
    part = {(m, d, s) for m, d, sp, steps, s in jobs if sp == 0.5 and steps == 160}
    assert part == {(m, d, s) for m in ("hesso", "taylor", "activation") for d in (True, False) for s in (0, 1, 2)}
    capsys.readouterr()
    quality.main(["--dry_run", "--ledger", str(ledger)])
    total = int(capsys.readouterr().out.split(" not in ")[0].split(", ")[1])
    for job in jobs[:2]:
        spec = quality.spec_of(opts, *job)
        quality.append_row(ledger, {**spec, "run_key": quality.run_key(spec)})
    quality.main(["--dry_run", "--ledger", str(ledger)])
    out = capsys.readouterr().out
    assert f"{total - 2} not in" in out
    # The same run asked for by hand is the recorded one; a different setting is a different run (a lever is not
    # skipped because the default run is recorded).
    quality.main(["--dry_run", "--ledger", str(ledger), "--methods", "hesso", "--distill", "true", "--seeds", "0"])
    assert "1 runs planned, 0 not in" in capsys.readouterr().out
    quality.main(["--dry_run", "--ledger", str(ledger), "--methods", "hesso", "--distill", "true", "--seeds", "0",
                  "--fade", "128"])  # fmt: skip
    assert "1 runs planned, 1 not in" in capsys.readouterr().out


def _row(method, distill, seed, nll_bbc, nll_general, **extra):
    opts = _opts()
    spec = quality.spec_of(opts, method, distill, 0.5, 160, seed)
    return {
        **spec,
        "nll_bbc": nll_bbc,
        "nll_general": nll_general,
        "ppl_bbc": quality.ppl(nll_bbc),
        "ppl_general": quality.ppl(nll_general),
        "removed": 0.5,
        "wall_s": 60.0,
        **extra,
    }


def test_bootstrap_ratio():
    a = [511 * 3.0, 511 * 3.2, 511 * 2.9, 511 * 3.1]
    ratio, lo, hi = quality.bootstrap_ratio(a, a)
    assert (ratio, lo, hi) == (1.0, 1.0, 1.0)
    b = [x - 511 * 0.1 for x in a]  # every window 0.1 nats lower per token
    ratio, lo, hi = quality.bootstrap_ratio(a, b)
    assert ratio == pytest.approx(math.exp(0.1)) and lo == pytest.approx(math.exp(0.1))
    assert hi == pytest.approx(math.exp(0.1))


def test_table_states_seeds_and_pairs(tmp_path):
    n = 4
    rows = [
        _row("hesso", True, 0, [511 * 3.0] * n, [511 * 4.0] * n),
        _row("taylor", True, 0, [511 * 3.1] * n, [511 * 4.2] * n),
        _row("hesso", True, 1, [511 * 3.0] * n, [511 * 4.1] * n),
    ]
    pre = quality.spec_of(_opts(), "pretrained", False, 0.0, 0, 0)
    rows.append({**pre, "nll_bbc": [511 * 3.5] * n, "nll_general": [511 * 3.6] * n, "ppl_bbc": math.exp(3.5),
                 "ppl_general": math.exp(3.6), "removed": 0.0, "wall_s": 1.0})  # fmt: skip
    text = quality.tables(rows)
    hesso = next(line for line in text.splitlines() if line.startswith("| hesso | yes |"))
    assert "| 2 (0, 1) |" in hesso
    assert f"{(math.exp(4.0) + math.exp(4.1)) / 2 / math.exp(3.6):.2f}x" in hesso
    pair = next(line for line in text.splitlines() if line.startswith("| 50%, 160 | hesso | taylor | yes | 0 |"))
    assert f"{math.exp(-0.2):.3f}" in pair  # general text, hesso / taylor
    assert not any(line.startswith("| 50%, 160 | hesso | taylor | yes | 1 |") for line in text.splitlines())
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nbefore\n{quality.BEGIN}\nold table\n{quality.END}\nafter\n")
    quality.write_table(rows, readme)
    out = readme.read_text()
    assert "old table" not in out and out.startswith("# B\n\nbefore\n") and out.endswith(f"{quality.END}\nafter\n")
    assert hesso in out
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- quality-table:begin -->"):
        quality.write_table(rows, readme)


def test_levers_pair_with_hessos_defaults_of_the_same_seed():
    n = 4
    hidden = {"prune_kinds": ["hidden_channel", "kv_group", "mlp_channel", "query_slot"]}
    rows = [
        _row("hesso", True, 0, [511 * 3.0] * n, [511 * 4.0] * n),
        _row("hesso", True, 0, [511 * 3.0] * n, [511 * 3.9] * n, **hidden),
        _row("hesso", True, 1, [511 * 3.0] * n, [511 * 3.9] * n, **hidden),  # no default row of seed 1
        _row("hesso", False, 0, [511 * 3.0] * n, [511 * 3.5] * n),  # another distillation setting
    ]
    lines = quality.tables(rows).splitlines()
    lever = "| 50%, 160 | hesso (hidden_channel+kv_group+mlp_channel+query_slot) | hesso | yes |"
    pairs = [line for line in lines if line.startswith(lever)]
    assert len(pairs) == 1 and pairs[0].startswith(lever + " 0 |")
    assert f"{math.exp(-0.1):.3f} [{math.exp(-0.1):.3f}-{math.exp(-0.1):.3f}]" in pairs[0]
    assert not any(line.startswith("| 50%, 160 | hesso | hesso |") for line in lines)  # not against itself


def test_rows_with_other_training_settings_are_separate_labelled_rows():
    """A lever run with another learning rate (or T, saliency steps, calibration blocks) is never merged into the
    protocol's row of its method: its label names every setting that differs from the protocol."""
    n = 4
    default = _row("hesso", True, 0, [511 * 3.0] * n, [511 * 4.0] * n)
    faster = _row("hesso", True, 0, [511 * 3.0] * n, [511 * 3.8] * n)
    faster["train"] = {**faster["train"], "lr": 3e-4}
    assert quality.label(default) == "hesso"
    assert quality.label(faster) == "hesso (lr 0.0003)"
    hot = _row("hesso", True, 0, [511 * 3.0] * n, [511 * 4.0] * n, saliency_steps=8)
    hot["distill_settings"] = {**hot["distill_settings"], "temperature": 2.0}
    assert quality.label(hot) == "hesso (8 saliency steps, T 2)"
    taylor = _row("taylor", True, 0, [511 * 3.1] * n, [511 * 4.2] * n)
    taylor["schedule"] = {**taylor["schedule"], "calib_blocks": 32}
    assert quality.label(taylor) == "taylor (32 calibration blocks)"
    lines = quality.tables([default, faster]).splitlines()
    assert any(line.startswith("| hesso | yes | 1 (0) |") for line in lines)
    assert any(line.startswith("| hesso (lr 0.0003) | yes | 1 (0) |") for line in lines)
    pair = next(line for line in lines if line.startswith("| 50%, 160 | hesso (lr 0.0003) | hesso | yes | 0 |"))
    assert f"{math.exp(-0.2):.3f}" in pair


def test_other_kinds_remove_as_many_parameters_as_the_default():
    from hf_hesso import build_groups
    from hf_hesso.optim.selection import ParamCounter

    model = resources.tiny_llama(vocab_size=97)
    assert quality.equal_budget_target(model, 0.5, None) == 0.5
    default = ParamCounter(build_groups(model)).total
    for kinds in (["kv_group", "query_slot", "mlp_channel", "hidden_channel"], ["mlp_channel"]):
        target = quality.equal_budget_target(model, 0.5, kinds)
        assert target * ParamCounter(build_groups(model, kinds=kinds)).total == pytest.approx(0.5 * default)
    with pytest.raises(ValueError, match=r"--sparsity 0.9 .* not a fraction below 1\. Choose a lower --sparsity"):
        quality.equal_budget_target(model, 0.9, ["kv_group"])


@pytest.mark.parametrize("method", ["taylor", "activation"])
def test_one_shot_prunes_after_the_warm_up_and_holds_zeros(method):
    torch.manual_seed(0)
    model = resources.tiny_llama(vocab_size=97).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (4, 16), generator=g)
    batches = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    cb = quality.OneShot(model, method, 0.5, at=2, batches=batches)

    class State:
        global_step = 1

    cb.on_step_end(None, State, None, model=model)
    assert cb.selected is None  # still warming up
    State.global_step = 2
    cb.on_step_end(None, State, None, model=model)
    assert cb.selected is not None and len(cb.selected) > 0
    removed = removed_fraction(cb.groups, model)
    assert 0.45 < removed <= 0.55
    with torch.no_grad():  # an optimizer step revives the zeros; the callback zeroes them again
        for p in model.parameters():
            p.add_(0.01)
    State.global_step = 3
    cb.on_step_end(None, State, None, model=model)
    assert removed_fraction(cb.groups, model) == removed
    # Activation and Taylor rank differently: the scores depend on the criterion, not only on the weights.
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The main job's variants (benchmarks/main_job.py)
# ---------------------------------------------------------------------------------------------------------------


def _main_job():
    spec = importlib.util.spec_from_file_location("main_job_bench", BENCH / "main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_variants_are_distinct_runs_and_state_their_settings():
    main_job = _main_job()
    keys = {main_job.key_of(flags, 0) for flags in main_job.VARIANTS.values()}
    assert len(keys) == len(main_job.VARIANTS)  # no two variants are the same run
    assert main_job.key_of(main_job.VARIANTS["MLP only, lr 3e-4"], 1) not in keys  # the seed is part of a run
    settings = main_job.settings_of(main_job.VARIANTS["MLP only, lr 3e-4"], 0)
    assert settings["prune_kinds"] == ["mlp_channel"] and settings["target_param_sparsity"] == 0.267
    assert settings["learning_rate"] == 3e-4 and settings["distill"] is True and settings["max_steps"] == 40
    # Flags that restate a default give the same run as leaving them out.
    assert main_job.key_of(["--max_steps", "40"], 0) == main_job.key_of([], 0)


def test_main_job_table_states_the_ratio_to_the_unpruned_model(tmp_path):
    main_job = _main_job()
    rows = [
        {"variant": "unpruned", "ppl_bbc": 30.0, "ppl_general": 40.0},
        {"variant": "a", "seed": 0, "ppl_bbc": 45.0, "ppl_general": 60.0, "removed_of_model": 0.158, "wall_s": 60},
        {"variant": "b", "seed": 0, "ppl_bbc": 44.0, "ppl_general": 50.0, "removed_of_model": 0.158, "wall_s": 60},
    ]
    text = main_job.table(rows)
    assert "| a | 0 | 15.8% | 45.00 | 60.00 | 1.50x |" in text and "| b | 0 | 15.8% | 44.00 | 50.00 | 1.25x |" in text
    assert text.index("| a |") < text.index("| b |")  # worst first, the best row last
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{main_job.BEGIN}\nold\n{main_job.END}\noutro\n")
    main_job.write_table(rows, readme)
    written = readme.read_text()
    assert "old" not in written and "| b | 0 |" in written and written.endswith("outro\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="main-job-table"):
        main_job.write_table(rows, readme)

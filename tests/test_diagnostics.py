"""Per-selection diagnostics: every period's selection, its kinds and layers, the loss before and after removal."""

from __future__ import annotations

import logging

from fixtures import hesso_args, lm_dataset, tiny_model

from hf_hesso import HESSOTrainer


def test_every_selection_is_logged_with_the_loss_before_and_after(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_hesso.callbacks")
    # 2 warm-up steps, 2 periods of 4 steps (selections at steps 3 and 7, zero at the ends of steps 6 and 10).
    trainer = HESSOTrainer(model=tiny_model("llama"), args=hesso_args(str(tmp_path)), train_dataset=lm_dataset())
    trainer.train()
    records = trainer.selection_diagnostics.records
    assert [r["step"] for r in records] == [3, 7]
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    hesso = trainer.hesso_optimizer
    kinds = trainer.groups.kinds()
    for record, after_step in zip(records, (7, 11), strict=True):
        # The loss of the selection step, and of the first step with the period's groups exactly zero.
        assert abs(record["loss_before"] - losses[record["step"]]) < 1e-5
        assert abs(record["loss_after"] - losses[after_step]) < 1e-5
        assert sum(record["kinds"].values()) == sum(record["layers"].values()) == len(record["groups"])
        expected = {}
        for i in record["groups"].tolist():
            expected[kinds[i]] = expected.get(kinds[i], 0) + 1
        assert record["kinds"] == dict(sorted(expected.items()))
    assert sum(len(r["groups"]) for r in records) == len(hesso.pruned_groups)
    lines = [r.getMessage() for r in caplog.records if "HESSO selection" in r.getMessage()]
    assert len(lines) == 2 and "HESSO selection 1 (step 3)" in lines[0] and "after removal" in lines[0]
    # The same figures reach the logs as metrics.
    logged = {k: v for e in trainer.state.log_history for k, v in e.items() if k.startswith("hesso/selection/")}
    assert logged["hesso/selection/p1/step"] == 3 and logged["hesso/selection/p2/step"] == 7
    assert abs(logged["hesso/selection/p2/loss_after"] - losses[11]) < 1e-5
    assert any(k.startswith("hesso/selection/p1/groups/layer_") for k in logged)

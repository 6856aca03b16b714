"""Saving writes only the files it owns, atomically file by file, and recovers from a crash at any step.

See docs/saving.md for the contract these tests check.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
import yaml
from fixtures import hesso_args, lm_dataset, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from hf_hesso import save_slim, slim_copy, slim_model
from hf_hesso.export import ConcurrentSaveError
from hf_hesso.export.atomic import atomic_save
from hf_hesso.modeling import journal
from hf_hesso.modeling.journal import MANIFEST_NAME
from hf_hesso.trainer import HESSOTrainer

HERE = Path(__file__).resolve().parent

# What a user keeps in an output directory: none of it may be touched by a save.
USER_FILES = {
    "train.py": b"print('my training script')",
    "baseline_logits.pt": b"\x01" * 128,
    "teacher.safetensors": b"\x02" * 256,
    "notes.txt": b"remember the learning rate",
    "eval/results.bin": b"\x03" * 32,
    "checkpoint-3/model.safetensors": b"a checkpoint of the run",
}


def snapshot(path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` (following a symlinked root)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_user_files(directory: Path) -> dict[str, str]:
    for name, data in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in USER_FILES.items()}


def leftovers(directory) -> list[str]:
    return sorted(e for e in os.listdir(directory) if e.startswith(".hf_hesso-save-") or ".tmp" in e or ".old" in e)


def manifest_files(directory) -> set[str]:
    return set(json.loads((Path(directory) / MANIFEST_NAME).read_text())["files"])


def logits_of(path, batch) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(batch).logits


def live_logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return type(model).forward(model, input_ids=batch).logits


BATCH = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def make_trainer(output_dir: str, **overrides) -> HESSOTrainer:
    return HESSOTrainer(
        model=tiny_model("llama"),
        args=hesso_args(output_dir, **overrides),
        train_dataset=lm_dataset(),
        processing_class=tiny_tokenizer(),
    )


def save_quietly(trainer, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`save_model\(\)` before `train\(\)`")
        trainer.save_model(*args, **kwargs)


# ---- Only our files ----


@pytest.mark.parametrize("where", ["subdir", "cwd"])
def test_user_files_survive_save_model(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    if where == "cwd":
        monkeypatch.chdir(work)
        output_dir = "."
    else:
        output_dir = str(work)
    user = write_user_files(work)
    trainer = make_trainer(output_dir)
    save_quietly(trainer)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.add_(1.0)  # the second save writes other weights
    expected = live_logits(trainer.model, BATCH)
    save_quietly(trainer)

    assert os.getcwd() == str(work) if where == "cwd" else True
    files = snapshot(work)
    assert {n: files.get(n) for n in user} == user  # every user file, byte for byte
    ours = manifest_files(work)
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "training_args.bin"} <= ours
    assert any(n.endswith(".py") for n in ours) and not ours & set(USER_FILES)
    # The directory holds exactly the user's files, the save's files and the manifest.
    assert set(files) == set(user) | ours | {MANIFEST_NAME}
    assert leftovers(work) == [] and leftovers(tmp_path) == []
    torch.testing.assert_close(logits_of(work, BATCH), expected, rtol=0, atol=1e-5)


def test_stale_files_of_our_previous_save_go_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    with atomic_save(out) as staging:
        for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            (Path(staging) / name).write_text(f"v1 {name}")
        (Path(staging) / "model.safetensors.index.json").write_text("{}")
        (Path(staging) / "adapter").mkdir()
        (Path(staging) / "adapter" / "adapter_model.safetensors").write_text("adapter v1")
    (out / "notes.txt").write_text("mine")
    (out / "pytorch_model.bin").write_text("a weight file hf_hesso never wrote")

    with atomic_save(out) as staging:
        (Path(staging) / "config.json").write_text("v2")
        (Path(staging) / "model.safetensors").write_text("v2 single file")
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model.safetensors", "notes.txt", "pytorch_model.bin", MANIFEST_NAME]
    )
    assert (out / "config.json").read_text() == "v2"
    assert manifest_files(out) == {"config.json", "model.safetensors"}

    # A file of ours that was changed since is the user's now: a save that does not write it keeps it.
    (out / "model.safetensors").write_text("edited by hand")
    with atomic_save(out) as staging:
        (Path(staging) / "config.json").write_text("v3")
    assert (out / "model.safetensors").read_text() == "edited by hand"
    assert manifest_files(out) == {"config.json"}


def test_an_update_that_stages_nothing_changes_nothing(tmp_path):
    out = tmp_path / "out"
    with atomic_save(out) as save:
        (Path(save) / "config.json").write_text("v1")
    before = (out / MANIFEST_NAME).stat()
    with atomic_save(out, update=True) as save:
        assert save.owns("config.json") and save.owns("README.md") and save.files == []
    assert save.files == ["config.json"]  # the files of the save, unchanged
    after = (out / MANIFEST_NAME).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns) and leftovers(out) == []


def test_error_while_writing_leaves_everything_as_it_was(tmp_path):
    out = tmp_path / "out"
    with atomic_save(out) as staging:
        (Path(staging) / "a.txt").write_text("v1")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_save(out) as staging:
            (Path(staging) / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert snapshot(out) == before and leftovers(out) == []


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        with atomic_save(tmp_path / "out"):
            pass
    assert (tmp_path / "out").read_text() == "not a directory"


def test_foreign_single_file_weights_that_would_shadow_a_sharded_save_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("someone else's model")
    with pytest.raises(ValueError, match=r"model.safetensors.*would load it instead.*Move or delete"):
        with atomic_save(out) as staging:
            (Path(staging) / "model-00001-of-00001.safetensors").write_text("shard")
            (Path(staging) / "model.safetensors.index.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["model.safetensors"]


def test_failed_save_model_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = make_trainer(str(out))
    save_quietly(trainer)
    good = snapshot(out)
    assert "model.safetensors" in good and "README.md" in good and "tokenizer.json" in good

    real_save_file = transformers.modeling_utils.safe_save_file

    def failing_save_file(tensors, filename, metadata=None):
        # Write a truncated file first, as a crash midway would.
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_save_file)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.add_(1.0)  # the new save would differ from the good one
    with pytest.raises(OSError, match="No space left on device"):
        save_quietly(trainer)
    assert snapshot(out) == good
    assert leftovers(out) == [] and leftovers(tmp_path) == []

    # Once the disk works again, the save goes through.
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save_file)
    save_quietly(trainer)
    assert snapshot(out)["model.safetensors"] != good["model.safetensors"]
    assert leftovers(out) == []


# ---- Kinds of output_dir ----


def other_filesystem_dir(tmp_path):
    """A fresh folder on another filesystem than `tmp_path` (tmpfs `/dev/shm`), or `None` where there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        return None
    return Path(tempfile.mkdtemp(prefix="hf_hesso_test_", dir=shm))


@pytest.mark.parametrize("filesystem", ["same", "other"])
def test_symlinked_output_dir_is_followed(tmp_path, filesystem):
    if filesystem == "same":
        target = tmp_path / "disk2" / "models"
        target.mkdir(parents=True)
    else:
        target = other_filesystem_dir(tmp_path)
        if target is None:
            pytest.skip("no writable /dev/shm on another filesystem")
    try:
        user = write_user_files(target)
        link = tmp_path / "out"
        link.symlink_to(target, target_is_directory=True)
        trainer = make_trainer(str(link))
        save_quietly(trainer)
        with torch.no_grad():
            trainer.model.model.embed_tokens.weight.add_(1.0)
        expected = live_logits(trainer.model, BATCH)
        save_quietly(trainer)  # a second save replaces the first through the link
        assert link.is_symlink() and os.readlink(link) == str(target)
        files = snapshot(target)
        assert {n: files.get(n) for n in user} == user
        assert "model.safetensors" in files and "config.json" in files
        assert set(os.listdir(tmp_path)) <= {"disk2", "out"}  # nothing written beside the link
        assert leftovers(target) == []
        torch.testing.assert_close(logits_of(link, BATCH), expected, rtol=0, atol=1e-5)
    finally:
        if filesystem == "other":
            shutil.rmtree(target, ignore_errors=True)


def test_mount_point_or_other_filesystem(tmp_path, monkeypatch):
    """`output_dir` as a mount point whose parent is another filesystem: every rename must stay inside it, and
    the directory itself must never be renamed or removed (EBUSY on a mount point)."""
    out = (tmp_path / "mnt").resolve()
    out.mkdir()
    user = write_user_files(out)

    def inside(path) -> bool:
        path = Path(os.path.abspath(os.fspath(path)))
        return path == out or out in path.parents

    def guard(real):
        def patched(src, dst, *args, **kwargs):
            for p in (src, dst):
                if Path(os.path.abspath(os.fspath(p))) == out:
                    raise OSError(errno.EBUSY, "Device or resource busy", os.fspath(p))
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", os.fspath(src))
            return real(src, dst, *args, **kwargs)

        return patched

    def guard_remove(real):
        def patched(path, *args, **kwargs):
            if "dir_fd" not in kwargs and Path(os.path.abspath(os.fspath(path))) == out:
                raise OSError(errno.EBUSY, "Device or resource busy", os.fspath(path))
            return real(path, *args, **kwargs)

        return patched

    monkeypatch.setattr(os, "rename", guard(os.rename))
    monkeypatch.setattr(os, "replace", guard(os.replace))
    monkeypatch.setattr(os, "rmdir", guard_remove(os.rmdir))
    trainer = make_trainer(str(out))
    save_quietly(trainer)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.add_(1.0)
    expected = live_logits(trainer.model, BATCH)
    save_quietly(trainer)
    files = snapshot(out)
    assert {n: files.get(n) for n in user} == user
    assert sorted(os.listdir(tmp_path)) == ["mnt"] and leftovers(out) == []
    monkeypatch.undo()
    torch.testing.assert_close(logits_of(out, BATCH), expected, rtol=0, atol=1e-5)


# ---- The model card ----


def test_user_readme_is_kept_and_the_card_skipped_with_a_warning(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# My project\n")
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"README.md' was not written by hf_hesso.*Delete or rename"):
        saved = save_slim(model, out)
    assert not saved.card_written and (out / "README.md").read_text() == "# My project\n"
    assert "README.md" not in manifest_files(out)

    (out / "README.md").unlink()
    saved = save_slim(model, out)
    assert saved.card_written and "Kept structures per layer" in (out / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_slim(model, out)  # our own card is replaced without a word

    # Once the user edits the card, it is theirs.
    (out / "README.md").write_text("# Edited card\n")
    with pytest.warns(UserWarning, match="README.md"):
        saved = save_slim(model, out)
    assert (out / "README.md").read_text() == "# Edited card\n" and not saved.card_written


EVALUATION = [
    {"text": "BBC news test split", "metric": "perplexity", "tokens": 16384, "before": 29.78, "after": 33.5},
    {"text": "Shakespeare", "metric": "perplexity", "tokens": 16384, "before": 34.39, "after": 51.6},
]


def test_card_records_the_evaluation_with_its_ratio(tmp_path):
    import yaml

    saved = save_slim(tiny_model("llama"), tmp_path / "out", evaluation=EVALUATION)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation" in card
    assert "| BBC news test split | perplexity | 16,384 | 29.78 | 33.50 | 1.12x |" in card
    assert "| Shakespeare | perplexity | 16,384 | 34.39 | 51.60 | 1.50x |" in card
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["hesso"]["evaluation"] == EVALUATION and saved.report.evaluation == EVALUATION
    # Without scores there is no Evaluation section.
    save_slim(tiny_model("llama"), tmp_path / "plain")
    assert "## Evaluation" not in (tmp_path / "plain" / "README.md").read_text()


@pytest.mark.parametrize(
    "bad, match",
    [
        ([{"text": "x", "metric": "perplexity", "tokens": 8, "before": 2.0}], r"evaluation\[0\]` must be a dict"),
        ([{**EVALUATION[0], "after": float("nan")}], r"evaluation\[0\]\['after'\]` must be a positive number"),
        ([EVALUATION[0], {**EVALUATION[1], "before": -1}], r"evaluation\[1\]\['before'\]`"),
    ],
)
def test_bad_evaluation_is_refused_before_anything_is_written(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        save_slim(tiny_model("llama"), tmp_path / "out", evaluation=bad)
    assert not (tmp_path / "out").exists()


def test_trainer_keeps_the_evaluation_for_later_saves(tmp_path):
    trainer = make_trainer(str(tmp_path / "out"))
    trainer.train()
    trainer.save_model(evaluation=EVALUATION)
    trainer.save_model(str(tmp_path / "again"))
    for folder in ("out", "again"):
        assert (
            "| Shakespeare | perplexity | 16,384 | 34.39 | 51.60 | 1.50x |"
            in (tmp_path / folder / "README.md").read_text()
        )


# ---- Crash at every step ----

REMOTE_LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    batch = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"logits": model(batch).logits, "hf_hesso": "hf_hesso" in sys.modules}, sys.argv[2])
    """
)


@pytest.mark.slow
def test_crash_at_every_step_leaves_a_loadable_model_and_the_next_save_cleans_up(tmp_path):
    result = subprocess.run(
        [sys.executable, str(HERE / "crash_save_worker.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["exit"] for r in runs[:-1]] == [77] * (len(runs) - 1) and runs[-1]["exit"] == 0
    assert len(runs) >= 10  # journal, every file, stale removal, manifest, journal removal, staging removal
    loaded = [r["loaded"] for r in runs]
    # Before the commit point the previous model A, after it the new model B, never anything else.
    first_b = loaded.index("B")
    assert first_b >= 1 and loaded[:first_b] == ["A"] * first_b and loaded[first_b:] == ["B"] * (len(runs) - first_b)
    for r in runs:
        assert r["leftovers"] == [] and r["exact_files"] and r["user_files_kept"] and r["manifest_is_save"], r
        assert r["reloaded_after_next_save"] == "B", r

    # Without hf_hesso, through the code shipped beside the weights: a crash right after the commit point (nothing
    # moved yet) and one midway (new code and config in place, old weights) both load as B.
    expected = None
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("PYTHONPATH", None)
    for k in (first_b + 1, first_b + 6):
        crashed = tmp_path / f"k{k}-crashed"
        assert any(e.startswith(".hf_hesso-save-") for e in os.listdir(crashed))  # nothing had recovered it
        out_file = tmp_path / f"remote{k}.pt"
        run = subprocess.run(
            [sys.executable, "-c", REMOTE_LOAD, str(crashed), str(out_file)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-4000:]
        got = torch.load(out_file)
        assert not got["hf_hesso"]
        if expected is None:
            expected = got["logits"]
        torch.testing.assert_close(got["logits"], expected, rtol=0, atol=1e-5)
        assert not any(e.startswith(".hf_hesso-save-") for e in os.listdir(crashed))  # the load finished the save
    torch.testing.assert_close(expected, logits_of(tmp_path / f"k{len(runs)}", BATCH), rtol=0, atol=1e-5)


# ---- Smaller items ----


def test_meta_device_model_is_refused_with_the_fix(tmp_path):
    with torch.device("meta"):
        model = tiny_model("llama")
    for call in (lambda: slim_model(model), lambda: slim_copy(model), lambda: save_slim(model, tmp_path / "out")):
        with pytest.raises(ValueError, match=r"meta device.*Load the weights first"):
            call()
    assert not (tmp_path / "out").exists()


def test_save_model_before_train_warns(tmp_path):
    trainer = make_trainer(str(tmp_path / "out"))
    with pytest.warns(UserWarning, match=r"before `train\(\)`: the model has not been pruned.*full-size model"):
        trainer.save_model()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_create_model_card_joins_the_save_and_respects_a_user_readme(tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(str(out))
    save_quietly(trainer)
    trainer.create_model_card(license="apache-2.0")
    assert "license: apache-2.0" in (out / "README.md").read_text()
    assert "README.md" in manifest_files(out) and "model.safetensors" in manifest_files(out)
    (out / "README.md").write_text("# Mine\n")
    manifest = (out / MANIFEST_NAME).stat()
    with pytest.warns(UserWarning, match="README.md"):
        trainer.create_model_card(license="mit")
    assert (out / "README.md").read_text() == "# Mine\n" and leftovers(out) == []
    # With nothing to write, the update commits nothing: the manifest is not rewritten.
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == manifest.st_mtime_ns
    assert (out / MANIFEST_NAME).stat().st_ino == manifest.st_ino


TOKENIZER_LOAD = textwrap.dedent(
    """
    import sys
    from transformers import AutoTokenizer
    if sys.argv[2] == "import":
        import hf_hesso  # registers the slim config classes
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
    else:
        tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    print("IDS", tok("t5 t6")["input_ids"])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["trust_remote_code", "import"])
def test_tokenizer_of_a_slim_dir_loads_silently_the_ways_the_card_shows(tmp_path, how):
    out = tmp_path / "out"
    save_slim(tiny_model("llama"), out, tokenizer=tiny_tokenizer())
    assert 'AutoTokenizer.from_pretrained("<this repo>", trust_remote_code=True)' in (out / "README.md").read_text()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(HERE.parent)}
    run = subprocess.run(
        [sys.executable, "-c", TOKENIZER_LOAD, str(out), "import" if how == "import" else "trust"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "IDS [5, 6]" in run.stdout
    output = run.stdout + run.stderr
    assert "[y/N]" not in output and "custom code" not in output and "model of type" not in output, output


# ---- Probes of a new user (issue 23) ----


def test_save_slim_takes_the_optimizer_a_trainer_user_holds(tmp_path):
    trainer = make_trainer(str(tmp_path / "run"))
    trainer.train()
    # `trainer.optimizer` is accelerate's `AcceleratedOptimizer` around HESSO.
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    saved = save_slim(trainer.model, tmp_path / "slim", optimizer=trainer.optimizer, tokenizer=tiny_tokenizer())
    direct = save_slim(trainer.model, tmp_path / "direct", optimizer=trainer.hesso_optimizer)
    assert saved.report.settings == direct.report.settings
    assert saved.report.settings["target_group_sparsity"] == 0.4
    assert saved.summary.params_after == direct.summary.params_after < saved.summary.params_before
    torch.testing.assert_close(
        logits_of(tmp_path / "slim", BATCH), live_logits(trainer.model, BATCH), rtol=0, atol=1e-5
    )

    plain = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"`optimizer` must be the `HESSO` \(or `CRIC`\).*got SGD.*hesso_optimizer"):
        save_slim(trainer.model, tmp_path / "never", optimizer=plain)
    assert not (tmp_path / "never").exists()

    # One source of the card's settings: the Trainer's card holds the optimizer's `settings()` as `save_slim` does,
    # plus what the optimizer does not know (the group kinds).
    trainer.save_model()
    settings = trainer.hesso_optimizer.settings()
    card = yaml.safe_load((tmp_path / "run" / "README.md").read_text().split("---")[1])["hesso"]["settings"]
    assert {k: card[k] for k in settings if settings[k] is not None} == {
        k: v for k, v in settings.items() if v is not None
    }
    assert {k: direct.report.settings[k] for k in card if k != "prune_kinds"} == {
        k: v for k, v in card.items() if k != "prune_kinds"
    }
    assert card["prune_kinds"] == "all" and "prune_kinds" not in direct.report.settings


def _counting(monkeypatch, name: str) -> list:
    """Replace the function `name` of `hf_hesso.modeling.journal` wherever the package holds it (every module that
    imported it) by a wrapper that records each call; returns the list of calls."""
    real = getattr(journal, name)
    calls: list = []

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    for module in [m for n, m in sys.modules.items() if n == "hf_hesso" or n.startswith("hf_hesso.")]:
        if getattr(module, name, None) is real:
            monkeypatch.setattr(module, name, counting)
    return calls


def test_one_save_recovers_once_and_reads_the_manifest_once(tmp_path, monkeypatch):
    """Following `output_dir` from `save_model()` (or `save_slim()`) to the files on disk: one atomic save, which
    finishes interrupted saves once and reads the previous manifest once (the README check included)."""
    out = tmp_path / "out"
    trainer = make_trainer(str(out))
    save_quietly(trainer)  # a first save: the next ones find a manifest and a card of ours
    recovered = _counting(monkeypatch, "recover")
    manifests = _counting(monkeypatch, "read_manifest")
    for save in (lambda: save_quietly(trainer), lambda: save_slim(trainer.model, out, tokenizer=tiny_tokenizer())):
        recovered.clear()
        manifests.clear()
        save()
        assert len(recovered) == 1 and len(manifests) == 1, (recovered, manifests)
    assert {"README.md", "model.safetensors", "config.json"} <= manifest_files(out)
    recovered.clear()
    manifests.clear()
    trainer.create_model_card(license="mit")
    assert len(recovered) == 1 and len(manifests) == 1, (recovered, manifests)
    assert "license: mit" in (out / "README.md").read_text()


def _tamper_manifest(out: Path, entry: str, size: int) -> None:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"][entry] = {"size": size}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_naming_a_file_outside_the_folder_is_refused_before_anything_moves(tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.bin").write_bytes(b"precious")
    out = tmp_path / "out"
    model = tiny_model("llama")
    save_slim(model, out)
    entry = {"dotdot": "../outside/x.bin", "absolute": str(outside / "x.bin"), "symlink": "link/x.bin"}[how]
    if how == "symlink":
        (out / "link").symlink_to(outside, target_is_directory=True)
    # As if the previous save had written it: same size, so it would be stale and removed.
    _tamper_manifest(out, entry, len(b"precious"))
    before, before_outside = snapshot(out), snapshot(outside)
    for _ in range(2):  # refused, and refused again the same way (no half-done save in between)
        with pytest.raises(
            ValueError, match=rf"names files that are not inside .*{re.escape(repr(entry))}.*Nothing was written"
        ):
            save_slim(model, out)
        assert snapshot(out) == before and snapshot(outside) == before_outside
        assert leftovers(out) == [] and not (out / ".hf_hesso-save.lock").exists()
    # Fixed as the message says: the folder is saveable again, and nothing outside was ever touched.
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["files"][entry]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    save_slim(model, out)
    assert (outside / "x.bin").read_bytes() == b"precious" and leftovers(out) == []
    assert entry not in manifest_files(out)


def test_committed_journal_of_an_older_version_naming_a_file_outside_is_finished_without_touching_it(tmp_path):
    # What an earlier hf_hesso left after such a manifest: a committed journal whose stale list goes out of the folder.
    (tmp_path / "x.bin").write_bytes(b"precious")
    out = tmp_path / "out"
    model = tiny_model("llama")
    save_slim(model, out)
    staging = out / ".hf_hesso-save-old"
    staging.mkdir()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    journal = {"version": 1, "files": [], "stale": ["../x.bin", str(tmp_path / "x.bin")], "manifest": manifest}
    (staging / "journal.json").write_text(json.dumps(journal))
    save_slim(model, out)  # finishes that save first, then saves
    assert (tmp_path / "x.bin").read_bytes() == b"precious"
    assert leftovers(out) == [] and "model.safetensors" in manifest_files(out)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_users_file_of_a_name_the_save_writes_is_never_replaced(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's own file")
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(repr(str(out / name)))} was not written by an earlier hf_hesso save.*never replaces a file "
        r"it did not write\. Nothing was written\. Choose another output_dir, or move or delete",
    ):
        save_slim(tiny_model("llama"), out, tokenizer=tiny_tokenizer())
    assert sorted(os.listdir(out)) == [name] and (out / name).read_bytes() == b"the user's own file"


def test_trainer_save_model_keeps_a_users_model_safetensors_in_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights the user put there")
    trainer = make_trainer(str(out))
    with pytest.raises(ValueError, match=r"model\.safetensors' was not written by an earlier hf_hesso save"):
        save_quietly(trainer)
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"weights the user put there"


def test_only_files_of_our_last_save_or_identical_ones_are_replaced(tmp_path):
    model = tiny_model("llama")
    first = tmp_path / "first"
    save_slim(model, first, tokenizer=tiny_tokenizer())
    # The same bytes as the save writes (a tokenizer saved there beforehand): nothing is lost, the save goes on.
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(first / "tokenizer.json", out / "tokenizer.json")
    save_slim(model, out, tokenizer=tiny_tokenizer())
    assert "tokenizer.json" in manifest_files(out)
    # A file of our last save, edited by hand since, is the user's now.
    (out / "config.json").write_text('{"edited": true}')
    with pytest.raises(
        ValueError, match=r"config\.json' was not written by an earlier hf_hesso save .*or changed since"
    ):
        save_slim(model, out, tokenizer=tiny_tokenizer())
    assert (out / "config.json").read_text() == '{"edited": true}'


CONCURRENT_SAVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from hf_hesso.export.atomic import atomic_save
    out, ready, go = sys.argv[1:4]
    with atomic_save(out) as staging:
        (Path(staging) / "config.json").write_text("from the other process")
        Path(ready).write_text("staged")
        while not os.path.exists(go):
            time.sleep(0.02)
    print("OTHER SAVE DONE")
    """
)


def _start_other_save(tmp_path, out, tag):
    ready, go = tmp_path / f"ready-{tag}", tmp_path / f"go-{tag}"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CONCURRENT_SAVER, str(out), str(ready), str(go)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(3000):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert ready.exists(), proc.communicate()[1][-3000:]
    return proc, go


@pytest.mark.slow
def test_a_second_save_into_a_folder_while_another_process_saves_there_is_refused(tmp_path):
    out = tmp_path / "out"
    model = tiny_model("llama")
    proc, go = _start_other_save(tmp_path, out, "a")
    try:
        staging = [e for e in os.listdir(out) if e.startswith(".hf_hesso-save-")]
        with pytest.raises(
            ConcurrentSaveError,
            match=rf"Another save into .* is running \(process {proc.pid} on .*does not support two saves into one "
            r"folder at the same time.*Wait for the other save to finish, or save to another folder",
        ):
            save_slim(model, out)
        # The other save's staging folder is intact, and it completes.
        assert [e for e in os.listdir(out) if e.startswith(".hf_hesso-save-")] == staging
    finally:
        go.write_text("go")
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "OTHER SAVE DONE" in stdout, stderr[-3000:]
    assert (out / "config.json").read_text() == "from the other process"
    assert not (out / ".hf_hesso-save.lock").exists()
    save_slim(model, out)  # the folder is free again
    assert leftovers(out) == [] and "model.safetensors" in manifest_files(out)

    # A save killed while holding the lock does not block the folder: its process is gone, the lock is taken over.
    proc, _ = _start_other_save(tmp_path, out, "b")
    proc.kill()
    proc.communicate(timeout=60)
    assert (out / ".hf_hesso-save.lock").exists()
    save_slim(model, out)
    assert leftovers(out) == [] and not (out / ".hf_hesso-save.lock").exists()


def test_a_second_save_from_another_thread_is_refused(tmp_path):
    out = tmp_path / "out"
    model = tiny_model("llama")
    staged, go = threading.Event(), threading.Event()
    errors = []

    def wait_inside(directory):
        staged.set()
        go.wait(timeout=300)

    def first_save():
        try:
            save_slim(model, out, write_extra=wait_inside)
        except BaseException as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=first_save)
    thread.start()
    try:
        assert staged.wait(timeout=300)
        with pytest.raises(ConcurrentSaveError, match=rf"Another save into .* is running \(process {os.getpid()} "):
            save_slim(model, out)
    finally:
        go.set()
        thread.join(timeout=300)
    assert errors == []
    torch.testing.assert_close(logits_of(out, BATCH), live_logits(model, BATCH), rtol=0, atol=1e-5)
    assert leftovers(out) == [] and not (out / ".hf_hesso-save.lock").exists()

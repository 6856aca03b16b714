"""`push_to_hub()` uploads the slim model and its card to a Hub (a real HTTP server on 127.0.0.1), and
`from_pretrained(repo_id, trust_remote_code=True)` in a fresh process gets the same logits back through it."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import transformers.utils.hub
from fixtures import hesso_args, lm_dataset, tiny_batch, tiny_model, tiny_tokenizer
from helpers import card_figures, reference_logits, reload_in_fresh_process
from hub_server import HubServer

from hf_hesso.trainer import HESSOTrainer

TOKEN = "hf_fake_test_token"
REPO = "testuser/tiny-hesso-llama"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The local Hub, with this process's huggingface_hub pointed at it (it reads HF_ENDPOINT at import)."""
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        # The server speaks the git-LFS upload protocol, not Xet.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        # transformers keeps one HfApi, bound to the endpoint of its first use.
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        yield server


@pytest.mark.slow
def test_push_to_hub_then_from_pretrained(hub, tmp_path):
    out = tmp_path / "out"
    args = hesso_args(str(out), hub_model_id=REPO, hub_token=TOKEN, save_strategy="steps", save_steps=7)
    trainer = HESSOTrainer(
        model=tiny_model("llama"), args=args, train_dataset=lm_dataset(), processing_class=tiny_tokenizer()
    )
    trainer.train()
    batch = tiny_batch("llama")
    expected = reference_logits(trainer.model, batch)
    (out / "notes.txt").write_text("private notes: stay local")  # not part of the model

    commit = trainer.push_to_hub()
    assert commit.oid == hub.state.repos[REPO].commits[-1]

    repo = hub.state.repos[REPO]
    uploaded = set(repo.files)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= uploaded
    assert any(name.endswith(".py") for name in uploaded)  # the slim model's code travels with it
    assert not any(name.startswith("checkpoint-") for name in uploaded)
    assert "notes.txt" not in uploaded and not any(name.startswith(".hf_hesso") for name in uploaded)
    assert "model.safetensors" in repo.lfs_paths and "config.json" not in repo.lfs_paths
    assert repo.files["README.md"] == (out / "README.md").read_bytes()
    assert b"Kept structures per layer" in repo.files["README.md"]
    assert repo.files["model.safetensors"] == (out / "model.safetensors").read_bytes()

    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home_reader"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
    }
    reloaded = reload_in_fresh_process(REPO, "lm", batch, tmp_path, env=env)
    assert reloaded["params"] == card_figures(out)["params_after"]
    assert ("GET", f"/{REPO}/resolve/{repo.commits[-1]}/model.safetensors") in hub.state.requests
    import torch

    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_save_slim_pushes_from_a_hand_written_loop(hub, tmp_path):
    """`save_slim(push_to_hub=True)` without a Trainer: creates the repo, uploads the slim model and its card."""
    import torch

    from hf_hesso import HESSO, build_groups, save_slim

    model = tiny_model("llama")
    groups = build_groups(model)
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        groups,
        target_group_sparsity=0.3,
        start_pruning_step=1,
        pruning_periods=1,
        pruning_steps=2,
    )
    batch = tiny_batch("llama")
    for _ in range(4):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    saved = save_slim(
        model, tmp_path / "out", optimizer=opt, push_to_hub=True, hub_model_id="testuser/loop", hub_token=TOKEN
    )
    repo = hub.state.repos["testuser/loop"]
    assert saved.url and saved.url.endswith(repo.commits[-1])
    assert repo.files["model.safetensors"] == (tmp_path / "out" / "model.safetensors").read_bytes()
    assert b"target_group_sparsity" in repo.files["README.md"]  # the optimizer's settings reached the card


def test_push_with_a_bad_token_fails_after_the_local_save(hub, tmp_path):
    """A rejected upload raises the Hub's 401 and creates nothing remotely; the local slim model is complete."""
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForCausalLM

    from hf_hesso import save_slim

    with pytest.raises(HfHubHTTPError, match="401"):
        save_slim(
            tiny_model("llama"), tmp_path / "out", push_to_hub=True, hub_model_id="testuser/nope", hub_token="hf_wrong"
        )
    assert "testuser/nope" not in hub.state.repos
    AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)


@pytest.mark.slow
def test_push_during_training_then_the_slim_save_replaces_what_the_trainer_copied(hub, tmp_path):
    """`push_to_hub=True` while training: transformers copies each checkpoint's full-size weights, config and
    tokenizer into `output_dir` and pushes them. hf_hesso records those files as its own, so the slim save at the end
    replaces them (a save never replaces a file it did not write) and the Hub ends with the slim model."""
    import json

    from hf_hesso.modeling.journal import MANIFEST_NAME

    out = tmp_path / "out"
    args = hesso_args(
        str(out),
        push_to_hub=True,
        hub_model_id=REPO,
        hub_token=TOKEN,
        hub_strategy="every_save",
        save_strategy="steps",
        save_steps=7,
    )
    trainer = HESSOTrainer(
        model=tiny_model("llama"), args=args, train_dataset=lm_dataset(), processing_class=tiny_tokenizer()
    )
    (out / "notes.txt").write_text("private notes: stay local")
    trainer.train()
    full = (out / "model.safetensors").read_bytes()  # the Trainer's copy of a checkpoint
    # transformers skips a checkpoint's copy and push while the previous push is still running (it uploads in the
    # background), so the copy is that of step 14 or, on a loaded machine, of step 7.
    copies = [(out / f"checkpoint-{s}" / "model.safetensors").read_bytes() for s in (7, 14)]
    assert full in copies
    assert "model.safetensors" in json.loads((out / MANIFEST_NAME).read_text())["files"]

    trainer.push_to_hub()
    slim = (out / "model.safetensors").read_bytes()
    assert len(slim) < len(full)
    assert hub.state.repos[REPO].files["model.safetensors"] == slim
    assert (out / "notes.txt").read_text() == "private notes: stay local"
    assert "notes.txt" not in json.loads((out / MANIFEST_NAME).read_text())["files"]

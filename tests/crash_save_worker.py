"""Kill a `save_slim` at every step of its sequence and record what a loader then finds (run by test_trainer_save).

`python tests/crash_save_worker.py WORKDIR` writes `WORKDIR/results.json`. One interpreter imports torch and
hf_hesso once; for each k = 1, 2, ... it copies a directory holding model A (a previous save plus user files),
forks, and the child saves model B there with `os.replace`/`os.rename`/`os.unlink`/`os.remove`/`os.rmdir`
patched to end the process with `os._exit` at their k-th call (a hard kill: no `finally`, no `except`). The
parent then records, for that k:

- `loaded`: which model `from_pretrained` of a copy of the directory gives ("A", "B" or an error), comparing logits;
- after a normal save of B into the crashed directory: the leftovers (staging folders, temporary files), whether the
  directory holds exactly the manifest's files plus the user's, and whether it loads as B.

It stops at the first k where the save completed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fixtures import tiny_model, tiny_tokenizer  # noqa: E402

USER_FILES = {"notes.txt": b"my notes", "train.py": b"print('train')", "data/baseline_logits.pt": b"\x00" * 64}
EXIT_CRASH = 77


def tree(path: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def crash_at(k: int) -> None:
    """Patch the namespace-changing os calls so that the k-th one ends the process at once."""
    calls = [0]
    for name in ("replace", "rename", "unlink", "remove", "rmdir"):
        real = getattr(os, name)

        def patched(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os._exit(EXIT_CRASH)
            return _real(*args, **kwargs)

        setattr(os, name, patched)


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from hf_hesso import save_slim

    tok = tiny_tokenizer()
    model_a = tiny_model("llama", seed=0)
    model_b = tiny_model("llama", seed=1)
    with torch.no_grad():  # B loses 8 MLP channels of layer 0: its config and weights differ in shape from A's
        mlp = model_b.model.layers[0].mlp
        mlp.gate_proj.weight[:8] = 0
        mlp.up_proj.weight[:8] = 0
        mlp.down_proj.weight[:, :8] = 0
    batch = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {"A": model_a(batch).logits, "B": model_b(batch).logits}

    pristine = os.path.join(workdir, "pristine")
    # A's save also writes a file that B's does not: B's save must remove it (stale), and nothing else.
    save_slim(
        model_a,
        pristine,
        tokenizer=tok,
        write_extra=lambda d: open(os.path.join(d, "extra_of_a.json"), "w").write("{}"),
    )
    for name, data in USER_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(pristine, name)) or pristine, exist_ok=True)
        with open(os.path.join(pristine, name), "wb") as f:
            f.write(data)
    user_hashes = {n: hashlib.sha256(d).hexdigest() for n, d in USER_FILES.items()}

    def which(path: str) -> str:
        try:
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            with torch.no_grad():
                logits = model(batch).logits
        except Exception as e:  # noqa: BLE001 - recorded for the test's message
            return f"error: {type(e).__name__}: {str(e)[:300]}"
        for name, ref in expected.items():
            if logits.shape == ref.shape and torch.allclose(logits, ref, atol=1e-5, rtol=0):
                return name
        return "wrong logits"

    results = []
    for k in range(1, 200):
        target = os.path.join(workdir, f"k{k}")
        shutil.copytree(pristine, target, symlinks=True)
        pid = os.fork()
        if pid == 0:
            crash_at(k)
            try:
                save_slim(model_b, target, tokenizer=tok)
            except BaseException:  # noqa: BLE001
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        # What a crash leaves, before anything recovers it: kept for the remote-code check of the test.
        shutil.copytree(target, target + "-crashed", symlinks=True)
        probe = target + "-probe"
        shutil.copytree(target, probe, symlinks=True)
        loaded = which(probe)
        shutil.rmtree(probe)
        # The next save finishes or cleans up whatever the crash left.
        saved = save_slim(model_b, target, tokenizer=tok)
        files = tree(target)
        manifest = json.load(open(os.path.join(target, ".hf_hesso_manifest.json")))["files"]
        results.append(
            {
                "k": k,
                "exit": code,
                "loaded": loaded,
                "leftovers": sorted(n for n in os.listdir(target) if n.startswith(".hf_hesso-save-") or ".tmp" in n),
                "exact_files": sorted(files) == sorted([*manifest, *USER_FILES, ".hf_hesso_manifest.json"]),
                "user_files_kept": all(files.get(n) == h for n, h in user_hashes.items()),
                "manifest_is_save": sorted(manifest) == sorted(saved.files),
                "reloaded_after_next_save": which(target),
            }
        )
        if code == 0:
            break
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

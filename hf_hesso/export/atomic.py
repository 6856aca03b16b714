"""Saving into a directory that may hold other files: write only what the save owns, atomically, file by file.

A save never renames, replaces or deletes the output directory itself, and never touches a file it did not write:

1. `recover(output_dir, remove_uncommitted=True)` finishes an earlier save that crashed after its commit point and
   removes the staging folders of saves that crashed before it;
2. the caller writes the new model into a staging folder `output_dir/.hf_hesso-save-<id>/` (inside `output_dir`:
   the same filesystem as the files it replaces, whether `output_dir` is the working directory, a mount point or a
   symlink to another filesystem), and every file is flushed to disk;
3. the journal is written into the staging folder with `os.replace`: the commit point;
4. each staged file replaces its destination with `os.replace` (atomic per file), the files that the previous save
   of ours wrote (its manifest `.hf_hesso_manifest.json`) and this one does not are removed, the new manifest is
   written, then the journal and the staging folder go.

The journal format and the roll-forward live in `hf_hesso.modeling.journal`, which ships beside the weights, so that
`from_pretrained` of a directory whose save was interrupted finishes that save before it reads the files (see
`docs/saving.md`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..modeling.journal import (
    FORMAT_VERSION,
    JOURNAL_NAME,
    MANIFEST_NAME,
    STAGING_PREFIX,
    fsync_path,
    read_manifest,
    recover,
    roll_forward,
    write_json_atomic,
)

# Files up to this size get a content digest in the manifest, so that a file of ours the user has edited since
# (a model card) is recognised as theirs. Weights are only sized: hashing gigabytes at every save is not worth it.
_DIGEST_MAX_BYTES = 1 << 20

# Weight files that transformers loads in preference to another: `model.safetensors` wins over a sharded
# `model.safetensors.index.json`, so a foreign one would shadow a new sharded save.
_SHADOWING = {"model.safetensors.index.json": "model.safetensors"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: Path) -> dict:
    size = path.stat().st_size
    out: dict = {"size": size}
    if size <= _DIGEST_MAX_BYTES:
        out["sha256"] = _sha256(path)
    return out


def _staged_files(staging: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(staging):
        dirs.sort()
        for name in sorted(files):
            out.append(Path(os.path.relpath(os.path.join(root, name), staging)).as_posix())
    return out


def _commit_order(files: list[str]) -> list[str]:
    """The order files replace their destinations in: code, then config.json, then the rest, indexes last.

    Code first: a loader that finds the new config.json also finds the code that finishes an interrupted save.
    Shards before their index: the index never names a shard that is not in place yet.
    """

    def rank(relative: str) -> tuple[int, str]:
        name = Path(relative).name
        if relative.endswith(".py"):
            order = 2 if name.startswith("modeling_") else 1 if name.startswith("configuration_") else 0
        elif relative == "config.json":
            order = 3
        elif name.endswith(".index.json"):
            order = 5
        else:
            order = 4
        return order, relative

    return sorted(files, key=rank)


def _unchanged(path: Path, entry) -> bool:
    """Whether `path` is still the file a save of ours wrote, as its manifest `entry` records it."""
    if not isinstance(entry, dict) or not path.is_file() or path.is_symlink():
        return False
    if path.stat().st_size != entry.get("size"):
        return False
    return "sha256" not in entry or _sha256(path) == entry["sha256"]


def owned_by_last_save(output_dir: str | os.PathLike, relative: str) -> bool:
    """Whether `output_dir/relative` is absent, or is a file the last save of ours wrote and nobody changed since."""
    path = Path(output_dir) / relative
    if not path.exists() and not path.is_symlink():
        return True
    return _unchanged(path, read_manifest(output_dir)["files"].get(relative))


def _check_shadowing(output_dir: Path, written: set[str], previous: dict) -> None:
    for index, single in _SHADOWING.items():
        if index in written and single not in written and (output_dir / single).exists() and single not in previous:
            raise ValueError(
                f"{str(output_dir / single)!r} was not written by an earlier save of hf_hesso, and transformers would "
                f"load it instead of the new sharded weights ({index}). Move or delete {single!r}, or save to another "
                "directory. Nothing was written."
            )


def prepare_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` if needed (following a symlink, as `os.makedirs` does) and finish or clean earlier saves."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"Cannot save a model to {str(output_dir)!r}: it exists and is not a directory.")
    output_dir.mkdir(parents=True, exist_ok=True)
    recover(output_dir, remove_uncommitted=True)
    return output_dir


@contextmanager
def atomic_save(output_dir: str | os.PathLike, *, update: bool = False) -> Iterator[str]:
    """Write files into `output_dir` atomically; yields the staging folder to write them into.

    On a normal exit the staged files replace theirs in `output_dir` (see the module docstring). On an exception
    before that, the staging folder is removed, `output_dir` is left as it was, and the exception propagates.

    Args:
        output_dir (`str` or `os.PathLike`): the directory to save into; created if needed. Other files in it (the
            user's scripts, data, `checkpoint-*` folders) are never touched.
        update (`bool`, *optional*, defaults to `False`): `False`: a new save, whose files replace those of the
            previous save of ours (files of the previous save that this one does not write are removed). `True`:
            add or replace only the staged files and keep the rest of the previous save (e.g. a new model card).

    Yields:
        `str`: the staging folder, inside `output_dir`.
    """
    output_dir = prepare_output_dir(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    try:
        yield str(staging)
        files = _staged_files(staging)
        if JOURNAL_NAME in files or MANIFEST_NAME in files:
            raise ValueError(
                f"A save may not write a file named {JOURNAL_NAME!r} or {MANIFEST_NAME!r} at its top level."
            )
        previous = read_manifest(output_dir)["files"]
        _check_shadowing(output_dir, set(files), previous)
        manifest_files = dict(previous) if update else {}
        for relative in files:
            path = staging / relative
            fsync_path(path)
            manifest_files[relative] = _entry(path)
        for root, _, _ in os.walk(staging):
            fsync_path(root, directory=True)
        # Files of the previous save that this one does not write, unless someone changed them since: then they are
        # theirs and stay.
        stale = (
            [] if update else sorted(r for r in set(previous) - set(files) if _unchanged(output_dir / r, previous[r]))
        )
        journal = {
            "version": FORMAT_VERSION,
            "files": _commit_order(files),
            "stale": stale,
            "manifest": {"version": FORMAT_VERSION, "writer": "hf_hesso", "files": manifest_files},
        }
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The commit point: from here on the new save wins, and a crash is finished by the next save or load.
    write_json_atomic(staging / JOURNAL_NAME, journal)
    roll_forward(output_dir, staging, journal)


def owned_files(output_dir: str | os.PathLike) -> list[str]:
    """The files of the last completed save in `output_dir` (relative paths), from its manifest."""
    return sorted(read_manifest(output_dir)["files"])

# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Crash recovery of a model directory written by hf_hesso (standard library only).

This file travels with every saved slim model (the slim config and model classes import it), so that loading a
directory whose last save was interrupted finishes that save first, even in a Python without `hf_hesso`.

How a save writes (`hf_hesso.export.atomic`):

1. every file of the new model is written into a staging folder `.hf_hesso-save-<id>/` *inside* the output
   directory (same filesystem as the files it will replace) and flushed to disk;
2. the journal `.hf_hesso-save-<id>/journal.json` is written (atomically: temporary name, fsync, `os.replace`).
   This is the commit point: before it, the directory holds the previous model; after it, the new model wins;
3. `roll_forward`: each staged file replaces its destination with `os.replace` (code files first, then
   `config.json`, then the rest), the files of the previous save that the new one does not write (listed in the
   previous manifest) are removed, the new manifest `.hf_hesso_manifest.json` is written, the journal and the
   staging folder are removed.

Every step of `roll_forward` can run again after a crash: a staged file that is gone was already moved, a stale
file that is gone was already removed. `recover(dir)` rolls forward every committed save it finds; a save
interrupted before its commit point leaves only a staging folder without journal, which the next save removes
(`recover(dir, remove_uncommitted=True)`; loading never removes it, since a save may be running right now).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

# The record of the files a save owns, in the output directory.
MANIFEST_NAME = ".hf_hesso_manifest.json"
# Staging folders of saves: `<output_dir>/.hf_hesso-save-<id>/`.
STAGING_PREFIX = ".hf_hesso-save-"
# The commit record inside a staging folder.
JOURNAL_NAME = "journal.json"
FORMAT_VERSION = 1


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file (or a directory entry list) to disk; silently skipped where the OS cannot (e.g. Windows dirs)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: dict, tmp_dir: str | os.PathLike | None = None) -> None:
    """Write `data` as JSON to `path` atomically: a temporary file (in `tmp_dir`, default beside it), fsync, replace."""
    path = Path(path)
    tmp = Path(tmp_dir or path.parent) / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent, directory=True)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of the last completed save in `directory`: `{"files": {relative path: {"size", "sha256"?}}}`.

    An absent or unreadable manifest reads as no files (nothing in the directory is then known to be ours).
    """
    try:
        with open(Path(directory) / MANIFEST_NAME, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {"files": {}}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {"files": {}}
    return data


def staging_folders(directory: str | os.PathLike) -> list[Path]:
    """The staging folders of saves in `directory` (complete, interrupted or in progress)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        Path(directory) / n for n in names if n.startswith(STAGING_PREFIX) and (Path(directory) / n).is_dir()
    )


def read_journal(staging: str | os.PathLike) -> dict | None:
    """The journal of a staging folder, or `None` when the save did not reach its commit point."""
    try:
        with open(Path(staging) / JOURNAL_NAME, encoding="utf-8") as f:
            journal = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or journal.get("version") != FORMAT_VERSION:
        return None
    return journal


def _inside(directory: Path, relative: str) -> Path:
    # A journal only ever names files below its directory; refuse anything else (an edited or foreign journal).
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        raise ValueError(f"hf_hesso journal names {relative!r}, which is not a path inside {str(directory)!r}.")
    return directory / relative


def _outside(directory: Path, relative: str) -> bool:
    """Whether `relative` leaves `directory`: absolute, `..`, or through a symlink that leads out."""
    if not isinstance(relative, str) or os.path.isabs(relative) or ".." in Path(relative).parts:
        return True
    root = os.path.realpath(directory)
    try:
        return os.path.commonpath([root, os.path.realpath(directory / relative)]) != root
    except ValueError:  # another drive (Windows)
        return True


def _remove_empty_parents(directory: Path, path: Path) -> None:
    parent = path.parent
    while parent != directory and directory in parent.parents:
        try:
            os.rmdir(parent)
        except OSError:
            return
        parent = parent.parent


def roll_forward(directory: str | os.PathLike, staging: str | os.PathLike, journal: dict) -> None:
    """Complete a committed save: move its staged files into place, remove stale files, write the manifest.

    Safe to run again after a crash at any point, and by a loader while the save itself runs.
    """
    directory, staging = Path(directory), Path(staging)
    for relative in journal["files"]:
        source, target = _inside(staging, relative), _inside(directory, relative)
        if not source.exists():
            continue  # moved already
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            if source.exists():
                raise
            # another process completing the same save moved it first
    fsync_path(directory, directory=True)
    if not (staging / JOURNAL_NAME).exists():
        return  # another process (the save itself, or a loader) completed this save meanwhile
    for relative in journal.get("stale", []):
        if _outside(directory, relative):
            # Only a journal of an older hf_hesso, from an edited manifest, can name one: never remove it.
            continue
        target = directory / relative
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        _remove_empty_parents(directory, target)
    if not (staging / JOURNAL_NAME).exists():
        return
    write_json_atomic(directory / MANIFEST_NAME, journal["manifest"], tmp_dir=staging)
    try:
        os.unlink(staging / JOURNAL_NAME)
    except FileNotFoundError:
        pass
    shutil.rmtree(staging, ignore_errors=True)


def recover(directory: str | os.PathLike, remove_uncommitted: bool = False) -> bool:
    """Finish every committed save found in `directory`; returns whether one was finished.

    Args:
        directory: a model directory written by hf_hesso (anything else is left alone: no staging folder there).
        remove_uncommitted: also delete staging folders of saves that crashed before their commit point. Only a
            new save does this (a loader must not: the save may still be running).
    """
    finished = False
    for staging in staging_folders(directory):
        journal = read_journal(staging)
        if journal is not None:
            roll_forward(directory, staging, journal)
            finished = True
        elif remove_uncommitted:
            shutil.rmtree(staging, ignore_errors=True)
    return finished


def recover_for_loading(path: str | os.PathLike) -> bool:
    """`recover(path)` for a loader: only for a local directory, and a failure (read-only copy) never stops loading."""
    try:
        if not os.path.isdir(path) or not staging_folders(path):
            return False
        return recover(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(
            f"{os.fspath(path)!r} holds an interrupted hf_hesso save that could not be completed ({e}); loading the "
            "files as they are. Save the model again, or run `hf_hesso.modeling.journal.recover(path)` with write "
            "access.",
            stacklevel=3,
        )
        return False

"""Saving into a directory that may hold other files: write only what the save owns, atomically, file by file.

A save never renames, replaces or deletes the output directory itself, and never touches a file it did not write:

0. the save takes the folder's lock `output_dir/.hf_hesso-save.lock` (created with `O_EXCL`; a second save into the
   same folder at the same time is refused with `ConcurrentSaveError`);
1. `recover(output_dir, remove_uncommitted=True)` finishes an earlier save that crashed after its commit point and
   removes the staging folders of saves that crashed before it; then the manifest of the previous save is read,
   once, and checked (every entry a path inside `output_dir`): the save decides what it owns from that reading;
2. the caller writes the new model into a staging folder `output_dir/.hf_hesso-save-<id>/` (inside `output_dir`:
   the same filesystem as the files it replaces, whether `output_dir` is the working directory, a mount point or a
   symlink to another filesystem), and every file is flushed to disk;
3. a staged file whose destination exists and was not written by the previous save of ours (or was changed since)
   stops the save, unless the two are identical: nothing of the user's is ever replaced. Then the journal is
   written into the staging folder with `os.replace`: the commit point;
4. each staged file replaces its destination with `os.replace` (atomic per file), the files that the previous save
   of ours wrote (its manifest `.hf_hesso_manifest.json`) and this one does not are removed, the new manifest is
   written, then the journal and the staging folder go; the lock is removed last.

The journal format and the roll-forward live in `hf_hesso.modeling.journal`, which ships beside the weights, so that
`from_pretrained` of a directory whose save was interrupted finishes that save before it reads the files (see
`docs/saving.md`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
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

# The lock file of a save in progress, in the output directory (not a staging folder: no `STAGING_PREFIX`).
LOCK_NAME = ".hf_hesso-save.lock"
# A lock file left empty (its writer died between creating and filling it) is stale after this many seconds.
_EMPTY_LOCK_STALE_S = 60.0

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


def _check_shadowing(output_dir: Path, written: set[str], previous: dict) -> None:
    for index, single in _SHADOWING.items():
        if index in written and single not in written and (output_dir / single).exists() and single not in previous:
            raise ValueError(
                f"{str(output_dir / single)!r} was not written by an earlier save of hf_hesso, and transformers would "
                f"load it instead of the new sharded weights ({index}). Move or delete {single!r}, or save to another "
                "directory. Nothing was written."
            )


class ConcurrentSaveError(RuntimeError):
    """Another save into the same output directory is running (two saves into one folder at once are unsupported)."""


# The output directories (real paths) whose lock this process holds, and the thread holding each.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def _make_output_dir(output_dir: str | os.PathLike) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"Cannot save a model to {str(output_dir)!r}: it exists and is not a directory.")
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _read_lock(lock: Path) -> dict | None:
    try:
        with open(lock, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # `os.kill(pid, 0)` would terminate the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by another user
        return True
    return True


def _lock_is_stale(lock: Path, holder: dict | None) -> bool:
    """Whether the lock was left by a save that no longer runs (killed): its process is gone from this machine."""
    if holder is None:
        # Empty or unreadable: being written right now, or its writer died in between; only an old one is stale.
        try:
            return time.time() - lock.stat().st_mtime > _EMPTY_LOCK_STALE_S
        except OSError:
            return False
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False  # another machine's process: cannot tell
    # Our own pid: no thread of this process holds it (checked before), so an earlier save of ours left it.
    return pid == os.getpid() or not _process_alive(pid)


def _concurrent_error(output_dir: Path, lock: Path, holder: dict | None) -> ConcurrentSaveError:
    if holder is None:
        who = "a save that is just starting"
    else:
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
        who = f"process {holder.get('pid')} on {holder.get('host')!r}, since {when}"
    return ConcurrentSaveError(
        f"Another save into {str(output_dir)!r} is running ({who}): hf_hesso does not support two saves into one "
        "folder at the same time, and this one was stopped before writing anything. Wait for the other save to "
        f"finish, or save to another folder. If no save is running (one was killed on another machine), delete "
        f"{str(lock)!r}."
    )


def _take_lock(output_dir: Path, lock: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for attempt in (0, 1):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if attempt == 0 and _lock_is_stale(lock, holder):
                try:
                    os.unlink(lock)
                except FileNotFoundError:
                    pass
                continue
            raise _concurrent_error(output_dir, lock, holder) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
        return


@contextmanager
def save_lock(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the save lock of `output_dir` (created if needed): `output_dir/.hf_hesso-save.lock`.

    The lock file is created with `O_EXCL` (atomically: of two saves, one creates it), holds the process id and
    host, and is removed when the block ends. A lock whose process is gone from this machine (a killed save) is
    taken over. Re-entrant within one thread.

    Raises:
        `ConcurrentSaveError`: another thread or process is saving into `output_dir`.
        `ValueError`: `output_dir` exists and is not a directory.
    """
    output_dir = _make_output_dir(output_dir)
    key = os.path.realpath(output_dir)
    lock = output_dir / LOCK_NAME
    me = threading.get_ident()
    with _held_guard:
        holder = _held.get(key)
        if holder is None:
            _held[key] = me
    if holder == me:
        yield output_dir
        return
    if holder is not None:
        raise _concurrent_error(output_dir, lock, {"pid": os.getpid(), "host": socket.gethostname()})
    try:
        _take_lock(output_dir, lock)
    except BaseException:
        with _held_guard:
            _held.pop(key, None)
        raise
    try:
        yield output_dir
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        with _held_guard:
            _held.pop(key, None)


def _escapes(output_dir: Path, relative: str) -> str | None:
    """Why `relative` is not a path inside `output_dir` (absolute, `..`, through a symlink leading out), or None."""
    if not isinstance(relative, str) or not relative:
        return "not a relative file path"
    posix = relative.replace("\\", "/")
    if os.path.isabs(relative) or posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return "an absolute path"
    if ".." in posix.split("/"):
        return "it goes up with '..'"
    root = os.path.realpath(output_dir)
    real = os.path.realpath(output_dir / relative)
    try:
        inside = os.path.commonpath([root, real]) == root
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        return f"a symlink leads it out of the folder, to {real!r}"
    return None


def check_manifest(output_dir: Path, files: dict) -> None:
    """Refuse a manifest that names a file outside `output_dir`, before a save moves or removes anything.

    `files` are the manifest's entries (`read_manifest(output_dir)["files"]`). The manifest lists the files a save
    may replace or remove; an entry outside the folder (an absolute path, `..`, a path through a symlink that leads
    out) could only come from an edit or another program.
    """
    bad = [(r, why) for r in files if (why := _escapes(output_dir, r)) is not None]
    if bad:
        listed = "; ".join(f"{r!r}: {why}" for r, why in bad)
        raise ValueError(
            f"The manifest {str(output_dir / MANIFEST_NAME)!r} of the previous hf_hesso save names files that are not "
            f"inside {str(output_dir)!r} ({listed}): it was edited, or not written by hf_hesso, and a save could "
            f"remove or replace a file outside the folder. Nothing was written. Remove those entries from the "
            f"manifest (or delete the manifest: hf_hesso then owns nothing there and refuses to replace the previous "
            "save's files, so delete them too), or save to another output_dir."
        )


def _check_destinations(output_dir: Path, staging: Path, files: list[str], previous: dict) -> None:
    """Refuse to replace a file that the previous save of ours did not write (or that changed since)."""
    foreign = []
    for relative in files:
        why = _escapes(output_dir, relative)
        if why is not None:
            raise ValueError(
                f"The save would write {relative!r}, which is not inside {str(output_dir)!r} ({why}). Nothing was "
                "written. Remove that symlink from the folder, or save to another output_dir."
            )
        target = output_dir / relative
        if not target.exists() and not target.is_symlink():
            continue
        if relative in previous and _unchanged(target, previous[relative]):
            continue
        if _identical(target, staging / relative):
            continue  # replacing it with the same bytes loses nothing
        foreign.append(relative)
    if foreign:
        listed = ", ".join(repr(str(output_dir / r)) for r in foreign)
        raise ValueError(
            f"{listed} {'was' if len(foreign) == 1 else 'were'} not written by an earlier hf_hesso save into this "
            "folder (or changed since), and this save would replace "
            f"{'it' if len(foreign) == 1 else 'them'}: hf_hesso never replaces a file it did not write. Nothing was "
            "written. Choose another output_dir, or move or delete those files yourself and save again."
        )


def _identical(target: Path, staged: Path) -> bool:
    if not target.is_file() or target.is_symlink():
        return False
    if target.stat().st_size != staged.stat().st_size:
        return False
    return _sha256(target) == _sha256(staged)


class AtomicSave:
    """One save into `output_dir`, as `atomic_save` opened it: the staging folder to write into, and what the
    previous save there owns (its manifest, read once when the save opened, after recovery).

    It is `os.PathLike` (the staging folder), so `Path(save)` and `os.path.join(save, name)` work.

    Attributes:
        directory (`Path`): the output directory.
        staging (`str`): the staging folder inside it, where the caller writes the files of the save.
        previous (`dict`): the manifest entries of the previous save (`{relative path: {"size", "sha256"?}}`).
        files (`list[str]`): after the save committed, the files its manifest lists (relative paths, sorted).
    """

    def __init__(self, directory: Path, staging: Path, previous: dict):
        self.directory = directory
        self.staging = str(staging)
        self.previous = previous
        self.files: list[str] = []

    def __fspath__(self) -> str:
        return self.staging

    def owns(self, relative: str) -> bool:
        """Whether the save may write `relative`: it is absent from `output_dir`, or it is a file the previous save
        wrote and nobody changed since."""
        path = self.directory / relative
        if not path.exists() and not path.is_symlink():
            return True
        return _unchanged(path, self.previous.get(relative))


@contextmanager
def atomic_save(output_dir: str | os.PathLike, *, update: bool = False) -> Iterator[AtomicSave]:
    """Write files into `output_dir` atomically; yields the `AtomicSave` whose staging folder they go into.

    Opening the save takes the folder's lock, creates `output_dir` if needed (following a symlink, as `os.makedirs`
    does), finishes or cleans earlier saves (`recover`, once) and reads and checks the manifest (once). On a normal
    exit the staged files replace theirs in `output_dir` (see the module docstring). On an exception before that,
    the staging folder is removed, `output_dir` is left as it was, and the exception propagates.

    Args:
        output_dir (`str` or `os.PathLike`): the directory to save into; created if needed. Other files in it (the
            user's scripts, data, `checkpoint-*` folders) are never touched.
        update (`bool`, *optional*, defaults to `False`): `False`: a new save, whose files replace those of the
            previous save of ours (files of the previous save that this one does not write are removed). `True`:
            add or replace only the staged files and keep the rest of the previous save (e.g. a new model card); an
            update that stages nothing changes nothing.

    Yields:
        `AtomicSave`: the save; write its files into `save.staging` (inside `output_dir`).
    """
    with save_lock(output_dir) as output_dir:
        recover(output_dir, remove_uncommitted=True)
        previous = read_manifest(output_dir)["files"]
        check_manifest(output_dir, previous)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
        save = AtomicSave(output_dir, staging, previous)
        try:
            yield save
            files = _staged_files(staging)
            if JOURNAL_NAME in files or MANIFEST_NAME in files or LOCK_NAME in files:
                raise ValueError(
                    f"A save may not write a file named {JOURNAL_NAME!r}, {MANIFEST_NAME!r} or {LOCK_NAME!r} at its "
                    "top level."
                )
            _check_shadowing(output_dir, set(files), previous)
            _check_destinations(output_dir, staging, files, previous)
            manifest_files = dict(previous) if update else {}
            for relative in files:
                path = staging / relative
                fsync_path(path)
                manifest_files[relative] = _entry(path)
            for root, _, _ in os.walk(staging):
                fsync_path(root, directory=True)
            # Files of the previous save that this one does not write, unless someone changed them since: then they
            # are theirs and stay.
            stale = (
                []
                if update
                else sorted(r for r in set(previous) - set(files) if _unchanged(output_dir / r, previous[r]))
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
        save.files = sorted(manifest_files)
        if update and not files:
            shutil.rmtree(staging, ignore_errors=True)
            return
        # The commit point: from here on the new save wins, and a crash is finished by the next save or load.
        write_json_atomic(staging / JOURNAL_NAME, journal)
        roll_forward(output_dir, staging, journal)


def adopt_files(output_dir: str | os.PathLike, relatives: list[str]) -> None:
    """Record files that another part of the program wrote into `output_dir` as owned by the last save.

    For files written beside an hf_hesso save by the code that drives it (e.g. the files transformers' Trainer
    copies from a checkpoint into `output_dir` when it pushes during training): the next save may replace them
    and removes those it does not write again. Only regular files inside `output_dir` are recorded.
    """
    with save_lock(output_dir) as output_dir:
        files = dict(read_manifest(output_dir)["files"])
        check_manifest(output_dir, files)
        for relative in relatives:
            path = output_dir / relative
            if _escapes(output_dir, relative) is None and path.is_file() and not path.is_symlink():
                files[relative] = _entry(path)
        write_json_atomic(
            output_dir / MANIFEST_NAME, {"version": FORMAT_VERSION, "writer": "hf_hesso", "files": files}
        )


def _top_level_files(directory: str | os.PathLike) -> dict[str, tuple[int, int, int]]:
    """Name -> (size, mtime in ns, inode) of the regular files directly in `directory`."""
    out = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return out
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            out[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


@contextmanager
def adopting_new_files(output_dir: str | os.PathLike) -> Iterator[None]:
    """Record the top-level files that the block writes into `output_dir` (new or changed) as owned by the last save
    (`adopt_files`), e.g. what transformers' Trainer copies from a checkpoint when it pushes during training. Nothing
    is recorded when the block raises."""
    before = _top_level_files(output_dir)
    yield
    if not os.path.isdir(output_dir):
        return
    after = _top_level_files(output_dir)
    written = sorted(name for name, stat in after.items() if before.get(name) != stat)
    if written:
        adopt_files(output_dir, written)


def owned_files(output_dir: str | os.PathLike) -> list[str]:
    """The files of the last completed save in `output_dir` (relative paths), from its manifest (for a folder saved
    earlier; a save in progress knows them as `AtomicSave.files`)."""
    return sorted(read_manifest(output_dir)["files"])

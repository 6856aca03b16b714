"""Atomic replacement of a saved model directory.

A model is written into a temporary sibling directory, and only once every file is complete does it take the
place of the previous output, by renames. A crash or an error while writing leaves the previous model untouched
and removes the temporary directory.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Files of a previous model that must not survive next to a new one: weights, their index and the remote code.
# Everything else the new save does not write (checkpoint-* folders, TensorBoard runs, metrics json files the
# user saved in the output directory) is carried over into the new directory.
STALE_MODEL_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.py", "*.pt")


def _fsync_tree(path: Path) -> None:
    # Flush the file contents before the rename makes them visible, so a power loss cannot expose empty files.
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Write a directory atomically: yields a temporary sibling path to write into, then swaps it in.

    On a normal exit, the temporary directory replaces `target` (entries of the old `target` that the new save did
    not write and that are not model weights or code, such as `checkpoint-*` folders, are moved over). On an
    exception, the temporary directory is deleted, `target` is left as it was, and the exception propagates.

    Args:
        target (`str` or `os.PathLike`): the directory to (re)write.

    Yields:
        `str`: the temporary directory to write the new content into.
    """
    target = Path(target).absolute()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield str(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old = None
    if target.exists():
        if not target.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"Cannot save a model to {str(target)!r}: it exists and is not a directory.")
        old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is None:
        return
    # The new model is in place. Carry over what is not part of a model; should this be interrupted, the
    # remaining entries are still in the `.old-*` sibling, never lost.
    for entry in os.listdir(old):
        if (target / entry).exists() or any(fnmatch.fnmatch(entry, p) for p in STALE_MODEL_PATTERNS):
            continue
        os.rename(old / entry, target / entry)
    shutil.rmtree(old, ignore_errors=True)

"""Crash-safe files for the lab: every cache and report file is written whole or not at all.

A file is first written under a unique temporary name beside its destination, flushed to disk,
then renamed over the destination (``os.replace``, atomic on one file system). A reader, a
crash, Ctrl-C or a second ``fdiv lab`` writing into the same folder therefore sees either the
old file or a complete new one. A set of files (the report) is staged whole first and renamed
in one short step during which Ctrl-C is held back (and then delivered), under a lock shared
by every process writing into the folder, so the set is never a mix of two runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the last chunk of every complete PNG (type + CRC)


def _temporary_beside(path: Path, data: bytes) -> str:
    """A flushed temporary file holding ``data`` in ``path``'s folder; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        _unlink_quietly(temporary)
        raise
    return temporary


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A reader (or a crash, or Ctrl-C) sees either the old file or the complete new one, never a
    truncated one; concurrent writers each rename a complete file (the last one wins)."""
    path = Path(path)
    temporary = _temporary_beside(path, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        _unlink_quietly(temporary)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


class _Deferred:
    received = False


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) back for the duration of the block and raise ``KeyboardInterrupt`` after it.

    Keep the block short (a few renames). Outside the main thread signals cannot be handled
    and the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = _Deferred()

    def hold(signum, frame):
        state.received = True

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if state.received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on ``folder`` shared by every process that writes a report into it
    (``fcntl.flock`` on the folder itself, so no lock file is left; no lock where ``fcntl`` is
    missing, as on Windows, where each file is still atomic)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def atomic_write_many(files: dict, *, lock: Path | None = None) -> None:
    """Write several files so that they change together: each is staged under a temporary name
    first (so nothing is touched if staging fails or is interrupted), then all are renamed into
    place in the given order, with Ctrl-C held back and, when ``lock`` names a folder, under
    :func:`folder_lock`. ``files`` maps a path to ``bytes`` or ``str``.

    A ``KeyboardInterrupt`` raised *after* every file was renamed has ``committed = True``."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            staged.append((_temporary_beside(path, data.encode("utf-8") if isinstance(data, str) else data), path))
        with folder_lock(lock) if lock is not None else contextlib.nullcontext():
            try:
                with deferred_interrupt():
                    while staged:
                        temporary, path = staged[0]
                        os.replace(temporary, path)
                        staged.pop(0)
            except KeyboardInterrupt as interrupt:
                interrupt.committed = True
                raise
    finally:
        for temporary, _ in staged:
            _unlink_quietly(temporary)


def move_tree(source: Path, destination: Path) -> list[Path]:
    """Move every file under ``source`` to the same relative place under ``destination``, each
    with one atomic rename (so a reader of a destination file sees the old or the new one);
    returns the destination paths."""
    moved = []
    for file in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        target = Path(destination) / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
        moved.append(target)
    return moved


def writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and prove it writable with a uniquely named probe file
    (so that concurrent runs never remove each other's probe); raise ``OSError`` if not."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle, probe = tempfile.mkstemp(dir=folder, prefix=".fdiv-write-test-", suffix=".tmp")
    os.close(handle)
    os.unlink(probe)


def png_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete PNG ("missing", "empty", "not a PNG", "truncated"), or None."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            if not head:
                return "empty"
            if head != PNG_SIGNATURE:
                return "not a PNG"
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(size - len(_PNG_END), 0))
            tail = file.read()
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "a folder, not a PNG"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    return None if tail == _PNG_END else "truncated"


__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_many",
    "atomic_write_text",
    "deferred_interrupt",
    "folder_lock",
    "move_tree",
    "png_problem",
    "writable_folder",
]

"""Files written whole: the one writer the trainer, the examples and the benchmarks use.

A reader sees the old file or the new one, never a part of one, and a process killed at any instant leaves the file
as it was (plus, at worst, a hidden ``.<name>.*.tmp`` file next to it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Opens a temporary file next to ``path`` for writing; on a clean exit, moves it onto ``path``.

    The temporary file is in ``path``'s folder (so that `os.replace` is a rename on one file system), flushed and
    `os.fsync`-ed before the rename (the data is on disk before the name points at it), and given the permissions of
    the file it replaces, or those `open` would give a new file (``0o666`` less the umask) rather than
    `tempfile.mkstemp`'s ``0o600``. An exception inside the block removes the temporary file and leaves ``path``
    untouched.

    Args:
        path (`str` or `os.PathLike`): the file to write; its folder must exist.
        mode (`str`, *optional*, defaults to `"w"`): ``"w"`` (text) or ``"wb"`` (bytes).
        **open_kwargs: passed to `open` (``newline=""`` for `csv`, ``encoding=...``).

    Yields:
        The open file object.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(descriptor, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _permissions_for(path))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomic(path: str | os.PathLike, content: str | bytes, encoding: str = "utf-8") -> Path:
    """Writes ``content`` (text in ``encoding``, or bytes) to ``path`` by `atomic_open`; returns ``Path(path)``."""
    if isinstance(content, bytes):
        with atomic_open(path, "wb") as file:
            file.write(content)
    else:
        with atomic_open(path, "w", encoding=encoding) as file:
            file.write(content)
    return Path(path)


def _permissions_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        # os.umask is the portable way to read the umask, and it also sets it: set it back at once.
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask

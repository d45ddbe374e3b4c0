"""File helpers shared by every writer: atomic writes, hashing, input protection.

Outputs are written to a temporary file in the destination folder and renamed into
place, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserError


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_not_input(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse to write ``out`` when it is one of the input files."""
    out_path = Path(out).resolve()
    for item in inputs:
        if item is not None and Path(item).resolve() == out_path:
            raise UserError(f"refusing to overwrite the input file {item}; choose another output path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(folder: str | os.PathLike[str]) -> None:
    """Fail early, in one line, when ``folder`` cannot be created or written into.

    Checked before any work starts, so a long run never ends in a traceback at write time.
    """
    folder = Path(folder)
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise UserError(f"cannot write into {folder}: {existing} is a file, not a folder")
            if not os.access(existing, os.W_OK):
                raise UserError(f"cannot write into {folder}: {existing} is not writable")
            return


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success."""
    dest = Path(dest)
    ensure_writable_dir(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder {dest.parent}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and a writer may recreate the file): give outputs the usual mode.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``dest`` atomically (UTF-8)."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_texts(outputs: dict[Path, str]) -> None:
    """Write several text files; every destination is checked first, so a bad one writes none."""
    for dest in outputs:
        ensure_writable_dir(Path(dest).parent)
    for dest, text in outputs.items():
        atomic_write_text(dest, text)

"""Files the user names: output paths checked before any work, checksums for provenance."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from clbench.core.errors import ClbenchError


def check_output_file(path: str | os.PathLike, option: str = "--output") -> Path:
    """Refuse, before any work starts, an output file that could not be written at the end.

    The folder must exist and take a new file (checked by creating and deleting a
    probe file, which also catches read-only mounts and, for root, nothing that
    the later write would not hit); the path must not be a folder or a special file.
    """
    p = Path(path)
    if p.is_dir():
        raise ClbenchError(f"{option} {path} is a folder; give a file path inside it, e.g. {p / 'out.json'}")
    if p.exists() and not p.is_file():
        raise ClbenchError(f"{option} {path} exists and is not a regular file; give a file path")
    parent = p.parent
    if not parent.exists():
        raise ClbenchError(f"{option} {path}: the folder {parent} does not exist; create it first "
                           f"(mkdir -p {parent}) or pick another path")
    if not parent.is_dir():
        raise ClbenchError(f"{option} {path}: {parent} is not a folder")
    problem = unwritable(parent)
    if problem:
        raise ClbenchError(f"{option} {path}: cannot write in {parent} ({problem}); pick a writable folder")
    return p


def unwritable(folder: Path) -> str | None:
    """Why no new file can be made in ``folder`` (tried for real: a probe file made and deleted), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".clbench-", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Make ``folder`` if needed and check that files can be written in it; else a ClbenchError about ``what``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ClbenchError(f"{what} {folder} is a file, not a folder; point it at a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClbenchError(f"cannot create {what} {folder} ({e.strerror or e}); point it at a writable "
                           "folder") from None
    problem = unwritable(folder)
    if problem:
        raise ClbenchError(f"cannot write in {what} {folder} ({problem}); point it at a writable folder")
    return folder


def partial_path(path: str | os.PathLike) -> Path:
    """Where an incomplete result goes instead of ``path``: ``r.json`` -> ``r.partial.json`` (beside it)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.partial{p.suffix or '.json'}")


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""Files the user names: output paths checked before any work, atomic writes, checksums for provenance.

Every file clbench writes goes through :func:`atomic_write`: the bytes go to a temporary file beside the
target, named ``<name>.tmp-<pid>@<host>`` (so it belongs to one process), and are renamed into place, so a
reader sees the old file or the new one, never half of one. :func:`remove_stale_temporaries` deletes only
the temporary files of processes of this host that are gone, never another live writer's.
"""
from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

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


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root/parts...``, refused with a ClbenchError unless it resolves to a path inside ``root`` (a part
    holding '/' or '..', or a link that leads elsewhere, would make a file outside the folder)."""
    root = Path(root)
    path = root.joinpath(*parts)
    base = root.resolve()
    target = path.resolve()
    if target == base or base not in target.parents:
        raise ClbenchError(f"refusing to write {path}: it resolves to {target}, outside {base}; names used in "
                           "file names may hold letters, digits, '-', '_' and '.' only")
    return path


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


Content = Union[str, bytes, Callable[[BinaryIO], None]]
TMP_MARK = ".tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary file this process writes ``path`` through: ``<name>.tmp-<pid>@<host>`` beside it."""
    p = Path(path)
    return p.with_name(f"{p.name}{TMP_MARK}{os.getpid()}@{socket.gethostname()}")


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` (text, bytes, or a function that writes into a binary file) to ``path`` atomically.

    The data goes to :func:`temporary_path`, is flushed to disk, and is renamed over ``path``; on any
    failure (a full disk, an exception in the writer, Ctrl-C) the temporary file is removed, ``path`` is
    left as it was, and the exception propagates."""
    p = Path(path)
    tmp = temporary_path(p)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_or_rescue(path: str | os.PathLike, content: Content, what: str = "the result") -> Path:
    """:func:`atomic_write`; if that fails with an OSError (a full disk, a folder gone), write the same
    content to a new file in the system's temporary folder and raise a ClbenchError naming it, so finished
    work is never lost to a failed write."""
    try:
        return atomic_write(path, content)
    except OSError as e:
        suffix = Path(path).suffix or ".out"
        try:
            fd, rescue = tempfile.mkstemp(prefix="clbench-rescue-", suffix=suffix)
            os.close(fd)
            atomic_write(rescue, content)
        except OSError as e2:
            raise ClbenchError(f"could not write {path} ({e.strerror or e}) nor a rescue copy in "
                               f"{tempfile.gettempdir()} ({e2.strerror or e2}); {what} is lost: free some space "
                               "and rerun") from None
        raise ClbenchError(f"could not write {path} ({e.strerror or e}); {what} was saved to {rescue} instead: "
                           f"move it into place (mv {rescue} {path}) once the problem is fixed") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Delete the temporary files (see :func:`temporary_path`) matching ``pattern`` + the temporary mark in
    ``folder`` whose writer, a process of this host, is gone; returns them. Files of live processes, of
    other hosts (a shared folder) and of other shapes are kept."""
    host, removed = socket.gethostname(), []
    for tmp in Path(folder).glob(f"{pattern}{TMP_MARK}*"):
        owner = tmp.name.rsplit(TMP_MARK, 1)[1]
        pid, _, where = owner.partition("@")
        if where != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed

"""Atomic writes and hashing.

Every artifact is written to a temporary file in the destination folder and renamed into place only
when complete, so an interrupted or failed run never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from xattn.errors import SIGNALLED, ArtifactError, OutOfSpaceError, Terminated, XattnError, no_space_cause


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any expensive work) when ``path`` cannot be written.

    Creates missing parent folders. Returns the path as a :class:`Path`.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ArtifactError(f"output path {path} is a folder", hint="give a file name")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create output folder {parent}: {exc.strerror}") from exc
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"output folder {parent} is not writable",
                            hint="choose another output path or fix its permissions")
    return path


def refuse_overwriting_inputs(outputs: dict[str, object], inputs: dict[str, object]) -> None:
    """Refuse (exit 2) when an output path is one of the inputs, compared as resolved paths (and as the same
    file where both exist: hard links, other spellings). No command may destroy the file it reads."""
    def key(path):
        return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()

    for out_label, out_path in outputs.items():
        if not out_path:
            continue
        for in_label, in_path in inputs.items():
            if not in_path:
                continue
            same = key(out_path) == key(in_path)
            if not same and Path(out_path).exists() and Path(in_path).exists():
                same = os.path.samefile(out_path, in_path)
            if same:
                raise ArtifactError(f"{out_label} {out_path} is the {in_label}: writing it would destroy the input",
                                    hint="choose another output path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = check_writable(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except Exception as exc:
            full = None if isinstance(exc, XattnError) else no_space_cause(exc)   # a toolkit error already says it
            if full is None:
                raise
            raise OutOfSpaceError(f"the file system refused to write {path} ({os.strerror(full.errno).lower()}); "
                                  f"{'its previous version was kept' if path.exists() else 'nothing was left there'}",
                                  hint="free space (or raise the limit) and run again") from None
        if SIGNALLED["signum"] is not None:   # terminated, even if the exception was swallowed on the way
            raise Terminated()
        # mkstemp makes private (0600) files; an artifact gets the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    # file names that are not UTF-8 arrive as surrogate escapes; reports show them as \\xNN, still valid UTF-8
    return write_bytes_atomic(path, text.encode("utf-8", errors="backslashreplace"))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_abandoned(parent: Path, pattern: str) -> list[Path]:
    """Folders in ``parent`` matching ``pattern`` whose name ends in ``-<pid>`` of a process that no longer
    exists: left by a run that was killed (SIGKILL leaves no chance to clean). Each is removed and said as a
    warning; a live run's folder (or another user's) is left alone. Returns what was removed."""
    import logging
    import shutil

    removed = []
    for folder in parent.glob(pattern):
        pid = folder.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue   # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue   # another user's live process
        shutil.rmtree(folder, ignore_errors=True)
        logging.getLogger("xattn").warning("removed %s, left by a killed run (process %s)", folder, pid)
        removed.append(folder)
    return removed


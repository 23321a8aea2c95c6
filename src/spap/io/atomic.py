"""Write a directory atomically: build it under a temporary name, then rename into place.

Temporary directories carry their owner in their name (``<prefix><pid>-<host>-<random>``), so a later
run can tell the leftovers of a killed process (SIGKILL, the OOM killer) from those of a live one and
remove only the former (``remove_dead_leftovers``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _host_tag() -> str:
    """Eight hex digits naming this machine (a shared filesystem may hold other machines' live runs)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def owned_tempdir(prefix: str, parent: str | Path | None = None) -> Path:
    """``tempfile.mkdtemp`` whose name records this process and machine: ``<prefix><pid>-<host>-...``."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-{_host_tag()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_leftovers(parent: str | Path, prefix: str) -> list[Path]:
    """Remove the directories under ``parent`` that ``owned_tempdir(prefix)`` made for processes of this
    machine that no longer run; returns them. Those of live processes, of other machines and names of
    any other form are left alone."""
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    host = _host_tag()
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        pid, _, rest = entry.name[len(prefix) :].partition("-")
        if not pid.isdigit() or not rest.startswith(host + "-") or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed %s, left by a run that no longer exists (pid %s)", entry, pid)
        removed.append(entry)
    return removed


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it becomes ``target``.

    On error the temporary directory is removed and ``target`` is left untouched. Without
    ``overwrite`` the final rename never replaces a non-empty directory: when another run wrote
    ``target`` meanwhile, that run's output is kept and this one fails with FileExistsError.
    """
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty directory; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        remove_dead_leftovers(target.parent, f".{target.name}.{kind}-")
    tmp = owned_tempdir(f".{target.name}.tmp-", target.parent)
    os.chmod(tmp, 0o777 & ~_current_umask())
    try:
        yield tmp
        _usual_modes(tmp)
        if overwrite:
            _replace(tmp, target)
        else:
            _rename_no_replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_no_replace(tmp: Path, target: Path) -> None:
    """rename(2) replaces an empty directory at most: a checkpoint written meanwhile stays."""
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(
            f"{target} was written by another run while this one ran; it is kept and this run's output "
            "discarded (pass --overwrite to replace it)"
        ) from None


def _replace(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(tmp.name.replace(".tmp-", ".old-", 1))
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _usual_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the mode a plain write would (0666 / 0777 minus
    the umask, i.e. 644 / 755 usually): some writers (safetensors) create files 0600 via a temp file."""
    umask = _current_umask()
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(Path(directory) / name, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(directory) / name, 0o666 & ~umask)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask

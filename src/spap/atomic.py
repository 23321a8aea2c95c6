"""Write a directory atomically: build it under a temporary name, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    On error the temporary directory is removed and ``target`` is left untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty (pass overwrite=True / --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_current_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _usual_modes(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name[-8:]}")
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

"""Files that are never seen half-written, and survive a crash once written.

Every file is written under a temporary name in its target folder, flushed to
disk (``fsync``), renamed over the target, and the folder itself is synced so
the rename is durable. An error or an interrupt (ComfyUI's Cancel raises inside
the write) removes the temporaries and leaves every target as it was.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_paths(targets: List[Path]) -> Iterator[List[Path]]:
    """Temporary paths beside ``targets``, to write in the ``with`` body; on a clean exit each is
    synced and renamed onto its target (all written before any is renamed), then the folders are
    synced. On any exception the temporaries are removed and no target is touched.

    Example::

        with atomic_paths([Path("out/a.safetensors")]) as (tmp,):
            save_file(tensors, tmp)
    """
    temps: List[Tuple[Path, Path]] = []
    try:
        for target in targets:
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            os.close(fd)
            temps.append((Path(tmp), target))
        yield [tmp for tmp, _ in temps]
        for tmp, _ in temps:
            _fsync_file(str(tmp))
        for tmp, target in temps:
            os.replace(tmp, target)
        for folder in {target.parent for _, target in temps}:
            _fsync_dir(folder)
        temps = []
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def atomic_write(files: Dict[Path, bytes]) -> None:
    """Write several files (path -> content) so that none is ever seen half-written (see :func:`atomic_paths`)."""
    targets = [Path(p) for p in files]
    with atomic_paths(targets) as temps:
        for tmp, data in zip(temps, files.values()):
            tmp.write_bytes(data)

"""Atomic file writes: a reader (or a rerun after ``kill -9``) sees the old file or the new one, never half of one.

Every file the app writes for later reading (``metrics.json``, ``samples.npz``, ``final.pt``, ``done.json``,
checkpoints, curves, sweep summaries) goes through :func:`atomic_file`: the data go to ``.<name>.tmp<pid>`` next to
the target, are flushed to disk, and ``os.replace`` (atomic on POSIX) puts them in place. A writer killed mid-write
leaves only the temporary, which :func:`experiments.stage_runtime.remove_stale_temporaries` deletes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """An open temporary file that replaces ``path`` when the block ends without error (removed otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # here, not at the top: the sweep summary (a Hydra callback) imports this module at start-up

    with atomic_file(path) as f:
        torch.save(obj, f)

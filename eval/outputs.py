"""Output locations are checked before any work, so that a bad --out costs seconds,
not the results of a long run."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable_dir(path, label: str) -> Path:
    """Create directory ``path`` if missing and prove it writable by creating and
    removing a probe file; a ValueError names ``label`` (the option) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label}: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".xbarsim-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{label}: cannot write to {path}: {err.strerror or err}") from None
    return path

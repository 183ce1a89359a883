"""Small file-system helpers shared by the stages."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `path` so that readers (and a run resumed after a kill) see the old file or the new
    one, never half of it. The temporary name starts with a dot and ends in .partial, which the
    stages clean up on start."""
    tmp = path.with_name(f".{path.name}.partial")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)

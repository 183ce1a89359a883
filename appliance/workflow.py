"""Prefect settings for the embedded default: a local, ephemeral API whose state lives in the
workspace (runs/prefect), nothing sent anywhere. A site with a Prefect server sets
PREFECT_API_URL and this leaves it alone."""

from __future__ import annotations

import os
from pathlib import Path


def prepare_prefect_env(workspace_root: Path) -> None:
    """Call before `import prefect` (settings are read at import)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    # The ephemeral API server migrates a fresh SQLite database on first start; on a busy
    # 2-core machine that takes longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not os.environ.get("PREFECT_API_URL"):
        home = Path(workspace_root) / "runs" / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_HOME", str(home))

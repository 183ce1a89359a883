"""Continual training: which labelled studies the newest model has not seen yet.

A study is new when it is trainable (labels done, at least one series preprocessed) and none of
its series is in the last finished run's split (train, validation or test). Counting by the
split rather than by time stamps is exact whatever the clocks or the order of the stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance.catalog import Catalog
from appliance.workspace import Workspace


def trainable_studies(ws: Workspace) -> set[str]:
    """Studies with labels and at least one cached (preprocessed) series."""
    with Catalog(ws.catalog_path) as catalog:
        rows = catalog.db.execute(
            "SELECT DISTINCT s.study_key FROM series s "
            "JOIN stage_status pre ON pre.kind = 'series' AND pre.key = s.key AND pre.stage = 'preprocess' "
            "AND pre.status = 'done' "
            "JOIN stage_status lab ON lab.kind = 'study' AND lab.key = s.study_key AND lab.stage = 'labels' "
            "AND lab.status = 'done'"
        ).fetchall()
    return {r[0] for r in rows}


def studies_in_run(ws: Workspace, run_dir: Path) -> set[str]:
    """The studies whose series a training run used (any part of its split)."""
    path = Path(run_dir) / "split.json"
    if not path.is_file():
        return set()
    split = json.loads(path.read_text())
    series = {k for part in ("train", "val", "test") for k in split.get(part, [])}
    with Catalog(ws.catalog_path) as catalog:
        study_of = dict(catalog.db.execute("SELECT key, study_key FROM series").fetchall())
    return {study_of[k] for k in series if k in study_of}


def new_trainable_studies(ws: Workspace, last_run: Path | None) -> list[str]:
    """Trainable studies the run `last_run` (None: no model yet) did not see, sorted."""
    seen = studies_in_run(ws, last_run) if last_run is not None else set()
    return sorted(trainable_studies(ws) - seen)

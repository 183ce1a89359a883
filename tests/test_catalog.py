"""Catalog: idempotent schema, stage status with fingerprints, no identifiers stored."""

from appliance.catalog import Catalog
from appliance.workspace import init_workspace, open_workspace


def test_schema_is_idempotent_and_persistent(tmp_path):
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        with cat.transaction():
            cat.upsert_study("s1", "a1", "p1")
            cat.replace_series("se1", "s1", "CT", "raw/s1/se1", {"n_slices": 2},
                               [("i1", "raw/s1/se1/i1.dcm", "h1", 10), ("i2", "raw/s1/se1/i2.dcm", "h2", 20)])
            cat.set_status("series", "se1", "ingest", "done")
    with Catalog(path) as cat:  # reopening re-runs the schema script harmlessly
        assert cat.counts()["series"] == 1
        row = cat.series("se1")
        assert row.n_instances == 2 and row.nbytes == 30 and row.geometry == {"n_slices": 2}
        assert cat.is_done("series", "se1", "ingest")
        assert cat.study_for_accession("a1") == "s1"


def test_replace_series_is_not_additive(tmp_path):
    with Catalog(tmp_path / "c.sqlite") as cat:
        cat.upsert_study("s1", None, None)
        for _ in range(3):
            cat.replace_series("se1", "s1", "CT", "raw", {}, [("i1", "p", "h", 1)])
        assert cat.counts()["instances"] == 1


def test_status_fingerprint_and_rollback(tmp_path):
    with Catalog(tmp_path / "c.sqlite") as cat:
        cat.set_status("series", "k", "preprocess", "done", fingerprint="v1")
        assert cat.is_done("series", "k", "preprocess", "v1")
        assert not cat.is_done("series", "k", "preprocess", "v2")  # settings changed: redo
        cat.set_status("series", "k", "preprocess", "running", fingerprint="v2")
        assert not cat.is_done("series", "k", "preprocess", "v2")  # killed mid-way: redo
        try:
            with cat.transaction():
                cat.set_status("series", "k", "preprocess", "done", fingerprint="v2")
                raise RuntimeError("crash inside the transaction")
        except RuntimeError:
            pass
        assert cat.status("series", "k", "preprocess")["status"] == "running"
        assert cat.stage_counts() == {"preprocess": {"running": 1}}


def test_workspace_keys_are_opaque_and_stable(tmp_path):
    ws = init_workspace(tmp_path / "site")
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    key = ws.opaque_key("study", uid)
    assert len(key) == 16 and uid not in key
    assert open_workspace(tmp_path / "site").opaque_key("study", uid) == key
    assert ws.opaque_key("series", uid) != key  # namespaces kept apart
    other = init_workspace(tmp_path / "other")
    assert other.opaque_key("study", uid) != key  # per-site salt
    for d in ("raw", "quarantine", "deid", "cache", "labels", "runs", "exports", "audit"):
        assert (ws.root / d).is_dir()
    assert (ws.root / "raw").stat().st_mode & 0o077 == 0, "raw/ is private to the appliance user"

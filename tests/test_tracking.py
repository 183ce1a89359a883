"""appliance.tracking: MLflow runs in the workspace's own SQLite store, and the privacy guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from appliance.errors import ApplianceError
from appliance.tracking import (
    MAX_PARAM_VAL_LENGTH,
    NullTracker,
    _quiet_mlflow,
    check_loggable,
    default_tracking_uri,
    open_run,
)

REAL_UID = "1.2.840.113619.2.55.3.604688119.971.1256042543.123"
PSEUDO_UID = "2.25.329800735698586629295641978511506172918"


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store: creating one takes seconds, copying it milliseconds."""
    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.sqlite"
    with pytest.MonkeyPatch.context() as mp, _quiet_mlflow():
        mp.chdir(folder)
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def ws(workspace, template_db) -> Path:
    """A workspace root whose runs/mlflow.sqlite already exists (empty)."""
    shutil.copy(template_db, workspace.runs / "mlflow.sqlite")
    return workspace.root


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=default_tracking_uri(root))


def test_run_logs_params_metrics_and_artifacts_inside_the_workspace(workspace, tmp_path, monkeypatch):
    root = workspace.root
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert default_tracking_uri(root) == f"sqlite:///{root}/runs/mlflow.sqlite"
    assert default_tracking_uri(root).startswith("sqlite:////")

    report = tmp_path / "outside" / "report.txt"
    report.parent.mkdir()
    report.write_text("auroc 0.91\n")
    ckpt = root / "runs" / "ckpt"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"\0" * 16)
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "ema.pt").write_bytes(b"\1" * 8)

    with open_run(root, experiment="greenrfm", run_name="train-001", tags={"stage": "pretrain"}) as run:
        assert run.run_id
        run.log_params({
            "optim": {"lr": 1e-4, "betas": (0.9, 0.999), "sched": {"name": "cosine"}},
            "canvas": [240, 240, 120],
            "data_dir": root / "cache" / "volumes",
            "note": "x" * (MAX_PARAM_VAL_LENGTH + 50),
            "empty": {},
        })
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            run.log_metrics({"loss": loss, "auroc": None if step == 0 else 0.6 + step / 10,
                             "nan_metric": float("nan")}, step=step * 10)
        run.log_dict({"labels": ["nodule", "effusion"], "where": str(root / "labels")}, "config/labels.json")
        run.log_artifact(report)
        run.log_artifact(report, artifact_path="reports")
        run.log_artifacts(ckpt, artifact_path="checkpoints")
        assert MlflowClient(tracking_uri=default_tracking_uri(root)).get_run(run.run_id).info.status == "RUNNING"

    assert (root / "runs" / "mlflow.sqlite").is_file()
    assert list(cwd.iterdir()) == [], "nothing may be written to the working directory"

    client = client_for(root)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "train-001"
    assert got.data.tags["stage"] == "pretrain"
    params = got.data.params
    assert params["optim.lr"] == "0.0001"
    assert json.loads(params["optim.betas"]) == [0.9, 0.999]
    assert params["optim.sched.name"] == "cosine"
    assert json.loads(params["canvas"]) == [240, 240, 120]
    assert params["data_dir"] == "cache/volumes"  # workspace paths are logged relative to its root
    assert len(params["note"]) == MAX_PARAM_VAL_LENGTH
    assert params["empty"] == "{}"

    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "loss"))
    assert loss == [(0, 1.0), (10, 0.5), (20, 0.25)]
    auroc = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "auroc"))
    assert auroc == [(10, pytest.approx(0.7)), (20, pytest.approx(0.8))]
    assert client.get_metric_history(run.run_id, "nan_metric") == []

    top = {f.path for f in client.list_artifacts(run.run_id)}
    assert top == {"config", "report.txt", "reports", "checkpoints"}
    assert {f.path for f in client.list_artifacts(run.run_id, "checkpoints")} == {"checkpoints/last.pt",
                                                                                   "checkpoints/sub"}
    assert {f.path for f in client.list_artifacts(run.run_id, "reports")} == {"reports/report.txt"}

    art_root = root / "runs" / "mlflow-artifacts"
    exp = client.get_experiment_by_name("greenrfm")
    assert exp.artifact_location == art_root.as_uri()
    assert got.info.artifact_uri == f"{art_root.as_uri()}/{run.run_id}/artifacts"
    on_disk = art_root / run.run_id / "artifacts"
    assert json.loads((on_disk / "config" / "labels.json").read_text()) == {"labels": ["nodule", "effusion"],
                                                                            "where": "labels"}
    assert (on_disk / "reports" / "report.txt").read_text() == "auroc 0.91\n"
    assert (on_disk / "checkpoints" / "sub" / "ema.pt").read_bytes() == b"\1" * 8


def test_resume_continues_the_same_run(ws):
    with open_run(ws, experiment="greenrfm", run_name="train-002") as first:
        first.log_params({"lr": 0.1, "epochs": 2, "model": {"depth": 12}})
        first.log_metrics({"loss": 1.0}, step=0)
    run_id = first.run_id

    with open_run(ws, experiment="ignored", run_name="ignored", resume_run_id=run_id,
                  tags={"resumed": "yes"}) as again:
        assert again.run_id == run_id
        assert client_for(ws).get_run(run_id).info.status == "RUNNING"
        again.log_params({"lr": 0.1, "epochs": 4, "model": {"depth": 12}, "extra": "new"})  # no error
        again.log_params({"lr": 0.1})
        again.log_metrics({"loss": 0.5}, step=1)

    client = client_for(ws)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"lr": "0.1", "epochs": "2", "model.depth": "12", "extra": "new"}
    assert got.data.tags["param_changed.epochs"] == "4"
    assert "param_changed.lr" not in got.data.tags
    assert got.data.tags["resumed"] == "yes"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [(0, 1.0), (1, 0.5)]
    exp = client.get_experiment_by_name("greenrfm")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    assert client.get_experiment_by_name("ignored") is None


def test_changed_param_within_one_run_becomes_a_tag(ws):
    with open_run(ws, experiment="greenrfm", run_name="r") as run:
        run.log_params({"batch": 8})
        run.log_params({"batch": 16})
    got = client_for(ws).get_run(run.run_id)
    assert got.data.params["batch"] == "8"
    assert got.data.tags["param_changed.batch"] == "16"


def test_resume_of_an_unknown_run_is_one_line_error(ws):
    with pytest.raises(ApplianceError, match="cannot resume"):
        open_run(ws, experiment="greenrfm", run_name="r", resume_run_id="0" * 32)


def test_exception_marks_the_run_failed_and_ctrl_c_killed(ws):
    with pytest.raises(ValueError, match="secret detail"):
        with open_run(ws, experiment="greenrfm", run_name="boom") as run:
            run.log_metrics({"loss": 1.0}, step=0)
            raise ValueError("secret detail")
    got = client_for(ws).get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["appliance.failure"] == "ValueError"
    assert not any("secret detail" in v for v in got.data.tags.values())

    with pytest.raises(KeyboardInterrupt):
        with open_run(ws, experiment="greenrfm", run_name="interrupted") as run2:
            raise KeyboardInterrupt
    assert client_for(ws).get_run(run2.run_id).info.status == "KILLED"


def test_end_without_context_manager(ws):
    run = open_run(ws, experiment="greenrfm", run_name="manual")
    run.end("FAILED")
    run.end("FINISHED")  # a second end does nothing
    assert client_for(ws).get_run(run.run_id).info.status == "FAILED"


# --------------------------------------------------------------------------------------------- privacy


def _refused(value, root, **kw) -> str:
    with pytest.raises(ApplianceError) as info:
        check_loggable(value, root, **kw)
    message = str(info.value)
    assert "\n" not in message
    text = str(value)
    assert text not in message
    if Path(text).name not in ("raw", "quarantine", "secrets"):
        assert Path(text).name not in message
    assert "DOE" not in message
    return message


def test_privacy_guard_refuses_private_paths_and_real_uids(workspace, monkeypatch, tmp_path):
    root = workspace.root
    monkeypatch.chdir(tmp_path)
    patient_file = root / "raw" / "DOE_JOHN_19610412" / "IM0001.dcm"

    assert "raw/" in _refused(patient_file, root)
    _refused(str(patient_file), root)
    _refused(patient_file.as_uri(), root)
    _refused("raw/DOE_JOHN_19610412", root)  # relative to the workspace root
    _refused(root / "raw", root)
    _refused(root / "cache" / ".." / "raw" / "DOE_JOHN", root)
    _refused(f"loaded {root}/quarantine/DOE_JOHN.zip ok", root)  # mentioned inside a text
    assert "secrets/" in _refused(root / "secrets" / "deid.key", root)
    assert "quarantine/" in _refused(str(root / "quarantine" / "x"), root)
    link = root / "cache" / "shortcut"
    link.symlink_to(root / "raw")
    _refused(link / "IM0001.dcm", root)  # through a symlink

    assert "UID" in _refused(REAL_UID, root)
    _refused(f"series {REAL_UID}.dcm", root)
    _refused("1.3.12.2.1107.5.1.4", root)
    _refused("12.25.1.2.3.4", root)  # not a 2.25. UID just because it contains one

    assert check_loggable(PSEUDO_UID, root) == PSEUDO_UID
    assert check_loggable(f"study {PSEUDO_UID}", root) == f"study {PSEUDO_UID}"
    assert check_loggable("1.2.840.10008.1.2.4.50", root) == "1.2.840.10008.1.2.4.50"  # a transfer syntax
    assert check_loggable("checkpoints/last.pt", root) == "checkpoints/last.pt"
    assert check_loggable("deid/3f2a9c/volume.npz", root) == "deid/3f2a9c/volume.npz"
    assert check_loggable(root / "deid" / "3f2a9c", root) == "deid/3f2a9c"
    assert check_loggable(str(root / "cache"), root) == "cache"
    assert check_loggable("/opt/models/vit.pt", root) == "/opt/models/vit.pt"
    assert check_loggable("https://example.org/raw/x", root) == "https://example.org/raw/x"
    assert check_loggable("raw", root) == "raw"  # a word, not a path
    assert check_loggable("1.2.3.4.5", root) == "1.2.3.4.5"  # too short for a UID
    assert check_loggable("2.5.1", root) == "2.5.1"
    assert check_loggable(1e-4, root) == "0.0001"
    # names that are not paths here (metric keys etc.) are not read as workspace folders
    assert check_loggable("quarantine/count", root, relative_paths=False) == "quarantine/count"


def test_tracker_applies_the_guard_everywhere(ws):
    with open_run(ws, experiment="greenrfm", run_name="guarded") as run:
        with pytest.raises(ApplianceError):
            run.log_params({"ok": 1, "source": ws / "raw" / "DOE_JOHN"})
        with pytest.raises(ApplianceError):
            run.log_params({"series": [PSEUDO_UID, REAL_UID]})
        with pytest.raises(ApplianceError):
            run.log_params({"nested": {REAL_UID: 1}})
        with pytest.raises(ApplianceError):
            run.set_tags({"series": REAL_UID})
        with pytest.raises(ApplianceError):
            run.log_metrics({f"auroc_{REAL_UID}": 0.5}, step=0)
        with pytest.raises(ApplianceError):
            run.log_dict({"files": [str(ws / "quarantine" / "a.dcm")]}, "bad.json")
        with pytest.raises(ApplianceError):
            run.log_artifact(ws / "secrets" / "deid.key")
        with pytest.raises(ApplianceError):
            run.log_artifacts(ws)  # would copy raw/ into the artifact store
        uid_dir = ws / "cache" / "dump"
        uid_dir.mkdir()
        (uid_dir / f"{REAL_UID}.npy").write_bytes(b"")
        with pytest.raises(ApplianceError):
            run.log_artifacts(uid_dir)
        run.log_params({"series": PSEUDO_UID})
        run.log_metrics({"quarantine/count": 3}, step=0)
    with pytest.raises(ApplianceError):
        open_run(ws, experiment="greenrfm", run_name=REAL_UID)

    client = client_for(ws)
    got = client.get_run(run.run_id)
    assert got.data.params == {"series": PSEUDO_UID}  # a refused batch logs nothing of it
    assert got.data.metrics == {"quarantine/count": 3.0}
    assert client.list_artifacts(run.run_id) == []


def test_disabled_tracker_does_nothing(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = open_run(workspace.root, experiment="greenrfm", run_name="off", enabled=False)
    assert isinstance(run, NullTracker)
    with run as r:
        assert r.run_id is None
        r.log_params({"a": {"b": 1}})
        r.log_metrics({"loss": 1.0}, step=0)
        r.set_tags({"t": "v"})
        r.log_dict({"k": "v"}, "k.json")
        r.log_artifact(tmp_path / "missing.txt")
        r.log_artifacts(tmp_path, "x")
    r.end("FAILED")
    assert not (workspace.runs / "mlflow.sqlite").exists()
    assert list(workspace.runs.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == [workspace.root.name]

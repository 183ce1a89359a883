"""MLflow run tracking for training jobs, without MLflow's global ("fluent") state.

Every run goes through its own `MlflowClient(tracking_uri=...)`, so concurrent Prefect tasks in one
process never share an "active run". By default the store is the workspace's own SQLite file,
`<ws>/runs/mlflow.sqlite`, and artifacts go to `<ws>/runs/mlflow-artifacts`, never to the process's
working directory.

Everything written to the store passes `check_loggable` first: MLflow's UI and exports are looked at
by people who may not see identifiable data, so no UID, no path into raw/, quarantine/ or secrets/,
and no absolute workspace path (which would reveal where the site keeps its data) goes in.

    with open_run(ws.root, experiment="greenrfm", run_name="train-001") as run:
        run.log_params({"optim": {"lr": 1e-4}, "canvas": [240, 240, 120]})
        run.log_metrics({"loss": 0.3}, step=10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# MLflow >= 3.2 reports usage to a remote endpoint unless told not to; the appliance never phones home.
# Set before mlflow is first imported (it is imported lazily below); an explicit site setting wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__all__ = [
    "NullTracker",
    "PRIVATE_DIRS",
    "Tracker",
    "check_loggable",
    "default_tracking_uri",
    "flatten_params",
    "open_run",
]

PRIVATE_DIRS = ("raw", "quarantine", "secrets")
ARTIFACTS_DIR = "mlflow-artifacts"
DB_NAME = "mlflow.sqlite"

# MLflow's own limits (mlflow.utils.validation); copied so this module imports without mlflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# dotted-digit runs of 5+ components (4+ dots); the length (>= 10) is checked on the match
_UID = re.compile(r"(?<!\d)\d+(?:\.\d+){4,}")
# UIDs that identify nothing: the appliance's 2.25.<int> pseudonyms and the DICOM standard's own
# registry (transfer syntaxes, SOP classes), which may be logged as settings
_SAFE_UID_PREFIXES = ("2.25.", "1.2.840.10008.")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


def default_tracking_uri(ws_root: Path) -> str:
    """The workspace's own SQLite store: `sqlite:///<ws_root>/runs/mlflow.sqlite` (absolute)."""
    return f"sqlite:///{Path(ws_root).expanduser().resolve() / 'runs' / DB_NAME}"


# --------------------------------------------------------------------------------------------------
# privacy guard


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop, a name too long: judge it as written
        return Path(os.path.normpath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _roots(ws_root: Path) -> list[Path]:
    """The workspace root as given (absolute) and with symlinks resolved; both forms may appear."""
    given = Path(os.path.normpath(Path(ws_root).expanduser().absolute()))
    resolved = _resolve(given)
    return [given] if given == resolved else [given, resolved]


def check_loggable(
    value: str | os.PathLike, ws_root: Path, *, what: str = "value", relative_paths: bool = True
) -> str:
    """The text to log for `value`, or ApplianceError when it must not reach the tracking store.

    Why: MLflow's store, UI and artifact folder are read by people and tools that may not see
    identifiable data (an exported run, a screenshot in a paper, a server outside the hospital).
    Patients are identified by their DICOM UIDs, and source folders and file names in raw/ and
    quarantine/ are often named after patients; secrets/ holds the de-identification key. So:

    - a file or folder inside the workspace's raw/, quarantine/ or secrets/ is refused, whether
      given as an absolute path, a `file:` URI, a path relative to the workspace root or to the
      working directory, or an absolute path mentioned inside a longer text;
    - a DICOM UID (dotted digits, 10+ characters, 4+ dots) is refused unless it is a `2.25.`
      pseudonym (what de-identification writes) or a standard `1.2.840.10008.` UID;
    - any other absolute path inside the workspace is returned relative to the workspace root, so
      runs do not reveal where the site keeps its data and stay valid when the workspace moves.

    The error message says what was refused and why, never the value itself. `what` names the thing
    in that message (e.g. "param 'data.root'"); it must itself be safe to print. relative_paths=False
    is for names that are not paths on this machine (metric, param and tag keys, names inside the
    artifact store): "quarantine/count" is then a metric name, not a folder.
    """
    is_path = isinstance(value, os.PathLike)
    text = os.fspath(value) if is_path else str(value)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")

    for match in _UID.finditer(text):
        uid = match.group(0)
        if len(uid) >= 10 and not uid.startswith(_SAFE_UID_PREFIXES):
            raise ApplianceError(f"refusing to log {what}: it contains a DICOM UID that is not a 2.25. pseudonym")

    roots = _roots(ws_root)
    private = [(name, root / name) for root in roots for name in PRIVATE_DIRS]

    # an absolute private path mentioned anywhere in the text (followed by a separator or the end)
    for name, folder in private:
        if re.search(re.escape(str(folder)) + r"(?![\w.\-])", text):
            raise ApplianceError(f"refusing to log {what}: it names a file or folder inside the workspace's {name}/")

    candidate: str | None = None
    if is_path:
        candidate = text
    elif text.startswith("file:"):
        candidate = unquote(urlparse(text).path)
    elif (
        (relative_paths or text.startswith(("/", "~")))
        and not _URL_SCHEME.match(text)
        and "\n" not in text
        and ("/" in text or os.sep in text or text.startswith("~"))
    ):
        candidate = text
    if candidate is None or not candidate.strip():
        return text

    path = Path(candidate).expanduser()
    bases = [path] if path.is_absolute() else [root / path for root in roots]
    if not path.is_absolute():
        with contextlib.suppress(OSError):  # the working directory may be gone
            bases.append(Path.cwd() / path)
    for base in bases:
        for form in {Path(os.path.normpath(base)), _resolve(base)}:
            for name, folder in private:
                if _inside(form, folder):
                    raise ApplianceError(
                        f"refusing to log {what}: it names a file or folder inside the workspace's {name}/"
                    )

    if path.is_absolute():
        for form in (Path(os.path.normpath(path)), _resolve(path)):
            for root in roots:
                if _inside(form, root):
                    return form.relative_to(root).as_posix()
    return text


def _check_local_source(path: Path, ws_root: Path, what: str) -> Path:
    """A local file or folder about to be copied into the artifact store: itself, everything under
    it, and no private folder of the workspace below it."""
    check_loggable(path, ws_root, what=what)
    src = _resolve(Path(path).expanduser().absolute())
    if src.is_dir():
        for root in _roots(ws_root):
            for name in PRIVATE_DIRS:
                if _inside(root / name, src):
                    raise ApplianceError(f"refusing to log {what}: the folder contains the workspace's {name}/")
        for dirpath, dirnames, filenames in os.walk(src):
            for entry in dirnames + filenames:
                full = Path(dirpath) / entry
                check_loggable(entry, ws_root, what=f"a file name under {what}", relative_paths=False)
                if full.is_symlink():
                    check_loggable(full, ws_root, what=f"a link under {what}")
    return src


def _sanitize_tree(obj: Any, ws_root: Path, what: str) -> Any:
    """A JSON-able copy of obj with every string (keys included) passed through check_loggable."""
    if hasattr(obj, "model_dump"):  # pydantic models, e.g. the site config
        obj = obj.model_dump(mode="json")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            out[check_loggable(str(k), ws_root, what=f"a key in {what}", relative_paths=False)] = _sanitize_tree(
                v, ws_root, what
            )
        return out
    if isinstance(obj, list | tuple):
        return [_sanitize_tree(v, ws_root, what) for v in obj]
    if isinstance(obj, set | frozenset):
        return [_sanitize_tree(v, ws_root, what) for v in sorted(obj, key=str)]
    if isinstance(obj, str | os.PathLike):
        return check_loggable(obj, ws_root, what=f"a value in {what}")
    if obj is None or isinstance(obj, bool | int | float):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return check_loggable(str(obj), ws_root, what=f"a value in {what}")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": [1, 2]} (lists are encoded when logged)."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_params(value, f"{name}."))
            else:
                out[name] = {}
        else:
            out[name] = value
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow and alembic log INFO lines when a store is first created ("Creating initial MLflow
    database tables...", one per migration); an operator's console should not show them."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.WARNING, lg.level))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --------------------------------------------------------------------------------------------------
# trackers


class NullTracker:
    """What open_run(enabled=False) returns: the Tracker's methods, doing nothing."""

    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, dir: Path, artifact_path: str | None = None) -> None:  # noqa: A002
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


class Tracker:
    """One MLflow run. Made by open_run; a context manager that ends the run FINISHED, FAILED (an
    exception) or KILLED (Ctrl-C). Safe to share between threads."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, ws_root: Path,
                 logged_params: Mapping[str, str] | None = None):
        self._client = client
        self._ws_root = ws_root
        self._params: dict[str, str] = dict(logged_params or {})
        self._metric_keys: set[str] = set()
        self._lock = threading.Lock()
        self._ended = False
        self.run_id: str = run_id
        self.experiment_id: str = experiment_id
        self.tracking_uri: str = client.tracking_uri

    @property
    def artifact_uri(self) -> str:
        return self._client.get_run(self.run_id).info.artifact_uri

    def register_model_version(self, name: str, artifact_path: str) -> str:
        """A new version of registered model `name` from this run's artifact folder; its version."""
        from mlflow.exceptions import MlflowException

        with self._lock, _quiet_mlflow():
            try:
                self._client.get_registered_model(name)
            except MlflowException:
                self._client.create_registered_model(name)
            version = self._client.create_model_version(name, source=f"{self.artifact_uri}/{artifact_path}",
                                                        run_id=self.run_id)
        return str(version.version)

    def _check(self, value: Any, what: str, names: bool = False) -> str:
        return check_loggable(value, self._ws_root, what=what, relative_paths=not names)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested mappings are flattened with dots, lists and tuples JSON-encoded, values truncated
        to MLflow's limit. A param already logged with the same value is skipped (a resumed run
        logs its config again); a changed value is recorded as tag `param_changed.<key>`, since
        MLflow refuses to overwrite a param."""
        from mlflow.entities import Param, RunTag

        new: dict[str, str] = {}
        for key, value in flatten_params(params).items():
            key = self._check(key, "a param key", names=True)
            what = f"param '{key}'"
            if isinstance(value, list | tuple | set | frozenset | Mapping):
                text = json.dumps(_sanitize_tree(value, self._ws_root, what))
            elif isinstance(value, os.PathLike):
                text = self._check(value, what)
            else:
                if hasattr(value, "item"):
                    with contextlib.suppress(TypeError, ValueError):
                        value = value.item()
                text = self._check(str(value), what)
            new[key] = text[:MAX_PARAM_VAL_LENGTH]

        with self._lock:
            fresh, changed = [], []
            for key, text in new.items():
                old = self._params.get(key)
                if old is None:
                    fresh.append(Param(key, text))
                    self._params[key] = text
                elif old != text:
                    changed.append(RunTag(f"param_changed.{key}", text))
            for batch in _chunks(fresh, MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, params=batch, synchronous=True)
            for batch in _chunks(changed, MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=batch, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Values that are None or NaN are skipped (e.g. a metric with no positives in a batch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if value is None:
                continue
            value = float(value)  # also numpy and 0-d torch values
            if math.isnan(value):
                continue
            if key not in self._metric_keys:
                self._check(key, "a metric key", names=True)
                self._metric_keys.add(key)
            batch.append(Metric(key, value, now, int(step)))
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = []
        for key, value in tags.items():
            key = self._check(key, "a tag key", names=True)
            text = self._check(value, f"tag '{key}'")
            batch.append(RunTag(key, text[:MAX_TAG_VAL_LENGTH]))
        for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """obj as JSON (or YAML for a .yaml/.yml name); every string in it passes the privacy guard."""
        artifact_file = self._check(artifact_file, "an artifact file name", names=True)
        data = _sanitize_tree(obj, self._ws_root, f"artifact '{artifact_file}'")
        self._client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        src = _check_local_source(Path(path), self._ws_root, "an artifact")
        if artifact_path is not None:
            artifact_path = self._check(artifact_path, "an artifact path", names=True)
        self._client.log_artifact(self.run_id, str(src), artifact_path)

    def log_artifacts(self, dir: Path, artifact_path: str | None = None) -> None:  # noqa: A002
        src = _check_local_source(Path(dir), self._ws_root, "an artifact folder")
        if artifact_path is not None:
            artifact_path = self._check(artifact_path, "an artifact path", names=True)
        self._client.log_artifacts(self.run_id, str(src), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED); a second call does nothing."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
            return
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            # the exception's class only: its message may quote data
            self.set_tags({"appliance.failure": exc_type.__name__})
            self.end(status)
        except Exception:  # never hide the exception that ended the run
            logging.getLogger(__name__).warning("could not mark MLflow run %s as %s", self.run_id, status)


def _local_artifacts(uri: str) -> bool:
    """Whether artifacts are written by this process (any store but a tracking server)."""
    scheme = urlparse(uri).scheme.lower()
    return scheme not in _REMOTE_SCHEMES


def open_run(
    ws_root: Path,
    *,
    experiment: str,
    run_name: str,
    uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    enabled: bool = True,
    resume_run_id: str | None = None,
) -> Tracker | NullTracker:
    """Start (or, with resume_run_id, reopen) an MLflow run.

    uri defaults to the workspace's SQLite store. Unless the store is a tracking server (http[s]://,
    which decides for itself), a new experiment keeps its artifacts in `<ws>/runs/mlflow-artifacts`.
    resume_run_id sets that run RUNNING again and goes on logging into it (`rfm train --resume`
    keeps one run); experiment and run_name are then ignored. enabled=False: a NullTracker, no store.
    The first open of a new SQLite store takes a few seconds (schema migrations).
    """
    if not enabled:
        return NullTracker()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    root = Path(ws_root).expanduser().resolve()
    uri = uri or default_tracking_uri(root)
    if uri == default_tracking_uri(root):
        (root / "runs").mkdir(parents=True, exist_ok=True)
    experiment = check_loggable(experiment, root, what="the experiment name", relative_paths=False)
    run_name = check_loggable(run_name, root, what="the run name", relative_paths=False)
    safe_tags = {}
    for key, value in (tags or {}).items():
        key = check_loggable(key, root, what="a tag key", relative_paths=False)
        safe_tags[key] = check_loggable(value, root, what=f"tag '{key}'")[:MAX_TAG_VAL_LENGTH]

    with _quiet_mlflow():
        client = MlflowClient(tracking_uri=uri)
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
            except MlflowException:
                raise ApplianceError(
                    f"cannot resume MLflow run {resume_run_id}: it is not in the tracking store"
                ) from None
            if run.info.lifecycle_stage == "deleted":
                raise ApplianceError(f"cannot resume MLflow run {resume_run_id}: it was deleted")
            client.update_run(resume_run_id, status="RUNNING")
            tracker = Tracker(client, resume_run_id, run.info.experiment_id, root, run.data.params)
            if safe_tags:
                tracker.set_tags(safe_tags)
            return tracker

        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if _local_artifacts(uri):
                folder = root / "runs" / ARTIFACTS_DIR
                folder.mkdir(parents=True, exist_ok=True)
                location = folder.as_uri()
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # another task created it meanwhile
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                experiment_id = exp.experiment_id
        else:
            experiment_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(experiment_id)
        run = client.create_run(experiment_id, run_name=run_name, tags=safe_tags)
    return Tracker(client, run.info.run_id, experiment_id, root)

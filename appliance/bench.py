"""`rfm bench <stage>`: throughput and peak memory of a stage, and a peer measured in the same run.

Each dataset is measured in a fresh process so its peak RSS is its own (workers included).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0  # Linux reports KiB


def _measure_ingest(source: str, preprocess: dict | None, workers: int | None, queue) -> None:
    """Child process: ingest + preprocess one source folder into a throwaway workspace."""
    from appliance.deid.stage import deidentify_workspace
    from appliance.ingest import ingest_folder
    from appliance.preprocess.stage import preprocess_workspace, worker_count
    from appliance.workspace import init_workspace

    with tempfile.TemporaryDirectory(prefix="rfm-bench-") as tmp:
        ws = init_workspace(Path(tmp) / "site", "bench")
        cfg = yaml.safe_load(ws.config_path.read_text()) or {}
        if preprocess:
            cfg.setdefault("preprocess", {}).update(preprocess)
        ws.config_path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        ing = ingest_folder(ws, Path(source))
        t1 = time.perf_counter()
        deidentify_workspace(ws)  # preprocess reads de-identified copies; timed by `rfm bench deid`
        t_deid = time.perf_counter()
        pre = preprocess_workspace(ws, workers=workers)
        t2 = time.perf_counter()
        total = (t1 - t0) + (t2 - t_deid)
        mb = ing.bytes_accepted / 1e6
        queue.put({
            "series": ing.series_accepted, "slices": ing.files_accepted, "mb": mb,
            "quarantined": ing.n_quarantined, "cached": pre.series_done,
            "ingest_s": t1 - t0, "preprocess_s": t2 - t_deid, "total_s": total, "deid_s_not_counted": t_deid - t1,
            "series_per_s": ing.series_accepted / total, "slices_per_s": ing.files_accepted / total,
            "mb_per_s": mb / total, "peak_rss_mb": _peak_rss_mb(),
            "preprocess_workers": worker_count(workers or ws.config().preprocess.workers, ing.series_accepted),
            "preprocess_settings": cfg.get("preprocess", {}),
        })


def _in_child(target, *args) -> dict:
    """Run target(*args, queue) in a fresh process; its result, or its failure as one line."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_report_errors, args=(target, args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty: keep waiting while the child lives
            if not proc.is_alive():
                result = {"error": f"benchmark process died (exit code {proc.exitcode})"}
                break
    proc.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def _report_errors(target, args, queue) -> None:
    try:
        target(*args, queue)
    except Exception as exc:  # report, don't hang the parent
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})


def _run_isolated(source: Path, preprocess: dict | None, workers: int | None) -> dict:
    return _in_child(_measure_ingest, str(source), preprocess, workers)


def dcm2niix_binary() -> str | None:
    beside = Path(sys.executable).parent / "dcm2niix"
    return str(beside) if beside.exists() else shutil.which("dcm2niix")


def _peer_dcm2niix(source: Path, ours_s: float) -> dict:
    """dcm2niix converting the same folder to NIfTI (no validation, copy, resampling or cache)."""
    exe = dcm2niix_binary()
    if exe is None:
        return {"skipped": "dcm2niix not installed"}
    with tempfile.TemporaryDirectory(prefix="rfm-peer-") as out:
        t0 = time.perf_counter()
        proc = subprocess.run([exe, "-z", "n", "-b", "n", "-f", "%s_%z", "-o", out, str(source)],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"skipped": f"dcm2niix exited {proc.returncode}"}
    return {"seconds": seconds, "ratio": ours_s / seconds,
            "ratio_means": "rfm ingest+preprocess seconds / dcm2niix seconds (>1: rfm slower)"}


def bench_ingest(studies: int = 20, real: Path | None = None, workers: int | None = None, seed: int = 0) -> dict:
    """Synthetic cohort (and a real series folder if given) through ingest + preprocess."""
    from appliance.synthetic import generate_cohort

    datasets: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rfm-bench-src-") as tmp:
        cohort = generate_cohort(Path(tmp) / "cohort", n_studies=studies, seed=seed)
        r = _run_isolated(cohort.dicom_dir, None, workers)
        r["peer_dcm2niix"] = _peer_dcm2niix(cohort.dicom_dir, r["total_s"])
        datasets[f"synthetic-{studies}"] = r
    if real is not None:
        real = Path(real)
        r = _run_isolated(real, None, workers)
        r["peer_dcm2niix"] = _peer_dcm2niix(real, r["total_s"])
        datasets[f"real:{real.name}"] = r
    return {
        "stage": "ingest",
        "what": "ingest (read, validate, copy to raw/, catalog) + preprocess (resample, window, fp16 cache); "
                "the de-identification between them is not counted (rfm bench deid measures it)",
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cores": mp.cpu_count()},
        "datasets": datasets,
    }


def _measure_deid(source: str, queue) -> None:
    """Child process: ingest a folder, then time the full deid stage and two header-only loops."""
    import pydicom

    from appliance.catalog import Catalog
    from appliance.deid.dicom import deidentify_dataset, write_deidentified
    from appliance.deid.stage import deidentify_workspace, load_keys, options_from_config
    from appliance.ingest import ingest_folder
    from appliance.workspace import init_workspace

    with tempfile.TemporaryDirectory(prefix="rfm-bench-") as tmp:
        ws = init_workspace(Path(tmp) / "site", "bench")
        ingest_folder(ws, Path(source))
        with Catalog(ws.catalog_path) as cat:
            files = [ws.root / r["raw_path"] for r in cat.db.execute("SELECT raw_path FROM instances ORDER BY key")]
        mb = sum(f.stat().st_size for f in files) / 1e6
        t0 = time.perf_counter()
        stage = deidentify_workspace(ws)
        full_s = time.perf_counter() - t0

        keys, options = load_keys(ws), options_from_config(ws.config().deid)
        out = Path(tmp) / "headers-only"
        out.mkdir()
        t0 = time.perf_counter()
        for i, f in enumerate(files):
            write_deidentified(deidentify_dataset(pydicom.dcmread(f), keys, options), out / f"{i}.dcm")
        ours_s = time.perf_counter() - t0

        peer: dict = {"skipped": "dicognito not installed"}
        try:
            from dicognito.anonymizer import Anonymizer
        except ImportError:
            Anonymizer = None
        if Anonymizer is not None:
            anonymizer = Anonymizer(seed="rfm-bench")
            peer_out = Path(tmp) / "dicognito"
            peer_out.mkdir()
            t0 = time.perf_counter()
            for i, f in enumerate(files):
                ds = pydicom.dcmread(f)
                anonymizer.anonymize(ds)
                ds.save_as(peer_out / f"{i}.dcm")
            peer_s = time.perf_counter() - t0
            peer = {"files_per_s": len(files) / peer_s, "mb_per_s": mb / peer_s, "seconds": peer_s}
        ours_fps, full_fps = len(files) / ours_s, (stage.files_written / full_s if full_s else 0.0)
        peer_fps = peer.get("files_per_s")
        queue.put({
            "files": len(files), "mb": mb,
            "full_stage": {"seconds": full_s, "files_per_s": full_fps,
                           "mb_per_s": mb / full_s if full_s else 0.0, "series": stage.series_done,
                           "quarantined": stage.series_quarantined, "pixels_cleaned": stage.files_pixels_cleaned,
                           "reports": stage.reports_done, "what": "pixels + headers + write + byte audit"},
            "headers_only": {"seconds": ours_s, "files_per_s": ours_fps, "mb_per_s": mb / ours_s,
                             "what": "read + Annex E headers + write (what dicognito does)"},
            "peer_dicognito": peer,
            "ratio_headers_only_vs_dicognito": ours_fps / peer_fps if peer_fps else None,
            "ratio_full_stage_vs_dicognito": full_fps / peer_fps if peer_fps else None,
            "peak_rss_mb": _peak_rss_mb(),
        })


def bench_deid(studies: int = 20, real: Path | None = None, seed: int = 0) -> dict:
    """files/s and MB/s of de-identification, and dicognito's on the same files in the same run."""
    from appliance.synthetic import generate_cohort

    datasets: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rfm-bench-src-") as tmp:
        cohort = generate_cohort(Path(tmp) / "cohort", n_studies=studies, seed=seed)
        sources = {f"synthetic-{studies}": cohort.dicom_dir}
        if real is not None:
            sources[f"real:{Path(real).name}"] = Path(real)
        for name, source in sources.items():
            datasets[name] = _in_child(_measure_deid, str(source))
    return {"stage": "deid", "ratio_means": "rfm files/s divided by dicognito files/s (>1: rfm faster)",
            "machine": {"python": platform.python_version(), "cores": mp.cpu_count()}, "datasets": datasets}


def bench_labels(studies: int = 100, latency_s: float = 0.2, max_in_flight: int = 16, n_requests: int = 200,
                 seed: int = 0) -> dict:
    """Reports/s of the rules extractor on the synthetic reports, and of the OpenAI client against a
    local server answering after a fixed latency: concurrent vs one request at a time, same run."""
    from appliance.labels.fake_server import measure_client_throughput
    from appliance.labels.rules import label_report
    from appliance.labels.vocabularies import load_vocabulary
    from appliance.synthetic import generate_cohort

    vocab = load_vocabulary("ct_rate_18")
    with tempfile.TemporaryDirectory(prefix="rfm-bench-") as tmp:
        cohort = generate_cohort(Path(tmp) / "cohort", n_studies=studies, seed=seed, matrix=32, slices=8)
        texts = [json.loads(line)["text"] for line in cohort.reports_path.read_text().splitlines()]
    reps = max(1, 2000 // len(texts))
    t0 = time.perf_counter()
    for _ in range(reps):
        for text in texts:
            label_report(text, vocab)
    rules_s = time.perf_counter() - t0
    concurrent = measure_client_throughput(vocab, n_reports=n_requests, max_in_flight=max_in_flight,
                                           latency_s=latency_s)
    serial = measure_client_throughput(vocab, n_reports=max(10, n_requests // 10), max_in_flight=1,
                                       latency_s=latency_s)
    return {
        "stage": "labels",
        "rules": {"reports": reps * len(texts), "seconds": rules_s, "reports_per_s": reps * len(texts) / rules_s,
                  "peak_rss_mb": _peak_rss_mb(), "vocabulary": vocab.name},
        "openai_client": {"concurrent": concurrent, "one_at_a_time": serial,
                          "speedup_vs_one_at_a_time": concurrent["reports_per_s"] / serial["reports_per_s"]},
        "machine": {"python": platform.python_version(), "cores": mp.cpu_count()},
    }

"""`rfm bench <stage>`: throughput and peak memory of a stage, and a peer measured in the same run.

Each dataset is measured in a fresh process so its peak RSS is its own (workers included).
"""

from __future__ import annotations

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
        pre = preprocess_workspace(ws, workers=workers)
        t2 = time.perf_counter()
        total = t2 - t0
        mb = ing.bytes_accepted / 1e6
        queue.put({
            "series": ing.series_accepted, "slices": ing.files_accepted, "mb": mb,
            "quarantined": ing.n_quarantined, "cached": pre.series_done,
            "ingest_s": t1 - t0, "preprocess_s": t2 - t1, "total_s": total,
            "series_per_s": ing.series_accepted / total, "slices_per_s": ing.files_accepted / total,
            "mb_per_s": mb / total, "peak_rss_mb": _peak_rss_mb(),
            "preprocess_workers": worker_count(workers or ws.config().preprocess.workers, ing.series_accepted),
            "preprocess_settings": cfg.get("preprocess", {}),
        })


def _run_isolated(source: Path, preprocess: dict | None, workers: int | None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_ingest, args=(str(source), preprocess, workers, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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
        "what": "ingest (read, validate, copy to raw/, catalog) + preprocess (resample, window, fp16 cache)",
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cores": mp.cpu_count()},
        "datasets": datasets,
    }

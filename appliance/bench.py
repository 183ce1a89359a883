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


# --- rfm bench train ---------------------------------------------------------------------------

RECIPE_CROP = (192, 192, 96)  # RECIPES.md section 1: random 192x192x96 training crop (x, y, z)
DEMO_CROP = (56, 56, 36)      # the demo's training crop (appliance/demo.py DEMO_SETTINGS)
CROP_MARGIN = (8, 8, 4)       # cached volumes are this much larger than the crop, so the random crop moves
BENCH_FINDINGS = 18           # CT-RATE vocabulary
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512}  # CXR-BERT's shape


def _bench_items(folder: Path, n: int, crop_xyz: tuple[int, int, int], findings: list[str], seed: int):
    """n random float16 cache volumes (Z, Y, X) in [-1, 1], a bit larger than the crop, with fake
    opaque keys, random 1/0/-1 labels and short synthetic reports."""
    import hashlib

    import numpy as np

    from appliance.train.data import TrainingItem

    rng = np.random.default_rng(seed)
    shape = tuple(c + m for c, m in zip(crop_xyz[::-1], CROP_MARGIN[::-1]))
    items = []
    for i in range(n):
        key = hashlib.sha256(f"rfm-bench:{seed}:{i}".encode()).hexdigest()
        npy = folder / f"{key[:16]}.npy"
        np.save(npy, (rng.random(shape, dtype=np.float32) * 2 - 1).astype(np.float16))
        labels = tuple(int(v) for v in rng.choice([1, 0, 0, -1], size=len(findings)))
        present = [f for f, v in zip(findings, labels) if v == 1] or ["no acute finding"]
        absent = [f for f, v in zip(findings, labels) if v == 0][:4]
        text = (f"IMPRESSION: {', '.join(present)}.\nFINDINGS: There is {present[0]}. "
                + " ".join(f"No {f}." for f in absent))
        items.append(TrainingItem(series_key=key[:32], study_key=key[32:48], patient_key=key[48:], npy=npy,
                                  labels=labels, text=text))
    return items


def _bench_plan(variant: str, device: str, memory_gb: float | None, tmp: Path):
    """The detected machine's plan (for a card of `memory_gb` when emulating one), variant forced."""
    from dataclasses import replace

    import torch

    from appliance.errors import ApplianceError
    from appliance.hardware import GpuInfo, detect_hardware, plan_profile

    hw = detect_hardware(tmp)
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ApplianceError("--device cuda, but torch sees no GPU")
    if cuda and not hw.gpus:  # torch sees a GPU that NVML does not (no nvidia-ml-py): read it from torch
        p = torch.cuda.get_device_properties(0)
        hw = replace(hw, gpus=(GpuInfo(0, p.name, round(p.total_memory / 2**30, 1), (p.major, p.minor), "?"),))
    notes = []
    if cuda and memory_gb is not None:
        hw = replace(hw, gpus=tuple(replace(g, vram_gb=memory_gb) for g in hw.gpus[:1]))
        notes.append(f"bench: planned for a {memory_gb:g} GB card (GPU reading replaced), allocator capped to it")
    else:
        hw = replace(hw, gpus=hw.gpus[:1] if cuda else ())  # one process: the plan of one GPU, or of none
    plan = plan_profile(hw, "cpu" if not cuda else "auto")
    plan = replace(plan, variant=variant)
    notes.append(f"bench: variant forced to {variant}")
    if plan.device == "cpu":
        plan = replace(plan, grad_accumulation=1)
        notes.append("bench: CPU step = micro-batch 2 x 1 accumulation (training uses the recipe's effective batch 10)")
    return replace(plan, reasons=[*plan.reasons, *notes])


def _bench_text_encoder(text: str, device_type: str, folder: Path, tokenizer) -> tuple[str, str | None]:
    """('tiny', None) or ('bert-base', a local folder with a randomly initialised CXR-BERT-shaped BERT)."""
    if text == "auto":
        text = "bert-base" if device_type == "cuda" else "tiny"
    if text == "tiny":
        return text, None
    if text != "bert-base":
        raise ValueError(f"text encoder {text!r}: use auto, tiny or bert-base")
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading it back would draw a bar over the CLI's status line
    config = BertConfig(**{**BERT_BASE, "vocab_size": max(BERT_BASE["vocab_size"], tokenizer.vocab_size)})
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return text, str(folder)


def _measure_train(variant: str, crop: tuple, steps: int, warmup: int, device: str, memory_gb: float | None,
                   text: str, loader_passes: int, start_method: str, queue) -> None:
    """Child process: one variant at one crop; stage 1 and stage 2 optimiser steps, then the loader."""
    import gc

    # A spawned child defaults to spawning its own children; the loader's workers start the way they
    # would under `rfm train` (fork on Linux), else each pass would time a fresh interpreter importing torch.
    mp.set_start_method(start_method, force=True)

    import torch
    from torch.utils.data import default_collate

    if memory_gb is not None and torch.cuda.is_available() and device != "cpu":
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gb / total_gb))

    from appliance.config import TrainSection
    from appliance.errors import ApplianceError
    from appliance.evaluate.zero_shot import PROMPT_PAIRS
    from appliance.labels.vocabularies import load_vocabulary
    from appliance.models import ModelSpec, build_site_tokenizer
    from appliance.progress import SilentProgress
    from appliance.train.trainer import _is_oom, _optimizer, _Trainer

    crop = tuple(int(c) for c in crop)
    findings = list(load_vocabulary("ct_rate_18").names)[:BENCH_FINDINGS]
    with tempfile.TemporaryDirectory(prefix="rfm-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        plan = _bench_plan(variant, device, memory_gb, tmp)
        cfg = TrainSection(crop=crop)
        step_n = plan.micro_batch * plan.grad_accumulation
        # enough items for one optimiser step, and for the loader to keep its workers busy a little
        n_items = min(64, max(16, step_n, 2 * max(1, plan.dataloader_workers) * plan.micro_batch))
        (tmp / "cache").mkdir()
        items = _bench_items(tmp / "cache", n_items, crop, findings, seed=0)
        corpus = [it.text for it in items] + [p.format(p=f) for f in findings for pair in PROMPT_PAIRS for p in pair]
        tokenizer = build_site_tokenizer(corpus, max_length=cfg.text_max_tokens)
        cuda = plan.device == "cuda"
        text_kind, text_dir = _bench_text_encoder(text, plan.device, tmp / "bert", tokenizer)
        if text_dir is not None:
            cfg = TrainSection(crop=crop, text_model_dir=Path(text_dir))  # as a site with CXR-BERT trains

        trainer = _Trainer(None, cfg, plan, tmp, SilentProgress(), None, None)
        trainer.setup_data({"train": items, "val": [], "test": []}, findings, tokenizer)
        spec = ModelSpec(variant=plan.variant, n_classes=len(findings), embed_dim=cfg.embed_dim,
                         text_model_dir=text_dir, text_vocab_size=tokenizer.vocab_size,
                         shared_classifier=cfg.ablation.shared_classifier,
                         activation_checkpointing=plan.activation_checkpointing)

        def step_batch(epoch: int) -> dict:
            trainer.train_set.set_epoch(epoch)  # a fresh random crop per epoch
            return default_collate([trainer.train_set[i] for i in range(step_n)])

        batches = [step_batch(e) for e in range(min(2, warmup + steps))]
        stages: dict[str, dict] = {}
        inference: dict = {}
        failure = None
        gpu_used_outside_allocator = None
        try:
            trainer.setup_model(spec)
            trainer.model.train()
            for name, step_fn, phase, clip in (("stage1", trainer.supervised_step, "stage1", None),
                                               ("stage2", trainer.alignment_step, "stage2", cfg.stage2.grad_clip)):
                optimizer = _optimizer(trainer.model, phase, cfg)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                samples, t0 = 0, time.perf_counter()
                for i in range(warmup + steps):
                    if i == warmup:
                        if cuda:
                            torch.cuda.synchronize()
                        samples, t0 = 0, time.perf_counter()
                    batch = batches[i % len(batches)]
                    trainer._step_with_backoff(step_fn, batch, optimizer, clip)
                    samples += len(batch["index"])
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                stages[name] = {
                    "samples_per_s": samples / seconds if seconds > 0 else 0.0, "seconds": seconds, "steps": steps,
                    "samples": samples,
                    "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                    "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                    "what": "supervised_step: BCE of each encoder through the shared classifier" if name == "stage1"
                            else "alignment_step: InfoNCE over the effective batch (gradient caching) + BCE",
                }
                if cuda:
                    free, total = torch.cuda.mem_get_info()
                    gpu_used_outside_allocator = (total - free - torch.cuda.memory_reserved()) / 2**30
                del optimizer
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            inference = _measure_inference(trainer.model, batches[0]["volume"], steps, warmup, trainer.plan,
                                           trainer.autocast, cuda)
        except ApplianceError as exc:  # out of memory at micro-batch 1
            failure = str(exc)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            failure = f"CUDA out of memory outside a training step: {str(exc).splitlines()[0]}"
        if hasattr(trainer, "model"):
            del trainer.model, trainer.net
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

        # the data loader alone, as the trainer builds it once per epoch (its workers, no model)
        passes, t_load = max(1, loader_passes), 0.0
        for epoch in range(passes + 1):  # the first pass warms the page cache and is not counted
            t0 = time.perf_counter()
            n_loaded = sum(len(b["index"]) for b in trainer.loader(epoch, 0))
            if epoch:
                t_load += time.perf_counter() - t0
        if trainer.history:
            trainer.history.close()
        peak_gpu = [s["peak_gpu_mem_gb"] for s in stages.values() if s["peak_gpu_mem_gb"] is not None]
        queue.put({
            "variant": variant, "crop": list(crop), "text_encoder": text_kind, "plan": plan.to_dict(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "step_samples": step_n, "finished": failure is None, "failure": failure,
            "stages": stages,
            "stage1_samples_per_s": stages.get("stage1", {}).get("samples_per_s"),
            "stage2_samples_per_s": stages.get("stage2", {}).get("samples_per_s"),
            "inference_samples_per_s": inference.get("samples_per_s"), "inference": inference,
            "loader_samples_per_s": passes * n_loaded / t_load if t_load > 0 else 0.0,
            "loader": {"items": n_items, "passes": passes, "workers": plan.dataloader_workers,
                       "micro_batch": plan.micro_batch, "seconds": t_load},
            "peak_gpu_mem_gb": max(peak_gpu) if peak_gpu else None,
            "peak_gpu_reserved_gb": max((s["peak_gpu_reserved_gb"] for s in stages.values()
                                         if s["peak_gpu_reserved_gb"] is not None), default=None),
            "gpu_used_outside_allocator_gb": gpu_used_outside_allocator,
            "memory_cap_gb": memory_gb if cuda else None,
            "peak_rss_mb": _peak_rss_mb(),
            "oom_backoffs": trainer.oom_backoffs, "final_micro_batch": trainer.plan.micro_batch,
            "final_grad_accumulation": trainer.plan.grad_accumulation,
        })


def _measure_inference(model, volume, steps: int, warmup: int, plan, autocast, cuda: bool) -> dict:
    """Forward-only image encoder + classifier (eval mode, no grad) at the plan's micro-batch, on a
    batch already on the device: what serving or `rfm eval` costs per volume."""
    import torch

    model.eval()
    volume = volume[:plan.micro_batch].to(next(model.parameters()).device)
    if plan.channels_last_3d:
        volume = volume.contiguous(memory_format=torch.channels_last_3d)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with autocast():
                model(volume, with_logits=True)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    samples = steps * len(volume)
    return {"samples_per_s": samples / seconds if seconds > 0 else 0.0, "seconds": seconds, "samples": samples,
            "batch": len(volume), "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "what": "image encoder + classifier forward, eval mode, no grad, at the plan's micro-batch"}


def bench_train(crops=(RECIPE_CROP, DEMO_CROP), variants=("standard", "lite"), steps: int = 3, warmup: int = 1,
                device: str = "auto", memory_fraction_gb: float | None = None, text: str = "auto",
                loader_passes: int = 2) -> dict:
    """Training samples/s of each stage, forward-only inference samples/s, peak GPU memory and peak RSS,
    and data-loader samples/s, for each (variant, crop), each measured in a fresh process on random cached
    volumes.

    memory_fraction_gb emulates a smaller card on a CUDA machine: the plan is made for a GPU of that
    size and torch's allocator is capped to it (set_per_process_memory_fraction).
    """
    from appliance.errors import ApplianceError

    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    if device not in ("auto", "cpu", "cuda") or text not in ("auto", "tiny", "bert-base"):
        raise ValueError(f"device {device!r} / text {text!r}: use auto, cpu or cuda / auto, tiny or bert-base")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ApplianceError("--device cuda, but torch sees no GPU")
    results = [_in_child(_measure_train, variant, tuple(crop), steps, warmup, device, memory_fraction_gb, text,
                         loader_passes, mp.get_start_method())
               for crop in crops for variant in variants]
    cuda = any(r["plan"]["device"] == "cuda" for r in results)
    notes = [
        "step = micro-batch x accumulation samples (one optimiser step, one effective batch); "
        "stage samples/s = samples of the timed steps / their wall time, after "
        f"{warmup} untimed warm-up step(s), batches already in host memory",
        "stage 1 = supervised_step (BCE of each encoder); stage 2 = alignment_step (InfoNCE over the effective "
        "batch by gradient caching: a no-grad pass then a grad pass, so about twice stage 1's work)",
        "inference samples/s = forward-only image encoder + classifier (eval mode, no grad, the plan's precision) "
        f"at the micro-batch, {steps} timed call(s) after {warmup} warm-up call(s)",
        "loader samples/s = trainer.loader() over the cached volumes with the plan's workers and no model, "
        f"{loader_passes} pass(es) after a warm-up pass (the workers persist across passes, as across "
        "epochs in training); the volumes sit in the page cache",
        "volumes are random float16 arrays the size of the crop plus a margin; items, keys, labels and reports "
        "are synthetic",
        "text encoder: bert-base = CXR-BERT's shape with random weights (what a site with CXR-BERT trains), "
        "tiny = the in-process BERT used without train.text_model_dir (the demo, CPU sites)",
    ]
    if cuda:
        notes.append("peak GPU memory = torch.cuda.max_memory_allocated() per stage (reset before each), GiB; "
                     "reserved = the caching allocator's peak; the CUDA context is outside both "
                     "(gpu_used_outside_allocator_gb)")
    else:
        notes.append("CPU: fp32, GreenRFM-L is the CPU plan's variant; standard is benchmarked for comparison")
    if memory_fraction_gb is not None and cuda:
        notes.append(f"card emulated: allocator capped at {memory_fraction_gb:g} GiB; a real card of that size "
                     "also holds the CUDA context and the display, so leave ~0.5 GB of head-room")
    return {"stage": "train", "device": "cuda" if cuda else "cpu", "torch": results[0]["torch"] if results else None,
            "gpu": next((r["gpu"] for r in results if r["gpu"]), None),
            "machine": {"python": platform.python_version(), "cores": mp.cpu_count()},
            "steps": steps, "warmup": warmup, "results": results, "notes": notes}

"""`rfm bench export`: latency and throughput of the exported image encoder per batch size, for every
backend this machine has (PyTorch eager fp32 and AMP, onnxruntime CPU and CUDA, TensorRT FP16),
measured in one run, with throughput ratios and each backend's embedding parity against eager fp32.

Each (variant, crop) is measured in a fresh process, so its peak memory is its own.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import tempfile
import threading
import time
from pathlib import Path

from appliance.bench import BENCH_FINDINGS, RECIPE_CROP, _in_child
from appliance.errors import ApplianceError

EAGER, AMP = "pytorch-eager-fp32", "pytorch-amp"
ORT_CPU, ORT_CUDA, TRT = "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt-fp16"
BACKENDS = (EAGER, AMP, ORT_CPU, ORT_CUDA, TRT)
CPU_BATCH_SIZES = (1, 2, 4)
CUDA_BATCH_SIZES = (1, 4, 8, 16)
MONAI_REFERENCE = ("context only, not a target: published TensorRT FP16 speed-ups for 3D medical networks over "
                   "PyTorch fp32 (MONAI model zoo, A100) are about 2.9x to 5x for the model alone; other networks "
                   "and GPUs than this table's")


class _PeakRss:
    """Peak RSS (MB) of this process while the block runs, sampled by a thread: ru_maxrss only
    grows, so it cannot tell one backend's peak from an earlier backend's."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s

    def __enter__(self) -> "_PeakRss":
        import psutil

        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)

    @property
    def mb(self) -> float:
        return self._peak / 2**20

    @staticmethod
    def now_mb() -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or any(s in text for s in ("out of memory", "failed to allocate", "not enough memory", "alloc_failed")))


def _time_batches(step, warmup: int, iterations: int, cuda: bool, max_seconds: float) -> tuple[list[float], object]:
    """Per-call seconds of `iterations` calls after `warmup` untimed ones (at least 2 timed calls,
    fewer than `iterations` once `max_seconds` are spent), and the last call's output."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = None
    sync()  # the input's host-to-device copy ran on torch's stream; ORT and TensorRT use their own
    for _ in range(warmup):
        out = step()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(iterations):
        sync()
        t0 = time.perf_counter()
        out = step()
        sync()  # the GPU work, not only its launch
        times.append(time.perf_counter() - t0)
        if len(times) >= 2 and time.perf_counter() - start > max_seconds:
            break
    return times, out


def _skip_reasons(cuda: bool, tensorrt: str, ort_cuda: bool, trt_status: tuple[bool, str]) -> dict[str, str]:
    skipped = {}
    if not cuda:
        skipped[ORT_CUDA] = "no GPU (device cpu)"
    elif not ort_cuda:
        skipped[ORT_CUDA] = "onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)"
    if tensorrt == "off":
        skipped[TRT] = "--tensorrt off"
    elif not trt_status[0]:
        skipped[TRT] = trt_status[1]
    elif not cuda:
        skipped[TRT] = "device cpu"
    return skipped


def _measure_export(variant: str, crop: tuple, batch_sizes: tuple, iterations: int, warmup: int, device: str,
                    tensorrt: str, max_seconds: float, queue) -> None:
    """Child process: one variant at one crop: export, then every backend at every batch size."""
    import contextlib
    import gc

    import numpy as np
    import torch

    from appliance.export.onnx_export import IMAGE_INPUT, export_image_encoder
    from appliance.export.runtime import OrtRunner, embedding_parity, ort_cuda_available
    from appliance.export.tensorrt import EngineProfile, TensorRTRunner, build_engine, tensorrt_status
    from appliance.models import ModelSpec, build_greenrfm

    cuda = device == "cuda"
    dev = torch.device(device)
    x, y, z = crop
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as in training: a fixed crop, cuDNN picks its fastest 3D kernels
    model = build_greenrfm(ModelSpec(variant=variant, n_classes=BENCH_FINDINGS, embed_dim=768,
                                     text_vocab_size=500)).eval()
    volumes = {b: np.random.default_rng(b).uniform(-1, 1, (b, 1, z, y, x)).astype(np.float32) for b in batch_sizes}
    skipped = _skip_reasons(cuda, tensorrt, ort_cuda_available(), tensorrt_status())
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    precision = {EAGER: "fp32" + (" (cuDNN TF32 allowed)" if cuda and torch.backends.cudnn.allow_tf32 else ""),
                 AMP: f"autocast {'fp16' if cuda else 'bf16'}", ORT_CPU: "fp32", ORT_CUDA: "fp32", TRT: "fp16"}
    rows: list[dict] = []
    reference: dict[int, np.ndarray] = {}
    exports: dict[str, dict] = {}

    def row(backend: str, batch: int, **fields) -> dict:
        on_gpu = cuda and backend != ORT_CPU
        return {"variant": variant, "crop": list(crop), "backend": backend, "batch": batch,
                "device": "cuda" if on_gpu else "cpu", "precision": precision[backend], **fields}

    def torch_backend(net, amp: bool):
        def open_backend():
            net.to(dev)
            autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp else contextlib.nullcontext

            def make(b: int):
                volume = torch.from_numpy(volumes[b]).to(dev)

                def step():
                    with torch.inference_mode(), autocast():
                        embedding = net.encode_image(volume)
                        return embedding, net.classifier(embedding)  # the ONNX graph's two outputs
                return step, lambda out: out[0].float().cpu().numpy()
            return make
        return open_backend

    def ort_cpu(path: Path):
        def open_backend():
            runner = OrtRunner(path, device="cpu")
            return lambda b: ((lambda: runner.run(**{IMAGE_INPUT: volumes[b]})),
                              lambda out: out["image_embedding"])
        return open_backend

    def ort_cuda(path: Path):
        def open_backend():
            runner = OrtRunner(path, device="cuda")
            index = runner.output_names.index("image_embedding")
            gpu = torch.cuda.current_device()

            def make(b: int):
                # input and outputs stay on the GPU (I/O binding), as for the torch and TensorRT rows
                volume = torch.from_numpy(volumes[b]).to(dev)
                binding = runner.session.io_binding()
                binding.bind_input(IMAGE_INPUT, "cuda", gpu, np.float32, tuple(volume.shape), volume.data_ptr())
                for name in runner.output_names:
                    binding.bind_output(name, "cuda", gpu)

                def step():
                    runner.session.run_with_iobinding(binding)
                    return binding, volume  # the bound buffer must outlive the binding
                return step, lambda out: out[0].copy_outputs_to_cpu()[index]
            return make
        return open_backend

    def trt(plan: Path):
        def open_backend():
            runner = TensorRTRunner(plan)

            def make(b: int):
                volume = torch.from_numpy(volumes[b]).to(dev)
                return (lambda: runner.run_torch(**{IMAGE_INPUT: volume})), \
                    lambda out: out["image_embedding"].float().cpu().numpy()
            return make
        return open_backend

    def outside_torch_bytes() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free - torch.cuda.memory_reserved()

    def measure(backend: str, open_backend, gpu_memory: str | None) -> None:
        """gpu_memory: "allocated" (torch's allocator peak), "device" (device memory the backend
        holds outside torch's allocator, a cudaMemGetInfo delta) or None (CPU: RSS only)."""
        if backend in skipped:
            rows.extend(row(backend, b, skipped=skipped[backend]) for b in batch_sizes)
            return
        if gpu_memory == "device":
            torch.cuda.empty_cache()
            base = outside_torch_bytes()
        rss_before = _PeakRss.now_mb()
        try:
            make = open_backend()
        except Exception as exc:
            rows.extend(row(backend, b, skipped=f"cannot start: {_first_line(exc)}") for b in batch_sizes)
            return
        oom_at = None
        for b in batch_sizes:  # ascending: after an out-of-memory, larger batches are not tried
            if oom_at is not None:
                rows.append(row(backend, b, oom=f"not run: batch {oom_at} ran out of memory"))
                continue
            try:
                if gpu_memory == "allocated":
                    torch.cuda.reset_peak_memory_stats()
                with _PeakRss() as rss:
                    step, fetch = make(b)
                    times, out = _time_batches(step, warmup, iterations, cuda, max_seconds)
                embedding = fetch(out)
                del step, out
            except Exception as exc:  # one backend's failure is a row, not the end of the run
                failure = _first_line(exc)
                if _is_oom(exc):
                    oom_at = b
                rows.append(row(backend, b, **({"oom": failure} if oom_at == b else {"error": failure})))
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                continue
            times_ms = np.asarray(times) * 1000.0
            r = row(backend, b, latency_ms_median=float(np.median(times_ms)),
                    latency_ms_p90=float(np.percentile(times_ms, 90)),
                    volumes_per_s=b * len(times) / float(np.sum(times)), iterations=len(times),
                    peak_rss_mb=rss.mb, rss_before_backend_mb=rss_before)
            if gpu_memory == "allocated":
                r["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            elif gpu_memory == "device":
                r["peak_gpu_mb"] = (outside_torch_bytes() - base) / 2**20
            if backend == EAGER:
                reference[b] = embedding
                r["parity"] = "reference"
            elif b in reference:
                r["parity"] = embedding_parity(reference[b], embedding)
                r["cosine_min"] = r["parity"]["cosine_min"]
            rows.append(r)
        del make
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory(prefix="rfm-bench-export-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        fp32 = export_image_encoder(model, crop, tmp / "image_fp32.onnx")
        exports["onnx_fp32"] = {"exporter": fp32.exporter, "opset": fp32.opset, "seconds": time.perf_counter() - t0,
                                "mb": fp32.path.stat().st_size / 1e6, "fallback_reason": fp32.fallback_reason}
        plan = tmp / "image_fp16.plan"
        if TRT not in skipped:
            try:
                t0 = time.perf_counter()
                fp16 = export_image_encoder(model, crop, tmp / "image_fp16.onnx", dtype=torch.float16)
                t1 = time.perf_counter()
                # one profile over all batch sizes, tuned for the largest (throughput) batch
                info = build_engine(fp16.path, plan, IMAGE_INPUT, (z, y, x),
                                    EngineProfile(min(batch_sizes), max(batch_sizes), max(batch_sizes)))
                exports["onnx_fp16"] = {"exporter": fp16.exporter, "opset": fp16.opset, "seconds": t1 - t0}
                exports["tensorrt_fp16"] = {**info, "seconds": time.perf_counter() - t1}
            except Exception as exc:
                skipped[TRT] = f"engine not built: {_first_line(exc)}"

        measure(EAGER, torch_backend(model, amp=False), "allocated" if cuda else None)
        measure(AMP, torch_backend(model, amp=True), "allocated" if cuda else None)
        del model  # the runtimes below hold their own copy of the weights; keep their memory figures their own
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        measure(ORT_CPU, ort_cpu(fp32.path), None)
        measure(ORT_CUDA, ort_cuda(fp32.path), "device")
        measure(TRT, trt(plan), "device")

    try:
        import tensorrt as trt_module

        trt_version = trt_module.__version__
    except Exception:
        trt_version = None
    queue.put({"rows": rows, "exports": {"variant": variant, "crop": list(crop), **exports},
               "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
               "tensorrt": trt_version})


def _add_ratios(rows: list[dict]) -> None:
    """vs_eager / vs_amp: a row's volumes/s over eager fp32's / AMP's at the same variant, crop and batch."""
    speed = {(r["variant"], tuple(r["crop"]), r["batch"], r["backend"]): r.get("volumes_per_s") for r in rows}
    for r in rows:
        if r.get("volumes_per_s"):
            for key, backend in (("vs_eager", EAGER), ("vs_amp", AMP)):
                other = speed.get((r["variant"], tuple(r["crop"]), r["batch"], backend))
                r[key] = r["volumes_per_s"] / other if other else None


def bench_export(variants=("lite", "standard"), crops=(RECIPE_CROP,), batch_sizes=None, iterations: int = 10,
                 warmup: int = 2, device: str = "auto", tensorrt: str = "auto", max_seconds: float = 30.0) -> dict:
    """Latency (median, p90 per batch), volumes/s, peak memory and embedding parity of the image encoder
    for each variant, crop, backend and batch size, on random volumes with random-init weights.

    A backend stops timing a batch size after `max_seconds` (at least 2 timed calls), so a slow CPU
    backend cannot hold the run for hours; each row says how many calls it timed.
    """
    import onnxruntime
    import torch

    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    if device not in ("auto", "cpu", "cuda") or tensorrt not in ("auto", "off"):
        raise ValueError(f"device {device!r} / tensorrt {tensorrt!r}: use auto, cpu or cuda / auto or off")
    if device == "cuda" and not torch.cuda.is_available():
        raise ApplianceError("--device cuda, but torch sees no GPU")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    batch_sizes = tuple(sorted({int(b) for b in (batch_sizes or (CUDA_BATCH_SIZES if cuda else CPU_BATCH_SIZES))}))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")

    rows: list[dict] = []
    exports: list[dict] = []
    gpu = trt_version = None
    for crop in crops:
        crop = tuple(int(c) for c in crop)
        for variant in variants:
            try:
                child = _in_child(_measure_export, variant, crop, batch_sizes, iterations, warmup, device, tensorrt,
                                  max_seconds)
            except RuntimeError as exc:  # e.g. the kernel's OOM killer ended the child
                rows.extend({"variant": variant, "crop": list(crop), "backend": backend, "batch": b,
                             "error": str(exc)} for backend in BACKENDS for b in batch_sizes)
                continue
            rows.extend(child["rows"])
            exports.append(child["exports"])
            gpu, trt_version = gpu or child["gpu"], trt_version or child["tensorrt"]
    _add_ratios(rows)

    notes = [
        f"latency = wall time of one batch call, median and p90 over the timed calls after {warmup} untimed "
        f"warm-up call(s); volumes/s = batch x timed calls / their total seconds"
        + ("; CUDA is synchronised before and after each call" if cuda else ""),
        "x eager / x AMP = a row's volumes/s over pytorch-eager-fp32's / pytorch-amp's at the same variant, crop "
        "and batch (>1: faster)",
        "cosine = min over the batch of the cosine between a backend's image embedding and eager fp32's on the "
        "same input volumes (random uniform [-1, 1], random-init weights)",
        "pytorch rows compute what the ONNX graph computes: encode_image, then the shared classifier's logits",
    ]
    if cuda:
        notes += [
            "GPU rows: input already on the GPU, outputs left there (onnxruntime-cuda through I/O binding); "
            "no host copies are timed. onnxruntime-cpu takes and returns host arrays",
            "peak memory, torch rows: torch.cuda.max_memory_allocated (weights, input, activations; reset per batch "
            "size); onnxruntime-cuda and TensorRT rows: device memory the runtime holds outside torch's allocator "
            "after the batch ran (cudaMemGetInfo delta from before its session; other processes on the GPU "
            "distort it). TensorRT allocates for the profile's largest batch whatever the batch",
            "torch: cudnn.benchmark on (as in training); eager fp32 uses torch's defaults, so cuDNN convolutions "
            "may run in TF32 on Ampere and newer. TensorRT: one strongly typed FP16 engine from the fp16 ONNX "
            f"graph, profile batch {batch_sizes[0]}..{batch_sizes[-1]} tuned for {batch_sizes[-1]}",
        ]
    else:
        notes += [
            "peak memory = peak RSS of the benchmark process while that backend ran at that batch size (sampled "
            "every 5 ms), including what the process held before (rss_before_backend_mb in the JSON: RSS before the "
            "backend loaded its model); the torch model is freed before the onnxruntime rows",
            "pytorch-amp on CPU is bfloat16 autocast: without native bf16 (AVX512-BF16 / AMX) it can be slower "
            "than fp32",
        ]
    for backend in (ORT_CUDA, TRT):
        reasons = sorted({r["skipped"] for r in rows if r["backend"] == backend and "skipped" in r})
        notes += [f"{backend} skipped: {reason}" for reason in reasons]
    if any(r.get("iterations", iterations) < iterations for r in rows if "volumes_per_s" in r):
        notes.append(f"some rows timed fewer than {iterations} calls: each batch size stops after {max_seconds:g} s "
                     "(see iterations in the JSON)")
    notes.append(MONAI_REFERENCE)
    return {"stage": "export", "device": device, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "tensorrt": trt_version, "gpu": gpu, "cpu_count": mp.cpu_count(),
            "machine": {"python": platform.python_version(), "cores": mp.cpu_count()},
            "variants": list(variants), "crops": [list(c) for c in crops], "batch_sizes": list(batch_sizes),
            "iterations": iterations, "warmup": warmup, "exports": exports, "results": rows, "notes": notes}

"""Running exported graphs: onnxruntime sessions (CPU, CUDA where available), parity measures,
and INT8 quantisation to explicit Q/DQ nodes with calibration volumes from the site's cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from appliance.export.onnx_export import IMAGE_INPUT, ExportError


def ort_providers(device: str = "cpu") -> list[str]:
    """onnxruntime execution providers for `device` (cpu | cuda); cuda needs onnxruntime-gpu."""
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("onnxruntime has no CUDA provider here (install onnxruntime-gpu instead of onnxruntime)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OrtRunner:
    """An onnxruntime session with a batch-at-a-time `run`."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no per-node placement chatter
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=ort_providers(device))
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load {Path(path).name}: {str(exc).splitlines()[0][:300]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return dict(zip(self.output_names, outputs))


def embedding_parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max absolute difference and per-row cosine similarity (min and mean) of two (N, D) arrays."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ExportError(f"exported output has shape {candidate.shape}, PyTorch's {reference.shape}")
    if not np.isfinite(candidate).all():
        return {"max_abs_diff": float("inf"), "cosine_min": float("nan"), "cosine_mean": float("nan"), "n": len(reference),
                "finite": False}
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = np.where(norms > 0, (reference * candidate).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)
    return {"max_abs_diff": float(np.abs(reference - candidate).max()), "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()), "n": int(len(reference)), "finite": True}


class _VolumeReader:
    """onnxruntime's CalibrationDataReader protocol over an iterable of (1, 1, Z, Y, X) volumes."""

    def __init__(self, volumes: Iterable[np.ndarray]):
        self._it = iter(volumes)

    def get_next(self) -> dict | None:
        volume = next(self._it, None)
        return None if volume is None else {IMAGE_INPUT: np.ascontiguousarray(volume, dtype=np.float32)}

    def rewind(self) -> None:  # part of the protocol; one pass is all the entropy/minmax methods take
        pass


def quantize_int8(fp32_onnx: Path, out: Path, calibration: Iterable[np.ndarray], method: str = "entropy") -> dict:
    """INT8 Q/DQ graph from the fp32 one: symmetric per-channel weights and symmetric activations
    (what TensorRT's explicit quantisation takes), activation ranges calibrated on `calibration`
    volumes. onnxruntime runs the result too, so its parity is measured on any machine."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ExportError(f"calibration method {method!r} is unknown; allowed: {', '.join(methods)}")
    volumes = list(calibration)
    if not volumes:
        raise ExportError("INT8 calibration needs cached volumes; none were found")
    out = Path(out)
    prepared = out.with_name(f".{out.stem}.pre.onnx")
    try:
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _VolumeReader(volumes), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=methods[method],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"INT8 quantisation failed: {str(exc).splitlines()[0][:300]}") from None
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in out.parent.glob("augmented_model*.onnx"):
            leftover.unlink(missing_ok=True)
    return {"method": method, "calibration_volumes": len(volumes), "format": "QDQ (symmetric int8)"}


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (the same 100+ MB graph in two layouts), else a copy."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

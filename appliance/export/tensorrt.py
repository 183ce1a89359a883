"""TensorRT engines of the image encoder (optional: the `tensorrt` extra and a CUDA GPU).

Precision comes from the network, not from builder flags: TensorRT 11 (what PyPI serves) removed
the FP16/INT8 builder flags and the INT8 calibrators. An FP16 engine is built as a *strongly typed*
network from an ONNX graph whose weights are fp16 (ImageEncoderForExport(dtype=float16)); an INT8
engine from the Q/DQ graph `quantize_int8` writes (calibrated on the site's own cache). Strongly
typed networks exist since TensorRT 9, so the same path serves TensorRT 10 and 11.

Buffers are torch CUDA tensors (no pycuda); the execution API is TensorRT 10+'s named-tensor one
(set_input_shape / set_tensor_address / execute_async_v3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.export.onnx_export import ExportError

MIN_TENSORRT_MAJOR = 10  # named-tensor execution API and strongly typed networks


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why): whether an engine can be built and run here, and the reason when not."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt is not installed (pip install 'rfm-appliance[tensorrt]' on a machine with an NVIDIA GPU)"
    except Exception as exc:  # a broken install (missing CUDA libraries) fails at import
        return False, f"tensorrt cannot be imported: {str(exc).splitlines()[0][:200]}"
    major = int(trt.__version__.split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        return False, f"tensorrt {trt.__version__} is too old (>= {MIN_TENSORRT_MAJOR} is needed)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    return True, f"tensorrt {trt.__version__} on {torch.cuda.get_device_name(0)}"


@dataclass
class EngineProfile:
    """One optimisation profile over the batch dimension of the (B, 1, Z, Y, X) input."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(f"batch profile must satisfy 1 <= min <= opt <= max, got "
                              f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")


def build_engine(onnx_path: Path, plan_path: Path, input_name: str, volume_shape_zyx: tuple[int, int, int],
                 profile: EngineProfile, workspace_gb: float = 4.0) -> dict:
    """Parse `onnx_path` into a strongly typed network, build and serialise the engine to `plan_path`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    z, y, x = volume_shape_zyx
    opt_profile.set_shape(input_name, (profile.min_batch, 1, z, y, x), (profile.opt_batch, 1, z, y, x),
                          (profile.max_batch, 1, z, y, x))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {Path(onnx_path).name} (see the TensorRT log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(f".{plan_path.name}.partial")
    with open(tmp, "wb") as handle:
        handle.write(memoryview(serialized))
    tmp.replace(plan_path)
    return {"tensorrt": trt.__version__, "strongly_typed": True, "profile": profile.__dict__,
            "workspace_gb": workspace_gb, "bytes": plan_path.stat().st_size}


class TensorRTRunner:
    """A deserialised engine with a batch-at-a-time `run` over numpy or torch inputs."""

    def __init__(self, plan_path: Path):
        import tensorrt as trt
        import torch

        self._torch = torch
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"{Path(plan_path).name} cannot be loaded (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                trt.int64: torch.int64, trt.bool: torch.bool}[self.engine.get_tensor_dtype(name)]

    def run_torch(self, **inputs):
        """Inputs as CUDA tensors (or arrays); outputs as CUDA tensors, synchronised."""
        torch = self._torch
        feeds = {}
        for name in self.input_names:
            value = inputs[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            feeds[name] = tensor.to("cuda", self._torch_dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(feeds[name].shape))
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ExportError("TensorRT execution failed")
        self.stream.synchronize()
        return outputs

    def run(self, **inputs) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() for k, v in self.run_torch(**inputs).items()}

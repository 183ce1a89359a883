"""A Triton Inference Server model repository for the exported encoder.

One folder per model with `config.pbtxt` and `1/model.onnx` (platform onnxruntime_onnx) or
`1/model.plan` (platform tensorrt_plan). The batch dimension is left out of `dims` because
`max_batch_size` > 0 (Triton adds it), and max_batch_size is the TensorRT profile's maximum.
The configs are Triton's own ModelConfig protobuf messages (tritonclient's model_config_pb2)
written in text format, so the repository is read back and validated against the same schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.export.onnx_export import ExportError, onnx_io

PLATFORM_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32",
                  "BOOL": "TYPE_BOOL"}


@dataclass
class TritonModel:
    name: str
    platform: str      # onnxruntime_onnx | tensorrt_plan
    source: Path       # the .onnx or .plan file
    io: dict           # onnx_io() of the graph (a plan is described by the ONNX graph it was built from)
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    gpu_only: bool = False  # a TensorRT plan runs on the GPU only; other models go where Triton places them


def _config(model: TritonModel):
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=model.name, platform=model.platform, max_batch_size=model.max_batch_size)
    for kind, values in (("input", model.io["inputs"]), ("output", model.io["outputs"])):
        for value in values:
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in value["shape"][1:]]  # batch left out
            getattr(config, kind).add(name=value["name"], data_type=pb.DataType.Value(ONNX_TO_TRITON[value["dtype"]]),
                                      dims=dims)
    if model.preferred_batch_sizes:
        config.dynamic_batching.preferred_batch_size.extend(model.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    if model.gpu_only:
        config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_GPU)
    return config


def write_triton_repository(repository: Path, models: list[TritonModel], link) -> list[Path]:
    """Write each model's folder; `link(src, dst)` places the graph file (hard link or copy)."""
    from google.protobuf import text_format

    written = []
    for model in models:
        if model.platform not in PLATFORM_FILES:
            raise ExportError(f"Triton platform {model.platform!r} is not supported")
        folder = Path(repository) / model.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(text_format.MessageToString(_config(model)))
        link(model.source, folder / "1" / PLATFORM_FILES[model.platform])
        written.append(folder)
    return written


def read_config(folder: Path):
    """config.pbtxt parsed as Triton's ModelConfig (a malformed file is an ExportError)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    path = Path(folder) / "config.pbtxt"
    try:
        return text_format.Parse(path.read_text(), pb.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ExportError(f"{folder.name}/config.pbtxt is not a valid Triton model config: {exc}") from None


def validate_triton_repository(repository: Path) -> list[str]:
    """What is wrong with the repository's layout (empty list: nothing). Checks every model folder:
    config.pbtxt parses as ModelConfig, its name is the folder's, version 1 holds the platform's
    file, max_batch_size > 0 and, for ONNX models, the inputs and outputs match the graph's names,
    types and non-batch dims."""
    from tritonclient.grpc import model_config_pb2 as pb

    problems = []
    folders = sorted(p for p in Path(repository).iterdir() if p.is_dir()) if Path(repository).is_dir() else []
    if not folders:
        return [f"{repository} holds no model folder"]
    for folder in folders:
        try:
            config = read_config(folder)
        except ExportError as exc:
            problems.append(str(exc))
            continue
        if config.name != folder.name:
            problems.append(f"{folder.name}: config name {config.name!r} differs from the folder name")
        expected = PLATFORM_FILES.get(config.platform)
        if expected is None:
            problems.append(f"{folder.name}: platform {config.platform!r} is not onnxruntime_onnx or tensorrt_plan")
            continue
        graph = folder / "1" / expected
        if not graph.is_file() or graph.stat().st_size == 0:
            problems.append(f"{folder.name}: 1/{expected} is missing")
            continue
        if config.max_batch_size <= 0:
            problems.append(f"{folder.name}: max_batch_size must be > 0 (the batch dimension is implicit)")
        if config.platform == "onnxruntime_onnx":
            io = onnx_io(graph)
            for kind, declared in (("inputs", config.input), ("outputs", config.output)):
                graph_values = {v["name"]: v for v in io[kind]}
                if {d.name for d in declared} != set(graph_values):
                    problems.append(f"{folder.name}: {kind} {sorted(d.name for d in declared)} differ from the graph's "
                                    f"{sorted(graph_values)}")
                    continue
                for d in declared:
                    value = graph_values[d.name]
                    dtype = pb.DataType.Name(d.data_type)
                    if ONNX_TO_TRITON.get(value["dtype"]) != dtype:
                        problems.append(f"{folder.name}: {d.name} is {dtype}, the graph's is {value['dtype']}")
                    graph_dims = [x if isinstance(x, int) and x > 0 else -1 for x in value["shape"][1:]]
                    if list(d.dims) != graph_dims:
                        problems.append(f"{folder.name}: {d.name} dims {list(d.dims)} (batch left out) differ from "
                                        f"the graph's {graph_dims}")
    return problems

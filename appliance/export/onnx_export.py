"""ONNX graphs of a trained GreenRFM: the image encoder (embedding + shared-classifier logits) and
the text encoder (prompt embedding), with a dynamic batch dimension.

torch's torch.export-based exporter (`dynamo=True`, the default since torch 2.9) is tried first;
when it fails, the TorchScript exporter (opset 17) is the tested fallback. Every graph is checked
with onnx's full checker (strict shape inference) before it is used.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from appliance.errors import ApplianceError

EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17
IMAGE_INPUT = "volume"
IMAGE_OUTPUTS = ("image_embedding", "logits")
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "text_embedding"
# torch.export needs a finite range for a dynamic dimension; TensorRT profiles and Triton's
# max_batch_size narrow it further.
MAX_EXPORT_BATCH = 1024


class ExportError(ApplianceError):
    """The export cannot be produced or does not compute what the PyTorch model computes."""


class ImageEncoderForExport(nn.Module):
    """volume (B, 1, Z, Y, X) float32 -> image_embedding (B, E) and logits (B, C), float32.

    `dtype=torch.float16` holds the weights in half precision and casts at the edges, so the graph's
    inputs and outputs stay float32: the fp16 graph a strongly typed TensorRT network is built from.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vision = copy.deepcopy(model.vision).to(dtype)
        self.image_proj = copy.deepcopy(model.image_proj).to(dtype)
        self.classifier = copy.deepcopy(model.classifier).to(dtype)
        self.dtype = dtype
        self.eval()

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.image_proj(self.vision(volume.to(self.dtype)))
        return embedding.float(), self.classifier(embedding).float()


class TextEncoderForExport(nn.Module):
    """input_ids, attention_mask (B, T) int64 -> text_embedding (B, E) float32 (BERT [CLS] -> projection)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text = copy.deepcopy(model.text)
        self.text_proj = copy.deepcopy(model.text_proj)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(hidden[:, 0])


@dataclass
class OnnxGraph:
    path: Path
    exporter: str            # the exporter that produced it: dynamo | torchscript
    opset: int
    fallback_reason: str | None = None  # why the torch.export-based exporter was not used


def export_image_encoder(model: nn.Module, crop_xyz: tuple[int, int, int], path: Path, *, exporter: str = "auto",
                         dtype: torch.dtype = torch.float32) -> OnnxGraph:
    """The image encoder for volumes of the training crop (x, y, z) -> input (B, 1, z, y, x)."""
    x, y, z = crop_xyz
    example = (torch.zeros(2, 1, z, y, x),)
    return _export(ImageEncoderForExport(model, dtype), example, path, exporter=exporter,
                   input_names=[IMAGE_INPUT], output_names=list(IMAGE_OUTPUTS),
                   dynamic={IMAGE_INPUT: {0: "batch"}}, dynamic_outputs={o: {0: "batch"} for o in IMAGE_OUTPUTS})


def export_text_encoder(model: nn.Module, max_tokens: int, path: Path, *, exporter: str = "auto") -> OnnxGraph:
    """The text encoder with dynamic batch and sequence length (up to the training's max tokens)."""
    ids = torch.ones(2, max_tokens, dtype=torch.long)
    mask = torch.ones(2, max_tokens, dtype=torch.long)
    mask[1, max_tokens // 2:] = 0  # trace with padding present
    axes = {0: "batch", 1: "tokens"}
    return _export(TextEncoderForExport(model), (ids, mask), path, exporter=exporter,
                   input_names=list(TEXT_INPUTS), output_names=[TEXT_OUTPUT],
                   dynamic={name: axes for name in TEXT_INPUTS}, dynamic_outputs={TEXT_OUTPUT: {0: "batch"}},
                   max_sizes={"tokens": max_tokens})


def _export(module: nn.Module, example: tuple, path: Path, *, exporter: str, input_names: list[str],
            output_names: list[str], dynamic: dict, dynamic_outputs: dict, max_sizes: dict | None = None) -> OnnxGraph:
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is unknown; allowed: {', '.join(EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fallback_reason = None
    if exporter in ("auto", "dynamo"):
        try:
            opset = _export_dynamo(module, example, path, input_names, output_names, dynamic, max_sizes or {})
            check_onnx(path)
            return OnnxGraph(path, "dynamo", opset)
        except ExportError:
            raise
        except Exception as exc:  # the exporter's own failure: any exception type
            if exporter == "dynamo":
                raise ExportError(f"torch.export-based ONNX export of {path.name} failed: {_first_line(exc)}") from exc
            fallback_reason = f"{type(exc).__name__}: {_first_line(exc)}"
            path.unlink(missing_ok=True)
    try:
        _export_torchscript(module, example, path, input_names, output_names, {**dynamic, **dynamic_outputs})
    except Exception as exc:
        raise ExportError(f"ONNX export of {path.name} failed with both exporters: {_first_line(exc)}") from exc
    check_onnx(path)
    return OnnxGraph(path, "torchscript", TORCHSCRIPT_OPSET, fallback_reason)


def _export_dynamo(module, example, path, input_names, output_names, dynamic, max_sizes) -> int:
    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str) -> torch.export.Dim:
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=1, max=max_sizes.get(name, MAX_EXPORT_BATCH))
        return dims[name]

    shapes = {name: {axis: dim(label) for axis, label in axes.items()} for name, axes in dynamic.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, dynamo=True, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=shapes, optimize=True, verbose=False, report=False)
    if program is None:
        raise RuntimeError("the exporter returned no program")
    # one self-contained file (< 2 GB for every GreenRFM size): what Triton and vendor runtimes load
    program.save(str(path), external_data=False)
    proto = program.model_proto
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _export_torchscript(module, example, path, input_names, output_names, dynamic_axes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    module.eval()  # the TorchScript exporter restores the module's mode on exit; keep it in eval


def check_onnx(path: Path) -> None:
    """onnx's full checker (strict shape inference), then drop what torch writes about the
    machine it ran on (source paths, stack traces in metadata and doc strings): the file is
    shipped to other systems."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path.name} fails onnx's checker: {_first_line(exc)}") from None
    model = onnx.load(str(path))
    changed = bool(model.metadata_props) or bool(model.doc_string) or bool(model.graph.doc_string)
    del model.metadata_props[:]
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        if node.metadata_props or node.doc_string:
            changed = True
            del node.metadata_props[:]
            node.doc_string = ""
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.metadata_props:
            changed = True
            del value.metadata_props[:]
    if changed:
        tmp = path.with_name(f".{path.name}.partial")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)


def onnx_io(path: Path) -> dict:
    """{"inputs": [...], "outputs": [...]} with name, element type name and shape (str for a symbolic dim)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [{"name": v.name, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    initializers = {i.name for i in model.graph.initializer}
    return {"inputs": describe([i for i in model.graph.input if i.name not in initializers]),
            "outputs": describe(model.graph.output)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__

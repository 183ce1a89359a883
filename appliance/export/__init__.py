"""The export stage: ONNX graphs of the trained encoder, their parity with PyTorch on the site's own
volumes, TensorRT engines where a GPU is present, a Triton model repository and a model card."""

from appliance.export.onnx_export import ExportError, export_image_encoder, export_text_encoder
from appliance.export.stage import ExportResult, export_run

__all__ = ["ExportError", "ExportResult", "export_image_encoder", "export_text_encoder", "export_run"]

"""ONNX export of a model's step with its state as explicit inputs and outputs.

``python -m capsule_ros.export --config FILE | --path CHECKPOINT --out DIR`` (``__main__.py``);
the graph (``step.py``), the directory format and its checks (``manifest.py``), and the export
itself (``onnx_export.py``, which needs torch.onnx, onnx and onnxscript; the runtime needs none
of them). The ONNX Runtime backend that runs an export is ``runtime/onnx_backend.py``.
"""
from .manifest import EXECUTION, NOT_EXPORTABLE, Export, ExportMismatch, read_export

__all__ = ["EXECUTION", "NOT_EXPORTABLE", "Export", "ExportMismatch", "read_export"]

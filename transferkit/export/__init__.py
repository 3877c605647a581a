"""Export to TorchScript (or ONNX), verified against the eager model, and load exported files for prediction."""

from transferkit.export.from_checkpoint import example_batch, export_checkpoint, model_from_checkpoint
from transferkit.export.inputs import InputPipeline
from transferkit.export.metadata import FORMAT, validate_metadata
from transferkit.export.onnx import export_onnx, read_onnx_metadata
from transferkit.export.predictor import Prediction, Predictor, load, read_metadata
from transferkit.export.torchscript import (
    ExportReport,
    export_torchscript,
    load_scripted,
    update_metadata,
)

__all__ = ["FORMAT", "ExportReport", "InputPipeline", "Prediction", "Predictor", "example_batch", "export_checkpoint",
           "export_onnx", "export_torchscript", "load", "load_scripted", "model_from_checkpoint", "read_metadata",
           "read_onnx_metadata", "update_metadata", "validate_metadata"]

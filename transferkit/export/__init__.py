"""Export to TorchScript and load exported files for prediction."""

from transferkit.export.predictor import Prediction, Predictor, load
from transferkit.export.torchscript import ExportReport, export_torchscript, load_scripted, read_metadata

__all__ = ["ExportReport", "Prediction", "Predictor", "export_torchscript", "load", "load_scripted", "read_metadata"]

"""transferkit: transfer learning on torchvision, timm and torchaudio backbones.

Example:
    >>> import transferkit
    >>> result = transferkit.finetune("tv:resnet18", data="images/", policy="feature_extraction",
    ...                               export="model.pt")  # doctest: +SKIP
    >>> transferkit.load("model.pt").predict("cat.jpg")[0].label  # doctest: +SKIP
"""

from transferkit._version import __version__

from transferkit.api import FinetuneResult, finetune, linear_probe, lr_find, resume
from transferkit.backbones import Backbone, Block, InputSpec, get_backbone, list_backbones
from transferkit.errors import (
    BackboneError,
    ConfigError,
    CorruptFileError,
    DataError,
    ExportError,
    OutputError,
    PolicyError,
    TrainingError,
    TransferkitError,
    UnknownBackboneError,
    WeightsError,
)
from transferkit.export import Prediction, Predictor, export_torchscript, load
from transferkit.heads import FeatureNorm, build_head
from transferkit.config import FinetuneConfig, load_config
from transferkit.model import ImagePreprocess, TransferModel, build_model
from transferkit.data.sampling import seed_everything
from transferkit.decisions import Decisions, decide, plan
from transferkit.facts import Facts, look
from transferkit.run import Run, build
from transferkit.policies import Policy, apply_policy, set_train_mode, trainable_parameter_names

__all__ = [
    "Backbone", "BackboneError", "Block", "ConfigError", "CorruptFileError", "OutputError", "DataError", "ExportError", "FeatureNorm", "FinetuneResult",
    "InputSpec", "Policy", "PolicyError", "Prediction", "Predictor", "TrainingError", "TransferModel",
    "TransferkitError", "UnknownBackboneError", "WeightsError", "ImagePreprocess", "apply_policy", "build_head",
    "build_model", "export_torchscript", "finetune", "get_backbone", "list_backbones", "load", "seed_everything",
    "set_train_mode", "trainable_parameter_names", "linear_probe", "lr_find", "resume", "FinetuneConfig",
    "load_config", "Decisions", "Facts", "Run", "build", "decide", "look", "plan",
]

"""transferkit: transfer learning on torchvision, timm and torchaudio backbones.

Example:
    >>> import transferkit
    >>> result = transferkit.finetune("tv:resnet18", data="images/", policy="feature_extraction",
    ...                               export="model.pt")  # doctest: +SKIP
    >>> transferkit.load("model.pt").predict("cat.jpg")[0].label  # doctest: +SKIP

``import transferkit`` loads nothing heavy: each public name imports its module (and torch)
on first use, so the command line answers ``--help`` without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transferkit._version import __version__

# public name -> the module that defines it (imported on first access, PEP 562)
_EXPORTS = {
    "FinetuneResult": "transferkit.api", "finetune": "transferkit.api", "linear_probe": "transferkit.api",
    "lr_find": "transferkit.api", "resume": "transferkit.api",
    "Backbone": "transferkit.backbones", "Block": "transferkit.backbones", "InputSpec": "transferkit.backbones",
    "get_backbone": "transferkit.backbones", "list_backbones": "transferkit.backbones",
    "BackboneError": "transferkit.errors", "ConfigError": "transferkit.errors",
    "CorruptFileError": "transferkit.errors", "DataError": "transferkit.errors", "EngineError": "transferkit.errors",
    "ExportError": "transferkit.errors",
    "OutputError": "transferkit.errors", "PolicyError": "transferkit.errors", "TrainingError": "transferkit.errors",
    "TransferkitError": "transferkit.errors", "TransferkitWarning": "transferkit.errors",
    "UnknownBackboneError": "transferkit.errors",
    "WeightsError": "transferkit.errors", "TrainingInterrupted": "transferkit._signals",
    "DistributedError": "transferkit.train.distributed",
    "Prediction": "transferkit.export", "Predictor": "transferkit.export",
    "export_torchscript": "transferkit.export", "load": "transferkit.export",
    "Evaluation": "transferkit.evaluation", "TargetEvaluation": "transferkit.evaluation",
    "evaluate": "transferkit.evaluation",
    "FeatureNorm": "transferkit.heads", "TargetScale": "transferkit.heads", "build_head": "transferkit.heads",
    "FinetuneConfig": "transferkit.config", "load_config": "transferkit.config",
    "ImagePreprocess": "transferkit.model", "TransferModel": "transferkit.model", "build_model": "transferkit.model",
    "Decisions": "transferkit.decisions", "decide": "transferkit.decisions", "plan": "transferkit.decisions",
    "Facts": "transferkit.facts", "look": "transferkit.facts", "Run": "transferkit.run", "build": "transferkit.run",
    "seed_everything": "transferkit.data.sampling",
    "Policy": "transferkit.policies", "apply_policy": "transferkit.policies",
    "set_train_mode": "transferkit.policies", "trainable_parameter_names": "transferkit.policies",
}

if TYPE_CHECKING:  # the same names, spelled out for type checkers and the API docs
    from transferkit._signals import TrainingInterrupted
    from transferkit.api import FinetuneResult, finetune, linear_probe, lr_find, resume
    from transferkit.backbones import Backbone, Block, InputSpec, get_backbone, list_backbones
    from transferkit.config import FinetuneConfig, load_config
    from transferkit.errors import (
        BackboneError,
        ConfigError,
        CorruptFileError,
        DataError,
        EngineError,
        ExportError,
        OutputError,
        PolicyError,
        TrainingError,
        TransferkitError,
        TransferkitWarning,
        UnknownBackboneError,
        WeightsError,
    )
    from transferkit.evaluation import Evaluation, TargetEvaluation, evaluate
    from transferkit.export import Prediction, Predictor, export_torchscript, load
    from transferkit.heads import FeatureNorm, TargetScale, build_head
    from transferkit.model import ImagePreprocess, TransferModel, build_model
    from transferkit.data.sampling import seed_everything
    from transferkit.decisions import Decisions, decide, plan
    from transferkit.facts import Facts, look
    from transferkit.run import Run, build
    from transferkit.train.distributed import DistributedError
    from transferkit.policies import Policy, apply_policy, set_train_mode, trainable_parameter_names

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a subpackage or module (transferkit.export.read_metadata after `import transferkit`)
        if name.isidentifier() and not name.startswith("__"):
            try:
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":  # a dependency of that module is missing: say so
                    raise
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


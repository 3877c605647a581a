"""Training: plain functions for the loop, feature caching, optimisation, checkpoints,
metrics, reporting and distributed training. See ``docs/training.md``."""

from transferkit.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from transferkit.train.device import resolve_device
from transferkit.train.distributed import DistInfo, dist_info, exit_cleanly, init_distributed, wrap_ddp
from transferkit.train.features import (
    FeatureStore,
    cache_key,
    compute_features,
    data_fingerprint,
    extract_features,
    feature_loader,
    load_cached,
)
from transferkit.train.loaders import EpochSampler, SeededItems, make_loader
from transferkit.train.loop import Loop, TrainState, evaluate, fit, train_one_epoch
from transferkit.train.lr_find import LRFindResult, lr_range_test, suggest_lr
from transferkit.train.metrics import classification_metrics, task_metrics, top_k_accuracy
from transferkit.train.optim import LRSchedule, make_optimizer, make_scheduler
from transferkit.train.probe import ProbeResult, fit_logistic_probe
from transferkit.train.speed import SpeedConfig, set_deterministic
from transferkit.heads import TASKS, output_activation
from transferkit.train.tasks import make_loss

__all__ = [
    "TASKS", "DistInfo", "EpochSampler", "FeatureStore", "LRFindResult", "LRSchedule", "ProbeResult", "SeededItems",
    "SpeedConfig", "TrainState", "cache_key", "classification_metrics", "compute_features", "data_fingerprint",
    "Loop", "dist_info", "evaluate", "exit_cleanly", "extract_features", "feature_loader", "fit", "fit_logistic_probe",
    "init_distributed", "load_cached", "load_checkpoint", "lr_range_test", "make_loader", "make_loss",
    "make_optimizer", "make_scheduler", "output_activation", "resolve_device", "rng_state", "save_checkpoint",
    "set_deterministic", "set_rng_state", "suggest_lr", "task_metrics", "top_k_accuracy", "train_one_epoch",
    "wrap_ddp",
]

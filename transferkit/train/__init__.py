"""Training: plain functions for the loop, feature caching, optimisation and checkpoints."""

from transferkit.train.checkpoint import load_checkpoint, save_checkpoint
from transferkit.train.device import resolve_device
from transferkit.train.features import extract_features, feature_loader
from transferkit.train.loop import evaluate, fit, train_one_epoch
from transferkit.train.optim import make_optimizer, make_scheduler

__all__ = ["evaluate", "extract_features", "feature_loader", "fit", "load_checkpoint", "make_optimizer",
           "make_scheduler", "resolve_device", "save_checkpoint", "train_one_epoch"]

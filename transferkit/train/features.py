"""Feature caching: a frozen backbone runs once per image, not once per epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from transferkit.model import TransferModel


@torch.no_grad()
def extract_features(model: TransferModel, loader: DataLoader, device: torch.device,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model.features`` over ``loader`` in eval mode; return CPU ``(features, labels)``."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            f = model.features(x.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y))
            if progress is not None:
                progress.update(len(y))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def feature_loader(features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, shuffle: bool,
                   seed: int = 0) -> DataLoader:
    """A loader over cached features (no workers needed: the data are in memory)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(features, labels), batch_size=batch_size, shuffle=shuffle, generator=g)

"""BatchNorm layers (and InstanceNorm layers that track running statistics) whose
statistics stay frozen whatever mode the model is put in.

A policy freezes the BatchNorm statistics of the blocks that do not train (and of every block
under ``bn="affine"`` or ``"frozen"``). Eval mode alone would keep them only while transferkit
sets the modes: a user who takes ``result.model`` into their own loop and calls
``model.train()`` would update them. As timm's ``freeze()`` and torchvision's
``FrozenBatchNorm2d`` do, such a layer is swapped for a frozen kind, here in place: the
module's class becomes a subclass of its own class (``BatchNorm2d`` ->
`FrozenBatchNorm2d`) whose ``train()`` keeps it in eval mode. Everything else stays as it
was: the same parameter and buffer objects (an optimizer, an L2-SP anchor or a DDP wrapper
built on them still holds them), the same state-dict keys (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``: checkpoints load either way),
gamma/beta still parameters (``bn="affine"`` trains them), the same forward (its class's, so
timm's ``BatchNormAct2d`` keeps its activation), and TorchScript scripts it as before.
`thaw_batchnorm` swaps the original class back when a later epoch unfreezes the block.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm2d(3)
    >>> freeze_batchnorm(bn)
    True
    >>> type(bn).__name__, bn.train().training
    ('FrozenBatchNorm2d', False)
    >>> thaw_batchnorm(bn), type(bn).__name__
    (True, 'BatchNorm2d')
"""

from __future__ import annotations

import sys

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from transferkit.data.fingerprint import module_fingerprint


class FrozenStatistics:
    """Mixin placed before a BatchNorm class: the layer stays in eval mode (normalises with its
    running statistics and never updates them) even when ``train()`` asks for training mode."""

    def train(self, mode: bool = True):  # noqa: ARG002  the mode asked for is what this class ignores
        return super().train(False)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: int):
        """Pickled (``torch.save(model)``, ``copy.deepcopy``) as its original class and state, so
        that another process, where the frozen kind of a class from another library (timm's
        ``BatchNormAct2d``) has not been made yet, makes it again when it loads the layer."""
        return _frozen_instance, (original_class(type(self)),), self.__getstate__()


class FrozenBatchNorm1d(FrozenStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with frozen statistics (see the module docstring)."""


class FrozenBatchNorm2d(FrozenStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with frozen statistics (see the module docstring)."""


class FrozenBatchNorm3d(FrozenStatistics, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with frozen statistics (see the module docstring)."""


_FROZEN: dict[type, type] = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d,
                             nn.BatchNorm3d: FrozenBatchNorm3d}


def _frozen_instance(cls: type) -> nn.Module:
    """An empty layer of the frozen kind of ``cls`` (pickle fills in its state)."""
    frozen = frozen_class(cls)
    return frozen.__new__(frozen)


def original_class(cls: type) -> type:
    """The BatchNorm class that the frozen kind ``cls`` was made from (``cls`` itself if it is not one)."""
    return next(c for c in cls.__mro__ if not issubclass(c, FrozenStatistics))


def frozen_class(cls: type) -> type:
    """The frozen-statistics subclass of the BatchNorm class ``cls`` (made once per class, and
    kept as an attribute of this module; a pickled layer names its original class, see
    `FrozenStatistics.__reduce_ex__`)."""
    if cls not in _FROZEN:
        name = f"Frozen{cls.__name__}"
        while hasattr(sys.modules[__name__], name):  # another library's class of the same name
            name += "_"
        frozen = type(name, (FrozenStatistics, cls), {"__module__": __name__, "__qualname__": name,
                                                       "__doc__": f"{cls.__qualname__} with frozen statistics."})
        setattr(sys.modules[__name__], name, frozen)
        _FROZEN[cls] = frozen
    return _FROZEN[cls]


def tracks_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer that keeps running statistics: BatchNorm of
    any kind (SyncBatchNorm, timm's ``BatchNormAct2d``) or InstanceNorm with
    ``track_running_stats=True``. These are the layers whose statistics a policy freezes."""
    return isinstance(module, _NormBase) and bool(module.track_running_stats)


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer swapped to frozen statistics."""
    return isinstance(module, FrozenStatistics)


def freeze_batchnorm(module: nn.Module) -> bool:
    """Swap ``module`` (a normalisation layer that tracks running statistics,
    `tracks_statistics`) to its frozen kind, in place, and put it in eval mode; ``True`` if it
    is frozen now. A layer without running statistics (``track_running_stats=False``) has
    none to freeze and is left alone."""
    if is_frozen_batchnorm(module):
        return True
    if not tracks_statistics(module):
        return False
    module.__class__ = frozen_class(type(module))
    module.eval()
    return True


def thaw_batchnorm(module: nn.Module) -> bool:
    """Swap a frozen BatchNorm layer back to its original class, in place (its mode is left
    as it is: eval, until the caller sets the modes); ``True`` if it was frozen."""
    if not is_frozen_batchnorm(module):
        return False
    module.__class__ = original_class(type(module))
    return True


def eval_fingerprint(module: nn.Module) -> str:
    """`module_fingerprint` of ``module`` as it computes in eval mode, where a layer with frozen
    statistics computes what the BatchNorm layer it was computes (the same forward and state;
    it only ignores ``train()``): such layers count as their original class. A trunk keeps its
    fingerprint when a policy freezes its statistics, so what was prepared for its feature
    pass before the policy applied (an ONNX export, a timing) serves the pass after. The
    layers are swapped back for the moment of hashing, in place: no other thread may use
    ``module`` meanwhile.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        >>> before = eval_fingerprint(m)
        >>> freeze_batchnorm(m[1]), eval_fingerprint(m) == before, type(m[1]).__name__
        (True, True, 'FrozenBatchNorm2d')
    """
    ours = set(_FROZEN.values())  # not a subclass of them, whose own forward may compute otherwise
    frozen = [(m, type(m)) for m in module.modules() if type(m) in ours]
    try:
        for m, _ in frozen:
            thaw_batchnorm(m)
        return module_fingerprint(module)
    finally:
        for m, cls in frozen:
            m.__class__ = cls

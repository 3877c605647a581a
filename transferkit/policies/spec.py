"""The [`Policy`][transferkit.Policy] record and its short string form.

A policy names *which backbone blocks train at which epoch*, how BatchNorm behaves,
how the learning rate varies with depth, and the optional L2-SP and LoRA regularisers.
It acts on the backbone's named blocks (``stem, layer1 .. layer4`` for a ResNet,
``embed, blocks.0 .. blocks.11, norm`` for a ViT), so it means the same thing on every
architecture. Epochs count from 0: ``milestones=(2,)`` unfreezes a block after two
full epochs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transferkit.backbones._base import Backbone
from transferkit.errors import PolicyError, TransferkitFutureWarning, suggest, warn
from transferkit.policies.structure import has_batchnorm as trunk_has_batchnorm

BN_MODES = ("train", "affine", "frozen")
DEFAULT_LORA_TARGETS = r"attn|attention|mlp"
_FEATURE_EXTRACTION = ("feature_extraction", "frozen", "linear_probe", "head", "none")
_FULL = ("full", "finetune", "all")
FINE_TUNE_DISCRIMINATIVE = 0.01  # fastai's fine_tune: lr_mult=100, i.e. slice(lr / 100, lr)
# after the frozen phase the base lr is lr * this (fastai halves it; measured here, docs/policies.md)
FINE_TUNE_UNFROZEN_LR = 0.1
# passes of the head over the cached features in fine_tune's frozen phase: 0 = as many as
# the run has epochs (the frozen phase is then the feature-extraction run of the same length,
# its best pass kept), so the backbone starts training under a trained head
FINE_TUNE_HEAD_PASSES = 0


def _plain(v: Any) -> Any:
    """A numpy scalar (``np.float32(0.3)``, ``np.int64(2)``, ``np.True_``) as the Python value it
    is (a float32 by its shortest spelling: 0.3, not 0.30000001192092896); anything else as it is."""
    dtype = getattr(v, "dtype", None)
    if type(v).__module__ != "numpy" or dtype is None or getattr(v, "ndim", None) != 0:
        return v
    return float(str(v)) if dtype.kind == "f" and dtype.itemsize < 8 else v.item()


def run_epochs(epochs: Any) -> int:
    """``epochs`` as the number of epochs of a run: a whole number >= 1 (a numpy integer too);
    PolicyError otherwise (a run of 0 epochs has no schedule to read)."""
    n = _plain(epochs)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PolicyError(f"epochs (the run's number of epochs) must be a whole number >= 1, got {epochs!r}.")
    return n


def _number(v: object) -> bool:
    """An int or a float, not a bool (``True`` is an int to Python, not a rate)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)

@dataclass(frozen=True, repr=False)
class Policy:
    """A fine-tuning policy (all fields optional; the default is feature extraction).

    Which blocks train:
        ``unfreeze``: ``"none"`` (only the head trains), ``"all"``, an int N (the last N
        blocks) or a tuple of block names. ``unfreeze_from``: a block name; it and every
        later block train. Gradual unfreezing (ULMFiT): ``every=k`` adds one more block
        (from the top) every k epochs, or ``milestones=(e1, e2, ..)`` adds one at each of
        those epochs, starting from ``unfreeze`` blocks (an int, default 0) and never
        beyond ``max_blocks``.
    BatchNorm: ``bn`` is ``"train"``, ``"affine"`` or ``"frozen"`` (see ``docs/policies.md``).
    Learning rates: ``discriminative=r`` scales block i of B by ``r ** ((B - i) / B)``
        (the stem gets ``lr * r``, the head ``lr``: fastai's ``slice(lr * r, lr)``);
        ``layer_decay=d`` scales it by ``d ** (B - i)`` (timm's ``layer_decay``).
        Norm, bias and token/position-embedding parameters get no weight decay unless
        ``decay_norm_bias``.
    L2-SP: ``l2sp=alpha`` adds ``alpha/2 ||w - w0||^2`` over the trainable pretrained weights
        and ``l2sp_beta/2 ||w||^2`` over the new weights (head, LoRA factors); weight decay
        is then off.
    fastai's ``fine_tune``: ``frozen_epochs=k`` keeps the whole backbone frozen (BatchNorm in
        eval mode) for epochs ``0 .. k-1``; from epoch k the policy's blocks train. The run
        then has two phases, each with its own learning-rate schedule (`lr_phases`): the head
        alone at the base lr, then the policy's blocks at ``lr * unfrozen_lr`` (default 0.1).
        ``head_passes=n``: on cached features each frozen epoch makes n passes over them, the
        head validated after each and its best pass kept (the backbone runs once; the head
        trains as feature extraction would, in seconds), so the backbone starts training under
        a trained head (linear probing, then fine-tuning); ``0`` (``passes=epochs``): as many
        passes as the run has epochs. ``"fine_tune:frozen=k"`` is ``Policy(unfreeze="all",
        frozen_epochs=k, discriminative=0.01, head_passes=0)``.
    LoRA: ``lora=r`` adds rank-r factors to the linear layers whose names match the regular
        expression ``lora_targets``; only they (and the head, and blocks named by
        ``unfreeze``) train. ``lora_alpha`` defaults to r (scale 1).

    Example:
        >>> Policy.parse("unfreeze:last=2,bn=affine")
        Policy(unfreeze=2, bn='affine')
        >>> str(Policy(every=2, layer_decay=0.7))
        'gradual:every=2,layer_decay=0.7'
        >>> Policy.parse("fine_tune")
        Policy(unfreeze='all', discriminative=0.01, frozen_epochs=1, head_passes=0)
    """

    unfreeze: str | int | tuple[str, ...] = "none"
    unfreeze_from: str | None = None
    every: int | None = None
    milestones: tuple[int, ...] = ()
    max_blocks: int | None = None
    bn: str = "train"
    discriminative: float | None = None
    layer_decay: float | None = None
    decay_norm_bias: bool = False
    l2sp: float | None = None
    l2sp_beta: float = 0.01
    lora: int | None = None
    lora_alpha: float | None = None
    lora_targets: str = DEFAULT_LORA_TARGETS
    frozen_epochs: int = 0
    unfrozen_lr: float = FINE_TUNE_UNFROZEN_LR
    head_passes: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy scalars (a sweep over np.linspace) as the numbers they are
            v = getattr(self, f.name)
            plain = type(v)(_plain(x) for x in v) if isinstance(v, (list, tuple)) else _plain(v)
            if plain is not v:
                object.__setattr__(self, f.name, plain)
        if isinstance(self.unfreeze, list):
            object.__setattr__(self, "unfreeze", tuple(self.unfreeze))
        if self.unfreeze == 0 and not isinstance(self.unfreeze, bool):  # no block: one spelling
            object.__setattr__(self, "unfreeze", "none")
        if isinstance(self.milestones, (list, int)):
            object.__setattr__(self, "milestones", tuple(self.milestones) if isinstance(self.milestones, list)
                               else (self.milestones,))
        if self.bn not in BN_MODES:
            raise PolicyError(f"Unknown BatchNorm mode bn={self.bn!r}. Valid: 'train' (statistics and gamma/beta "
                              "train), 'affine' (statistics frozen, gamma/beta train), 'frozen' (nothing trains).")
        self._check_unfreeze()
        self._check_gradual()
        self._check_rates()
        self._check_lora()
        self._check_frozen_epochs()

    def _check_frozen_epochs(self) -> None:
        k = self.frozen_epochs
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise PolicyError(f"Policy.frozen_epochs (epochs with the whole backbone frozen) must be an integer >= 0, "
                              f"got {k!r}.")
        if k and (self.is_gradual or self.lora is not None):
            raise PolicyError("frozen_epochs (fine_tune's frozen=k) combines with unfreezing blocks (full, last=, "
                              "blocks=, from=), not with gradual unfreezing (whose start=0 and milestones already "
                              "freeze the first epochs) nor with LoRA.")
        u = self.unfrozen_lr
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 10:
            raise PolicyError(f"Policy.unfrozen_lr (the lr after the frozen phase, as a multiple of the base lr) must "
                              f"be a number in (0, 10], got {u!r}.")
        if u != FINE_TUNE_UNFROZEN_LR and not k:
            raise PolicyError(f"unfrozen_lr={u} sets the lr after a frozen phase; this policy has none (add frozen=k, "
                              "e.g. 'fine_tune:frozen=1,unfrozen_lr=0.1').")
        n = self.head_passes
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PolicyError(f"Policy.head_passes (passes of the head over cached features per frozen epoch) must be "
                              f"an integer >= 1, or 0 for as many as the run's epochs, got {n!r}.")
        if n != 1 and not k:
            raise PolicyError(f"passes={n or 'epochs'} sets the head's passes in a frozen phase; this policy has none "
                              "(add frozen=k, e.g. 'unfreeze:last=2,frozen=1,passes=10').")
        if k and self.unfreeze == "none" and self.unfreeze_from is None:
            raise PolicyError(f"frozen_epochs={k} needs a policy that unfreezes blocks after the frozen epochs "
                              "(e.g. 'fine_tune:frozen=1', 'unfreeze:last=2,frozen=1'); this one never trains the "
                              "backbone.")

    def _check_unfreeze(self) -> None:
        u = self.unfreeze
        if isinstance(u, str) and u not in ("none", "all"):
            raise PolicyError(f"Policy.unfreeze must be 'none', 'all', an int or a tuple of block names, got {u!r}.")
        if isinstance(u, bool) or (isinstance(u, int) and u < 0):
            raise PolicyError(f"Policy.unfreeze=N needs an integer N >= 0, got {u!r}.")
        if isinstance(u, tuple) and (not u or not all(isinstance(b, str) and b for b in u)):
            raise PolicyError(f"Policy.unfreeze as block names needs a non-empty tuple of names, got {u!r}.")
        if isinstance(u, tuple) and len(set(u)) < len(u):
            twice = sorted({b for b in u if u.count(b) > 1})
            raise PolicyError(f"Policy.unfreeze names {twice} twice; name each block once.")
        if not isinstance(u, (str, int, tuple)):
            raise PolicyError(f"Policy.unfreeze must be 'none', 'all', an int or a tuple of block names, got {u!r}.")
        if self.unfreeze_from is not None:
            if not isinstance(self.unfreeze_from, str) or not self.unfreeze_from:
                raise PolicyError(f"Policy.unfreeze_from must be a block name, got {self.unfreeze_from!r}.")
            if u != "none":
                raise PolicyError(f"Give either unfreeze={u!r} or unfreeze_from={self.unfreeze_from!r}, not both.")

    def _check_gradual(self) -> None:
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1):
            raise PolicyError(f"Policy.every (gradual unfreezing) must be an integer >= 1, got {self.every!r}.")
        ms = self.milestones
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in ms) or list(ms) != sorted(set(ms)):
            raise PolicyError(f"Policy.milestones must be strictly increasing epochs >= 0, got {ms!r}.")
        if self.every is not None and ms:
            raise PolicyError("Gradual unfreezing takes either every=k or milestones=(..), not both.")
        if self.is_gradual:
            if not (self.unfreeze == "none" or isinstance(self.unfreeze, int)) or self.unfreeze_from is not None:
                raise PolicyError("Gradual unfreezing starts from a number of top blocks (unfreeze=N, default 0); "
                                  f"got unfreeze={self.unfreeze!r}, unfreeze_from={self.unfreeze_from!r}.")
        if self.max_blocks is not None:
            if not self.is_gradual:
                raise PolicyError("Policy.max_blocks only applies to gradual unfreezing (every=k or milestones).")
            m = self.max_blocks
            if isinstance(m, bool) or not isinstance(m, int) or m <= self.start:
                raise PolicyError(f"Policy.max_blocks must be an integer above the starting blocks ({self.start}): at "
                                  f"max={self.max_blocks!r} no block would ever be added (unfreeze:last=N trains N "
                                  "blocks from the start).")

    def _check_rates(self) -> None:
        for name in ("discriminative", "layer_decay"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and 0 < v <= 1):
                raise PolicyError(f"Policy.{name} must be a number in (0, 1] (the lr ratio), got {v!r}.")
        if self.discriminative is not None and self.layer_decay is not None:
            raise PolicyError("Give either discriminative=r or layer_decay=d, not both: both set the lr per block.")
        for name in ("l2sp", "l2sp_beta"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and 0 <= v < math.inf):
                raise PolicyError(f"Policy.{name} must be a finite number >= 0, got {v!r}.")
        if self.l2sp == 0 and self.l2sp_beta == 0:
            raise PolicyError("l2sp=0,l2sp_beta=0 penalises nothing, and L2-SP replaces weight decay: the run would "
                              "train without either. Drop l2sp= (weight decay), or give l2sp or l2sp_beta a weight.")
        if self.l2sp is None and self.l2sp_beta != _DEFAULTS["l2sp_beta"]:
            raise PolicyError(f"l2sp_beta={self.l2sp_beta} weighs the new weights' penalty of L2-SP; this policy has "
                              "no L2-SP (add l2sp=alpha, e.g. 'full,l2sp=0.01,l2sp_beta=0.5').")
        for name in ("discriminative", "layer_decay"):
            if getattr(self, name) is not None and self._never_trains_backbone:
                raise PolicyError(f"{name}={getattr(self, name)} sets the learning rate of each backbone block; this "
                                  "policy never trains the backbone (feature extraction). Use a policy that trains "
                                  f"blocks (e.g. 'fine_tune', 'unfreeze:last=2,{name}=0.5') or drop {name}=.")

    @property
    def _never_trains_backbone(self) -> bool:
        """No backbone weight trains at any epoch: no block unfreezes, no LoRA factor, no
        BatchNorm gamma/beta (``bn="affine"`` trains them in every block)."""
        return not self.trains_blocks and self.bn != "affine"

    @property
    def trains_blocks(self) -> bool:
        """Whether some block of the backbone trains in some epoch (it unfreezes blocks, or adds
        LoRA factors to them); False for feature extraction, ``bn="affine"`` or not."""
        return not (self.unfreeze == "none" and self.unfreeze_from is None and not self.is_gradual
                    and self.lora is None)

    def _check_lora(self) -> None:
        r = self.lora
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise PolicyError(f"Policy.lora (the LoRA rank) must be an integer >= 1, got {r!r}.")
        if r is not None and (self.unfreeze == "all" or self.is_gradual):
            raise PolicyError("LoRA trains low-rank factors instead of the backbone: it combines with unfreezing "
                              "some blocks (last=, blocks=, from=), not with full fine-tuning or gradual unfreezing.")
        if self.lora_alpha is not None and not (_number(self.lora_alpha) and 0 < self.lora_alpha < math.inf):
            raise PolicyError(f"Policy.lora_alpha must be a finite number > 0, got {self.lora_alpha!r}.")
        try:
            re.compile(self.lora_targets)
        except (re.error, TypeError) as exc:
            raise PolicyError(f"Policy.lora_targets must be a regular expression, got {self.lora_targets!r}: {exc}") from exc
        written = [t.strip() for t in _split_options(_escape_commas(self.lora_targets))]
        if written != [self.lora_targets.replace("\\,", ",")] or not self.lora_targets:  # str(policy) reads back
            raise PolicyError(f"Policy.lora_targets={self.lora_targets!r} cannot be written in a policy string and "
                              "read back: give a pattern that is not empty ('.*' for every linear layer), without "
                              "spaces at its ends, with a literal comma written [,] (the record and resume use "
                              "the string).")
        object.__setattr__(self, "lora_targets", self.lora_targets.replace("\\,", ","))  # the same pattern
        if r is None:
            unused = [f"{name}={getattr(self, name)!r}" for name in ("lora_alpha", "lora_targets")
                      if getattr(self, name) != _DEFAULTS[name]]
            if unused:
                raise PolicyError(f"{' and '.join(unused)} {'configure' if len(unused) > 1 else 'configures'} LoRA's "
                                  "factors; this policy has no LoRA (add lora=r, e.g. 'lora:r=8,alpha=16,targets=qkv', "
                                  "or drop them).")

    # ---- queries -------------------------------------------------------------------
    @property
    def is_gradual(self) -> bool:
        return self.every is not None or bool(self.milestones)

    @property
    def start(self) -> int:
        """The number of top blocks unfrozen at epoch 0 for a count-based policy."""
        return self.unfreeze if isinstance(self.unfreeze, int) else 0

    def trainable_blocks(self, block_names: Sequence[str], epoch: int = 0) -> list[str]:
        """The names of the blocks whose weights train at ``epoch`` (in block order).

        Example:
            >>> Policy(every=2).trainable_blocks(["stem", "layer1", "layer2"], epoch=3)
            ['layer2']
        """
        names = list(block_names)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise PolicyError(f"epoch must be an integer >= 0, got {epoch!r}.")
        blocks = self._blocks_after_frozen_phase(names, epoch)
        return [] if epoch < self.frozen_epochs else blocks

    def _blocks_after_frozen_phase(self, names: list[str], epoch: int) -> list[str]:
        if not names and self.trains_blocks:
            raise PolicyError(f"The backbone has no block that can train (a TorchScript backbone is frozen whole: only "
                              f"the head trains), so the policy {str(self)!r} would train the head alone. Use "
                              "policy='feature_extraction', or build the backbone from its nn.Module (from_module) to "
                              "fine-tune it.")
        if self.unfreeze_from is not None:
            _check_known([self.unfreeze_from], names)
            return names[names.index(self.unfreeze_from):]
        u = self.unfreeze
        if u == "all":
            return names
        if isinstance(u, tuple):
            _check_known(u, names)
            return [b for b in names if b in u]
        n = self.start
        if n > len(names):
            raise PolicyError(f"The policy unfreezes the last {n} blocks but this backbone has {len(names)}: {names}.")
        if self.is_gradual:
            if n >= len(names):
                raise PolicyError(f"The policy starts with the last {n} blocks unfrozen (start=) and adds one more at "
                                  f"each step, but this backbone has {len(names)} blocks: {names}, so no block would "
                                  f"ever be added. Give start={len(names) - 1} or less, or "
                                  f"'unfreeze:last={len(names)}' to train them all from the start.")
            if self.max_blocks is not None and self.max_blocks > len(names):
                raise PolicyError(f"The policy unfreezes at most {self.max_blocks} blocks (max=) but this backbone has "
                                  f"{len(names)}: {names}. Give max={len(names)} or less, or drop max= to unfreeze "
                                  "them all.")
            steps = epoch // self.every if self.every else sum(m <= epoch for m in self.milestones)
            n = min(n + steps, len(names) if self.max_blocks is None else min(self.max_blocks, len(names)))
        return names[len(names) - n:] if n else []

    def schedule(self, block_names: Sequence[str], epochs: int) -> list[list[str]]:
        """The blocks whose weights train in each epoch ``0 .. epochs-1`` (whole blocks: under
        ``bn="affine"`` the BatchNorm gamma/beta of every other block train too, and LoRA factors
        train from epoch 0; `frozen_phase_epochs` counts those).

        Example:
            >>> Policy.parse("gradual:every=2").schedule(["stem", "layer1", "layer2"], 5)
            [[], [], ['layer2'], ['layer2'], ['layer1', 'layer2']]
        """
        return [self.trainable_blocks(block_names, e) for e in range(run_epochs(epochs))]

    def frozen_phase_epochs(self, backbone: Backbone | Sequence[str], epochs: int, *,
                            has_batchnorm: bool | None = None) -> int:
        """The number of leading epochs (of ``0 .. epochs-1``) in which no backbone parameter
        trains: those epochs can run on features computed once (``fine_tune:frozen=k``: k,
        ``gradual:every=k``: k, ``full``: 0, ``feature_extraction``: ``epochs``).

        ``backbone``: the [`Backbone`][transferkit.Backbone] (whose trunk says whether
        ``bn="affine"`` has BatchNorm gamma/beta to train), or its block names with
        ``has_batchnorm`` (required with ``bn="affine"``). LoRA factors train from epoch 0.

        Example:
            >>> Policy.parse("fine_tune:frozen=2").frozen_phase_epochs(["stem", "layer1"], 5)
            2
        """
        names = _block_names(backbone)
        if self.lora is not None or (self.bn == "affine" and _has_batchnorm(backbone, has_batchnorm, self)):
            return 0
        n = 0
        for epoch in range(run_epochs(epochs)):
            if self.trainable_blocks(names, epoch):
                break
            n += 1
        return n

    def lr_phases(self, epochs: int) -> list[tuple[int, float]]:
        """``[(epochs, lr factor), ...]``: the phases of a run of ``epochs`` epochs, each with its own
        learning-rate schedule (restarted, warmup in the first only) at ``base lr * factor``.

        A policy with a frozen phase (``fine_tune:frozen=k``, ``...,frozen=k``) has two, as
        fastai's ``fine_tune`` runs two one-cycle fits: the head alone at the base lr for k
        epochs, then the policy's blocks (and the head) at ``lr * unfrozen_lr``. Every other
        policy has one phase over the whole run.

        Example:
            >>> Policy.parse("fine_tune:frozen=1").lr_phases(5)
            [(1, 1.0), (4, 0.1)]
            >>> Policy.parse("full").lr_phases(5)
            [(5, 1.0)]
        """
        epochs = run_epochs(epochs)
        k = self.frozen_epochs
        if 0 < k < epochs:
            return [(k, 1.0), (epochs - k, float(self.unfrozen_lr))]
        return [(epochs, 1.0)]

    # ---- string form -----------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | Policy) -> Policy:
        """Parse a policy string ``kind[:option][,option]*``.

        Kinds: ``feature_extraction``, ``full``, ``unfreeze:last=N``,
        ``unfreeze:blocks=a+b``, ``unfreeze:from=layer3``, ``gradual:every=k``,
        ``gradual:milestones=2+4`` (options ``start=N``, ``max=N``), ``lora:r=8`` (options
        ``alpha=16``, ``targets=<regex>``, ``last/blocks/from``), ``fine_tune:frozen=k``
        (fastai's: k epochs with the backbone frozen, then everything at
        ``discriminative=0.01`` and ``lr * unfrozen_lr``; bare ``fine_tune`` is ``frozen=1``;
        ``frozen=k`` and ``unfrozen_lr=f`` also apply to ``full`` and ``unfreeze``). Options for every kind:
        ``bn=train|affine|frozen``, ``discriminative=r``, ``layer_decay=d``, ``l2sp=alpha``,
        ``l2sp_beta=beta``, ``decay_norm_bias=true``. ``Policy.parse(str(p)) == p``: a comma inside
        brackets (``targets=fc{1,2}``) belongs to its option, and ``\\,`` is a comma of a LoRA
        target pattern outside them. The old
        spelling ``finetune`` still means ``full`` and warns (FutureWarning): it reads too much
        like ``fine_tune``.

        Example:
            >>> Policy.parse("gradual:milestones=1+3,layer_decay=0.75")
            Policy(milestones=(1, 3), layer_decay=0.75)
        """
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise PolicyError(f"A policy is a Policy object or a string such as 'feature_extraction', got {spec!r}.")
        head, *opts = [p.strip() for p in _split_options(spec.strip())]
        kind, _, first = head.partition(":")
        kind = kind.strip()
        if kind not in _KINDS:
            raise PolicyError(f"Unknown policy {spec!r}.{_kind_hint(kind)} Valid kinds: 'feature_extraction', 'full', "
                              "'unfreeze:last=N', 'unfreeze:blocks=a+b', 'unfreeze:from=BLOCK', 'gradual:every=K', "
                              "'gradual:milestones=E1+E2', 'lora:r=R', 'fine_tune:frozen=K'; options after commas, "
                              "e.g. ',bn=affine'.")
        if kind == "finetune":
            warn("policy 'finetune' is 'full': every block trains from the first epoch, at one rate. "
                 "fastai's recipe (the backbone frozen first, then every block at per-block rates) is "
                 "'fine_tune'. Write 'full' or 'fine_tune' to say which you mean.", TransferkitFutureWarning)
        kw: dict[str, Any] = dict(_KINDS[kind][0])
        seen: set[str] = set()
        for opt in ([first] if first else []) + opts:
            key, eq, value = (s.strip() for s in opt.partition("="))
            if key not in _OPTIONS or not eq or not value:
                raise PolicyError(f"Unknown or empty policy option {opt!r} in {spec!r}; valid options: "
                                  f"{', '.join(k + '=' for k in _OPTIONS)}.")
            field, conv, kinds = _OPTIONS[key]
            if kinds and kind not in kinds:
                raise PolicyError(f"Option {key!r} in {spec!r} only applies to {'/'.join(kinds)} policies.")
            if key in seen or (field in kw and field not in _KINDS[kind][0]):
                raise PolicyError(f"Option {key!r} conflicts with another option in {spec!r}.")
            seen.add(key)
            kw[field] = conv(key, value)
        if kind == "fine_tune" and "layer_decay" in seen and "discriminative" not in seen:
            del kw["discriminative"]  # layer_decay replaces fine_tune's default discriminative rates
        if kind == "fine_tune" and kw.get("frozen_epochs") == 0 and "passes" not in seen:
            kw["head_passes"] = 1  # no frozen phase: no passes of the head alone
        needed = _KINDS[kind][1]
        if needed and not seen & set(needed):
            raise PolicyError(f"Policy {spec!r} needs one of {', '.join(k + '=' for k in needed)} "
                              f"(e.g. '{kind}:{needed[0]}=2').")
        return cls(**kw)

    def __str__(self) -> str:
        parts = [self._kind_str()]
        if self.is_gradual and self.start:
            parts.append(f"start={self.start}")
        if self.max_blocks is not None:
            parts.append(f"max={self.max_blocks}")
        if self.lora is not None:
            if self.lora_alpha is not None:
                parts.append(f"alpha={self.lora_alpha!r}")
            if self.lora_targets != DEFAULT_LORA_TARGETS:
                parts.append(f"targets={_escape_commas(self.lora_targets)}")
            parts += self._unfreeze_opts()
        if self.frozen_epochs and not self._is_fine_tune:
            parts.append(f"frozen={self.frozen_epochs}")
        for key in ("bn", "discriminative", "layer_decay", "decay_norm_bias", "l2sp", "unfrozen_lr", "head_passes"):
            v = getattr(self, key)
            if self._is_fine_tune and (key, v) in (("discriminative", FINE_TUNE_DISCRIMINATIVE),
                                                   ("head_passes", FINE_TUNE_HEAD_PASSES)):
                continue
            if key == "head_passes" and self._is_fine_tune and v == 1:
                parts.append("passes=1")
            elif key == "head_passes" and v == 0:
                parts.append("passes=epochs")
            elif v != _DEFAULTS[key]:
                key = "passes" if key == "head_passes" else key
                parts.append(f"{key}={str(v).lower() if isinstance(v, bool) else v}")
        if self.l2sp is not None and self.l2sp_beta != _DEFAULTS["l2sp_beta"]:
            parts.append(f"l2sp_beta={self.l2sp_beta!r}")
        return ",".join(parts)

    def _unfreeze_opts(self) -> list[str]:
        if self.unfreeze_from is not None:
            return [f"from={self.unfreeze_from}"]
        if isinstance(self.unfreeze, tuple):
            return ["blocks=" + "+".join(self.unfreeze)]
        return [f"last={self.unfreeze}"] if self.unfreeze != "none" else []

    @property
    def _is_fine_tune(self) -> bool:
        """Written as ``fine_tune:frozen=k``: everything unfreezes after k frozen epochs, at per-block rates."""
        return (self.unfreeze == "all" and self.frozen_epochs > 0
                and (self.discriminative is not None or self.layer_decay is not None))

    def _kind_str(self) -> str:
        if self._is_fine_tune:
            return f"fine_tune:frozen={self.frozen_epochs}"
        if self.lora is not None:
            return f"lora:r={self.lora}"
        if self.is_gradual:
            return f"gradual:every={self.every}" if self.every else "gradual:milestones=" + "+".join(map(str, self.milestones))
        if self.unfreeze == "all":
            return "full"
        if self.unfreeze == "none" and self.unfreeze_from is None:
            return "feature_extraction"
        return "unfreeze:" + self._unfreeze_opts()[0]

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != _DEFAULTS[f.name]]
        return f"Policy({', '.join(changed)})"

    def replace(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _block_names(backbone: Backbone | Sequence[str]) -> list[str]:
    if isinstance(backbone, Backbone):
        return backbone.block_names
    if isinstance(backbone, str) or not isinstance(backbone, Sequence):
        raise PolicyError(f"Expected a Backbone or a list of block names, got {type(backbone).__name__} {backbone!r}.")
    return list(backbone)


def _split_options(spec: str, brackets: bool = True) -> list[str]:
    """``spec`` split at its commas, except those inside brackets (a LoRA target pattern's
    ``fc{1,2}``, ``(a|b)`` or ``[,;]``: a character class's own brackets are literal) and
    escaped ones (``\\,``, kept as a comma in the option). A spec whose brackets do not
    close (or ``brackets=False``) is split at every unescaped comma.

    Example:
        >>> _split_options("lora:r=4,targets=fc{1,2},bn=frozen")
        ['lora:r=4', 'targets=fc{1,2}', 'bn=frozen']
    """
    parts: list[str] = []
    cur: list[str] = []
    depth, i, class_at = 0, 0, None  # class_at: where the open character class's items start in cur
    while i < len(spec):
        c = spec[i]
        if c == "\\":
            escaped = spec[i + 1:i + 2]
            cur.append("," if escaped == "," and depth == 0 and class_at is None else c + escaped)
            i += 2
            continue
        if brackets and class_at is not None:
            if c == "]" and len(cur) > class_at:  # a "]" first in the class is one of its items
                class_at = None
            elif c == "^" and len(cur) == class_at and spec[i - 1] == "[":
                class_at += 1
        elif brackets and c == "[":
            class_at = len(cur) + 1
        elif brackets and c in "({":
            depth += 1
        elif brackets and c in ")}":
            depth = max(depth - 1, 0)  # a lone closing bracket is literal in a pattern
        if c == "," and depth == 0 and class_at is None:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if depth or class_at is not None:  # brackets that do not close: no pattern to keep whole
        return _split_options(spec, brackets=False)
    return parts + ["".join(cur)]


def _escape_commas(pattern: str) -> str:
    """``pattern`` with its commas outside brackets written ``\\,`` (`_split_options` reads them back)."""
    return "\\,".join(_split_options(pattern.replace("\\,", ",")))


def _has_batchnorm(backbone: Backbone | Sequence[str], has_batchnorm: bool | None, policy: Policy) -> bool:
    """Whether ``bn="affine"`` finds BatchNorm gamma/beta to train in the backbone's blocks."""
    if isinstance(backbone, Backbone):
        found = trunk_has_batchnorm(backbone)
        if has_batchnorm is not None and has_batchnorm != found:
            raise PolicyError(f"has_batchnorm={has_batchnorm} contradicts the trunk of {backbone.name}, which "
                              f"{'has' if found else 'has no'} trainable BatchNorm layers; omit has_batchnorm.")
        return found
    if has_batchnorm is None:
        raise PolicyError(f"Policy {policy} trains BatchNorm gamma/beta wherever the trunk has BatchNorm layers, "
                          "so whether the backbone stays frozen depends on the trunk: pass the Backbone instead of "
                          "its block names, or has_batchnorm=True/False.")
    return bool(has_batchnorm)


def _check_known(wanted: Sequence[str], names: list[str]) -> None:
    unknown = [b for b in wanted if b not in names]
    if unknown:
        hint = suggest(unknown[0], names)
        raise PolicyError(f"Unknown {'block' if len(unknown) == 1 else 'blocks'} {unknown} in the policy.{hint} "
                          f"This backbone's blocks are {names}.")


def _kind_hint(kind: str) -> str:
    """`` Did you mean 'fine_tune'?`` for a near-miss policy kind (``fine-tune``, ``Full``, ``unfreez``)."""
    same = kind.lower().replace("-", "_").replace(" ", "_")
    if same in _KINDS and same != "finetune":
        return f" Did you mean {same!r}?"
    return suggest(same, [k for k in _KINDS if k != "finetune"], n=2)


_LEAST = {"every": 1, "r": 1}  # the options whose whole number starts at 1 (the others at 0)


def _int(key: str, v: str) -> int:
    if not v.isdecimal():
        raise PolicyError(f"Policy option {key}= needs a whole number >= {_LEAST.get(key, 0)}, got {v!r}.")
    return int(v)


def _float(key: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise PolicyError(f"Policy option {key}= needs a number, got {v!r}.") from None


def _names(key: str, v: str) -> tuple[str, ...]:
    return tuple(b.strip() for b in v.split("+") if b.strip())


def _ints(key: str, v: str) -> tuple[int, ...]:
    return tuple(_int(key, b.strip()) for b in v.split("+"))


def _bool(key: str, v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise PolicyError(f"Policy option {key}= needs true or false, got {v!r}.")


def _passes(key: str, v: str) -> int:
    if v.strip().lower() == "epochs":
        return 0
    if not v.isdecimal() or int(v) < 1:
        raise PolicyError(f"Policy option {key}= needs a number of passes (e.g. passes=5) or passes=epochs (as "
                          f"many as the run's epochs), got {v!r}.")
    return int(v)


def _str(key: str, v: str) -> str:
    return v


_KINDS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    **{k: ({}, ()) for k in _FEATURE_EXTRACTION},
    **{k: ({"unfreeze": "all"}, ()) for k in _FULL},
    "unfreeze": ({}, ("last", "blocks", "from")),
    "gradual": ({}, ("every", "milestones")),
    "lora": ({}, ("r",)),
    "fine_tune": ({"unfreeze": "all", "frozen_epochs": 1, "discriminative": FINE_TUNE_DISCRIMINATIVE,
                   "head_passes": FINE_TUNE_HEAD_PASSES}, ()),
}
_Conv = Callable[[str, str], Any]
_OPTIONS: dict[str, tuple[str, _Conv, tuple[str, ...]]] = {
    "last": ("unfreeze", _int, ("unfreeze", "lora")),
    "blocks": ("unfreeze", _names, ("unfreeze", "lora")),
    "from": ("unfreeze_from", _str, ("unfreeze", "lora")),
    "every": ("every", _int, ("gradual",)),
    "milestones": ("milestones", _ints, ("gradual",)),
    "start": ("unfreeze", _int, ("gradual",)),
    "max": ("max_blocks", _int, ("gradual",)),
    "r": ("lora", _int, ("lora",)),
    "alpha": ("lora_alpha", _float, ("lora",)),
    "targets": ("lora_targets", _str, ("lora",)),
    "bn": ("bn", _str, ()),
    "discriminative": ("discriminative", _float, ()),
    "layer_decay": ("layer_decay", _float, ()),
    "decay_norm_bias": ("decay_norm_bias", _bool, ()),
    "l2sp": ("l2sp", _float, ()),
    "l2sp_beta": ("l2sp_beta", _float, ()),
    "frozen": ("frozen_epochs", _int, ("fine_tune", "full", "finetune", "all", "unfreeze")),
    "unfrozen_lr": ("unfrozen_lr", _float, ("fine_tune", "full", "finetune", "all", "unfreeze")),
    "passes": ("head_passes", _passes, ("fine_tune", "full", "finetune", "all", "unfreeze")),
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Policy)}

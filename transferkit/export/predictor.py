"""Load an exported model and predict from files, PIL images, numpy arrays, tensors or waveforms."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transferkit._progress import progress as progress_bar
from transferkit._text import exception_line, expand_home, file_reason, plural
from transferkit.backbones._base import InputSpec
from transferkit.data.audio import loud_note
from transferkit.errors import ConfigError, DataError, ExportError, TransferkitError, warn
from transferkit.hardware import out_of_memory
from transferkit.export.inputs import InputPipeline, is_open_file
from transferkit.export.metadata import audio_max_seconds, is_onnx_file
from transferkit.export.torchscript import check_device, load_scripted, quiet_jit, read_scripted_metadata
from transferkit.heads import labels_given, output_activation


@dataclass
class Prediction:
    """One input's prediction.

    ``multiclass``: ``label``/``index``/``probability`` of the top class, ``top_k`` pairs.
    ``multilabel``: ``labels`` holds every label whose probability >= the threshold;
    ``label`` is the most probable one. ``regression``: ``values`` maps output names to values
    (``label``, ``index`` and ``probability`` are None, ``top_k`` is empty). An input file
    that could not be read (or gave non-finite outputs) has ``error`` set to why, and no
    label or values (``ok`` is False).
    """

    label: str | None
    index: int | None
    probability: float | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    source: str | None = None
    task: str = "multiclass"
    labels: list[str] | None = None
    values: dict[str, float] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """False when this input could not be predicted (see ``error``)."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "task": self.task}
        if self.error is not None:
            return {**d, "error": self.error}
        if self.task == "regression":
            return {**d, "values": self.values}
        d.update(label=self.label, index=self.index, probability=self.probability,
                 top_k=[{"label": lab, "probability": p} for lab, p in self.top_k])
        if self.task == "multilabel":
            d["labels"] = self.labels
        return d

    def __str__(self) -> str:
        if self.error is not None:
            return f"error: {self.error}"
        if self.task == "regression":
            return ", ".join(f"{k}={v:.7g}" for k, v in (self.values or {}).items())
        # 3 decimals, and a probability below 0.0005 in two figures (of 30,000 classes the top 3 all read 0.000)
        alts = ", ".join(f"{lab} {p:.3f}" if p >= 5e-4 or p == 0 else f"{lab} {p:.1e}" for lab, p in self.top_k)
        return f"[{', '.join(self.labels or [])}] {alts}" if self.task == "multilabel" else alts


LENGTH_SPREAD = 2.0
"""How far apart (longest / shortest) the lengths of the audio clips run in one batch may be
(`Predictor._rows`): a batch is padded to its longest clip."""


class Predictor:
    """An exported model with its labels, task and preprocessing.

    Example:
        >>> p = transferkit.load("model.pt")  # doctest: +SKIP
        >>> p.predict(["ant.jpg"], top_k=2)[0].label  # doctest: +SKIP
        'ants'
    """

    def __init__(self, module: torch.jit.ScriptModule, metadata: dict[str, Any], device: str | torch.device = "cpu",
                 source: str = "the model") -> None:
        self.module = module.eval()
        self.metadata = metadata
        self.labels: list[str] = list(metadata["labels"])
        self.task: str = metadata["task"]
        self.input_spec = InputSpec.from_dict(metadata["input_spec"])
        if self.input_spec.kind == "image" and self.input_spec.channels != 3:
            raise ConfigError(f"{source} takes {self.input_spec.channels}-channel images (its input_spec), and predict "
                              "reads every image as 3-channel RGB. Run the file yourself on [N, "
                              f"{self.input_spec.channels}, H, W] tensors (torch.jit.load), or export a model that "
                              "takes 3 channels.")
        self.device = torch.device(device)
        self.source = source
        # audio: long clips are cropped to the window training and validation saw (30 s unless the run said;
        # None: whole clips)
        self.max_seconds = audio_max_seconds(metadata) if self.input_spec.kind == "audio" else None
        self.inputs = InputPipeline(self.input_spec, max_seconds=self.max_seconds)

    def __repr__(self) -> str:
        return (f"Predictor({self.source}, task={self.task!r}, {len(self.labels)} outputs, "
                f"input={self.input_spec.kind}, device={self.device})")

    # -- running the model --------------------------------------------------------------
    def _float_dtype(self) -> torch.dtype | None:
        """The dtype of the module's floating-point weights, as they are now (``model.double()``
        after this predictor was made counts): float inputs are given in it. None: no such weights
        (a frozen TorchScript file, an ONNX session)."""
        params = self.module.parameters() if isinstance(self.module, torch.nn.Module) else ()
        return next((t.dtype for t in params if t.is_floating_point()), None)

    def _rows(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The outputs for prepared inputs ``xs`` (`InputPipeline.prepare`), in their order.
        Audio clips run in groups whose lengths are at most `LENGTH_SPREAD` apart, so that one
        long clip does not pad a batch of short ones to its length (a clip's outputs do not
        depend on the others in its batch); images run as one batch."""
        if not self.inputs.audio or len(xs) < 2:
            return self._run(self.inputs.collate(xs))
        order = sorted(range(len(xs)), key=lambda k: xs[k].shape[-1])
        out: list[torch.Tensor | None] = [None] * len(xs)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and xs[order[end]].shape[-1] <= LENGTH_SPREAD * xs[order[start]].shape[-1]:
                end += 1
            group = order[start:end]
            for k, row in zip(group, self._run(self.inputs.collate([xs[k] for k in group]))):
                out[k] = row
            start = end
        return torch.stack(out)  # type: ignore[arg-type]

    def _run(self, xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), quiet_jit():
            dtype = self._float_dtype()
            if dtype is not None and xb.is_floating_point():
                xb = xb.to(dtype)
            try:
                out = self.module(xb.to(self.device))
            except TransferkitError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch.jit.Error is no RuntimeError; MemoryError is one
                raise self._failed(exc, xb) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != len(self.labels):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ExportError(f"{self.source} returns {shape} but its metadata lists {len(self.labels)} labels: the "
                              "model and its metadata do not belong together. Re-export the model.")
        return output_activation(self.task, out.float()).cpu()

    def _failed(self, exc: BaseException, xb: torch.Tensor) -> TransferkitError:
        """The error of the model failing on the batch ``xb``: out of memory (a smaller batch is
        the fix), an input its own checks refuse (the exported file's ``ValueError``: a
        `DataError` saying it, which `predict` reports input by input), or a model that cannot
        run on what the predictor gives it (its error, what it was given, and for an image model
        refusing uint8 pixels, what an exported image model takes)."""
        line = exception_line(exc, 300)
        batch = f"{'an input' if len(xb) == 1 else f'a batch of {len(xb)} inputs'} of shape {tuple(xb.shape[1:])}"
        if out_of_memory(exc):
            return ExportError(f"{self.source} ran out of memory on {batch} ({exception_line(exc, 160)}); pass a "
                               "smaller batch_size (predict(..., batch_size=1), transferkit predict --batch-size 1).")
        if line.startswith("ValueError: "):  # the file's (or TransferModel's) check of its input
            return DataError(f"{self.source} refuses {batch}: {line[len('ValueError: '):]}")
        image = self.input_spec.kind == "image"
        given = f"{str(xb.dtype).replace('torch.', '')} {'pixels [N, C, H, W]' if image else 'waveforms [N, T]'}"
        raw = " An image model to deploy takes raw pixels, uint8 in [0, 255] (what the predictor gives it for " \
              "image files) or float in [0, 1]: put transferkit's ImagePreprocess(mean, std) in front of the " \
              "module (transferkit.build_model does)." if image and xb.dtype == torch.uint8 \
            and "type" in line.lower() else ""
        return ExportError(f"{self.source} failed on {batch} (the predictor gave it {given}): {line.rstrip('.')}."
                           f"{raw}")

    def outputs(self, inputs: Any, *, batch_size: int = 32, progress: bool | None = False) -> torch.Tensor:
        """``[N, num_outputs]``: probabilities (softmax for multiclass, sigmoid for multilabel)
        or values (regression), in the order of ``inputs``."""
        self.inputs.forget()
        items = self.inputs.split(inputs)
        _check_batch_size(batch_size)
        out = []
        for chunk in _progress(_chunks(items, batch_size), len(items), progress):
            try:
                xs = [self.inputs.prepare(x) for x in chunk]
            except DataError as exc:  # without the readers' advice on training options, which this method does not take
                files = any(_is_file(x) for x in items)
                raise DataError(file_reason(exc) + (" (predict() reports such files one by one)" if files else "")) \
                    from exc
            out.append(self._rows(xs))
        self._warn_about_inputs()
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def predict_proba(self, inputs: Any, *, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities ``[N, num_classes]``; regression models have none (use [`outputs`][transferkit.Predictor.outputs])."""
        if self.task == "regression":
            raise ConfigError("A regression model has no class probabilities; use Predictor.outputs() or predict().")
        return self.outputs(inputs, batch_size=batch_size)

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int = 32, threshold: float = 0.5,
                progress: bool | None = False) -> list[Prediction]:
        """Predict one item or a sequence of them: file paths, PIL images, numpy arrays,
        tensors (a ``[N, C, H, W]`` tensor is N images), or for audio models audio files and
        waveforms (a ``[N, T]`` tensor is N clips). Returns one [`Prediction`][transferkit.Prediction] per item.

        A file that cannot be read (missing, not an image or audio, broken, NaN/inf audio
        samples) or that the model refuses (its own ``ValueError`` on that input, where it
        takes the others) does not stop the others: its prediction has ``error`` set to why
        (and ``ok`` False), and one warning says how many failed; so does any input for which
        the model returns NaN/inf. Other bad inputs (an array of the wrong shape, an
        unsupported type, an object the model refuses) raise, and so does a model that refuses
        every input of a batch (one `DataError`) or fails on what it is given (`ExportError`).

        Example:
            >>> predictor.predict(["a.jpg", "b.png"], top_k=3)[0].top_k  # doctest: +SKIP
            [('ants', 0.91), ('bees', 0.09)]
            >>> preds = predictor.predict(["a.jpg", "broken.jpg"])  # doctest: +SKIP
            >>> preds[1].ok, preds[1].error  # doctest: +SKIP
            (False, "Cannot read image 'broken.jpg': ...")
        """
        preds = list(self.iter_predict(inputs, top_k=top_k, batch_size=batch_size, threshold=threshold,
                                       progress=progress))
        failed = [p for p in preds if p.error is not None]
        if failed:  # else a mistyped path printed an empty top_k, and nothing more
            warn(f"{len(failed)} of the {len(preds)} inputs gave no prediction (e.g. {failed[0].error.rstrip('.')}); "
                 "each such prediction has ok False and error set to why.")
        return preds

    def iter_predict(self, inputs: Any, *, top_k: int = 1, batch_size: int = 32, threshold: float = 0.5,
                     progress: bool | None = False) -> Iterator[Prediction]:
        """`predict`, one [`Prediction`][transferkit.Prediction] at a time in the inputs' order, each
        batch's as soon as it has run: a caller can write them out as they come (``transferkit
        predict`` does, so an interrupted run keeps what it predicted)."""
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ConfigError(f"top_k={top_k!r} is out of range; expected a positive integer.")
        top_k = int(top_k)  # a NumPy integer too
        if self.task == "multiclass" and top_k > len(self.labels) > 0:
            # not "top_k=...": the command line spells it --top-k, finetune's setting --set top_k=...
            warn(f"Asked for the top {top_k} labels of a model of {len(self.labels)} classes: each prediction lists "
                 f"{len(self.labels)}.")
        if self.task == "regression" and top_k != 1:
            warn(f"Asked for the top {top_k} labels of a regression model, which has none: each prediction gives "
                 "its values.")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold={threshold!r} is out of range; expected a probability in [0, 1] (a label "
                              "is given when its probability is at least the threshold).")
        if threshold != 0.5 and self.task != "multilabel":  # said in words: the command line spells it --threshold
            warn(f"A threshold of {threshold:g} applies to multi-label models; this model is {self.task}, so it is "
                 "not used.")
        _check_batch_size(batch_size)
        self.inputs.forget()
        items = self.inputs.split(inputs)
        for chunk in _progress(_chunks(list(enumerate(items)), batch_size), len(items), progress):
            preds: dict[int, Prediction] = {}
            ready, xs = [], []
            for i, x in chunk:
                try:
                    xs.append(self.inputs.prepare(x))
                    ready.append(i)
                except DataError as exc:
                    if not _is_file(x):  # a file read fails alone
                        if len(items) == 1:
                            raise
                        raise DataError(f"Input {i} of the {len(items)} (counting from 0): {exc}") from exc
                    preds[i] = Prediction(None, None, None, [], _source(x), self.task, error=file_reason(exc))
            for i, row in zip(ready, self._each_row(xs, ready, items, preds) if xs else ()):
                if i in preds:  # an input the model refused: said in its prediction
                    continue
                if not torch.isfinite(row).all():
                    preds[i] = Prediction(None, None, None, [], _source(items[i]), self.task,
                                          error=f"the model returned non-finite outputs ({row.tolist()}) for this "
                                                "input; check that it holds finite values")
                else:
                    preds[i] = self._prediction(row, _source(items[i]), top_k, threshold)
            yield from (preds[i] for i, _ in chunk)
        self._warn_about_inputs()

    def _each_row(self, xs: list[torch.Tensor], ready: list[int], items: list[Any],
                  preds: dict[int, Prediction]) -> torch.Tensor:
        """`_rows` of ``xs`` (the prepared inputs ``ready`` of ``items``); where the model refuses
        the batch (its ``ValueError``), each input is run alone, and a file it refuses gets a
        prediction that says why in ``preds`` (its row NaN), as an unreadable file does; another
        input it refuses raises, as one that cannot be read does."""
        try:
            return self._rows(xs)
        except DataError as batch:
            if len(xs) == 1 and not _is_file(items[ready[0]]):
                raise DataError(f"Input {ready[0]} of the {len(items)} (counting from 0): {batch}") \
                    if len(items) > 1 else batch from None
            failed = batch
        rows, refused = [], {}
        for i, x in zip(ready, xs):
            try:
                rows.append(self._rows([x])[0])
            except DataError as exc:
                if not _is_file(items[i]):
                    raise DataError(f"Input {i} of the {len(items)} (counting from 0): {exc}") from exc
                refused[i] = str(exc)
                rows.append(torch.full((len(self.labels),), float("nan")))
        if len(refused) == len(xs) > 1:  # a model that refuses every input: said once, as before
            raise failed
        preds.update({i: Prediction(None, None, None, [], _source(items[i]), self.task, error=why)
                      for i, why in refused.items()})
        return torch.stack(rows)

    def _warn_about_inputs(self) -> None:
        """Warn once per call of the audio clips met that the model sees only in part, or whose
        float samples look like unscaled PCM integers."""
        if self.inputs.loud:
            peak, example = max(self.inputs.loud, key=lambda pair: pair[0])
            warn(loud_note(len(self.inputs.loud), peak, example))
        if self.inputs.cropped:
            # no `max_seconds=` here: the window is the model's, not an option of predict (the CLI would
            # spell it as finetune's --max-seconds flag)
            window = self.inputs.window_seconds
            what = ("its backbone's clip_seconds" if self.inputs.spec.clip_seconds else
                    "the max_seconds of its training run")
            warn(f"{plural(len(self.inputs.cropped), 'audio clip')} last longer than the model's window of "
                 f"{window:g} s (e.g. {self.inputs.cropped[0]}): each was cropped to its middle {window:g} s, "
                 f"the window the model was trained and validated on ({what}, recorded in the exported "
                 "file). Split long recordings to predict every part.")
        self.inputs.forget()

    def _prediction(self, row: torch.Tensor, source: str | None, top_k: int, threshold: float) -> Prediction:
        if self.task == "regression":
            return Prediction(None, None, None, [], source, self.task,
                              values={lab: float(v) for lab, v in zip(self.labels, row.tolist())})
        p, idx = row.sort(descending=True, stable=True)  # of equal scores the first label first, as argmax
        pairs = [(self.labels[j], float(q)) for q, j in zip(p[:top_k].tolist(), idx[:top_k].tolist())]
        best = int(idx[0])
        positives = [lab for lab, given in zip(self.labels, labels_given(row, threshold).tolist()) if given] \
            if self.task == "multilabel" else None
        return Prediction(self.labels[best], best, float(row[best]), pairs, source, self.task, positives)

    def predict_folder(self, folder: str | Path, *, top_k: int = 1, batch_size: int = 32, threshold: float = 0.5,
                       progress: bool | None = None) -> list[Prediction]:
        """Predict every image (or audio) file below ``folder``, sorted by path, with a progress
        bar on a terminal (``progress=True/False`` forces it on/off)."""
        files = self.inputs.list_files(folder)
        return self.predict(files, top_k=top_k, batch_size=batch_size, threshold=threshold, progress=progress)


def _is_file(item: Any) -> bool:
    """Whether ``item`` is a file (a path, or an open file): one that fails, fails alone."""
    return isinstance(item, (str, Path)) or is_open_file(item)


def _source(item: Any) -> str | None:
    """The file ``item`` names: a path, or an open file's ``name``; None for other inputs."""
    if isinstance(item, (str, Path)):
        return str(item)
    name = getattr(item, "name", None) if is_open_file(item) else None
    return str(name) if isinstance(name, (str, Path)) else None


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _progress(chunks: Iterator[list[Any]], total: int, progress: bool | None) -> Iterator[list[Any]]:
    """Yield ``chunks``, advancing a bar by their sizes: on a terminal when ``progress`` is None,
    always when True, never when False (transferkit._progress)."""
    with progress_bar(total, "predict", unit="file", verbose=progress is not False, force=progress is True,
                      leave=True) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The validated metadata of an exported file, TorchScript or ONNX (which one is read
    from the file's content). The whole file is checked: its record digests and its
    metadata (`transferkit.export.onnx.read_onnx_metadata`), and for TorchScript that the
    model's output has one value per label (`read_scripted_metadata`).

    Example:
        >>> read_metadata("model.pt")["labels"]  # doctest: +SKIP
        ['a', 'b']
    """
    if is_onnx_file(path):
        from transferkit.export.onnx import read_onnx_metadata

        return read_onnx_metadata(path)
    return read_scripted_metadata(path)


def load(path: str | Path, *, device: str | torch.device = "cpu") -> Predictor:
    """Load an exported transferkit model as a [`Predictor`][transferkit.Predictor].

    An ONNX export (from `transferkit.export.export_onnx`) runs on onnxruntime
    (``pip install 'transferkit[onnx]'``; without it, an ExportError says so), a TorchScript
    export on torch; which one a file is, is read from its content, not its name. The file and its metadata are checked: a truncated or damaged file (every record's
    SHA-256 is compared with the one written at export), missing or edited metadata raise
    [`ExportError`][transferkit.ExportError] naming the problem; a checkpoint passed instead of an
    export says how to export it. ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or
    ``"auto"``; one that is not available here raises ConfigError.

    Example:
        >>> predictor = transferkit.load("model.pt")  # doctest: +SKIP
        >>> predictor.predict("cat.jpg", top_k=3)[0].top_k  # doctest: +SKIP
    """
    dev, path = check_device(device), expand_home(path)
    if is_onnx_file(path):  # an ONNX export runs on onnxruntime
        from transferkit.export.onnx import load_onnx

        runner, meta = load_onnx(path, device=dev)
        return Predictor(runner, meta, device=dev, source=repr(str(path)))  # type: ignore[arg-type]
    module, meta = load_scripted(path, map_location=dev)
    return Predictor(module, meta, device=dev, source=repr(str(path)))

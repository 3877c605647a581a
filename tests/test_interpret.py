"""show_results / plot_top_losses / most_confused on a tiny model and folder."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from transferkit.backbones._base import InputSpec
from transferkit.data.images import ImageFolderDataset
from transferkit.data.transforms import eval_transform
from transferkit.errors import ConfigError
from transferkit.model import ImagePreprocess
from transferkit.train import interpret, reporting
from transferkit.train.interpret import (
    confusion,
    most_confused,
    plot_top_losses,
    predict_logits,
    show_results,
    top_losses,
    write_interpretation,
)

CLASSES = ["ant", "bee", "wasp"]


def _logits_for(labels, preds, sure=3.0):
    out = torch.zeros(len(preds), len(CLASSES))
    out[torch.arange(len(preds)), torch.tensor(preds)] = sure
    return out


def test_most_confused_matches_a_hand_built_confusion():
    # true -> predicted: ant->bee x3, ant->wasp x1, bee->ant x2, wasp->bee x3, the rest right
    pairs = [(0, 0)] * 4 + [(0, 1)] * 3 + [(0, 2)] + [(1, 1)] * 5 + [(1, 0)] * 2 + [(2, 2)] * 2 + [(2, 1)] * 3
    labels, preds = [t for t, _ in pairs], [p for _, p in pairs]
    logits = _logits_for(labels, preds)
    expected = np.array([[4, 3, 1], [2, 5, 0], [0, 3, 2]])
    assert confusion(logits, labels, CLASSES).tolist() == expected.tolist()
    assert most_confused(logits, labels, CLASSES) == [("ant", "bee", 3), ("wasp", "bee", 3), ("bee", "ant", 2),
                                                      ("ant", "wasp", 1)]
    assert most_confused(logits, torch.tensor(labels), CLASSES, min_count=2) == [
        ("ant", "bee", 3), ("wasp", "bee", 3), ("bee", "ant", 2)]
    with pytest.raises(ConfigError, match=r"shape \(20, 3\) but there are 2 classes"):
        most_confused(logits, labels, CLASSES[:2])
    with pytest.raises(ConfigError, match="20 rows of logits for 19 samples"):
        most_confused(logits, labels[:-1], CLASSES)
    with pytest.raises(ConfigError, match="min_count must be a positive integer"):
        most_confused(logits, labels, CLASSES, min_count=0)


def test_top_losses_are_the_worst_mistakes_first():
    labels = [0, 1, 2, 0]
    logits = torch.tensor([[5.0, 0.0, 0.0],   # right and sure: lowest loss
                           [4.0, 0.0, 0.0],   # wrong, sure: highest loss
                           [0.0, 1.0, 0.0],   # wrong, unsure
                           [1.0, 0.0, 0.0]])  # right, unsure
    rows = top_losses(logits, labels, CLASSES, k=3)
    assert [r[0] for r in rows] == [1, 2, 3]
    idx, loss, true, pred, p = rows[0]
    assert (true, pred) == ("bee", "ant")
    assert loss == pytest.approx(-math.log(1 / (math.exp(4) + 2)), rel=1e-5)
    assert p == pytest.approx(math.exp(4) / (math.exp(4) + 2), rel=1e-5)
    assert len(top_losses(logits, labels, CLASSES, k=50)) == 4


def _folder(root, per_class=4):
    rng = np.random.default_rng(0)
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((20, 26, 3), 40 + 80 * ci, np.uint8) + rng.integers(0, 20, (20, 26, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}{i}.png")
    spec = InputSpec(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    return ImageFolderDataset(root).view(transform=eval_transform(spec))


class _Tiny(nn.Module):
    """Mean brightness -> 3 logits: a real model that reads the images."""

    def __init__(self):
        super().__init__()
        self.pre = ImagePreprocess((0.5,) * 3, (0.5,) * 3)
        self.fc = nn.Linear(1, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-4.0], [0.0], [4.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pre(x).mean(dim=(1, 2, 3)).unsqueeze(1))


def _spy(monkeypatch):
    seen = []
    real = reporting.save_figure

    def spy(fig, path):
        shown = [ax for ax in fig.axes if ax.images or ax.lines]
        seen.append({"shown": len(shown), "titles": [ax.get_title() for ax in shown],
                     "colors": [ax.title.get_color() for ax in shown],
                     "grid": fig.axes[0].get_subplotspec().get_gridspec().get_geometry(),
                     "size": tuple(fig.get_size_inches())})
        return real(fig, path)

    monkeypatch.setattr(interpret, "save_figure", spy)
    return seen


def test_pictures_from_a_tiny_model_and_folder(tmp_path, monkeypatch):
    ds = _folder(tmp_path / "val")
    model = _Tiny()
    logits = predict_logits(model, ds, batch_size=5)
    assert logits.shape == (12, 3)
    assert most_confused(model, ds, CLASSES) == most_confused(logits, ds, CLASSES)
    seen = _spy(monkeypatch)

    out = show_results(model, ds, CLASSES, tmp_path / "plots" / "results.png", n=7)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
    first = seen[-1]
    assert first["shown"] == 7 and first["grid"] == (3, 3)  # 7 images on a 3 x 3 grid
    preds, labels = logits.argmax(1), torch.tensor(ds_targets(ds))
    for title, color in zip(first["titles"], first["colors"]):
        true, pred = title.split("\n")[0][6:], title.split("\n")[1][6:].split(" (")[0]
        assert true in CLASSES and pred in CLASSES
        assert (color == "tab:green") == (true == pred)
    assert any(c == "tab:red" for c in first["colors"]) or bool((preds == labels).all())

    out = plot_top_losses(logits, ds, CLASSES, tmp_path / "plots" / "top.png", k=4)
    assert out.read_bytes()[:4] == b"\x89PNG"
    top = seen[-1]
    assert top["shown"] == 4 and top["grid"] == (2, 2)
    worst = top_losses(logits, ds, CLASSES, k=1)[0]
    assert top["titles"][0] == f"pred: {worst[3]} ({worst[4]:.2f})\ntrue: {worst[2]}, loss {worst[1]:.2f}"

    written = write_interpretation(tmp_path / "plots2", model, ds, CLASSES, n=4, k=2)
    assert written["show_results"].name == "show_results.png" and written["show_results"].is_file()
    assert written["top_losses"].is_file() and written["most_confused"] == most_confused(logits, ds, CLASSES)
    assert seen[-1]["shown"] == 2 and seen[-2]["shown"] == 4

    with pytest.raises(ConfigError, match="n must be a positive integer"):
        show_results(logits, ds, CLASSES, tmp_path / "x.png", n=0)
    with pytest.raises(ConfigError, match="the dataset itself"):
        show_results(model, [0, 1], CLASSES, tmp_path / "x.png")


def ds_targets(ds):
    from transferkit.data.images import dataset_targets

    return dataset_targets(ds)


def test_images_of_every_layout_and_waveforms_are_drawn():
    u8 = torch.randint(0, 256, (3, 8, 10), dtype=torch.uint8)
    assert interpret._picture(u8).shape == (8, 10, 3)
    assert interpret._picture(u8.float() / 255).dtype == np.uint8
    assert interpret._picture(torch.rand(1, 8, 10)).shape == (8, 10, 3)
    assert interpret._picture(Image.new("L", (10, 8))).shape == (8, 10, 3)
    wave = torch.tensor([0.1, -0.2, float("nan")])
    assert interpret._picture(wave).tolist() == pytest.approx([0.1, -0.2, 0.0])
    with pytest.raises(ConfigError, match="Cannot draw an image of shape"):
        interpret._picture(torch.zeros(2, 3, 4, 5))

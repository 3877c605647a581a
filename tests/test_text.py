"""Text for people: counted nouns and lines wrapped under their label."""

from __future__ import annotations

from transferkit._text import plural, wrap_lines


def test_plural():
    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert plural(3, "class", "classes") == "3 classes"


def test_wrap_lines_keeps_short_lines_and_aligns_continuations():
    text = "plan: short\n  optim:    " + " ".join(f"group{i} lr 0.001" for i in range(12))
    out = wrap_lines(text, width=60).splitlines()
    assert out[0] == "plan: short"
    assert all(len(line) <= 60 for line in out)
    assert out[1].startswith("  optim:    group0") and all(line.startswith(" " * 12) for line in out[2:])
    assert " ".join(" ".join(out[1:]).split()) == " ".join(text.splitlines()[1].split())  # nothing lost

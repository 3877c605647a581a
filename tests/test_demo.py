"""`make demo`: the README's table holds the accuracies the demo computes, and the showcase
prediction says whether it is right."""

from __future__ import annotations

import re
from pathlib import Path

from transferkit.demo import README_END, README_START, run_demo

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| (.+?) \| (\d+) \| ([0-9.]+) \| [0-9.]+ \|$", re.M)


def test_readme_table_is_what_the_demo_prints(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo")
    printed = capsys.readouterr().out
    block = README.read_text().split(README_START, 1)[1].split(README_END, 1)[0]
    readme = [(m, int(e), a) for m, e, a in ROW.findall(block)]
    demo = [(r["method"], r["epochs"], f"{r['test_acc']:.3f}") for r in summary["target"]]
    assert readme == demo, "README.md is stale: run `make readme`"
    assert summary["export_max_abs_diff"] <= 1e-5
    showcase = next(line for line in printed.splitlines() if "first test image" in line)
    label = re.search(r"a (\d), predicted '(\d)'", showcase)
    assert showcase.endswith(": right") == (label.group(1) == label.group(2)), showcase
    assert showcase.endswith(": right") or "WRONG" in showcase

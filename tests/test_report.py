"""The benchmark report from hand-built records: ties in rankings, the learning-rate sweep
section, and domain-shift columns (a cell evaluated on another dataset)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

from promptmatch.benchmark.report import _rankings, aggregate, ranking_with_ties, write_report
from promptmatch.benchmark.store import ResultStore

BACKBONE = {"name": "vit_tiny", "label": "vit-t"}
SETTING = "linear frozen"


def make_record(method: str, seed: int, miou: Dict[str, float], dataset: str = "ade", status: str = "ok",
                **extra: Any) -> Dict[str, Any]:
    """One ``results.jsonl`` record of a cell, with the fields the report reads."""
    rec: Dict[str, Any] = {
        "key": f"{dataset}|{BACKBONE['label']}|{SETTING}|{method}|{seed}", "dataset": dataset,
        "backbone": dict(BACKBONE), "setting_label": SETTING, "method": method, "seed": seed, "status": status,
        "miou": dict(miou), "per_class_iou": {}, "trainable_params": 1000.0, "trainable_pct": 0.5,
        "checkpoint_bytes": 4096, "step_time_median_s": 0.01, "throughput_img_s": 100.0, "peak_mem_mb": 500.0,
        "latency_ms_median": 2.0, "wall_s": 10.0, "device": "cpu", "versions": {"torch": "2.x"},
        "peak_mem_kind": "process RSS",
    }
    rec.update(extra)
    return rec


def write(tmp_path: Path, records: Sequence[Dict[str, Any]]) -> str:
    """Store the records in ``tmp_path/results.jsonl`` and return the text of the report written from them."""
    store = ResultStore(tmp_path / "results.jsonl")
    for r in records:
        store.append(r)
    return write_report(tmp_path, plots=False).read_text()


def ranking_line(report: str, split: str, dataset: str = "ade") -> str:
    """The ranking (last cell) of the Rankings table row for a dataset and split label."""
    section = report.split("## Rankings of methods")[1].split("\n## ")[0]
    (line,) = [ln for ln in section.splitlines()
               if ln.startswith("| R") and f"| {dataset} |" in ln and f"| {split} |" in ln]
    return line.rstrip(" |").rsplit(" | ", 1)[1]


# ---------------------------------------------------------------------------- ties


def test_ranking_with_ties_groups_chained_neighbours():
    # a-b: |0.50-0.49| < max(0.02, 0.005); b-c: |0.49-0.475| = 0.015 < 0.02 -> chained; c-d: 0.075 >= 0.02
    scores = {"c": (0.475, 0.02), "a": (0.50, 0.02), "d": (0.40, 0.01), "b": (0.49, 0.005)}
    assert ranking_with_ties(scores) == [["a", "b", "c"], ["d"]]
    # the larger std decides: 0.03 apart, one std 0.04 -> tied; 0.05 apart -> not
    assert ranking_with_ties({"x": (0.5, 0.0), "y": (0.47, 0.04)}) == [["x", "y"]]
    assert ranking_with_ties({"x": (0.5, 0.01), "y": (0.45, 0.04)}) == [["x"], ["y"]]
    # the difference must be strictly smaller; std 0 (or nan: one seed) never ties; nan means are left out
    assert ranking_with_ties({"x": (0.5, 0.25), "y": (0.25, 0.125)}) == [["x"], ["y"]]  # exact in binary
    assert ranking_with_ties({"x": (0.5, 0.0), "y": (0.5, 0.0)}) == [["x"], ["y"]]
    assert ranking_with_ties({"x": (0.5, float("nan")), "y": (0.49, 0.05)}) == [["x"], ["y"]]
    assert ranking_with_ties({"x": (float("nan"), 0.1), "y": (0.3, 0.1)}) == [["y"]]
    assert ranking_with_ties({}) == []


def test_report_ties_with_three_seeds(tmp_path):
    vals = {"spm": [0.50, 0.52, 0.48],      # mean 50.0, std 2.0
            "lora": [0.49, 0.51, 0.47],     # mean 49.0, std 2.0: within the spread of spm -> tied
            "linear": [0.40, 0.41, 0.39]}   # mean 40.0, std 1.0: 9 points below lora -> ranked
    recs = [make_record(m, s, {"val": v}) for m, vs in vals.items() for s, v in enumerate(vs)]
    report = write(tmp_path, recs)
    assert ranking_line(report, "val") == "spm (50.0) ≈ lora (49.0) > linear (40.0)"
    assert "≈: the difference is smaller than the seed spread (std over seeds); such methods are tied, not ranked." \
        in report
    assert "ties cannot be judged" not in report
    # _rankings is unchanged: mean per method
    (scores,) = _rankings(aggregate(recs)).values()
    assert scores == pytest.approx({"spm": 0.50, "lora": 0.49, "linear": 0.40})


def test_report_one_seed_never_ties(tmp_path):
    recs = [make_record("spm", 0, {"val": 0.500}), make_record("lora", 0, {"val": 0.499}),
            make_record("linear", 0, {"val": 0.40})]
    report = write(tmp_path, recs)
    assert ranking_line(report, "val") == "spm (50.0) > lora (49.9) > linear (40.0)"
    assert "With one seed, ties cannot be judged" in report
    assert "≈" not in report


# ---------------------------------------------------------------------------- learning rates


def trials(values: Dict[float, Optional[float]]) -> List[Dict[str, Any]]:
    """``lr_trials`` from {lr: held-out mIoU, or None for a diverged trial}."""
    return [{"lr": lr, "holdout_miou": v, "status": "ok" if v is not None else "diverged"}
            for lr, v in values.items()]


def test_report_lr_section(tmp_path):
    sweep = {0: ({1e-4: 0.45, 3e-4: 0.44, 1e-3: None}, 1e-4),
             1: ({1e-4: 0.47, 3e-4: 0.46, 1e-3: None}, 1e-4),
             2: ({1e-4: 0.43, 3e-4: 0.46, 1e-3: None}, 3e-4)}
    recs = [make_record("spm", s, {"val": 0.5 + s / 100}, lr_trials=trials(t), lr_chosen=lr, holdout_fraction=0.1)
            for s, (t, lr) in sweep.items()]
    # lora: one of its 2 seeds diverged at 1e-3
    recs += [make_record("lora", 0, {"val": 0.48}, lr_trials=trials({1e-4: 0.40, 1e-3: 0.42}), lr_chosen=1e-3,
                         holdout_fraction=0.1),
             make_record("lora", 1, {"val": 0.47}, lr_trials=trials({1e-4: 0.41, 1e-3: None}), lr_chosen=1e-4,
                         holdout_fraction=0.1)]
    recs += [make_record("linear", s, {"val": 0.40}) for s in range(3)]  # a fixed lr: no sweep, no row
    report = write(tmp_path, recs)
    section = report.split("## Learning rates (chosen on a held-out part of the training split)")[1].split("\n## ")[0]
    assert "(10% of it)" in section
    assert ("| ade | vit-t | linear frozen | spm | 1e-04 (seeds 0,1), 3e-04 (seed 2) | "
            "1e-04: 45.0; 3e-04: 45.3; 1e-03: diverged | 0.3 |") in section
    assert ("| ade | vit-t | linear frozen | lora | 1e-04 (seed 1), 1e-03 (seed 0) | "
            "1e-04: 40.5; 1e-03: 42.0 (diverged in 1 of 2 seeds) | 1.5 |") in section
    assert "| linear |" not in section
    # choices at the edge of the tried range are named
    assert ("Chose the highest learning rate tried (1 of 2 rows; their best lr may lie outside the range tried): "
            "lora on ade, vit-t, linear frozen (seed 0).") in section
    assert ("Chose the lowest learning rate tried (2 of 2 rows; their best lr may lie outside the range tried): "
            "lora on ade, vit-t, linear frozen (seed 1); spm on ade, vit-t, linear frozen (seeds 0,1).") in section
    # the main table keeps its columns
    assert ("| backbone | setting | method | seeds | val mIoU | trainable (% bb) | ckpt KB | step ms | img/s | "
            "peak MB | latency ms |") in report
    rows = {r["method"]: r for r in aggregate(recs)}
    assert rows["spm"]["lr_chosen"] == [1e-4, 1e-4, 3e-4]
    assert "lr_chosen" not in rows["linear"]


def test_report_lr_section_inside_the_range(tmp_path):
    recs = [make_record("spm", s, {"val": 0.5}, lr_trials=trials({1e-4: 0.40, 3e-4: 0.45, 1e-3: 0.41}),
                        lr_chosen=3e-4, holdout_fraction=0.2) for s in range(2)]
    report = write(tmp_path, recs)
    assert "No seed chose the highest or the lowest learning rate tried." in report
    assert "Chose the highest" not in report and "Chose the lowest" not in report


def test_report_lr_edges_are_judged_per_seed(tmp_path):
    """A grid that grew between seeds: seed 0 chose the top of its own grid, seed 1 the middle of its own."""
    recs = [make_record("spm", 0, {"val": 0.5}, lr_trials=trials({1e-4: 0.40, 3e-4: 0.45}), lr_chosen=3e-4),
            make_record("spm", 1, {"val": 0.5}, lr_trials=trials({1e-4: 0.40, 3e-4: 0.45, 1e-3: 0.41}),
                        lr_chosen=3e-4)]
    section = write(tmp_path, recs).split("## Learning rates")[1].split("\n## ")[0]
    assert "Chose the highest learning rate tried (1 of 1 rows" in section and "(seed 0)." in section
    assert "Chose the lowest" not in section and "No seed chose" not in section


def test_report_names_lrs_some_cells_of_a_row_never_tried(tmp_path):
    """An extended sweep chose an lr that other cells of its row never tried: the report names the lr,
    who chose it and who did not try it; a row whose cells all tried the chosen lrs is not named."""
    grid = {1e-4: 0.40, 3e-4: 0.41, 1e-3: 0.39}
    recs = [make_record("spm", 0, {"val": 0.5}, lr_trials=trials(grid), lr_chosen=3e-4),
            make_record("spm", 1, {"val": 0.6}, lr_trials=trials({**grid, 1e-4: 0.42, 2.5e-5: 0.48}),
                        lr_chosen=2.5e-5),
            make_record("lora", 0, {"val": 0.5}, lr_trials=trials(grid), lr_chosen=3e-4),
            make_record("lora", 1, {"val": 0.5}, lr_trials=trials(grid), lr_chosen=3e-4)]
    recs += [make_record(m, s, {"val": 0.5}, dataset="city", lr_trials=trials(grid), lr_chosen=3e-4)
             for m in ("spm", "lora") for s in (0, 1)]
    section = write(tmp_path, recs).split("## Learning rates")[1].split("\n## ")[0]
    assert "Sweeps of unequal reach (1 row(s))" in section
    assert ("- ade, vit-t, linear frozen: 2.5e-05 chosen by spm (seed 1); not tried by lora (seeds 0,1), "
            "spm (seed 0).") in section
    assert "- city," not in section
    (tmp_path / "same").mkdir()
    same = write(tmp_path / "same", [r for r in recs if r["dataset"] == "city"])
    assert "unequal reach" not in same


def test_report_without_lr_trials_has_no_lr_section(tmp_path):
    report = write(tmp_path, [make_record("spm", 0, {"val": 0.5}), make_record("linear", 0, {"val": 0.4})])
    assert "## Learning rates" not in report


# ---------------------------------------------------------------------------- domain shift


def test_report_domain_shift_columns_and_rankings(tmp_path):
    # trained on ade; on cityscapes the order of spm and lora flips
    scores = {"spm": (0.50, 0.30), "lora": (0.45, 0.35), "linear": (0.40, 0.20)}
    recs = [make_record(m, 0, {"val": v, "cityscapes:val": x}) for m, (v, x) in scores.items()]
    report = write(tmp_path, recs)
    header = next(ln for ln in report.splitlines() if ln.startswith("| backbone | setting | method | seeds |"))
    assert "| val mIoU | →cityscapes:val mIoU |" in header
    assert "| spm | 1 | 50.0 | 30.0 |" in report
    # the relative section compares on the first split, the dataset's own (val), not the shift
    assert "| ade | vit-t | linear frozen | spm | +10.0 |" in report
    assert ranking_line(report, "val") == "spm (50.0) > lora (45.0) > linear (40.0)"
    assert ranking_line(report, "→cityscapes:val") == "lora (35.0) > spm (30.0) > linear (20.0)"
    tau = report.split("### Splits against the clean split")[1].split("\n\n", 2)[1]
    head, _, row = tau.splitlines()[:3]
    assert head == "| dataset | backbone | setting | →cityscapes:val |"
    assert row == "| ade | vit-t | linear frozen | 0.33 |"  # one discordant pair of three
    pairs = json.loads((tmp_path / "kendall_tau.json").read_text())
    assert [p["tau_b"] for p in pairs] == pytest.approx([1 / 3])


def test_report_shift_only_split_is_not_the_clean_split(tmp_path):
    # no "val": the clean split is the dataset's own "test", not the (alphabetically first) shift key
    recs = [make_record(m, 0, {"test": v, "cityscapes:val": x})
            for m, (v, x) in {"spm": (0.5, 0.3), "lora": (0.4, 0.35)}.items()]
    report = write(tmp_path, recs)
    tau = report.split("### Splits against the clean split")[1]
    assert "| dataset | backbone | setting | →cityscapes:val |" in tau
    assert "| ade | vit-t | linear frozen | -1.00 |" in tau


# ---------------------------------------------------------------------------- summary (methods side by side)


def test_report_summary_puts_methods_side_by_side(tmp_path):
    recs = [make_record("linear", s, {"val": 0.40 + s / 100}) for s in range(3)]
    recs += [make_record("lora", s, {"val": 0.60 + s / 100}) for s in range(3)]
    recs += [make_record("spm", s, {"val": 0.70}) for s in range(2)]  # a third seed has not finished
    recs += [make_record("lora", 0, {"val": 0.30}, dataset="cityscapes"),
             make_record("spm", 0, {}, dataset="cityscapes", status="error", reason="boom")]
    report = write(tmp_path, recs)
    section = report.split("## Summary: val mIoU, methods side by side")[1].split("\n## ")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ")]
    assert rows[0] == "| dataset | backbone | setting | linear | lora | spm |"
    assert rows[1] == "| ade | vit-t | linear frozen | 41.0 ± 1.0 | 61.0 ± 1.0 | **70.0 ± 0.0** (n=2) |"
    assert rows[2] == "| cityscapes | vit-t | linear frozen | – | **30.0** | error |"
    # the summary comes before the per-dataset tables
    assert report.index("## Summary: val mIoU") < report.index("## ade")


def test_report_summary_orders_methods_as_the_profile_lists_them(tmp_path):
    """Columns follow the backbone entries' ``methods`` (baselines first, as a profile lists
    them; a second backbone's extra methods after), then unlisted methods alphabetically;
    methods listed but never run get no column."""
    cnn = dict(BACKBONE, methods=["linear", "spm", "lora", "never_run"])
    vit = dict(BACKBONE, label="vit-s", methods=["linear", "lora", "spm", "mona"])
    recs = [make_record(m, 0, {"val": 0.5}, backbone=cnn) for m in ("lora", "spm", "linear")]
    recs += [make_record(m, 0, {"val": 0.5}, backbone=vit, key=f"ade|vit-s|{SETTING}|{m}|0")
             for m in ("mona", "linear", "lora", "spm")]
    recs += [make_record("bitfit", 0, {"val": 0.5}, backbone=dict(BACKBONE))]
    report = write(tmp_path, recs)
    header = next(ln for ln in report.splitlines() if ln.startswith("| dataset | backbone | setting | "))
    assert header == "| dataset | backbone | setting | linear | spm | lora | mona | bitfit |"
    assert "| ade | vit-s | linear frozen | **50.0** | **50.0** | **50.0** | **50.0** | – |" in report  # a tie: all bold

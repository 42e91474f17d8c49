"""The learning-rate section of the benchmark report: which lr each seed's held-out sweep
chose, the held-out mIoU of every lr tried, and the rows whose choice lies at an edge of the
range tried."""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from .store import latest_records

__all__ = ["lr_section"]


def _lr(v: Any) -> str:
    """A learning rate in short scientific notation: ``1e-04``, ``3.5e-04``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    mant, exp = f"{v:.3e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{exp}"


def _seeds_text(seeds: Sequence[int]) -> str:
    """``seed 2`` or ``seeds 0,1``."""
    return ("seeds " if len(seeds) > 1 else "seed ") + ",".join(str(s) for s in seeds)


def lr_section(records: List[Dict[str, Any]],
               group_key: Callable[[Mapping[str, Any]], Tuple[str, str, str, str]]) -> List[str]:
    """Markdown: the learning rates chosen on the held-out part of the training split, per
    (dataset, backbone, setting, method), from the ``ok`` records (latest per cell) with
    ``lr_trials``; empty if there are none."""
    groups: Dict[Tuple[str, str, str, str], List[Dict[str, Any]]] = {}
    for r in latest_records(records):
        if r.get("status") == "ok" and r.get("lr_trials"):
            groups.setdefault(group_key(r), []).append(r)
    if not groups:
        return []
    fractions = sorted({float(r["holdout_fraction"]) for rs in groups.values() for r in rs
                        if isinstance(r.get("holdout_fraction"), (int, float))})
    frac = f" ({', '.join(f'{100 * f:g}%' for f in fractions)} of it)" if fractions else ""
    out = ["## Learning rates (chosen on a held-out part of the training split)", "",
           f"Each seed trained once per tried learning rate on the training split less a held-out part{frac} and "
           "kept the lr with the best held-out mIoU; the evaluation splits took no part in the choice. Held-out "
           "mIoU in points, mean over the seeds that finished that lr; spread = best minus worst of those finite "
           "means, in points (small: the method is insensitive to the lr in this range).", "",
           "| dataset | backbone | setting | method | chosen lr (per seed) | held-out mIoU per tried lr | spread |",
           "|---|---|---|---|---|---|---|"]
    edges: Dict[str, List[str]] = {"highest": [], "lowest": []}
    for key, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        chosen: Dict[float, List[int]] = {}
        for r in rs:
            if isinstance(r.get("lr_chosen"), (int, float)):
                chosen.setdefault(float(r["lr_chosen"]), []).append(r["seed"])
        chosen_text = ", ".join(f"{_lr(lr)} ({_seeds_text(sd)})" for lr, sd in sorted(chosen.items())) or "–"
        trials: Dict[float, List[Mapping[str, Any]]] = {}
        for r in rs:
            for t in r["lr_trials"]:
                trials.setdefault(float(t["lr"]), []).append(t)
        cells, means = [], []
        for lr, ts in sorted(trials.items()):
            vals = [float(t["holdout_miou"]) for t in ts if t.get("status", "ok") == "ok"
                    and isinstance(t.get("holdout_miou"), (int, float)) and math.isfinite(t["holdout_miou"])]
            fails = [(what, sum(1 for t in ts if t.get("status") == what)) for what in ("diverged", "error")]
            fails = [(what, c) for what, c in fails if c]
            if vals:
                means.append(statistics.fmean(vals))
                text = f"{100 * means[-1]:.1f}" + "".join(f" ({what} in {c} of {len(ts)} seeds)" for what, c in fails)
            elif fails:
                text = ", ".join(what if c == len(ts) else f"{what} in {c} of {len(ts)} seeds" for what, c in fails)
            else:
                text = "–"
            cells.append(f"{_lr(lr)}: {text}")
        spread = f"{100 * (max(means) - min(means)):.1f}" if len(means) > 1 else "–"
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {chosen_text} | {'; '.join(cells)} | {spread} |")
        for edge, pick in (("highest", max), ("lowest", min)):  # each seed against its own tried lrs
            sd = [r["seed"] for r in rs if len({t["lr"] for t in r["lr_trials"]}) > 1
                  and r.get("lr_chosen") == pick(t["lr"] for t in r["lr_trials"])]
            if sd:
                edges[edge].append(f"{key[3]} on {key[0]}, {key[1]}, {key[2]} ({_seeds_text(sd)})")
    out += [""] + [f"Chose the {edge} learning rate tried ({len(rows)} of {len(groups)} rows; their best lr may lie "
                   "outside the range tried): " + "; ".join(rows) + "." for edge, rows in edges.items() if rows]
    swept = any(len({t["lr"] for t in r["lr_trials"]}) > 1 for rs in groups.values() for r in rs)
    out += [] if edges["highest"] or edges["lowest"] or not swept else \
        ["No seed chose the highest or the lowest learning rate tried."]
    reach = _unequal_reach(groups)
    if reach:
        out += ["", f"Sweeps of unequal reach ({len(reach)} row(s)): a learning rate that some cells chose and other "
                "cells of the same row never tried (a sweep extended past its list's end where its own best was "
                "there). The others' choice inside the list is the best only if their held-out curve has a "
                "single peak; where it may not, compare the row's methods with care, or list these learning "
                "rates for every method:", ""] + [f"- {line}" for line in reach]
    return out + [""]


def _methods_seeds(members: Sequence[Tuple[str, Mapping[str, Any]]]) -> str:
    """``lora (seeds 0,1), spm (seed 2)`` for (method, record) pairs."""
    by: Dict[str, List[int]] = {}
    for m, r in members:
        by.setdefault(m, []).append(r["seed"])
    return ", ".join(f"{m} ({_seeds_text(sorted(sd))})" for m, sd in sorted(by.items()))


def _unequal_reach(groups: Mapping[Tuple[str, str, str, str], List[Dict[str, Any]]]) -> List[str]:
    """One line per (dataset, backbone, setting) row in which an lr chosen by some cells was never
    tried by others of the row (its methods were not all offered the same learning rates)."""
    rows: Dict[Tuple[str, str, str], List[Tuple[str, Dict[str, Any]]]] = {}
    for key, rs in groups.items():
        rows.setdefault(key[:3], []).extend((key[3], r) for r in rs)
    lines = []
    for row, members in sorted(rows.items()):
        tried = [{float(t["lr"]) for t in r["lr_trials"]} for _, r in members]
        parts = []
        for lr in sorted({float(r["lr_chosen"]) for _, r in members if isinstance(r.get("lr_chosen"), (int, float))}):
            untried = [mr for mr, t in zip(members, tried) if lr not in t]
            if untried:
                chose = [(m, r) for m, r in members if r.get("lr_chosen") == lr]
                parts.append(f"{_lr(lr)} chosen by {_methods_seeds(chose)}; not tried by {_methods_seeds(untried)}")
        if parts:
            lines.append(f"{', '.join(row)}: " + ". ".join(parts) + ".")
    return lines

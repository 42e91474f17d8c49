"""The report of a benchmark folder, from ``results.jsonl`` alone: tables of mean and spread
over seeds, diverged cells, costs relative to the frozen backbone and full fine-tuning,
rankings of the methods, Kendall's tau-b between rankings, and plots."""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .lr_report import lr_section
from .pivot import summary_section
from .plots import plot_report
from .spec import defaults_version
from .store import ResultStore, latest_records

__all__ = ["aggregate", "kendall_tau_b", "ranking_with_ties", "write_report", "reason_summary", "shorten", "tail_lines",
           "NO_MATPLOTLIB"]

#: what the report (and the console) says when the plots cannot be drawn
NO_MATPLOTLIB = ("No plots: matplotlib is not installed in this Python environment ({error}); install it "
                 "(pip install matplotlib) and write the report again with --report-only --out <this folder>.")

_logger = logging.getLogger(__name__)


def _group_key(r: Mapping[str, Any]) -> Tuple[str, str, str, str]:
    return (r["dataset"], r["backbone"].get("label", r["backbone"]["name"]), r["setting_label"], _method_label(r))


def _method_label(r: Mapping[str, Any]) -> str:
    """A record's method label; one recorded under earlier defaults of its method (its key
    names an older version than a cell of the same method and config would today) gets
    ``" (defaults vN)"``, so its seeds never pool with today's."""
    try:
        key = json.loads(r["key"])
    except (KeyError, TypeError, ValueError):
        return r["method"]
    variant = key.get("variant") or {}
    version = int(key.get("defaults", 1))
    if version == defaults_version(variant.get("name", key.get("method", r["method"])), variant.get("cfg") or {}):
        return r["method"]
    return f"{r['method']} (defaults v{version})"


def _mean_std(vals: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return float(statistics.fmean(vals)), float(statistics.stdev(vals)) if len(vals) > 1 else 0.0


def aggregate(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and std over seeds per (dataset, backbone, setting, method) of the ``ok`` records.

    Skipped and failed cells appear with ``status`` and ``reason`` and no numbers. A group
    in which any seed diverged has ``status: "diverged"`` (its other seeds would overstate the
    method), so it is never ranked. A cell recorded twice (e.g. an error retried) counts
    once: the last record wins. ``miou`` keeps the dataset's own splits first, then the
    ``"<other dataset>:<split>"`` keys of a cell evaluated on another dataset (domain shift).
    ``lr_chosen`` (the learning rate each seed's held-out sweep chose, in seed order) is
    there when the records carry it.
    """
    groups: Dict[Tuple[str, str, str, str], List[Mapping[str, Any]]] = {}
    for r in latest_records(records):
        groups.setdefault(_group_key(r), []).append(r)
    rows = []
    for (dataset, backbone, setting, method), rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("status") == "ok"]
        row: Dict[str, Any] = {"dataset": dataset, "backbone": backbone, "setting": setting, "method": method,
                               "n_seeds": len(ok), "seeds": sorted(r["seed"] for r in ok)}
        diverged = sorted((r for r in rs if r.get("status") == "diverged"), key=lambda r: r["seed"])
        if diverged:
            row.update(status="diverged", n_diverged=len(diverged), reason=(
                f"diverged in {len(diverged)} of {len(rs)} seed(s): " + "; ".join(
                    f"seed {r['seed']} at step {r.get('diverged_at_step')} (lr {_num(r.get('diverged_lr'))}, "
                    f"loss {_num(r.get('diverged_loss'))})" for r in diverged)))
            rows.append(row)
            continue
        if not ok:
            row.update(status=rs[0].get("status"), reason=rs[0].get("reason", ""))
            rows.append(row)
            continue
        row["status"] = "ok"
        # the dataset's own splits first, then "<other dataset>:<split>" (domain shift), each in record order
        splits = sorted(ok[0]["miou"], key=lambda s: ":" in s)
        row["miou"] = {s: _mean_std([r["miou"].get(s) for r in ok]) for s in splits}
        for k in ("trainable_params", "trainable_pct", "checkpoint_bytes", "step_time_median_s", "throughput_img_s",
                  "peak_mem_mb", "latency_ms_median", "wall_s"):
            row[k] = _mean_std([r.get(k) for r in ok])
        if any("lr_chosen" in r for r in ok):  # the learning rate each seed's held-out sweep chose
            row["lr_chosen"] = [r.get("lr_chosen") for r in sorted(ok, key=lambda r: r["seed"])]
        rows.append(row)
    return rows


#: a line that starts with an exception's name: ``ValueError: ...``, ``mmengine.x.ConfigError: ...``
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")


def shorten(text: str, limit: int) -> str:
    """``text`` with its whitespace collapsed to single spaces and, when longer than ``limit``
    characters, cut at the last word boundary before it and ended with ``...`` (the start is
    kept; a word is cut only if it alone is longer than half the limit)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, max(1, limit - 3) + 1)
    if cut < limit // 2:
        cut = max(1, limit - 3)
    return text[:cut].rstrip(" ,;:") + "..."


def tail_lines(text: str, limit: int = 4000) -> str:
    """The last whole lines of ``text`` that fit in ``limit`` characters (all of it when it
    fits; the last ``limit`` characters when its last line alone is longer): how a long
    reason (a traceback, a child's stderr) is kept in a record without starting mid-word."""
    if len(text) <= limit:
        return text
    cut = text.find("\n", len(text) - limit)
    return text[cut + 1:] if cut != -1 and cut + 1 < len(text) else text[-limit:]


def reason_summary(reason: Any, limit: int = 400) -> str:
    """Why a cell failed, in one line for a console or a table: of a traceback (also the tail
    of a child's stderr), the final exception's name and its whole message; else the reason
    itself; shortened with :func:`shorten`. The record keeps the full reason."""
    lines = str(reason or "").splitlines()
    start = None
    for i, line in enumerate(lines):  # the last traceback is the final exception's
        if line.startswith("Traceback (most recent call last)"):
            start = i
    if start is not None:  # its frames are indented; the exception starts at the first line that is not
        start = next((j for j in range(start + 1, len(lines)) if lines[j] and not lines[j][0].isspace()), None)
    if start is None:  # a traceback whose start was cut off: the last line naming an exception
        start = next((i for i in reversed(range(len(lines))) if _EXCEPTION_LINE.match(lines[i])), None)
    return shorten(" ".join(lines[start:] if start is not None else lines), limit)


def _reason_line(reason: Any) -> str:
    """A record's reason for a table cell (see :func:`reason_summary`)."""
    return reason_summary(reason, 160).replace("|", "/")


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two paired score sequences (ties handled; nan if undefined)."""
    n = len(x)
    if n != len(y):
        raise ValueError("kendall_tau_b needs sequences of the same length")
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom > 0 else float("nan")


def _rankings(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str, str], Dict[str, float]]:
    """Method scores (mean mIoU) per (dataset, backbone, setting, split)."""
    out: Dict[Tuple[str, str, str, str], Dict[str, float]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        for split, (m, _) in r["miou"].items():
            if not math.isnan(m):
                out.setdefault((r["dataset"], r["backbone"], r["setting"], split), {})[r["method"]] = m
    return out


def _ranking_spreads(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str, str], Dict[str, Tuple[float, float]]]:
    """Method (mean, std over seeds) of mIoU per (dataset, backbone, setting, split): the keys and
    methods of :func:`_rankings`, with the std; the std is nan for a method with fewer than two
    seeds, whose ties cannot be judged."""
    out: Dict[Tuple[str, str, str, str], Dict[str, Tuple[float, float]]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        for split, (m, s) in r["miou"].items():
            if not math.isnan(m):
                out.setdefault((r["dataset"], r["backbone"], r["setting"], split), {})[r["method"]] = (
                    m, s if r.get("n_seeds", 0) >= 2 else float("nan"))
    return out


def _tied(a: Tuple[float, float], b: Tuple[float, float]) -> bool:
    """Whether two (mean, std) scores are tied: both stds finite and the means closer than the larger std."""
    if not (math.isfinite(a[1]) and math.isfinite(b[1])):
        return False
    return abs(a[0] - b[0]) < max(a[1], b[1])


def ranking_with_ties(scores: Mapping[str, Tuple[float, float]]) -> List[List[str]]:
    """Methods in groups of tied methods, best mean first, from ``{method: (mean, std over seeds)}``.

    Methods are ordered by mean (ties of equal means by name); two neighbours in that order are
    tied when ``|mean_a - mean_b| < max(std_a, std_b)``, and ties chain (a ≈ b and b ≈ c put a,
    b and c in one group). A method whose std is not finite (nan: one seed) ties with nothing;
    with std 0 on both sides nothing ties either. Methods with a nan mean are left out.
    """
    order = sorted(((m, (float(ms[0]), float(ms[1]))) for m, ms in scores.items() if not math.isnan(ms[0])),
                   key=lambda kv: (-kv[1][0], kv[0]))
    groups: List[List[str]] = []
    prev: Optional[Tuple[float, float]] = None
    for m, ms in order:
        if prev is not None and _tied(prev, ms):
            groups[-1].append(m)
        else:
            groups.append([m])
        prev = ms
    return groups


def _split_label(split: str) -> str:
    """A split key as shown in tables: ``"<other dataset>:<split>"`` (evaluated on another dataset,
    a domain shift) gets an arrow, ``→cityscapes:val``; a split of the dataset itself is unchanged."""
    return f"→{split}" if ":" in split else split


def _tau(a: Mapping[str, float], b: Mapping[str, float]) -> Tuple[float, int]:
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return float("nan"), len(common)
    return kendall_tau_b([a[m] for m in common], [b[m] for m in common]), len(common)


def _fmt(ms: Tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if s else f"{m * scale:.{digits}f}"


def _relative_section(rows: List[Dict[str, Any]], frozen: str = "linear", full: str = "full") -> List[str]:
    """Markdown: every method against the frozen backbone (``linear``) and full fine-tuning
    with the same dataset, backbone and setting: mIoU difference and cost ratios."""
    ok = {(r["dataset"], r["backbone"], r["setting"], r["method"]): r for r in rows if r["status"] == "ok"}
    groups = sorted({k[:3] for k in ok})
    if not any((g + (frozen,)) in ok or (g + (full,)) in ok for g in groups):
        return []
    out = ["## Relative to the frozen backbone and to full fine-tuning", "",
           f"Same dataset, backbone and setting; `{frozen}` is the frozen backbone with the setting's decoder. "
           "mIoU differences in points on the first split; ratios of means.", "",
           f"| dataset | backbone | setting | method | mIoU - {frozen} | mIoU - {full} | step time / {full} | "
           f"peak memory / {full} | latency / {frozen} |", "|---|---|---|---|---|---|---|---|---|"]

    def diff(a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> str:
        if b is None:
            return "–"
        split = next(iter(a["miou"]))
        if split not in b["miou"]:
            return "–"
        return f"{100 * (a['miou'][split][0] - b['miou'][split][0]):+.1f}"

    def ratio(a: Dict[str, Any], b: Optional[Dict[str, Any]], key: str) -> str:
        if b is None or not b[key][0] or math.isnan(b[key][0]) or math.isnan(a[key][0]):
            return "–"
        return f"{a[key][0] / b[key][0]:.2f}"

    for g in groups:
        fz, ft = ok.get(g + (frozen,)), ok.get(g + (full,))
        for m in sorted(k[3] for k in ok if k[:3] == g):
            r = ok[g + (m,)]
            out.append(f"| {g[0]} | {g[1]} | {g[2]} | {m} | {diff(r, fz)} | {diff(r, ft)} | "
                       f"{ratio(r, ft, 'step_time_median_s')} | {ratio(r, ft, 'peak_mem_mb')} | "
                       f"{ratio(r, fz, 'latency_ms_median')} |")
    return out + [""]


def _diverged_section(records: List[Dict[str, Any]]) -> List[str]:
    """Markdown list of the diverged cells (latest record per cell); empty if none."""
    div = [r for r in latest_records(records) if r.get("status") == "diverged"]
    if not div:
        return []
    out = ["## Diverged cells (not ranked)", "",
           "Training met a non-finite loss, gradient or weight and stopped; these cells have no mIoU, and a "
           "method/setting with any diverged seed is left out of the rankings. Lower the learning rate, or let "
           "cells skip a few bad steps with the spec's `max_bad_steps`.", "",
           "| dataset | backbone | setting | method | seed | step | loss | lr | not finite | skipped before |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(div, key=lambda r: _group_key(r) + (r["seed"],)):
        d, b, st, m = _group_key(r)
        out.append(f"| {d} | {b} | {st} | {m} | {r['seed']} | {r.get('diverged_at_step')} | "
                   f"{_num(r.get('diverged_loss'))} | {_num(r.get('diverged_lr'))} | {r.get('diverged_what', '')} | "
                   f"{len(r.get('skipped_steps') or [])} |")
    return out + [""]


def _method_order(records: Sequence[Mapping[str, Any]]) -> List[str]:
    """The methods of ``records`` in the order their profile lists them (each backbone entry's
    ``methods``, in record order), then any other method alphabetically."""
    seen = {r["method"] for r in records if "method" in r}
    order: List[str] = []
    for r in records:
        backbone = r.get("backbone")
        for m in (backbone.get("methods") or ()) if isinstance(backbone, Mapping) else ():
            if m in seen and m not in order:
                order.append(m)
    return order + sorted(seen - set(order))


def write_report(out: Union[str, os.PathLike], plots: bool = True) -> Path:
    """Write ``<out>/report.md`` (and PNG plots) from ``<out>/results.jsonl`` alone."""
    out = Path(out)
    records = ResultStore(out / "results.jsonl").load()
    rows = aggregate(records)
    lines = [f"# Benchmark report ({out.name})", ""]
    latest = latest_records(records)  # a cell recorded again (--retry-errors) counts as its last record says
    ok_recs = [r for r in latest if r.get("status") == "ok"]

    def count(status: str) -> int:
        return sum(1 for r in latest if r.get("status") == status)

    lines.append(f"{len(latest)} cells recorded: "
                 f"{sum(1 for r in rows if r['status'] == 'ok')} method/setting groups with results, "
                 f"{count('skipped')} skipped, {count('error')} failed, "
                 f"{count('diverged')} diverged (listed apart, never ranked). "
                 "Values are mean ± std over seeds (std shown when more than one seed).")
    if ok_recs:
        v = ok_recs[-1].get("versions", {})
        lines.append(f"Device: {ok_recs[-1].get('device')}; software: " +
                     ", ".join(f"{k} {val}" for k, val in v.items()))
        lines.append("Memory: " + ok_recs[-1].get("peak_mem_kind", "") + " (MB), one process per cell.")
    lines += [""] + summary_section(rows, methods=_method_order(latest))
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"## {dataset}", ""]
        drows = [r for r in rows if r["dataset"] == dataset]
        splits: List[str] = []
        for r in drows:
            for s in r.get("miou", {}):
                if s not in splits:
                    splits.append(s)
        head = ["backbone", "setting", "method", "seeds"] + [f"{_split_label(s)} mIoU" for s in splits] + \
               ["trainable (% bb)", "ckpt KB", "step ms", "img/s", "peak MB", "latency ms"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in drows:
            if r["status"] != "ok":
                reason = _reason_line(r.get("reason"))
                lines.append(f"| {r['backbone']} | {r['setting']} | {r['method']} | – | "
                             f"{r['status']}: {reason} |" + " |" * (len(head) - 5))
                continue
            cells = [_fmt(r["miou"][s], 100) if s in r["miou"] else "–" for s in splits]
            lines.append(f"| {r['backbone']} | {r['setting']} | {r['method']} | {r['n_seeds']} | " + " | ".join(cells) +
                         f" | {r['trainable_params'][0]:,.0f} ({r['trainable_pct'][0]:.2f}%) | "
                         f"{r['checkpoint_bytes'][0] / 1024:.0f} | {_fmt(r['step_time_median_s'], 1000, 0)} | "
                         f"{_fmt(r['throughput_img_s'], 1, 1)} | {_fmt(r['peak_mem_mb'], 1, 0)} | "
                         f"{_fmt(r['latency_ms_median'], 1, 1)} |")
        lines.append("")

    lines += _diverged_section(records)
    lines += lr_section(records, _group_key)
    lines += _relative_section(rows)
    ranks = _rankings(rows)
    if ranks:
        spreads = _ranking_spreads(rows)
        lines += ["## Rankings of methods", "",
                  "Methods ordered by mean mIoU (best first), per dataset, backbone, setting and split.", "",
                  "| id | dataset | backbone | setting | split | ranking |", "|---|---|---|---|---|---|"]
        ids = {}
        for i, (key, scores) in enumerate(sorted(ranks.items()), 1):
            ids[key] = f"R{i}"
            order = " > ".join(" ≈ ".join(f"{m} ({100 * scores[m]:.1f})" for m in group)
                               for group in ranking_with_ties(spreads[key]))
            lines.append(f"| R{i} | {key[0]} | {key[1]} | {key[2]} | {_split_label(key[3])} | {order} |")
        stds = [s for scores in spreads.values() for _, s in scores.values()]
        judged, single = any(math.isfinite(s) for s in stds), any(not math.isfinite(s) for s in stds)
        lines.append("")
        if judged:
            lines.append("≈: the difference is smaller than the seed spread (std over seeds); "
                         "such methods are tied, not ranked.")
        if single:
            lines.append("With one seed, ties cannot be judged: \">\" only orders the means." if not judged else
                         "A method with one seed is never marked tied: with one seed, ties cannot be judged.")
        lines += ["", "## Kendall's tau-b between rankings", "",
                  "Over the methods two rankings share; 1 = same order, -1 = reversed, nan = fewer than 2 "
                  "common methods or all tied.", ""]
        keys = sorted(ranks)
        taus = []
        for a, b in itertools.combinations(keys, 2):
            t, n = _tau(ranks[a], ranks[b])
            taus.append((a, b, t, n))
        # main view: the val (or first) split across datasets and settings, as a matrix
        main_split = "val" if any(k[3] == "val" for k in keys) else next(
            (k[3] for k in keys if ":" not in k[3]), keys[0][3])  # a split of the dataset itself, not a shift
        mk = [k for k in keys if k[3] == main_split]
        if len(mk) > 1:
            lines += [f"### Across datasets and settings ({main_split} split)", "",
                      "| | " + " | ".join(ids[k] for k in mk) + " |", "|---|" + "---|" * len(mk)]
            for a in mk:
                row = [f"{_tau(ranks[a], ranks[b])[0]:.2f}" for b in mk]
                lines.append(f"| {ids[a]} ({a[0]}, {a[2]}) | " + " | ".join(row) + " |")
            lines.append("")
        lines += ["### Splits against the clean split (per dataset, backbone and setting)", "",
                  "| dataset | backbone | setting | " + " | ".join(
                      _split_label(s) for s in sorted({k[3] for k in keys if k[3] != main_split})) + " |"]
        other = sorted({k[3] for k in keys if k[3] != main_split})
        lines.append("|---|---|---|" + "---|" * len(other))
        for k in mk:
            row = []
            for s in other:
                kk = (k[0], k[1], k[2], s)
                row.append(f"{_tau(ranks[k], ranks[kk])[0]:.2f}" if kk in ranks else "–")
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(row) + " |")
        finite = [t for _, _, t, _ in taus if not math.isnan(t)]
        lines += ["", f"All {len(taus)} pairs of rankings: mean tau-b "
                  f"{statistics.fmean(finite):.2f} (min {min(finite):.2f}) over {len(finite)} defined pairs."
                  if finite else f"All {len(taus)} pairs of rankings: no defined tau (fewer than 2 common methods, or all tied).", ""]
        (out / "kendall_tau.json").write_text(json.dumps(
            [{"a": ids[a], "b": ids[b], "tau_b": None if math.isnan(t) else t, "n_methods": n} for a, b, t, n in taus], indent=1) + "\n")
    if plots and any(r["status"] == "ok" for r in rows):
        try:
            import matplotlib  # noqa: F401  (an optional dependency: the report is written without it)
        except ImportError as e:
            note = NO_MATPLOTLIB.format(error=f"{type(e).__name__}: {e}")
            _logger.warning("%s: %s", out / "report.md", note)
            lines += ["## Plots", "", note, ""]
        else:
            paths = plot_report(rows, out)
            lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in paths] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    _logger.info("wrote %s", path)
    return path


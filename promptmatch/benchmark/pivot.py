"""A benchmark's results side by side: one row per dataset, backbone and setting, one column
per method (the table a paper prints)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["pivot_rows", "summary_section"]

Row = Tuple[str, str, str]


def pivot_rows(rows: Sequence[Mapping[str, Any]], split: str = "val",
               methods: Optional[Sequence[str]] = None) -> Tuple[List[str], Dict[Row, Dict[str, Mapping[str, Any]]]]:
    """The methods (in the order given, else in the order of ``rows``) and, per (dataset,
    backbone, setting), each method's aggregated row (from :func:`report.aggregate`) that has
    ``split``, or is not ``ok`` (its status is shown instead)."""
    order: List[str] = list(methods) if methods is not None else []
    table: Dict[Row, Dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        if methods is not None and r["method"] not in methods:
            continue
        if r["status"] == "ok" and split not in r.get("miou", {}):
            continue
        if r["method"] not in order:
            order.append(r["method"])
        table.setdefault((r["dataset"], r["backbone"], r["setting"]), {})[r["method"]] = r
    return order, table


def summary_section(rows: Sequence[Mapping[str, Any]], split: str = "val",
                    methods: Optional[Sequence[str]] = None) -> List[str]:
    """Markdown lines: ``split`` mIoU (points, mean ± std over seeds) of every method side by
    side, the best mean of each row in bold; a cell with fewer seeds than the row's most says
    how many (``n=2``); empty when no row has that split."""
    order, table = pivot_rows(rows, split, methods)
    if not table:
        return []
    out = [f"## Summary: {split} mIoU, methods side by side", "",
           "Mean ± std over seeds, in points; the best mean of each row in bold; `n=k`: only k seeds "
           "finished (the row's others have more).", "",
           "| dataset | backbone | setting | " + " | ".join(order) + " |", "|---|---|---|" + "---|" * len(order)]
    for (dataset, backbone, setting), cells in sorted(table.items()):
        ok = {m: r for m, r in cells.items() if r["status"] == "ok"}
        most = max((r["n_seeds"] for r in ok.values()), default=0)
        best = max((r["miou"][split][0] for r in ok.values() if math.isfinite(r["miou"][split][0])), default=None)
        texts = []
        for m in order:
            r = cells.get(m)
            if r is None:
                texts.append("–")
                continue
            if r["status"] != "ok":
                texts.append(str(r["status"]))
                continue
            mean, std = r["miou"][split]
            text = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if r["n_seeds"] > 1 else "")
            if best is not None and mean == best:
                text = f"**{text}**"
            if r["n_seeds"] < most:
                text += f" (n={r['n_seeds']})"
            texts.append(text)
        out.append(f"| {dataset} | {backbone} | {setting} | " + " | ".join(texts) + " |")
    return out + [""]

"""The plots of a benchmark report (matplotlib, an optional dependency imported here only)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Tuple

__all__ = ["plot_report"]


def plot_report(rows: List[Dict[str, Any]], out: Path) -> List[Path]:
    """Write the report's PNG plots into ``out`` from :func:`~.report.aggregate`'s rows: per
    dataset, mIoU against trainable parameters with the Pareto front; step time and peak
    memory per method. Returns their paths. Needs matplotlib (raises ImportError without it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    paths: List[Path] = []
    for dataset in sorted({r["dataset"] for r in ok}):
        rs = [r for r in ok if r["dataset"] == dataset and "val" in r["miou"]] or \
             [r for r in ok if r["dataset"] == dataset]
        split = "val" if all("val" in r["miou"] for r in rs) else next(iter(rs[0]["miou"]))
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        settings = sorted({r["setting"] for r in rs})
        markers = "osD^v<>ph*"
        for i, setting in enumerate(settings):
            for r in (r for r in rs if r["setting"] == setting):
                x, y = max(1.0, r["trainable_params"][0]), 100 * r["miou"][split][0]
                ax.errorbar(x, y, yerr=100 * r["miou"][split][1], fmt=markers[i % len(markers)], capsize=2,
                            label=f"{setting}" if r is next(q for q in rs if q["setting"] == setting) else None)
                ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        pts = sorted(((max(1.0, r["trainable_params"][0]), 100 * r["miou"][split][0]) for r in rs))
        front, best = [], -1.0
        for x, y in pts:  # Pareto front: fewer parameters and higher mIoU
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, alpha=0.6,
                    label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"{split} mIoU (%)")
        ax.set_title(f"{dataset}: mIoU vs trainable parameters")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"pareto_{dataset}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    for metric, label, fname, scale in (("step_time_median_s", "training step time (ms, median)", "step_time.png", 1000),
                                        ("peak_mem_mb", "peak training memory (MB)", "memory.png", 1)):
        groups: Dict[Tuple[str, str], List[float]] = {}
        for r in ok:
            groups.setdefault((r["method"], r["setting"].split(" ")[0]), []).append(r[metric][0] * scale)
        methods = sorted({m for m, _ in groups})
        decoders = sorted({d for _, d in groups})
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(methods) + 2), 4))
        w = 0.8 / max(1, len(decoders))
        for j, dec in enumerate(decoders):
            xs = [i + j * w for i, m in enumerate(methods) if (m, dec) in groups]
            ys = [statistics.fmean(groups[(m, dec)]) for m in methods if (m, dec) in groups]
            ax.bar(xs, ys, width=w, label=f"decoder {dec}")
        ax.set_xticks([i + w * (len(decoders) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels(methods)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per method (mean over datasets and backbones)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths

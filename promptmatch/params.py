"""Parameter accounting: what trains, what stays frozen."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from torch import nn

__all__ = ["ParameterReport", "parameter_report"]


@dataclass
class ParameterReport:
    """Trainable and frozen parameter counts of a segmentor, by component."""

    components: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def backbone_total(self) -> int:
        c = self.components.get("backbone", {})
        return c.get("trainable", 0) + c.get("frozen", 0)

    @property
    def trainable(self) -> int:
        return sum(c["trainable"] for c in self.components.values())

    @property
    def frozen(self) -> int:
        return sum(c["frozen"] for c in self.components.values())

    def percent_of_backbone(self, count: int) -> float:
        return 100.0 * count / max(1, self.backbone_total)

    def as_dict(self) -> Dict[str, object]:
        return {
            "components": {k: dict(v) for k, v in self.components.items()},
            "trainable": self.trainable,
            "frozen": self.frozen,
            "backbone": self.backbone_total,
            "trainable_percent_of_backbone": round(self.percent_of_backbone(self.trainable), 4),
        }

    def __str__(self) -> str:
        rows: List[str] = [f"{'component':<14}{'trainable':>14}{'frozen':>14}{'% backbone':>12}"]
        for name, c in self.components.items():
            rows.append(
                f"{name:<14}{c['trainable']:>14,}{c['frozen']:>14,}{self.percent_of_backbone(c['trainable'] + (c['frozen'] if name != 'backbone' else 0)):>11.2f}%"
            )
        rows.append(
            f"{'total':<14}{self.trainable:>14,}{self.frozen:>14,}{self.percent_of_backbone(self.trainable):>11.2f}%"
        )
        rows.append("(% backbone: a component's size, or for 'total' all trainable parameters, over the backbone's size)")
        return "\n".join(rows)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count trainable and frozen parameters of each top-level component of ``model``."""
    report = ParameterReport()
    seen = set()
    for name, child in model.named_children():
        counts = {"trainable": 0, "frozen": 0}
        for p in child.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        report.components[name] = counts
    rest = {"trainable": 0, "frozen": 0}
    for p in model.parameters(recurse=False):
        rest["trainable" if p.requires_grad else "frozen"] += p.numel()
    if rest["trainable"] or rest["frozen"]:
        report.components["(own)"] = rest
    return report

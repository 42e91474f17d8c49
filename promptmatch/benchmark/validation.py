"""Everything a benchmark run will meet, checked before it trains anything.

:func:`check_run` is what ``--validate`` reports and what :func:`~.runner.run_benchmark`
refuses a run on, so a spec that validates is one a run accepts: the data
(:func:`~.data.check_spec_data`: missing folders, every bad-data case) and each cell's
settings resolved against the data, this machine and the installed packages
(:func:`check_cells`): a memory-engine cell with ``image_size`` null on images of several
sizes, dataset configs that do not resolve for the mmengine engine, an engine or a method
whose dependencies are missing, a device or ``amp`` this machine does not have. What a run
will do that a user may not expect (a method that does not apply to a backbone is skipped,
a report without plots) comes back as notes, not problems.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .data import check_spec_data, entry_source, mmseg_dataset_config, problems_text
from .errors import SpecError
from .spec import BenchmarkSpec, Cell, expand_grid

__all__ = ["RunCheck", "check_run", "check_cells"]

_logger = logging.getLogger(__name__)


@dataclass
class RunCheck:
    """What :func:`check_run` found: ``data`` and ``settings`` problems (a run refuses to
    start on any of them) and ``notes`` (what the run will do that may surprise)."""

    data: List[str] = field(default_factory=list)
    settings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def problems(self) -> List[str]:
        """Every problem, the data's first."""
        return self.data + self.settings

    def headline(self) -> str:
        """``N data problem(s) and M problem(s) with the settings, ...``."""
        return problems_text(self.data, self.settings)


def check_run(spec: BenchmarkSpec, cells: Optional[Sequence[Cell]] = None, deep: bool = True,
              progress: bool = False) -> RunCheck:
    """Check the spec's data and the settings of ``cells`` (default: the whole grid) before
    any training; every problem found is listed, nothing is written."""
    cells = expand_grid(spec) if cells is None else list(cells)
    data = check_spec_data(spec, deep=deep, progress=progress)
    settings, notes = check_cells(spec, cells)
    return RunCheck(data, settings, notes)


def check_cells(spec: BenchmarkSpec, cells: Sequence[Cell]) -> Tuple[List[str], List[str]]:
    """``(problems, notes)`` of the cells' settings resolved against the data, this machine
    and the installed packages (the data itself is :func:`~.data.check_spec_data`'s)."""
    problems = _machine_problems(spec, cells)
    problems += _engine_problems(cells)
    problems += _native_size_problems(cells)
    problems += _mmengine_dataset_problems(cells)
    method_problems, notes = _method_checks(cells)
    problems += method_problems
    notes += _slide_notes(cells)
    notes += _report_notes()
    return list(dict.fromkeys(problems)), list(dict.fromkeys(notes))


# ----------------------------------------------------------------------------- the machine
def _machine_problems(spec: BenchmarkSpec, cells: Sequence[Cell]) -> List[str]:
    """A CUDA device the machine does not have; an ``amp`` the resolved device cannot run."""
    import torch

    from promptmatch.inference import check_amp

    problems = []
    has_cuda = torch.cuda.is_available()
    if spec.device == "cuda" and not has_cuda:
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        problems.append(f"'device' is 'cuda', but this machine has no usable CUDA GPU ({why}); run on a machine with "
                        "one, or set the spec's 'device' to 'cpu' (or 'auto': the GPU where there is one)")
    device_type = "cuda" if spec.device == "cuda" or (spec.device == "auto" and has_cuda) else "cpu"
    for amp in sorted({str(c.settings.get("amp")) for c in cells if c.settings.get("amp")}):
        try:
            check_amp(amp, device_type)
        except ValueError as e:
            where = " (no GPU here)" if spec.device == "auto" else ""
            problems.append(f"setting 'amp': {e} (the spec's 'device' is {spec.device!r}{where})")
    return problems


# ----------------------------------------------------------------------------- engines
def _engine_problems(cells: Sequence[Cell]) -> List[str]:
    """What the cells' engines need: the mmseg stack (``mmengine``: mmseg's datasets, models and
    pipelines), mmengine alone (``runner``: promptmatch's own folder engine, which trains folder
    datasets only)."""
    from promptmatch.stack import SETUP_COMMAND, mmseg_stack_error

    problems = []
    mm = [c for c in cells if c.settings.get("engine") == "mmengine"]
    err = mmseg_stack_error() if mm else None
    if err is not None:
        cause = err.__cause__ if err.__cause__ is not None else err
        problems.append(_engine_problem(mm, "mmengine", "the mmseg stack (mmengine, mmcv with its compiled ops, "
                                        "mmsegmentation)", f"{type(cause).__name__}: {cause}",
                                        f"from the promptmatch checkout with `{SETUP_COMMAND}`"))
    runner = [c for c in cells if c.settings.get("engine") == "runner"]
    if runner:
        try:
            import mmengine  # noqa: F401
        except ImportError as e:
            problems.append(_engine_problem(runner, "runner", "mmengine", f"{type(e).__name__}: {e}",
                                            "with pip install mmengine"))
        others = sorted({repr(c.dataset["name"]) for c in runner if entry_source(c.dataset).name != "folder"})
        if others:
            problems.append(f"the runner engine trains folder datasets only, and dataset {', '.join(others)} is not "
                            "one; set \"engine\": \"memory\" (offline datasets) or \"mmengine\" (mmseg configs) "
                            "in the spec's settings")
    return problems


def _engine_problem(cells: Sequence[Cell], engine: str, what: str, error: str, how: str) -> str:
    datasets = ", ".join(sorted({repr(c.dataset["name"]) for c in cells}))
    memory_ok = all(not c.backbone.get("mmseg_model") and all(
        entry_source(e).in_memory for e in [c.dataset, *(c.dataset.get("targets") or [])]) for c in cells)
    return (f"{len(cells)} cell(s) (dataset {datasets}) run on the {engine} engine (the setting 'engine', or the "
            f"default of the dataset's source or an mmseg model), which needs {what}; it is not installed "
            f"in this Python environment ({error}). Install it {how}"
            + (", or set \"engine\": \"memory\" in the spec's settings (datasets small enough to hold in memory)"
               if memory_ok else ""))


def _eval_items(cell: Cell) -> List[Tuple[Mapping[str, Any], str]]:
    """``(dataset entry, split)`` of every evaluation of a cell: its own splits, then its
    domain-shift targets'."""
    out = [(cell.dataset, sp) for sp in cell.dataset["splits"]]
    for t in cell.dataset.get("targets") or []:
        out += [(t, sp) for sp in t["splits"]]
    return out


def _native_size_problems(cells: Sequence[Cell]) -> List[str]:
    """Memory-engine cells with ``image_size`` null on splits whose images differ in size."""
    found: Dict[Tuple[str, str], Optional[str]] = {}
    for c in cells:
        if c.settings.get("engine") != "memory" or c.settings.get("image_size"):
            continue
        for entry, split in [(c.dataset, c.dataset.get("train_split", "train"))] + _eval_items(c):
            key = (entry["name"], split)
            if key not in found:
                found[key] = entry_source(entry).native_size_problem(entry, split)
    return [p for p in found.values() if p]


def _mmengine_dataset_problems(cells: Sequence[Cell]) -> List[str]:
    """The mmseg dataset configs of every mmengine cell, built as the cell builds them (a
    folder whose images mix suffixes, an ``image_size`` a config cannot take, ...)."""
    from promptmatch.datasets.folder import FolderDatasetError

    problems: List[str] = []
    seen = set()
    for c in cells:
        if c.settings.get("engine") != "mmengine":
            continue
        size = c.settings.get("image_size")
        crop = (int(size), int(size)) if size else (512, 512)
        train_split = c.dataset.get("train_split", "train")
        items = [(c.dataset, train_split, True)] + [(e, sp, False) for e, sp in _eval_items(c)]
        if isinstance(c.settings.get("lr"), Mapping):  # the held-out part of the training split
            items.append((c.dataset, train_split, False))
        for entry, split, train in items:
            key = (json.dumps(entry, sort_keys=True, default=str), split, train, crop, bool(size))
            if key in seen:
                continue
            seen.add(key)
            try:
                mmseg_dataset_config(entry, split, train, crop, None, explicit_size=bool(size))
            except SpecError as e:
                problems.append(str(e))
            except (FolderDatasetError, ImportError):
                pass  # bad data, or an mmseg_config without the mmseg stack: listed by the other checks
    return problems


def _slide_notes(cells: Sequence[Cell]) -> List[str]:
    """Sliding-window evaluation whose window covers the whole (resized) image: it runs, as one
    window, the same as ``eval_mode: whole``."""
    notes = []
    for size, crop in sorted({(c.settings["image_size"], c.settings["eval_crop"]) for c in cells
                              if c.settings.get("eval_mode") == "slide" and c.settings.get("image_size")
                              and c.settings.get("engine") == "memory"}):
        if crop >= size:
            notes.append(f"setting eval_crop {crop} is not smaller than image_size {size}: the memory engine's "
                         "sliding-window evaluation is then one window per image, the same as eval_mode 'whole'")
    return notes


# ----------------------------------------------------------------------------- methods
def _method_checks(cells: Sequence[Cell]) -> Tuple[List[str], List[str]]:
    """Each method built once on each timm backbone (random init): a missing optional
    dependency (e.g. peft for lora) is a problem; a method that does not apply to the backbone
    is a note (its cells are recorded as skipped). Other errors are left to the cells."""
    import torch

    import promptmatch as pm

    missing: Dict[Tuple[str, str], List[str]] = {}
    skipped: Dict[Tuple[str, str, str], int] = {}
    built: Dict[str, Optional[BaseException]] = {}
    for c in cells:
        b = c.backbone
        if b.get("mmseg_model"):
            continue  # the mmseg model's own config decides; its cells record what does not apply
        key = json.dumps([b["name"], b.get("kwargs"), b.get("num_stages"), c.method_name, c.method_cfg],
                         sort_keys=True, default=str)
        if key not in built:
            built[key] = _build_error(pm, torch, b, c)
        err = built[key]
        if isinstance(err, pm.MethodNotApplicableError):
            k = (c.method, b["name"], str(err))
            skipped[k] = skipped.get(k, 0) + 1
        elif isinstance(err, ImportError):
            missing.setdefault((c.method, str(err)), [])
            if b["name"] not in missing[(c.method, str(err))]:
                missing[(c.method, str(err))].append(b["name"])
    problems = [f"method {m!r} (on {', '.join(bbs)}): {msg}; install it, or leave {m!r} out of the spec's methods"
                for (m, msg), bbs in missing.items()]
    notes = [f"method {m!r} does not apply to backbone {bb!r} ({msg}): its {n} cell(s) will be recorded as "
             f"skipped; to leave them out, give the backbone's entry the \"methods\" that apply to it"
             for (m, bb, msg), n in skipped.items()]
    return problems, notes


def _build_error(pm: Any, torch: Any, backbone: Mapping[str, Any], cell: Cell) -> Optional[BaseException]:
    """The exception building the cell's method on its backbone (random init) raises, or None."""
    quiet = logging.getLogger("promptmatch")  # what a build logs is the cell's to say, not the check's
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):  # the cells' seeds stay theirs
            model = pm.create_segmentor(backbone["name"], cell.method_name, 2, "linear",
                                        method_cfg=dict(cell.method_cfg) or None,
                                        num_stages=backbone.get("num_stages"),
                                        backbone_kwargs=dict(backbone.get("kwargs") or {}) or None)
        del model
    except (pm.MethodNotApplicableError, ImportError) as e:
        return e
    except Exception as e:  # not what this check is for: the cell records it with its traceback
        _logger.debug("building %s on %s for the checks failed: %s", cell.method, backbone["name"], e)
    finally:
        quiet.setLevel(level)
    return None


# ----------------------------------------------------------------------------- the report
def _report_notes() -> List[str]:
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module without a spec (e.g. set to None in sys.modules)
        found = False
    if found:
        return []
    return ["matplotlib is not installed: report.md will be written without plots (pip install matplotlib, then "
            "--report-only writes them)"]

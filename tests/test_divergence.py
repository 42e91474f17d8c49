"""A diverged run never passes for a result and never overwrites a good checkpoint:
the library loop, save_prompts, benchmark cells and reports, concurrent benchmark runs."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import promptmatch as pm
from promptmatch import benchmark as bm
from promptmatch.benchmark.report import _rankings
from promptmatch.training import train_segmentor

from conftest import make_backbone, make_batch

REPO = Path(__file__).resolve().parents[1]
HUGE_LR = 1e20  # the first update is finite and enormous; the next loss is not finite


def _model(method="spm", seed=0):
    torch.manual_seed(seed)
    return pm.create_segmentor(make_backbone("test_resnet", {}, seed=seed), method, 4, "linear")


def _trainable(model):
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


# ---------------------------------------------------------------------------- library loop


@pytest.mark.parametrize("method", ["linear", "spm", "full"])
def test_library_loop_stops_at_the_first_non_finite_step(method):
    model = _model(method)
    x, y = make_batch(64, n=4)
    seen = []
    with pytest.raises(pm.DivergenceError) as info:
        train_segmentor(model, x, y, steps=8, batch=2, lr=HUGE_LR, on_step=lambda i, loss: seen.append(i))
    e = info.value
    assert e.step <= 2 and e.reason in ("loss", "gradients") and e.skipped == []
    assert e.lr == pytest.approx(HUGE_LR * (1 - e.step / 8) ** 0.9)
    msg = str(e)
    assert f"step {e.step}" in msg and "lr" in msg and "lower the learning rate" in msg
    assert seen == list(range(e.step))  # stopped within the step, before reporting it
    # the bad step changed nothing: every trainable weight is still finite
    assert not pm.divergence.non_finite_tensors(model.trainable_state_dict())


def test_library_loop_skips_a_bounded_number_of_bad_steps():
    x, y = make_batch(64, n=4)
    x[0] = float("nan")  # every batch holding image 0 has a NaN loss
    model = _model("spm")
    initial = _trainable(model)
    run = train_segmentor(model, x, y, steps=11, batch=1, lr=1e-3, seed=0, max_bad_steps=11)
    bad = [i for i, loss in enumerate(run["losses"]) if loss != loss]
    # seed 0, batch 1 draws image 0 at steps 0, 1, 4, 5 and 8: the run ends on good steps
    assert bad == [0, 1, 4, 5, 8] and run["skipped"] == bad
    assert not pm.divergence.non_finite_tensors(model.trainable_state_dict())
    assert any(not torch.equal(initial[k], v) for k, v in model.trainable_state_dict().items())  # good steps trained

    before = _trainable(model)
    with pytest.raises(pm.DivergenceError, match=r"1 bad step\(s\) skipped before") as info:
        train_segmentor(model, x, y, steps=11, batch=1, lr=1e-3, seed=0, max_bad_steps=1)
    assert info.value.skipped == bad[:1] and info.value.step == bad[1]
    after = _trainable(model)
    # no good step before the stop (steps 0 and 1 are bad): nothing changed at all, BatchNorm statistics included
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not pm.divergence.non_finite_tensors(after)

    # a run whose last step is bad never recovered: it fails even within its budget
    with pytest.raises(pm.DivergenceError, match="last step"):
        train_segmentor(_model("spm"), x, y, steps=bad[-1] + 1, batch=1, lr=1e-3, seed=0, max_bad_steps=11)


def test_library_loop_refuses_a_bad_max_bad_steps():
    x, y = make_batch(64, n=2)
    with pytest.raises(ValueError, match="max_bad_steps must be an integer >= 0"):
        train_segmentor(_model("linear"), x, y, steps=1, batch=1, lr=1e-3, max_bad_steps=-1)


# --------------------------------------------------------------------------- save_prompts


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_save_prompts_refuses_non_finite_tensors_and_keeps_the_old_file(tmp_path, bad):
    model = _model("spm")
    path = pm.save_prompts(model, tmp_path / "p.safetensors")
    before = path.read_bytes(), path.with_suffix(".json").read_bytes()
    name, param = next((n, p) for n, p in model.named_parameters() if n.startswith("method."))
    with torch.no_grad():
        param.view(-1)[0] = bad
    with pytest.raises(pm.NonFiniteError, match=rf"NaN or infinite values \({name}\).*left as it was"):
        pm.save_prompts(model, path)
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.safetensors"]  # no temporary left
    with pytest.raises(pm.NonFiniteError, match="Nothing was written"):
        pm.save_prompts(model, tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()


# ------------------------------------------------------------------------------ benchmark

TINY = {
    "name": "tiny-div",
    "methods": ["linear", "spm"],
    "backbones": [{"name": "test_resnet"}],
    "datasets": [{"name": "nuclei", "splits": ["val"]}],
    "settings": {"steps": 4, "batch": 2, "image_size": 64, "warmup": 1, "eval_batch": 64, "latency_images": 1},
    "seeds": [0],
}


def test_benchmark_cell_records_divergence(tmp_path):
    spec = bm.validate_spec({**TINY, "settings": {**TINY["settings"], "lr": HUGE_LR}})
    recs = bm.run_benchmark(spec, tmp_path, progress=False, isolate=False)
    assert [r["status"] for r in recs] == ["diverged", "diverged"]
    for r in recs:
        assert r["diverged_at_step"] <= 2 and r["diverged_lr"] > 1e19 and "miou" not in r
        assert "diverged at step" in r["reason"] and r["trainable_params"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "2 diverged (listed apart, never ranked)" in report and "## Diverged cells (not ranked)" in report
    assert "## Rankings of methods" not in report  # nothing finished, nothing ranked
    # recorded, so a resumed run does not train them again
    assert bm.run_benchmark(spec, tmp_path, progress=False, isolate=False, report=False) == []

    # with a budget of bad steps the key changes and the cell is run on its own terms
    spec2 = bm.validate_spec({**TINY, "methods": ["linear"], "max_bad_steps": 50,
                              "settings": {**TINY["settings"], "lr": HUGE_LR}})
    (rec,) = bm.run_benchmark(spec2, tmp_path, progress=False, isolate=False, report=False)
    assert rec["key"] != recs[0]["key"] and '"max_bad_steps":50' in rec["key"]
    # every step after the first was skipped, the last one too: it never recovered
    assert rec["status"] == "diverged" and rec["skipped_steps"] == [1, 2] and rec["diverged_at_step"] == 3
    assert "last step" in rec["reason"]
    with pytest.raises(bm.SpecError, match="'max_bad_steps' must be an integer >= 0"):
        bm.validate_spec({**TINY, "max_bad_steps": -1})


def test_report_ranks_only_finished_cells(tmp_path):
    spec = bm.validate_spec({**TINY, "methods": ["linear", "spm", "bitfit"], "seeds": [0, 1]})
    recs = bm.run_benchmark(spec, tmp_path / "src", progress=False, isolate=False, report=False)
    assert {r["status"] for r in recs} == {"ok"}
    # bitfit diverged on seed 1 (its seed 0 finished): the whole method/setting is left out of the rankings
    out = tmp_path / "mixed"
    out.mkdir()
    store = bm.ResultStore(out / "results.jsonl")
    for r in recs:
        if r["method"] == "bitfit" and r["seed"] == 1:
            r = copy.deepcopy(r)
            for k in ("miou", "per_class_iou", "latency_ms_median", "checkpoint_bytes"):
                r.pop(k)
            r.update(status="diverged", diverged_at_step=3, diverged_loss=float("nan"), diverged_lr=2e-3,
                     diverged_what="loss", reason="training diverged at step 3: the loss is nan (lr 0.002)")
        store.append(r)
    rows = bm.aggregate(store.load())
    status = {row["method"]: row["status"] for row in rows}
    assert status == {"linear": "ok", "spm": "ok", "bitfit": "diverged"}
    bitfit = next(row for row in rows if row["method"] == "bitfit")
    assert "diverged in 1 of 2 seed(s): seed 1 at step 3" in bitfit["reason"]
    ranks = _rankings(rows)
    assert ranks and all(set(scores) == {"linear", "spm"} for scores in ranks.values())
    report = (bm.write_report(out, plots=False)).read_text()
    ranking_lines = [line for line in report.splitlines() if line.startswith("| R")]
    assert ranking_lines and not any("bitfit" in line for line in ranking_lines)
    diverged = report.split("## Diverged cells (not ranked)")[1].split("##")[0]
    assert "| bitfit | 1 | 3 |" in diverged and "| linear |" not in diverged and "| spm |" not in diverged
    assert "1 diverged" in report


# -------------------------------------------------------------------- concurrent runs


def _cli(spec_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "promptmatch.benchmark", "--spec", str(spec_path), "--out",
                             str(out), "--no-progress", *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**TINY, "methods": ["linear"]}))
    out = tmp_path / "out"
    with bm.OutputLock(out):
        with pytest.raises(bm.BenchmarkLockedError, match=r"another benchmark run \(pid \d+"):
            with bm.OutputLock(out):
                pass
        proc = _cli(spec_path, out)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr[-2000:]
        assert "another benchmark run" in stderr and "--out" in stderr
        assert not (out / "results.jsonl").exists()
    with bm.OutputLock(out):  # released: it can be taken again
        pass


@pytest.mark.slow
def test_two_concurrent_runs_leave_a_valid_results_file(tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    procs = [_cli(spec_path, out), _cli(spec_path, out)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    # either one was refused while the other ran, or the second found every cell finished
    assert codes in ([0, 0], [0, 2]), [(rc, err[-1500:]) for _, err, rc in results]
    ran = sorted(int(re.search(r"(\d+) cells run", out).group(1)) for out, _, rc in results if rc == 0)
    if codes == [0, 2]:  # the second start found the folder locked and was refused
        assert ran == [2] and "another benchmark run" in next(err for _, err, rc in results if rc == 2)
    else:  # the second start came after the first had finished: it found every cell done
        assert ran == [0, 2]
    lines = [line for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    recs = [json.loads(line) for line in lines]  # every line is whole JSON
    assert sorted(r["key"] for r in recs) == sorted(c.key for c in bm.expand_grid(bm.load_spec(spec_path)))
    assert all(r["status"] == "ok" for r in recs)

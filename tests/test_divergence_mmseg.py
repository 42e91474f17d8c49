"""Divergence on the mmseg path: PromptEncoderDecoder's train step under an mmengine optimiser
wrapper, this project's tools/train.py and mmseg's own, and the prompt checkpoint hook."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmseg")
pytestmark = pytest.mark.slow

import promptmatch as pm  # noqa: E402

from mmseg_utils import SIDE, make_tiny_dataset, python, run, write_backbone_weights, write_configs  # noqa: E402

HUGE_LR = "1e20"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("div_mmseg")
    data_root = make_tiny_dataset(tmp / "data")
    cfg = write_configs(tmp, "upernet_r50", tmp / "backbone.pth", data_root)
    write_backbone_weights(cfg, tmp / "backbone.pth")
    return tmp, cfg


def _build(cfg, **model_kwargs):
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    c = Config.fromfile(str(cfg))
    c.model.update(model_kwargs)
    torch.manual_seed(0)
    model = MODELS.build(c.model)
    model.init_weights()
    return model


def _batch(nan: bool = False):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        img = torch.randint(0, 255, (3, SIDE, SIDE), generator=g).float()
        if nan:
            img[:, :4, :4] = float("nan")
        inputs.append(img)
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, SIDE, SIDE), generator=g))
        s.set_metainfo(dict(img_shape=(SIDE, SIDE), ori_shape=(SIDE, SIDE), pad_shape=(SIDE, SIDE)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def _state(model):
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def test_train_step_skips_or_stops_on_a_non_finite_loss(setup):
    from mmengine.optim import OptimWrapper

    _, cfg = setup
    model = _build(cfg, max_bad_steps=1)
    model.train()
    ow = OptimWrapper(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    log = model.train_step(_batch(), ow)
    assert torch.isfinite(log["loss"])
    before = _state(model)
    model.train_step(_batch(nan=True), ow)  # skipped: nothing changes, BatchNorm statistics included
    after = _state(model)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.divergence_guard.skipped) == 1 and not model.divergence_guard.last_step_ok
    model.train_step(_batch(), ow)  # a good step trains again
    assert model.divergence_guard.last_step_ok
    assert any(not torch.equal(after[k], v) for k, v in model.trainable_state_dict().items())
    before = _state(model)
    with pytest.raises(pm.DivergenceError, match=r"diverged at step \d+: the loss is nan \(lr 0.001\)"):
        model.train_step(_batch(nan=True), ow)  # the budget of one bad step is spent
    assert all(torch.equal(before[k], v) for k, v in model.trainable_state_dict().items())
    with pytest.raises(ValueError, match="max_bad_steps must be an integer >= 0"):
        _build(cfg, max_bad_steps=-2)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_checkpoint_hook_keeps_the_last_finite_prompts(setup, tmp_path):
    from mmengine.logging import MMLogger

    from promptmatch.mmseg import PromptCheckpointHook

    _, cfg = setup
    model = _build(cfg)
    runner = SimpleNamespace(model=model, work_dir=str(tmp_path), cfg=SimpleNamespace(filename=str(cfg)), iter=2)
    hook = PromptCheckpointHook(interval=2, out_dir=str(tmp_path))
    hook._save(runner, str(tmp_path / "prompts" / "iter_2.safetensors"), 2)
    files = sorted(tmp_path.rglob("*"))
    before = {p: p.read_bytes() for p in files if p.is_file()}
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("decode_head."))[0].fill_(float("nan"))
    logger, records = MMLogger.get_current_instance(), _Records()
    logger.addHandler(records)
    try:
        hook._save(runner, str(tmp_path / "prompts" / "iter_4.safetensors"), 4)
    finally:
        logger.removeHandler(records)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    text = " ".join(records.messages)
    assert "NOT written at iteration 4" in text and "last finite prompts" in text


def _train(cfg, work, *options, script="tools/train.py", cwd=None):
    cmd = [python(), script, str(cfg), "--work-dir", str(work)]
    if options:
        cmd += ["--cfg-options", *options]
    return run(cmd, cwd=cwd) if cwd else run(cmd)


def test_train_tool_stops_or_skips_and_keeps_the_good_prompts(setup):
    tmp, cfg = setup
    work = tmp / "work"
    res = _train(cfg, work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    prompts = sorted(p for p in (work / "prompts").rglob("*") if p.is_file()) + \
        [work / "prompts.safetensors", work / "prompts.json"]
    good = {p: p.read_bytes() for p in prompts}
    pm.read_prompt_metadata(work / "prompts.safetensors")

    # stop (the default): exit status 3, the message names the iteration, loss and lr
    res = _train(cfg, work, f"optim_wrapper.optimizer.lr={HUGE_LR}", "train_cfg.max_iters=4")
    out = res.stdout + res.stderr
    assert res.returncode == 3, out[-4000:]
    assert "error: training diverged at step" in res.stderr and "lr 1e+20" in res.stderr, res.stderr[-2000:]
    assert {p: p.read_bytes() for p in prompts} == good

    # skip: every iteration after the first is bad; no prompt checkpoint is written from them
    res = _train(cfg, work, f"optim_wrapper.optimizer.lr={HUGE_LR}", "train_cfg.max_iters=4",
                 "model.max_bad_steps=10")
    out = res.stdout + res.stderr
    assert res.returncode == 3, out[-4000:]  # it ended on a skipped iteration: never recovered
    assert "it ended on an iteration skipped as non-finite" in res.stderr, res.stderr[-2000:]
    assert "skipped (the loss is nan" in out and "prompt checkpoint NOT written at iteration 2" in out, out[-4000:]
    assert "prompt checkpoint NOT written at iteration 4" in out
    assert not (work / "prompts" / "iter_4.safetensors").exists()
    assert {p: p.read_bytes() for p in prompts} == good


def test_mmseg_own_train_script_stops(setup):
    import mmseg

    tmp, cfg = setup
    script = str(Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py")
    work = tmp / "mmseg_work"
    res = _train(cfg, work, f"optim_wrapper.optimizer.lr={HUGE_LR}", "train_cfg.max_iters=4", script=script, cwd=tmp)
    assert res.returncode != 0
    assert "DivergenceError" in res.stderr and "diverged at step" in res.stderr, res.stderr[-3000:]
    shutil.rmtree(work, ignore_errors=True)

"""Faults that would show on a GPU, shown on the CPU where the same cause can be reproduced
(issue: ready for the first GPU user)."""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import timm
import torch

import promptmatch as pm

from conftest import make_batch
from method_contract import CONTRACT_BACKBONES, NUM_CLASSES, applies, build


def _seg(num_classes: int, decoder: str, backbone=None, seed: int = 0):
    torch.manual_seed(seed)
    backbone = backbone if backbone is not None else timm.create_model("test_resnet", pretrained=False)
    seg = pm.create_segmentor(backbone, "spm", num_classes, decoder)
    with torch.no_grad():
        for p in seg.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return seg.eval()


def test_bank_add_follows_the_backbones_device_and_dtype(tmp_path):
    """A bank whose backbone is not on the CPU in float32 (here float64, the same fault as
    CUDA: the matchers and head were built on the default device and dtype) builds each
    dataset's matchers and head where the backbone is, and gives that dataset's logits."""
    backbone = timm.create_model("test_resnet", pretrained=False).double()
    paths = {}
    refs = {}
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    for name, (k, decoder) in {"a": (3, "linear"), "b": (4, "multilevel")}.items():
        seg = _seg(k, decoder, backbone, seed=len(paths)).double()
        with torch.no_grad():
            refs[name] = seg(images)
        paths[name] = pm.save_prompts(seg, tmp_path / f"{name}.safetensors")
    bank = pm.PromptBank(backbone).eval()
    for name, path in paths.items():
        bank.add(name, path)
    assert {p.dtype for p in bank.parameters()} == {torch.float64}
    with torch.no_grad():
        for name in ("b", "a"):
            torch.testing.assert_close(bank(images, name), refs[name], rtol=0, atol=0)


def test_nccl_init_gets_its_timeout_in_seconds(monkeypatch):
    """mmengine's init_dist converts ``timeout`` with ``timedelta(seconds=timeout)``: the benchmark
    must pass a number of seconds (a timedelta raised TypeError at start-up of every GPU run)."""
    mmengine_dist = pytest.importorskip("mmengine.dist", reason="the mmseg stack is not installed")
    import torch.distributed as dist

    from promptmatch.benchmark import runner

    seen = {}

    def fake_init_dist(launcher, backend="nccl", **kwargs):
        seen.update(launcher=launcher, backend=backend, **kwargs)

    monkeypatch.setattr(mmengine_dist, "init_dist", fake_init_dist)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert runner._init_distributed("cuda") == 0
    assert seen["launcher"] == "pytorch" and seen["backend"] == "nccl"
    assert isinstance(seen["timeout"], int) and not isinstance(seen["timeout"], bool)
    # what mmengine 0.10.7 does with it
    assert datetime.timedelta(seconds=seen["timeout"]) == datetime.timedelta(hours=12)


def test_ddp_wrapper_on_gpus_gets_the_settings_of_the_cpu_branch(monkeypatch):
    """The GPU branch used to set only the wrapper type, leaving DDP's own defaults
    (broadcast_buffers=True, find_unused_parameters=False whatever the config says); the CPU
    branch (tested with gloo in tests/test_distributed.py) sets both."""
    pytest.importorskip("mmseg", reason="the mmseg stack is not installed")
    from mmengine.config import Config

    from promptmatch.mmseg import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config(dict(find_unused_parameters=True))
    runtime.prepare_distributed(cfg, "pytorch")
    wrapper = cfg.model_wrapper_cfg
    assert wrapper["type"] == "promptmatch.PromptDistributedDataParallel"
    assert wrapper["broadcast_buffers"] is False
    assert wrapper["find_unused_parameters"] is True


# ----------------------------------------------------------------------------- helpers
CLASSES = ["background", "thing", "stuff"]
SIDE = 64
TINY = {"image_size": SIDE, "steps": 2, "batch": 2, "warmup": 1, "eval_batch": 4, "latency_images": 1,
        "workers": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder dataset in mmseg's layout (img_dir/, ann_dir/, classes.json): 4 train, 3 val images."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (len(CLASSES), 3))
    for split, n in (("train", 4), ("val", 3)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            mask = np.kron(rng.integers(0, len(CLASSES), (4, 4)), np.ones((SIDE // 4, SIDE // 4), dtype=np.int64))
            img = np.clip(palette[mask] + rng.normal(0, 20, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "img_dir" / split / f"{i:04d}.png")
            Image.fromarray(mask.astype(np.uint8)).save(root / "ann_dir" / split / f"{i:04d}.png")
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


def _cell(folder, method="linear", backbone=None, device="cpu", **settings):
    """The one cell of a spec: ``method`` on ``backbone`` (test_resnet) on the folder dataset."""
    from promptmatch import benchmark as bm

    spec = bm.validate_spec({"name": "device-faults", "methods": [method],
                             "backbones": [backbone or {"name": "test_resnet"}],
                             "datasets": [{"name": "mine", "folder": str(folder)}],
                             "settings": {**TINY, **settings}, "seeds": [0], "device": device})
    (cell,) = bm.expand_grid(spec)
    return cell


# ----------------------------------------------------------------------------- fault 3 (rest)

@pytest.mark.parametrize("backbone", CONTRACT_BACKBONES, ids=[b.id for b in CONTRACT_BACKBONES])
@pytest.mark.parametrize("method", pm.list_methods())
def test_every_trainable_parameter_gets_a_gradient(method, backbone):
    """No trainable parameter goes without a gradient (DDP without find_unused_parameters fails
    at its second iteration on one): parameters after the last stage, which the staged forward
    never runs (a ViT's final norm under bitfit and full), are frozen when the method is attached."""
    if not applies(method, backbone):
        pytest.skip(f"{method} does not apply to {backbone.name}")
    try:
        model = build(method, backbone)
    except ImportError as e:  # an optional dependency (peft for lora)
        pytest.skip(str(e))
    images, labels = make_batch(backbone.side, n=2, num_classes=NUM_CLASSES)
    sum(model.loss(images, labels).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"{method} on {backbone.name}: trainable parameters without a gradient"
    if method in ("bitfit", "full") and backbone.name == "test_vit":  # what the fault was about
        assert not model.backbone.norm.bias.requires_grad
        assert all(p.grad is None for p in model.backbone.norm.parameters())


def test_unreached_parameters_of_a_staged_backbone():
    """What the staged backbone reports as unreached: exactly the trainable parameters after the
    last stage; its modules' train/eval flags and the parameters' flags are left as they were."""
    vit = pm.create_backbone("test_vit").train()
    staged = pm.stage_backbone(vit, num_stages=2)
    assert staged.unreached_parameters() == []  # frozen: nothing trains
    for p in vit.parameters():
        p.requires_grad_(True)
    vit.blocks[0].eval()
    flags = [m.training for m in vit.modules()]
    names = [n for n, _ in staged.unreached_parameters()]
    assert names == ["norm.weight", "norm.bias"]
    assert [m.training for m in vit.modules()] == flags
    assert all(p.requires_grad for p in vit.parameters())


def test_mmseg_prompted_model_freezes_what_follows_the_last_stage(folder):
    """The same through mmseg: a PromptEncoderDecoder on promptmatch.TimmBackbone (which stages
    itself unfrozen) under bitfit leaves the ViT's final norm frozen, and every trainable
    parameter gets a gradient."""
    pytest.importorskip("mmseg", reason="the mmseg stack is not installed")
    import promptmatch.mmseg  # noqa: F401
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from promptmatch.benchmark import mmseg_cell

    register_all_modules(init_default_scope=False)

    cell = _cell(folder, method="bitfit", backbone={"name": "test_vit", "num_stages": 2}, engine="mmengine")
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(mmseg_cell.build_cell_config(cell, Path("unused"), 1e-3).model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and not any(n.startswith("backbone.model.norm.") for n in names), sorted(names)
    images, labels = make_batch(64, n=2, num_classes=3)
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData

    samples = []
    for lab in labels:
        s = SegDataSample(gt_sem_seg=PixelData(data=lab[None]))
        s.set_metainfo(dict(img_shape=(64, 64), pad_shape=(64, 64), ori_shape=(64, 64)))
        samples.append(s)
    losses = model.loss(images, samples)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# ----------------------------------------------------------------------------- fault 8
def _state(model):
    return {k: (v.device, v.dtype, v.detach().clone()) for k, v in model.state_dict().items()}


def test_export_checks_a_cpu_float32_copy_and_leaves_the_model_as_it_is(tmp_path):
    """A model whose parameters are not on the CPU in float32 (float64 here, standing in for a
    CUDA model with TF32) is traced and checked from a CPU float32 copy, onnxruntime's own
    precision: the check agrees to float32 rounding, and the model keeps its device, dtype,
    values and training mode (it used to be run as it was on float32 images: a CUDA reference
    with TF32 against onnxruntime at atol 1e-3, or here a dtype error)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install promptmatch[deploy])")
    model = _seg(3, "multilevel").double().train()
    before = _state(model)
    report = pm.export_onnx(model, tmp_path / "m.onnx", image_size=(64, 64))
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert report.argmax_agreement == 1.0
    assert model.training and all(m.training for m in model.method.modules())
    after = _state(model)
    assert after.keys() == before.keys()
    for k, (device, dtype, value) in before.items():
        assert after[k][:2] == (device, dtype), k
        assert torch.equal(after[k][2], value), k


@pytest.mark.parametrize("method", ["spm", "vpt", "adaptformer", "bitfit", "full"])
def test_model_on_cpu_float32_runs_like_the_model(method):
    """What export runs: the model with CPU float32 copies of its tensors, hooks of the method
    included (adaptformer's and vpt's hooks are closures over the method), gives the model's
    logits; afterwards the model has its own tensors back, bit for bit."""
    from promptmatch.onnx_check import on_cpu_float32

    torch.manual_seed(0)
    model = pm.create_segmentor(pm.create_backbone("test_vit"), method, 3, "multilevel").double().eval()
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = _state(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        with on_cpu_float32(model) as same:
            assert same is model and {p.dtype for p in model.parameters()} == {torch.float32}
            got = model(x.float())
        again = model(x)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    after = _state(model)
    for k, (device, dtype, value) in before.items():
        assert after[k][:2] == (device, dtype) and torch.equal(after[k][2], value), k


# ----------------------------------------------------------------------------- fault 2
def test_step_timer_keeps_the_peak_of_every_step_through_logger_resets(tmp_path):
    """mmengine's logger resets CUDA's peak counter at each log interval (get_max_cuda_memory):
    the step timer reads the peak at the end of every iteration, before the logger, and keeps
    the maximum. Shown with mmengine's real Runner and hook order, a counter that behaves as
    CUDA's allocator peak, and a hook at the LoggerHook's priority that resets it as the logger
    does on a GPU."""
    pytest.importorskip("mmengine", reason="the mmseg stack is not installed")
    from mmengine.hooks import Hook, LoggerHook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from mmengine.runner.priority import get_priority
    from torch.utils.data import DataLoader

    from promptmatch.benchmark.mmseg_cell import _StepTimer

    assert get_priority(_StepTimer.PRIORITY) < get_priority(LoggerHook.priority)  # runs first
    step_peaks = [50, 300, 20, 10]

    class PeakCounter:  # CUDA's max_memory_allocated: the largest allocation since the last reset
        peak = 0

    counter = PeakCounter()

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.allocations = list(step_peaks)

        def forward(self, x, mode="loss"):
            counter.peak = max(counter.peak, self.allocations.pop(0))
            return {"loss": (self.w * x).sum()}

    class ResetLikeTheLogger(Hook):
        priority = LoggerHook.priority

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            counter.peak = 0

    timer = _StepTimer(torch.device("cpu"), peak_bytes=lambda: counter.peak)
    runner = Runner(model=Toy(), work_dir=str(tmp_path), experiment_name=f"toy-{tmp_path.name}",
                    train_dataloader=DataLoader([{"x": torch.ones(1)}] * 4, batch_size=1),
                    train_cfg=dict(by_epoch=False, max_iters=4), optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.0)),
                    default_hooks=dict(logger=dict(type="LoggerHook", interval=1)),
                    custom_hooks=[ResetLikeTheLogger()], default_scope="mmengine")
    runner.register_hook(timer._hook)
    runner.train()
    assert len(timer.times) == 4
    assert counter.peak == 0  # what one reading after training would report
    assert timer.peak == max(step_peaks)


def test_peak_memory_fields_take_the_step_peak(monkeypatch):
    """On a GPU the record's peak is the larger of the allocator's peak now and the peak read
    during training (the allocator's own may have been reset since)."""
    from promptmatch.benchmark import common

    monkeypatch.setattr(common, "cuda_peak_bytes", lambda device: 100 * 2 ** 20)  # after the last reset
    fields = common.peak_memory_fields(torch.device("cuda"), 0.0, step_peak_bytes=300 * 2 ** 20)
    assert fields["peak_mem_mb"] == 300
    assert common.peak_memory_fields(torch.device("cuda"), 0.0)["peak_mem_mb"] == 100


# ----------------------------------------------------------------------------- fault 4
def test_cpu_cell_stays_on_the_cpu_where_mmengine_would_take_another_device(folder, tmp_path, monkeypatch):
    """mmengine's Runner moves every model to ``get_device()``, which is ``cuda`` on any machine
    with a GPU: a ``cpu`` mmengine cell run in-process (or under torchrun) trained on the GPU while
    its record said cpu. Here mmengine's device is set to ``meta`` (a device that is not the
    cell's, as cuda is on a GPU machine): the cell still trains and evaluates on the CPU, and its
    record names the device the model's parameters were on."""
    pytest.importorskip("mmseg", reason="the mmseg stack is not installed")
    from mmengine.device import utils as device_utils

    from promptmatch.benchmark import cell as cell_mod
    from promptmatch.benchmark import mmseg_cell

    monkeypatch.setattr(device_utils, "DEVICE", "meta")
    seen = []
    original = mmseg_cell.MmengineEngine._train

    def train(engine, runner):
        seen.append(next(mmseg_cell._model_of(runner).parameters()).device)
        return original(engine, runner)

    monkeypatch.setattr(mmseg_cell.MmengineEngine, "_train", train)
    rec = cell_mod.run_cell(_cell(folder, engine="mmengine"), work_dir=tmp_path / "cell")
    assert rec["status"] == "ok", rec.get("reason")
    assert [d.type for d in seen] == ["cpu"]
    assert rec["device"].startswith("cpu") and rec["peak_mem_kind"].startswith("cpu")
    assert device_utils.DEVICE == "meta"  # mmengine's own answer is back after the cell


def test_cpu_cell_of_the_runner_engine_stays_on_the_cpu(folder, tmp_path, monkeypatch):
    """Fault 4 on the folder engine (mmengine's Runner without mmseg): with mmengine's device set
    to ``meta`` (as ``cuda`` is on a GPU machine), a ``cpu`` cell trains and evaluates on the CPU
    and its record says so; ``promptmatch.train --device cpu`` goes the same way."""
    from mmengine.device import utils as device_utils

    from promptmatch.benchmark import cell as cell_mod
    from promptmatch.engine import runner as engine_runner

    monkeypatch.setattr(device_utils, "DEVICE", "meta")
    seen = []
    original = engine_runner.build_runner

    def build(cfg, segmentor, folder_, hooks=()):
        runner = original(cfg, segmentor, folder_, hooks=hooks)
        seen.append(next(runner.model.parameters()).device)
        return runner

    monkeypatch.setattr(engine_runner, "build_runner", build)
    rec = cell_mod.run_cell(_cell(folder, engine="runner"), work_dir=tmp_path / "cell")
    assert rec["status"] == "ok", rec.get("reason")
    assert seen and {d.type for d in seen} == {"cpu"}
    assert rec["device"].startswith("cpu") and rec["peak_mem_kind"].startswith("cpu")
    assert device_utils.DEVICE == "meta"  # mmengine's own answer is back after the cell


# ----------------------------------------------------------------------------- fault 7
def _autocast_seen(model):
    """A forward hook on the first convolution of ``model``'s backbone that records (autocast
    on?, its dtype) on the CPU at every call."""
    seen = []
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(
        lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    return seen, handle


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_both_engines_evaluate_in_the_precision_the_record_names(folder, tmp_path, amp):
    """Both engines evaluate under the setting's amp (the precision it trains and measures
    latency in) and their records say so. mmengine's ValLoop wraps val_step in
    ``autocast(enabled=False)``, which used to make mmengine cells evaluate in float32 whatever
    an autocast around the loop said."""
    pytest.importorskip("mmseg", reason="the mmseg stack is not installed")
    from promptmatch.benchmark import cell as cell_mod
    from promptmatch.benchmark import mmseg_cell
    from promptmatch.benchmark.common import eval_precision
    from promptmatch.benchmark.data import memory_tensors

    settings = {"amp": amp} if amp else {}
    want = (amp is not None, torch.bfloat16) if amp else (False, None)
    assert eval_precision(settings) == ("bf16 autocast" if amp else "float32")
    # the in-memory engine
    cell = _cell(folder, **settings)
    engine = cell_mod.MemoryEngine(cell, torch.device("cpu"))
    engine.prepare()
    model = engine._build()
    seen, handle = _autocast_seen(model)
    x, y = memory_tensors(cell.dataset, "val", SIDE)
    engine._evaluate(model, x, y)
    handle.remove()
    # the mmengine engine
    mcell = _cell(folder, engine="mmengine", **settings)
    mengine = mmseg_cell.MmengineEngine(mcell, torch.device("cpu"), tmp_path / "mm")
    mengine.prepare()
    runner, _ = mengine._runner(tmp_path / "mm", 1e-3)
    try:
        mseen, mhandle = _autocast_seen(mmseg_cell._model_of(runner))
        mengine._evaluate(runner, mengine._dataset(mcell.dataset, "val"), mengine.classes)
        mhandle.remove()
    finally:
        mmseg_cell._release(runner)
    for name, calls in (("memory", seen), ("mmengine", mseen)):
        assert calls, name
        assert {(on, dtype if on else None) for on, dtype in calls} == {want}, name


# ----------------------------------------------------------------------------- more of the kind
def test_train_segmentor_follows_the_models_device_and_dtype():
    """train_segmentor and evaluate_segmentor send batches to the model's device (they went to
    the CPU unless told: a CUDA model failed) in the model's dtype (float32 batches failed on a
    float64 or bfloat16 model)."""
    from promptmatch.training import evaluate_segmentor, train_segmentor

    model = _seg(3, "linear").double()
    images, labels = make_batch(64, n=4, num_classes=3)
    run = train_segmentor(model, images, labels, steps=2, batch=2, lr=1e-3)
    assert len(run["losses"]) == 2 and all(v == v for v in run["losses"])
    m, _, preds = evaluate_segmentor(model, images, labels, 3)
    assert 0.0 <= m <= 1.0 and preds.shape == labels.shape


@pytest.mark.cuda
def test_train_and_evaluate_a_cuda_model_without_naming_the_device():
    """On a GPU: a CUDA model trains and evaluates (fp16 autocast included) with no ``device``."""
    from promptmatch.training import evaluate_segmentor, train_segmentor

    model = _seg(3, "linear").cuda()
    images, labels = make_batch(64, n=4, num_classes=3)
    train_segmentor(model, images, labels, steps=2, batch=2, lr=1e-3, amp="bf16")
    m, _, preds = evaluate_segmentor(model, images, labels.cuda(), 3, amp="fp16")
    assert 0.0 <= m <= 1.0 and preds.device.type == "cpu"


@pytest.mark.cuda
def test_export_of_a_cuda_model_checks_on_the_cpu(tmp_path):
    """On a GPU: a CUDA model exports and checks at atol 1e-3 (from a CPU float32 copy) and stays on the GPU."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install promptmatch[deploy])")
    model = pm.create_segmentor(pm.create_backbone("test_vit"), "spm", 3, "multilevel").cuda().eval()
    report = pm.export_onnx(model, tmp_path / "m.onnx", image_size=(64, 64))
    assert report.max_abs_diff < 1e-4
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_a_cuda_cell_without_a_gpu_says_so(folder):
    """A cell of a ``device: cuda`` spec on a machine without a GPU fails at once, saying why."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    from promptmatch.benchmark.cell import run_cell

    with pytest.raises(RuntimeError, match="asks for device 'cuda'.*sees no CUDA GPU"):
        run_cell(_cell(folder, device="cuda"))


def test_cpu_cell_under_torchrun_on_a_gpu_machine_gets_the_cpu_wrapper(monkeypatch):
    """Under torchrun a CPU cell takes the CPU set-up (gloo, DDP without device ids) even where
    CUDA is available; other runs keep the GPU set-up there."""
    pytest.importorskip("mmseg", reason="the mmseg stack is not installed")
    import torch.distributed as dist
    from mmengine.config import Config

    from promptmatch.mmseg import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # torchrun's group, gloo for a CPU grid
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    cpu = Config(dict())
    runtime.prepare_distributed(cpu, "pytorch", device="cpu")
    assert cpu.model_wrapper_cfg["type"] == "promptmatch.CPUDistributedDataParallel"
    assert cpu.env_cfg.dist_cfg["backend"] == "gloo"
    gpu = Config(dict())
    runtime.prepare_distributed(gpu, "pytorch")
    assert gpu.model_wrapper_cfg["type"] == "promptmatch.PromptDistributedDataParallel"

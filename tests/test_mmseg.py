"""mmseg integration: the one-line change on mmseg-shipped configs, both train scripts,
tools/test.py reproducing the training-time evaluation, resume, refused prompts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("mmseg")
pytestmark = pytest.mark.slow

import promptmatch as pm  # noqa: E402

from mmseg_utils import SHIPPED, make_tiny_dataset, python, run, write_backbone_weights, write_configs  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tinyseg"))


def _mmseg_train_script() -> str:
    import mmseg

    return str(Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py")


def _miou(log_text: str) -> float:
    hits = re.findall(r"mIoU: ([0-9.]+)", log_text)
    assert hits, log_text[-3000:]
    return float(hits[-1])


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def trained(request, data_root, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    cfg = write_configs(tmp, name, tmp / "backbone.pth", data_root)
    write_backbone_weights(cfg, tmp / "backbone.pth")
    work = tmp / "work"
    res = run([python(), "tools/train.py", str(cfg), "--work-dir", str(work)])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return name, tmp, cfg, work, res.stdout + res.stderr


def test_one_line_config_trains_with_promptmatch_train(trained):
    name, tmp, cfg, work, log = trained
    assert "promptmatch: spm on" in log and "trainable" in log
    assert (work / "prompts.safetensors").is_file()
    assert (work / "prompts" / "iter_2.safetensors").is_file()
    meta = pm.read_prompt_metadata(work / "prompts.safetensors")
    assert meta["class_names"] == ["red", "green", "blue"]
    assert meta["method"] == "spm" and meta["num_classes"] == 3
    # only matcher, head (and neck) weights are in the prompt checkpoint
    assert not any(k.startswith("backbone.") for k in meta["tensors"])
    assert any(k.startswith("method.") for k in meta["tensors"])
    assert any(k.startswith("decode_head.") for k in meta["tensors"])


def test_only_prompt_and_heads_train(trained):
    name, tmp, cfg, work, log = trained
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    model = MODELS.build(Config.fromfile(str(cfg)).model)
    model.init_weights()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone" not in trainable
    assert {"method", "decode_head"} <= trainable
    model.train()
    assert not model.backbone.training and model.decode_head.training


def test_test_tool_reproduces_training_eval(trained):
    name, tmp, cfg, work, log = trained
    train_miou = _miou(log)
    res = run([python(), "tools/test.py", str(cfg), str(work / "prompts.safetensors"), "--work-dir", str(tmp / "test")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    metrics = json.loads((tmp / "test" / "test_metrics.json").read_text())["metrics"]
    assert metrics["mIoU"] == pytest.approx(train_miou, abs=0.011)
    assert "per class results" in res.stdout + res.stderr


def test_mmseg_own_train_script(trained, data_root):
    """mmseg's own train.py writes only Runner checkpoints: this project's tools take them."""
    name, tmp, cfg, work, log = trained
    res = run([python(), _mmseg_train_script(), str(cfg), "--work-dir", str(tmp / "mmseg_work")], cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "promptmatch: spm on" in res.stdout + res.stderr
    train_miou = _miou(res.stdout + res.stderr)
    pth = tmp / "mmseg_work" / "iter_2.pth"
    # tools/test.py reproduces the training-time mIoU from the .pth ...
    res = run([python(), "tools/test.py", str(cfg), str(pth), "--work-dir", str(tmp / "test_pth")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    metrics = json.loads((tmp / "test_pth" / "test_metrics.json").read_text())["metrics"]
    assert metrics["mIoU"] == pytest.approx(train_miou, abs=0.011)
    # ... and tools/extract_prompts.py turns it into a prompt checkpoint that holds the same weights
    out = tmp / "extracted" / "prompts.safetensors"
    res = run([python(), "tools/extract_prompts.py", str(cfg), str(pth), str(out)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    meta = pm.read_prompt_metadata(out)
    assert meta["class_names"] == ["red", "green", "blue"] and meta["extra"]["extracted_from"] == str(pth)
    import torch

    from promptmatch.mmseg.checkpoints import read_runner_state_dict

    state = read_runner_state_dict(pth)
    tensors = pm.checkpoint.read_prompt_tensors(out)
    assert tensors and all(torch.equal(v, state[k]) for k, v in tensors.items())
    assert not any(k.startswith("backbone.") for k in tensors)


def test_runner_checkpoint_of_another_backbone_refused(trained, tmp_path):
    name, tmp, cfg, work, log = trained
    if name != "upernet_r50":
        pytest.skip("refusal is exercised once")
    import torch

    from promptmatch.mmseg.checkpoints import read_runner_state_dict

    state = read_runner_state_dict(work / "iter_2.pth")  # tools/train.py's Runner checkpoint
    key = next(k for k in state if k.startswith("backbone.") and k.endswith("conv1.weight"))
    state[key] = state[key] + 1.0
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "other.pth")
    res = run([python(), "tools/test.py", str(cfg), str(tmp_path / "other.pth"), "--work-dir", str(tmp_path / "t")])
    assert res.returncode != 0
    assert "frozen backbone differs from the config's pretrained backbone" in res.stderr, res.stderr[-2000:]
    res = run([python(), "tools/extract_prompts.py", str(cfg), str(tmp_path / "other.pth"), str(tmp_path / "p.safetensors")])
    assert res.returncode == 2 and "frozen backbone differs" in res.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_runner_checkpoint_of_other_settings_refused(trained, tmp_path):
    """A Runner checkpoint records its model's identity: a config with another setting whose
    tensors fit all the same (SPM's prompt gain) is refused, not loaded silently."""
    name, tmp, cfg, work, log = trained
    if name != "upernet_r50":
        pytest.skip("refusal is exercised once")
    from promptmatch.mmseg.checkpoints import read_runner_identity

    identity = read_runner_identity(work / "iter_2.pth")
    assert identity is not None and identity["method"] == "spm"
    assert identity["method_config"]["prompt_gain"] == pm.SPMConfig().prompt_gain
    assert identity["class_names"] == ["red", "green", "blue"]
    other = tmp_path / "other_gain.py"
    other.write_text(f"_base_ = ['{cfg}']\nmodel = dict(method_cfg=dict(prompt_gain=1.5))\n")
    res = run([python(), "tools/test.py", str(other), str(work / "iter_2.pth"), "--work-dir", str(tmp_path / "t")])
    assert res.returncode != 0
    assert "method_config.prompt_gain: checkpoint has 4.0, model has 1.5" in res.stderr, res.stderr[-2000:]


def test_init_model_works_with_mmseg_inference(trained, data_root):
    name, tmp, cfg, work, log = trained
    if name != "upernet_r50":
        pytest.skip("exercised once")
    from mmseg.apis import inference_model

    from promptmatch.mmseg import init_model  # the import the docs and inference.py's docstring show

    model = init_model(str(cfg), str(work / "prompts.safetensors"), device="cpu")
    assert model.dataset_meta["classes"] == ["red", "green", "blue"] and not model.training
    image = data_root / "img_dir" / "val" / "0.png"
    result = inference_model(model, str(image))
    pred = result.pred_sem_seg.data
    assert pred.shape[-2:] == (64, 64) and int(pred.max()) < 3
    # the prompts are the trained ones: a model with freshly initialised heads predicts differently
    fresh = init_model(str(cfg), None, device="cpu")
    logits = result.seg_logits.data
    assert not torch_allclose(inference_model(fresh, str(image)).seg_logits.data, logits)
    with pytest.raises(pm.PromptMismatchError, match="method_config.hidden_dim"):
        init_model(str(cfg), str(work / "prompts.safetensors"), cfg_options={"model.method_cfg.hidden_dim": 32})


def torch_allclose(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b))


def test_resume(trained):
    name, tmp, cfg, work, log = trained
    if name != "upernet_r50":
        pytest.skip("resume is exercised once")
    res = run([python(), "tools/train.py", str(cfg), "--work-dir", str(work), "--resume",
               "--cfg-options", "train_cfg.max_iters=4", "train_cfg.val_interval=4"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert re.search(r"resumed? .*iter_2\.pth|Load checkpoint from .*iter_2\.pth|resumed epoch: 0, iter: 2", out, re.I), out[-3000:]
    assert (work / "prompts" / "iter_4.safetensors").is_file()
    assert pm.read_prompt_metadata(work / "prompts.safetensors")["extra"]["iter"] == 4


def test_resume_of_another_models_checkpoint_refused(trained, tmp_path):
    """Resuming applies a Runner checkpoint without a strict check (mmengine): the recorded
    identity refuses one of another model before it trains."""
    name, tmp, cfg, work, log = trained
    if name != "upernet_r50":
        pytest.skip("exercised once")
    import shutil

    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    last = Path((work / "last_checkpoint").read_text().strip()).name  # resume only trusts its own work dir
    (copy / "last_checkpoint").write_text(str(copy / last))
    res = run([python(), "tools/train.py", str(cfg), "--work-dir", str(copy), "--resume",
               "--cfg-options", "train_cfg.max_iters=4", "model.method_cfg.prompt_gain=1.5"])
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "the checkpoint this run resumed from belongs to another model" in out, out[-3000:]
    assert "method_config.prompt_gain" in out


def test_mismatched_prompts_refused(trained, tmp_path):
    name, tmp, cfg, work, log = trained
    if name != "upernet_r50":
        pytest.skip("refusal is exercised once")
    other = tmp / "other.py"
    other.write_text(f"_base_ = ['./{cfg.name}']\nmodel = dict(method_cfg=dict(hidden_dim=32))\n")
    res = run([python(), "tools/test.py", str(other), str(work / "prompts.safetensors"), "--work-dir", str(tmp_path)])
    assert res.returncode != 0
    assert "method_config.hidden_dim" in res.stderr

"""Evaluate a prompt checkpoint: build the config's model, load the frozen backbone's own
weights first (mmengine's Runner.test() does not), then the prompts, then test.

    python tools/test.py CONFIG PROMPTS.safetensors [--work-dir DIR] [--cfg-options k=v ...]
    python tools/test.py CONFIG work_dir/iter_N.pth   # a run of mmseg's own train.py

A Runner checkpoint (``.pth``) is read without running pickled code, and refused if its
frozen backbone differs from the config's pretrained one.

Prompts that belong to another backbone, class set or method config are refused with the
field that differs. Metrics are printed (per-class IoU table included) and written to
``<work_dir>/test_metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys



def parse_args(argv=None):
    from mmengine.config import DictAction

    from . import parse_with_launcher

    p = argparse.ArgumentParser(description="Test a prompt checkpoint")
    p.add_argument("config", help="test config file path")
    p.add_argument("checkpoint", help="prompt checkpoint (.safetensors) written by training, or an mmengine "
                   "Runner checkpoint (.pth) of a prompted model")
    p.add_argument("--work-dir", help="the dir to save logs and metrics")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override settings in the config")
    return parse_with_launcher(p, argv)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from these tools
    args = parse_args(argv)
    from mmengine.runner import Runner

    from promptmatch.checkpoint import PromptMismatchError, read_prompt_metadata
    from promptmatch.core import PromptCheckpointable
    from promptmatch.mmseg.checkpoints import load_prompts_or_runner_checkpoint
    from promptmatch.mmseg.hooks import unwrap_model
    from promptmatch.mmseg.runtime import check_data_roots, load_config, prepare_distributed

    if args.checkpoint.endswith(".safetensors"):
        read_prompt_metadata(args.checkpoint)  # fail early on a missing or foreign file
    elif not args.checkpoint.endswith(".pth"):
        raise SystemExit(
            f"error: {args.checkpoint!r} is neither a prompt checkpoint (.safetensors; this project's "
            "tools/train.py writes <work_dir>/prompts.safetensors) nor an mmengine Runner checkpoint (.pth)"
        )
    elif not osp.isfile(args.checkpoint):
        raise SystemExit(f"error: checkpoint {args.checkpoint!r} does not exist")
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    cfg.load_from = None
    cfg.resume = False
    check_data_roots(cfg)
    prepare_distributed(cfg, args.launcher)
    runner = Runner.from_cfg(cfg)
    model = unwrap_model(runner.model)
    if not isinstance(model, PromptCheckpointable):
        raise SystemExit(f"error: the config's model ({type(model).__name__}) is not a promptmatch model")
    model.init_weights()  # the frozen backbone's pretrained weights (init_cfg); heads are replaced below
    if getattr(model, "class_names", None) is None:
        classes = runner.test_dataloader.dataset.metainfo.get("classes")
        if classes is not None and len(classes) == model.num_classes:
            model.class_names = list(classes)
    try:
        load_prompts_or_runner_checkpoint(model, args.checkpoint)
    except PromptMismatchError as e:
        raise SystemExit(f"error: {e}") from None
    metrics = runner.test()
    from mmengine.dist import is_main_process

    from promptmatch.engine.compat import close_process_group

    main_process = is_main_process()  # asked before the group ends: every process answers "main" after
    close_process_group()
    if main_process:  # under torchrun every process holds the same gathered metrics: one writes them
        out = osp.join(cfg.work_dir, "test_metrics.json")
        os.makedirs(cfg.work_dir, exist_ok=True)
        with open(out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "metrics": metrics}, f, indent=2, default=float)
        print(json.dumps(metrics, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

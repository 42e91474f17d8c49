"""Train a segmentor from an mmseg config; for promptmatch models, write the per-dataset
prompt checkpoint (``<work_dir>/prompts.safetensors``) at every checkpoint interval and at
the end. Mirrors mmseg's tools/train.py.

    python tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp] [--cfg-options k=v ...]
    bash tools/dist_train.sh CONFIG NUM_PROCS [...]     # multi-process (GPU: nccl; CPU: gloo)

Exits with status 3 if training diverges (a non-finite loss or gradient, or a run that
ends on an iteration skipped under ``model.max_bad_steps``); the prompt checkpoints written
before stay as they were.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys



def parse_args(argv=None):
    from mmengine.config import DictAction

    from . import parse_with_launcher

    p = argparse.ArgumentParser(description="Train a (prompt-tuned) segmentor")
    p.add_argument("config", help="train config file path")
    p.add_argument("--work-dir", help="the dir to save logs, checkpoints and prompts")
    p.add_argument("--resume", action="store_true", default=False,
                   help="resume from the latest checkpoint in the work dir automatically")
    p.add_argument("--amp", action="store_true", default=False, help="enable automatic mixed precision")
    p.add_argument("--cfg-options", nargs="+", action=DictAction,
                   help="override settings in the config, key=value pairs (xxx=yyy)")
    return parse_with_launcher(p, argv)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from these tools
    args = parse_args(argv)
    from mmengine.logging import print_log
    from mmengine.runner import Runner

    from promptmatch.engine.compat import close_process_group
    from promptmatch.mmseg.runtime import (
        add_prompt_hook, check_data_roots, load_config, prepare_distributed, trust_checkpoints_under,
    )

    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    if args.amp:
        opt = cfg.optim_wrapper.get("type", "OptimWrapper")
        if opt == "AmpOptimWrapper":
            print_log("AMP training is already enabled in your config.", logger="current", level=logging.WARNING)
        else:
            assert opt == "OptimWrapper", f"`--amp` is only supported when the optimizer wrapper type is OptimWrapper, got {opt}"
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    cfg.resume = args.resume
    check_data_roots(cfg)
    add_prompt_hook(cfg)
    prepare_distributed(cfg, args.launcher)
    if "runner_type" in cfg:
        from mmengine.registry import RUNNERS

        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    from promptmatch.divergence import DivergenceError

    with trust_checkpoints_under(cfg.work_dir):
        try:
            runner.train()
        except DivergenceError as e:  # every process stops at the same step (the guard agrees across them)
            print_log(f"promptmatch: {e}", logger="current", level=logging.ERROR)
            print(f"error: {e}", file=sys.stderr)
            close_process_group()
            return 3
    close_process_group()  # no process exits while another still writes its checkpoints
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    guard = getattr(model, "divergence_guard", None)
    if guard is not None and guard.skipped:
        print_log(f"promptmatch: {guard.summary()}", logger="current", level=logging.WARNING)
        if not guard.last_step_ok:
            msg = (f"training diverged: it ended on an iteration skipped as non-finite ({guard.summary()}); "
                   "the prompt checkpoints written before it were kept")
            print_log(f"promptmatch: {msg}", logger="current", level=logging.ERROR)
            print(f"error: {msg}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

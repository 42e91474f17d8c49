"""Turn an mmengine Runner checkpoint of a prompted model (``iter_<n>.pth``, as mmseg's own
``tools/train.py`` writes) into a prompt checkpoint (``.safetensors``).

    python tools/extract_prompts.py CONFIG WORK_DIR/iter_N.pth OUT.safetensors [--cfg-options k=v ...]

The config's model is built with its pretrained backbone (``init_cfg``); a checkpoint whose
frozen backbone differs from it is refused. The ``.pth`` is read without running pickled code.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys



def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from these tools
    from mmengine.config import Config, DictAction

    p = argparse.ArgumentParser(description="Extract the prompt checkpoint from a Runner checkpoint")
    p.add_argument("config", help="the config the run was trained with")
    p.add_argument("checkpoint", help="mmengine Runner checkpoint (.pth)")
    p.add_argument("out", help="prompt checkpoint to write (.safetensors)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override settings in the config")
    args = p.parse_args(argv)
    from mmengine.logging import MMLogger

    from promptmatch.checkpoint import PromptMismatchError
    from promptmatch.mmseg.checkpoints import extract_prompts
    from promptmatch.mmseg.inference import build_prompted_model

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    MMLogger.get_instance("promptmatch", log_level=logging.WARNING)
    model = build_prompted_model(cfg)
    try:
        out = extract_prompts(model, args.checkpoint, args.out)
    except (PromptMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test-only mmengine hook: after training, gather a checksum of the trainable weights from
every rank and write what each rank saw (used by tests/test_distributed.py)."""
import json
import os

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DistSyncCheckHook(Hook):
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.first_batch = None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.first_batch is None:
            self.first_batch = [str(s.img_path) for s in data_batch["data_samples"]]

    def after_train(self, runner):
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        total = torch.tensor(
            [float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))],
            dtype=torch.float64,
        )
        gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, total)
        rank = dist.get_rank()
        with open(os.path.join(self.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world_size": dist.get_world_size(), "checksums": [float(g) for g in gathered],
                       "first_batch": self.first_batch}, f)

# The benchmarking protocol's recipe: AdamW (lr 1e-4, weight decay 0.05), poly decay
# (power 0.9) to 0 over 40k iterations; validation and checkpoints every 4k iterations.
# Only the prompt matchers and the heads receive gradients (the backbone is frozen).
optimizer = dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer, clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # full Runner checkpoints (frozen backbone included) are only needed to --resume: keep
    # the latest one; the small prompt checkpoints of every interval are kept by
    # promptmatch.PromptCheckpointHook (see default_runtime.py)
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))

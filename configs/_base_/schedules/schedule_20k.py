# The benchmarking protocol's recipe over 20k iterations (Pascal VOC 2012 aug): AdamW
# (lr 1e-4, weight decay 0.05), poly decay (power 0.9) to 0; validation and checkpoints
# every 4k iterations.
_base_ = ['./schedule_40k.py']

param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=20000, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=20000, val_interval=4000)

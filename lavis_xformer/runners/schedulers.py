"""A per-iteration learning-rate schedule for LAVIS's ``lr_scheduler`` registry.

LAVIS's ``linear_warmup_cosine_lr`` warms up inside epoch 0 and then sets one cosine value per epoch, so the
paper's 1-epoch stage 2 stays at the peak lr after its warm-up and never reaches ``min_lr``.
``linear_warmup_cosine_iter_lr`` is the same warm-up followed by a cosine over every iteration of every epoch:

    t = cur_epoch * iters_per_epoch + cur_step            (global iteration, 0-based)
    T = max_epoch * iters_per_epoch                       (iterations in the run)
    t <  W:  lr = warmup_lr + (init_lr - warmup_lr) * t / W                        (LAVIS's linear warm-up)
    t >= W:  lr = min_lr + (init_lr - min_lr) * (1 + cos(pi * (t - W) / (T - 1 - W))) / 2

so iteration W runs at ``init_lr`` and the last iteration (T - 1) at ``min_lr``. ``W = run.warmup_steps``, counted in
iterations as LAVIS counts them. The lr is a function of (epoch, step) and these parameters only, so a run resumed
mid-epoch gets exactly the lr an uninterrupted one had. The number of iterations per epoch is what the training
loop runs (``len(train_loader)``, or ``iters_per_inner_epoch`` in iteration mode); the plugin's runner passes it to
``set_iters_per_epoch`` before each epoch's loop (LAVIS's constructor arguments do not include it).
"""

import math

from lavis.common.registry import registry


@registry.register_lr_scheduler("linear_warmup_cosine_iter_lr")
class LinearWarmupCosineIterLRScheduler:
    def __init__(self, optimizer, max_epoch, min_lr, init_lr, warmup_steps=0, warmup_start_lr=-1,
                 iters_per_epoch=None, **kwargs):
        self.optimizer = optimizer
        self.max_epoch = int(max_epoch)
        self.min_lr = float(min_lr)
        self.init_lr = float(init_lr)
        self.warmup_steps = int(warmup_steps or 0)
        self.warmup_start_lr = float(warmup_start_lr) if warmup_start_lr is not None and warmup_start_lr >= 0 \
            else self.init_lr
        self.iters_per_epoch = None
        if iters_per_epoch is not None:
            self.set_iters_per_epoch(iters_per_epoch)

    def set_iters_per_epoch(self, iters_per_epoch: int) -> None:
        if int(iters_per_epoch) < 1:
            raise ValueError(f"linear_warmup_cosine_iter_lr: iters_per_epoch={iters_per_epoch} must be >= 1")
        self.iters_per_epoch = int(iters_per_epoch)

    # The runner saves a scheduler's state_dict in its checkpoints and loads it on resume, so the lr of the first
    # resumed iteration is known before the epoch's loop passes iters_per_epoch again. The other parameters come
    # from the run config, whose differences the runner reports itself.
    def state_dict(self) -> dict:
        return {"iters_per_epoch": self.iters_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("iters_per_epoch") is not None:
            self.set_iters_per_epoch(state["iters_per_epoch"])

    @property
    def total_iters(self) -> int:
        return self.max_epoch * self.iters_per_epoch

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        if self.iters_per_epoch is None:
            raise RuntimeError(
                "lr_sched linear_warmup_cosine_iter_lr needs the number of iterations per epoch, which the plugin's "
                "runner passes (run.runner: runner_xformer); this runner did not call set_iters_per_epoch. Use "
                "runner_xformer, or lr_sched: linear_warmup_cosine_lr (LAVIS's epoch-wise cosine)"
            )
        t = int(cur_epoch) * self.iters_per_epoch + int(cur_step)
        if t < self.warmup_steps:
            return self.warmup_start_lr + (self.init_lr - self.warmup_start_lr) * t / self.warmup_steps
        decay_span = self.total_iters - 1 - self.warmup_steps
        progress = 1.0 if decay_span <= 0 else min(1.0, (t - self.warmup_steps) / decay_span)
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, cur_epoch, cur_step):
        lr = self.lr_at(cur_epoch, cur_step)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        return lr

"""The trainer's step as something to time: what the plan probe (dits.plan) and `dits bench train`
both run, so that what is timed is what trains."""
from __future__ import annotations

import copy

import torch


class _PlanRunner:
    """What the probe needs of a runner besides ``run()``: why its compile failed, and ``close()``,
    which undoes a per-block compile of ``self.model`` and drops what the plan compiled."""
    plan = model = net = device = None

    def failed(self) -> str | None:
        """Why the plan's compile failed (the step then ran eager), or None."""
        return getattr(self.net, "why", "torch.compile failed") if getattr(self.net, "failed", False) else None

    def close(self) -> None:
        from dits.speed import compiled_blocks, uncompile_blocks

        compiled = self.plan is not None and self.plan.compile
        uncompile_blocks(compiled_blocks(self.model))
        self.net = self.model = None
        if compiled:
            torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class TrainStepRunner(_PlanRunner):
    """Calls :func:`dits.train.loop.train_step` on its own model (a copy of ``model`` unless
    ``copy_model`` is False), EMA and optimiser, compiled and with kernels as ``plan`` says, on the
    inputs ``inputs()`` returns: (x, t, model_kwargs, noise). Each :meth:`run` is one step with the
    loop's bookkeeping (the loss accumulator, the non-finite check's host sync)."""

    def __init__(self, plan, model: torch.nn.Module, cfg, objective, device: torch.device, inputs,
                 copy_model: bool = True, step: int = 0):
        from dits.speed import adamw
        from dits.train.distributed import Dist
        from dits.train.faults import NonFiniteGuard, agree
        from dits.train.loop import StepParts, step_loss
        from dits.train.outputs import LossAccumulator

        self.device, self.inputs, self.step, self.plan = device, inputs, step, plan
        self.model = copy.deepcopy(model) if copy_model else model
        self.model.train()
        ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.net = step_loss(plan, objective, self.model, self.model, quiet=True)
        opt = adamw(self.model.parameters(), cfg.lr, cfg.weight_decay, device)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        guard, ctx, no_signal = NonFiniteGuard(cfg.on_nonfinite, fp16=cfg.precision == "fp16"), Dist(0, 1, device), torch.zeros(())

        def decide(loss, gnorm):
            return agree(ctx, guard.bad(loss, gnorm), no_signal)
        self.parts = StepParts(self.net, self.model, ema, opt, scaler, cfg, device, decide, plan)
        self.acc = LossAccumulator()

    def run(self) -> None:
        from dits.train.loop import train_step

        x, t, kwargs, noise = self.inputs()
        res = train_step(self.parts, self.step, x, t, kwargs, noise)
        if res.bad:
            self.acc.skip()
        else:
            self.acc.add(res.losses, res.gnorm)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.parts = None
        super().close()


class SampleCallRunner(_PlanRunner):
    """One model call of a sampling run, as :func:`dits.sample.generate` makes it with ``plan``'s
    kernels and compile: ``model(x, t, y)`` under no_grad on fixed random inputs of the run's shape
    ``x_shape`` (a guided call's doubled batch; labels up to the null class). The model is not
    copied: :meth:`close` undoes a per-block compile."""

    def __init__(self, plan, model: torch.nn.Module, x_shape: tuple, device: torch.device):
        g = torch.Generator().manual_seed(0)
        n, k = x_shape[0], int(getattr(model, "num_classes", 0) or 0)
        self.x = torch.randn(x_shape, generator=g).to(device)
        self.t = torch.randint(0, 1000, (n,), generator=g).to(device)
        self.y = torch.randint(0, k + 1, (n,), generator=g).to(device) if k else None
        self.device, self.plan, self.model = device, plan, model
        self.net = plan.wrap(model, model, quiet=True)

    def run(self) -> None:
        with torch.no_grad(), self.plan.scope():
            self.net(self.x, self.t, self.y)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

"""Lightning (``lightning.pytorch``) with a parashield defense.

Automatic optimization: put ``DefenseOptimization`` before ``LightningModule`` in the bases and
return the defense from ``configure_optimizers``::

    class Model(DefenseOptimization, L.LightningModule):
        def configure_optimizers(self):
            return ps.SAM(self.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)

Each optimizer step then runs ``training_step`` and backward K+1 times (Lightning's own closure),
with ``self.log``/``self.log_dict`` muted in the corrupted passes, so the logged loss and the
step's output are the clean pass's; ``on_before_optimizer_step`` and ``gradient_clip_val`` run
once, on the averaged gradient; the global step counts once. ``accumulate_grad_batches > 1`` is
refused (Lightning backpropagates the early micro-batches outside the step, where the defense
cannot redo them at its corruptions): raise the batch size or use manual optimization. With
``precision="16-mixed"`` the trajectory runs with Lightning's GradScaler: a pass that overflows
makes the scaler skip the step, as in plain fp16 training.

Manual optimization (``self.automatic_optimization = False``), micro-batches looped inside::

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for t in opt.trajectory():                # or defense_of(opt).trajectory()
            loss = self.loss(batch)
            self.manual_backward(loss)
            if t == 0:
                self.log("train_loss", loss)      # the clean loss
        self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt.step()                                # hooks once, global step counted
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl

from . import defense_of

__all__ = ["DefenseOptimization", "defense_of", "muted_logging"]


@contextmanager
def muted_logging(module: "pl.LightningModule") -> Iterator[None]:
    """Within the block ``module.log`` and ``module.log_dict`` do nothing (corrupted passes must
    not be logged as training losses)."""
    module.log = module.log_dict = _no_log  # instance attributes shadow the methods
    try:
        yield
    finally:
        del module.log, module.log_dict


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


class DefenseOptimization:
    """Mixin for a ``LightningModule`` trained with a parashield defense under automatic
    optimization (see the module docstring); it replaces the ``optimizer_step`` hook."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Optional[Callable[[], Any]] = None) -> None:
        """The defense's K+1 passes through Lightning's closure (training_step, zero_grad,
        backward), then ``optimizer.step`` with the clean result, where Lightning runs its
        pre-step hooks and clipping once before the base step."""
        module: pl.LightningModule = self  # type: ignore[assignment]
        if module.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={module.trainer.accumulate_grad_batches}) with a parashield "
                "defense: Lightning backpropagates the early micro-batches outside the optimizer step, where the "
                "defense cannot redo them at its corruptions. Use a larger batch, or manual optimization with the "
                "micro-batches looped inside defense_of(opt).trajectory() (see parashield.integrations.lightning)"
            )
        if optimizer_closure is None:
            raise ValueError("optimizer_step needs Lightning's optimizer_closure to run the defense's passes")
        clean = None
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)  # fp16: an overflow skips the step
        for t in defense_of(optimizer).trajectory(scaler=scaler):
            with muted_logging(module) if t > 0 else nullcontext():
                optimizer_closure()
            if t == 0:
                clean = getattr(optimizer_closure, "_result", None)
        if clean is not None:
            optimizer_closure._result = clean  # the step's output (on_train_batch_end, the loss): the clean pass
        optimizer.step(closure=lambda: None if clean is None else clean.loss)

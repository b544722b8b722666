"""``transformers.Trainer`` with a parashield defense.

``DefenseTrainer`` is a ``Trainer`` whose optimizer is a defense: built from the Trainer's own
optimizer choice and parameter groups (``defense=functools.partial(ps.SAM, rho=0.05)``) or given
as ``optimizers=(ps.APD(...), None)``. Each optimizer step runs the defense's K+1 passes over the
whole accumulation window, so with ``gradient_accumulation_steps=G`` it equals the defense on the
joint batch (every micro-batch in every pass, scaled as the Trainer scales it); then the Trainer
clips the averaged gradient once (``max_grad_norm``), steps, and advances its LR scheduler. The
logged ``loss`` is the clean loss (pass t = 0). Checkpoints save and resume the defense's state
(its random generator included) with the optimizer's.

Refused: fp16 mixed precision with a gradient scaler (use ``bf16=True``), and any optimizer that
is not a parashield defense (plain training needs the plain ``Trainer``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from transformers import Trainer

from . import defense_of


class DefenseTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a parashield defense.

    Args:
        defense: builds the defense from the Trainer's parameter groups and base optimizer, as
            ``defense(param_groups, base_optimizer=cls, **base_kwargs)`` (``cls``/``base_kwargs``
            from ``TrainingArguments``: ``optim``, ``learning_rate``, betas, ...), e.g.
            ``functools.partial(ps.APD, budget=ps.Budget("l2", 0.05), steps=3)``. Leave it None
            when passing ``optimizers=(defense, scheduler_or_None)``.
        *args, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, defense: Optional[Callable[..., Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if defense is not None:
            if not callable(defense):
                raise TypeError(f"defense must be callable as defense(param_groups, base_optimizer=cls, **kwargs), got {defense!r}")
            if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
                raise ValueError("give either defense= or optimizers=/optimizer_cls_and_kwargs=, not both")
        elif self.optimizer is not None:
            defense_of(self.optimizer)  # refuses a plain optimizer now, not at the first step
        self.defense = defense
        self._window: list[Any] = []  # the accumulation window's micro-batches so far

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's own optimizer (``optim``, its parameter groups with the weight-decay
        split), wrapped by ``defense``: the defense's base optimizer is that class over those
        groups with the same settings."""
        if self.optimizer is not None or self.defense is None:
            return super().create_optimizer(model)
        base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model if model is None else model)
        if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)):
            raise ValueError(f"optim={self.args.optim!r} gives {base_cls!r}, not a torch.optim.Optimizer class a defense can wrap")
        base = super().create_optimizer(model)
        self.optimizer = self.defense(base.param_groups, base_optimizer=base_cls, **base_kwargs)
        return self.optimizer

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Collect the window's micro-batches; at its last one run the defense's passes over all
        of them (the Trainer's own forward, loss scaling and backward per micro-batch) and
        return the window's clean loss; earlier micro-batches return 0, so the Trainer's summed
        loss is the clean loss of the window."""
        self._window.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        if getattr(self.accelerator, "scaler", None) is not None:
            raise NotImplementedError("DefenseTrainer does not support fp16 with a gradient scaler: use bf16=True")
        window, self._window = self._window, []
        clean = torch.zeros((), device=self.args.device)
        for t in defense_of(self.optimizer).trajectory():
            for batch in window:
                loss = super().training_step(model, batch, num_items_in_batch)
                if t == 0:
                    clean = clean + loss.to(clean.device)
        return clean

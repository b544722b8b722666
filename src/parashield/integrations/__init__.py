"""Training with the defenses (``APD``, ``SAM``, ``OneStepDefense``, ``RandomWeightPerturbation``)
inside the frameworks people train with, one module per framework, each imported only on demand
(``import parashield`` loads none of them):

- ``parashield.integrations.huggingface``: ``DefenseTrainer``, a ``transformers.Trainer``.
- ``parashield.integrations.lightning``: ``DefenseCallback`` and ``defense_step`` for
  ``lightning.LightningModule``.
- ``parashield.integrations.accelerate``: ``defense_step`` for loops over ``accelerator.prepare``d
  optimizers.

A defense step needs K+1 forward/backward passes over the whole (accumulated) batch before one
base step, so the frameworks' one-backward-per-micro-batch loops cannot drive it unchanged; each
module either reshapes the step or refuses with an error that says what to write instead.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from ..defense import APD


def defense_of(optimizer: Any) -> APD:
    """The ``APD`` inside a framework's optimizer wrapper (accelerate's ``AcceleratedOptimizer``
    holds it as ``.optimizer``, Lightning's ``LightningOptimizer`` as ``._optimizer``). The
    wrapper is unwrapped even where it passes ``isinstance`` (Lightning's subclasses the wrapped
    class with a copy of its attributes): the defense's state lives in the wrapped object."""
    seen = optimizer
    for _ in range(8):  # wrappers nest a few levels at most
        inner = getattr(seen, "_optimizer", None) or getattr(seen, "optimizer", None)
        if inner is None or inner is seen:
            break
        seen = inner
    if not isinstance(seen, APD):
        raise TypeError(
            f"expected a parashield defense (APD, SAM, OneStepDefense, RandomWeightPerturbation) or a framework "
            f"wrapper around one, got {type(optimizer).__name__}"
        )
    return seen


def check_framework_closure(closure: Callable[[], Any]) -> None:
    """Refuse ``step(closure)`` where a framework would make the defense's passes wrong; each
    check runs only where the user imported that framework, and none imports one:

    - accelerate's gradient accumulation: its optimizer wrapper calls ``step`` only on the last
      micro-batch of ``accumulate``, so the other micro-batches' closures would never run;
    - Lightning's automatic optimization without ``DefenseOptimization``: its precision plugin
      wraps the closure (``_wrap_closure``) so that every call also runs
      ``on_before_optimizer_step`` and gradient clipping, which would run once per pass, on each
      pass's gradient, with the last corrupted pass's loss logged.
    """
    if "accelerate.state" in sys.modules:
        from .accelerate import check_no_accumulation

        check_no_accumulation()
    func = getattr(closure, "func", None)
    owner = type(getattr(func, "__self__", None)).__module__
    if isinstance(closure, functools.partial) and getattr(func, "__name__", "") == "_wrap_closure" \
            and owner.startswith(("lightning.pytorch.", "pytorch_lightning.")):
        raise TypeError(
            "a parashield defense under Lightning's automatic optimization needs the DefenseOptimization mixin: "
            "'class Model(DefenseOptimization, L.LightningModule)' (from parashield.integrations.lightning), so "
            "that the K+1 passes run with the clean loss logged and the pre-step hooks and clipping once per step"
        )

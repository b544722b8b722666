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

from typing import Any

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

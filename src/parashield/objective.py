"""The objective L(w + a): a model, a loss function and data, seen as a function of the selected
parameters.

``Objective.probe()`` is the one place where the model is touched: it puts the model in eval mode
(or keeps train mode on request), saves the selected parameters once, and on exit restores
parameters, buffers (also ones a forward pass changes in eval mode, such as a call counter, or
replaces), ``.grad``, modes and ``requires_grad`` flags exactly as found, also when an exception or
KeyboardInterrupt escapes. Gradients are taken with ``torch.autograd.grad``, so the user's
``.grad`` fields are never written.

Conventions (loss over several batches, eval mode): docs/method.md, "Notation".
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .budget import _foreach_norm as foreach_norm
from ._checks import check_not_sharded
from .selection import ParamSpec, select_parameters

Tensors = list[Tensor]
LossFn = Callable[[nn.Module, Any], Tensor]


NO_EXAMPLE = "data yielded no batch with at least one example (a batch of 0 rows weighs 0)"


class NonFiniteLossError(ValueError):
    """The loss (or its gradient) is NaN or infinite."""


def is_single_batch(data: Any) -> bool:
    """A tensor, a tuple, a mapping, or a list of tensors is one batch; any other iterable (a
    DataLoader, a list of batches) is a sequence of batches."""
    if isinstance(data, (Tensor, tuple, Mapping)):
        return True
    if isinstance(data, list):
        return bool(data) and all(isinstance(x, Tensor) for x in data)  # [] holds no batch
    return False


#: First-argument names that say a function takes a model's output, not the model.
_OUTPUT_NAMES = {"output", "outputs", "out", "logits", "pred", "preds", "prediction", "predictions", "y_pred",
                 "y_hat", "yhat", "scores", "input", "inputs"}


def _loss_hint(loss_fn: Any) -> Optional[str]:
    """Why ``loss_fn`` cannot be a ``loss_fn(model, batch)``, when that is visible up front: a
    torch loss, a function whose first argument is named like an output, or one that cannot take
    two positional arguments."""
    if isinstance(loss_fn, nn.modules.loss._Loss) or getattr(loss_fn, "__module__", None) == "torch.nn.functional":
        return f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)} takes (output, target)"
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # builtins without a signature: judged when called
        return None
    try:
        signature.bind(None, None)
    except TypeError:
        return f"loss_fn{signature} cannot be called with two arguments"
    first = next(iter(signature.parameters), None)
    if first in _OUTPUT_NAMES:
        return f"loss_fn{signature} looks like a function of the model's output"
    return None


_SIGNATURE = ("loss_fn is called as loss_fn(model, batch) and returns the batch's mean loss, e.g. "
              "lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1])")


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading dimension of its first tensor (1 if none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, (Tensor, list, tuple, Mapping)):
            return batch_size(item)
    return 1


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; other objects pass through."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        moved = [to_device(x, device) for x in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


@contextmanager
def preserved_modes(model: nn.Module, train: Optional[bool]) -> Iterator[None]:
    """Set every module's mode to ``train`` (None keeps them) and restore each one on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if train is not None:
            model.train(train)
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def overflow_to_inf(value: Union[Tensor, float]) -> float:
    """``float(value)``, with NaN mapped to +inf: the loss of a model that a corruption made
    overflow is infinitely large, which keeps comparisons between corruptions meaningful."""
    out = float(value)
    return math.inf if math.isnan(out) else out


def check_finite(value: Tensor, what: str) -> float:
    """Return ``float(value)``, raising NonFiniteLossError naming ``what`` if it is NaN/Inf."""
    out = float(value)
    if not math.isfinite(out):
        raise NonFiniteLossError(f"{what} is {out}: the loss is not finite (check the model, the data and eps)")
    return out


def _floating_dtypes(batch: Any) -> set[torch.dtype]:
    """The floating-point dtypes of the tensors of a (nested) batch."""
    if isinstance(batch, Tensor):
        return {batch.dtype} if batch.is_floating_point() else set()
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    return set().union(*(_floating_dtypes(x) for x in items))


def _dtype_mismatch(model: nn.Module, batch: Any) -> Optional[str]:
    """Where a batch's floating dtypes are not the model's: what to convert."""
    have = _floating_dtypes(batch)
    want = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not have or not want or have <= want:
        return None
    have_names, want_names = ("/".join(sorted(str(d).removeprefix("torch.") for d in ds)) for ds in (have, want))
    return (f"the batch holds {have_names} tensors, the model's parameters are {want_names}: convert the data "
            f"(e.g. x.to({sorted(map(str, want))[0]})) or the model")


def call_loss(loss_fn: LossFn, model: nn.Module, batch: Any) -> Tensor:
    """``loss_fn(model, batch)``, checked to be a floating-point scalar tensor; a loss function
    written as ``(output, target)`` gets an error that shows the expected signature."""
    try:
        loss = loss_fn(model, batch)
    except (TypeError, AttributeError) as exc:
        if type(model).__name__ not in str(exc):  # not the model mistaken for an output: the user's own error
            raise
        raise TypeError(f"loss_fn failed on the model ({exc}): {_SIGNATURE}") from exc
    except RuntimeError as exc:
        mismatch = _dtype_mismatch(model, batch) if "type" in str(exc) else None
        if mismatch is None:
            raise
        raise TypeError(f"loss_fn failed ({exc}): {mismatch}") from exc
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__}; {_SIGNATURE}")
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn returned a {loss.dtype} tensor: the loss must be a real floating-point scalar")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor (the batch mean), got shape {tuple(loss.shape)}")
    return loss


class Objective:
    """``L(w + a)`` for a model, ``loss_fn(model, batch) -> scalar tensor`` and data.

    Args:
        model: the network; only the selected parameters are ever changed (and restored).
        loss_fn: ``loss_fn(model, batch)`` returning the mean loss of the batch as a
            floating-point scalar tensor computed from ``model(...)`` (not detached: attacks
            differentiate it). A torch loss such as ``nn.CrossEntropyLoss()`` takes
            ``(output, target)`` and is refused with the line to write instead.
        data: one batch (a tensor, tuple, dict or list of tensors) or a re-iterable of batches
            (a DataLoader, a list of batches); over several batches the loss is the
            example-weighted mean, the weight being the leading dimension of each batch (a
            batch of 0 rows weighs 0). Empty data is refused.
        params: which parameters are variables (see ``select_parameters``); default all
            trainable floating-point parameters. One frozen later (``requires_grad=False``)
            drops out of ``params``: frozen tensors are never touched.
        train_mode: evaluate in train mode (BatchNorm batch statistics, dropout) instead of eval
            mode; buffers such as running statistics are restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: ParamSpec = None,
        *,
        train_mode: bool = False,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        hint = _loss_hint(loss_fn)
        if hint:
            raise TypeError(f"{hint}, but {_SIGNATURE}")
        if isinstance(data, Iterator):
            raise TypeError(
                "data must be one batch or a re-iterable of batches (a DataLoader or a list); "
                "an iterator/generator can be read only once"
            )
        if not is_single_batch(data) and not isinstance(data, Iterable):
            raise TypeError(f"data must be a batch or an iterable of batches, got {type(data).__name__}")
        if isinstance(data, (tuple, list, Mapping, str, bytes)) and len(data) == 0:
            raise ValueError(f"data is empty ({data!r}): give one batch or a list of batches")
        if not isinstance(train_mode, bool):
            raise TypeError(f"train_mode must be a bool, got {train_mode!r}")
        named = select_parameters(model, params)
        meta = [n for n, p in named if p.is_meta]
        if meta:
            raise ValueError(f"parameters {meta[:3]} are on the meta device (shapes without values): "
                             "materialize the model (e.g. model.to_empty(device=...) and load its weights) first")
        check_not_sharded([p for _, p in named], "Objective")
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.train_mode = train_mode
        self._named = named

    @property
    def names(self) -> list[str]:
        """Names of the selected parameters that are trainable now (see ``params``)."""
        return [n for n, _ in self._trainable()]

    @property
    def params(self) -> list[nn.Parameter]:
        """The selected parameters, less any frozen (``requires_grad=False``) since the objective
        was built: frozen tensors are never touched."""
        return [p for _, p in self._trainable()]

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        named = [(n, p) for n, p in self._named if p.requires_grad]
        if not named:
            raise ValueError("every parameter of the objective was frozen (requires_grad=False) after it was built: "
                             "nothing is left to corrupt")
        return named

    def __repr__(self) -> str:
        data = "1 batch" if is_single_batch(self.data) else (
            f"{len(self.data)} batches" if hasattr(self.data, "__len__") else type(self.data).__name__)
        loss_fn = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        return (f"Objective(model={type(self.model).__name__}, loss_fn={loss_fn}, {len(self.params)} tensors / "
                f"{self.numel} parameters, data={data}, train_mode={self.train_mode})")

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def restrict(self, params: ParamSpec) -> "Objective":
        """The same objective over a sub-selection of parameters (e.g. one layer)."""
        return Objective(self.model, self.loss_fn, self.data, params, train_mode=self.train_mode)

    def batches(self, data: Any = None) -> Iterable[Any]:
        data = self.data if data is None else data
        return [data] if is_single_batch(data) else data

    @contextmanager
    def probe(self) -> Iterator["Probe"]:
        """Context in which the parameters can be moved to ``w + a`` and the loss, gradient and
        Hessian-vector products taken; restores the model exactly on exit."""
        buffers = [(m, name, b, b.detach().clone()) for m in self.model.modules()
                   for name, b in m._buffers.items() if b is not None]
        probe = Probe(self)
        try:
            with preserved_modes(self.model, self.train_mode):
                yield probe
        finally:
            probe.set(None)
            with torch.no_grad():
                for module, name, b, saved in buffers:
                    module._buffers[name] = b  # a forward may have replaced it (self.count = self.count + 1)
                    b.copy_(saved)

    # One-shot conveniences -------------------------------------------------------------------
    def loss(self, delta: Optional[Sequence[Tensor]] = None, data: Any = None) -> float:
        with self.probe() as pr:
            pr.set(delta)
            return check_finite(pr.loss(data), "loss")

    def gradient(self, delta: Optional[Sequence[Tensor]] = None, data: Any = None) -> tuple[float, Tensors]:
        with self.probe() as pr:
            pr.set(delta)
            loss, grads = pr.gradient(data)
            return float(loss), grads


def _own_memory(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor]) -> Tensors:
    """Gradients that each own their memory: autograd may return one tensor for two parameters
    (``a + b``) or an expanded stride-0 tensor (``w.sum()``), and callers modify them in place."""
    out, seen = [], set()
    for g, p in zip(grads, params):
        if g is None:
            g = torch.zeros_like(p)
        elif 0 in g.stride() or g.data_ptr() in seen:
            g = g.clone(memory_format=torch.contiguous_format)
        seen.add(g.data_ptr())
        out.append(g)
    return out


def _unstack(stacked: Sequence[Tensor]) -> list[Tensors]:
    """Stacked ``(R, *shape)`` tensors as R tensor lists (views), one per corruption."""
    return [list(row) for row in zip(*(s.unbind() for s in stacked))]


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _double_backward_attention() -> ContextManager[None]:
    """``scaled_dot_product_attention`` restricted to its math backend, the one with a double
    backward (the fused CPU/flash/memory-efficient kernels have none), for the passes of a
    Hessian-vector product; the user's backend choice is restored on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class Probe:
    """Evaluation handle given by ``Objective.probe()`` (see there)."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.params = objective.params
        with torch.no_grad():
            self._saved = [p.detach().clone() for p in self.params]

    @property
    def clean(self) -> Tensors:
        """The parameters as found (read-only use)."""
        return self._saved

    def set(self, delta: Optional[Sequence[Tensor]]) -> None:
        """Move the selected parameters to ``w + delta`` (``None``: back to w, bit for bit)."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._saved)
            if delta is not None:
                if len(delta) != len(self.params):
                    raise ValueError(f"delta has {len(delta)} tensors, the selection has {len(self.params)}")
                torch._foreach_add_(self.params, list(delta))

    def set_along(self, directions: Sequence[Sequence[Tensor]], coords: Sequence[float]) -> None:
        """Move the selected parameters to ``w + sum_k coords[k] * directions[k]`` in place (a
        copy of w and one fused multiply-add per direction; nothing allocated)."""
        self.set(None)
        with torch.no_grad():
            for d, c in zip(directions, coords):
                torch._foreach_add_(self.params, list(d), alpha=float(c))

    def _losses(self, data: Any, differentiable: bool = False) -> Iterator[tuple[Tensor, int]]:
        """``(loss, examples)`` per batch with at least one example (a batch of 0 rows weighs 0:
        its mean loss would be NaN). ``differentiable``: the loss must depend on the parameters."""
        obj = self.objective
        device = obj.device
        for batch in obj.batches(data):
            n = batch_size(batch)
            if n == 0:
                continue
            loss = call_loss(obj.loss_fn, obj.model, to_device(batch, device))
            if differentiable and not loss.requires_grad:
                raise ValueError(
                    "loss_fn returned a loss that does not require grad: it must be computed from model(...) "
                    "without .detach(), .item(), torch.no_grad() or a cast to an integer dtype"
                )
            yield loss.reshape(()), n

    def loss(self, data: Any = None) -> Tensor:
        """Example-weighted mean loss at the current parameters (0-dim tensor, float64)."""
        with torch.no_grad():  # copies: a loss_fn may return the same buffer every call
            terms = [(loss.detach().to(torch.float64, copy=True), n) for loss, n in self._losses(data)]
        if not terms:
            raise ValueError(NO_EXAMPLE)
        if len(terms) == 1:  # the mean of one batch: its loss, no rounding of l * n / n
            return terms[0][0]
        total = terms[0][0] * terms[0][1]
        for term, n in terms[1:]:
            total = total + term * n
        return total / sum(n for _, n in terms)

    def gradient(self, data: Any = None, check: bool = True) -> tuple[Tensor, Tensors]:
        """Loss (0-dim float64) and its gradient w.r.t. the selected parameters; with ``check``
        a NaN/Inf loss or gradient raises NonFiniteLossError, without it the loss is returned
        as +inf when either is not finite (a corrupted model whose loss overflowed)."""
        total, count, acc, batches = None, 0, None, 0
        with torch.enable_grad():  # also inside the caller's no_grad(), as evaluation code often is
            for loss, n in self._losses(data, differentiable=True):
                grads = _own_memory(torch.autograd.grad(loss, self.params, allow_unused=True), self.params)
                value = loss.detach().to(torch.float64, copy=True)
                term = value * n
                if acc is None:  # one batch: its gradient and loss as they are, no scaling passes
                    acc, total, first = grads, term, value
                else:
                    if batches == 1 and count != 1:
                        torch._foreach_mul_(acc, float(count))
                    torch._foreach_add_(acc, grads, alpha=float(n))
                    total = total + term
                count += n
                batches += 1
        if acc is None:
            raise ValueError(NO_EXAMPLE)
        if batches > 1:
            torch._foreach_div_(acc, float(count))
        loss = total / count if batches > 1 else first  # as ``loss``: one batch's mean is its loss
        # One host sync for both checks: an infinite gradient norm turns the sum into NaN/Inf.
        probe_value = loss + torch.stack(foreach_norm(acc, 2.0)).to(loss).sum()
        if check:
            check_finite(probe_value, "loss or gradient")
        elif not math.isfinite(float(probe_value)):
            loss = torch.full_like(loss, math.inf)
        return loss, acc

    def stacked_losses(self, stacked: Sequence[Tensor], data: Any = None) -> Tensor:
        """Losses at ``w + a`` for R corruptions given stacked (one ``(R, *w.shape)`` tensor per
        selected parameter, as ``Budget.samples`` draws them) in one batched evaluation: ``vmap``
        over ``torch.func.functional_call``, so R trials cost one wide forward pass instead of R
        narrow ones. Returns shape (R,), float64; raises a RuntimeError where the model or loss
        cannot be vmapped (e.g. ``.item()`` inside)."""
        from torch.func import functional_call, vmap

        obj = self.objective
        wrapper = _LossModule(obj.model, obj.loss_fn)
        r = len(stacked[0])
        path = {id(p): n for n, p in obj.model.named_parameters()}  # the real paths, _orig_mod included
        params = {f"model.{path[id(p)]}": a + w for p, a, w in zip(obj.params, stacked, self._saved)}

        def one(params: dict, batch: Any) -> Tensor:
            return functional_call(wrapper, params, (batch,))

        total, count = None, 0
        with torch.no_grad():
            for batch in obj.batches(data):
                n = batch_size(batch)
                if n == 0:
                    continue
                batch = to_device(batch, obj.device)
                values = vmap(one, in_dims=(0, None))(params, batch)
                if values.shape != (r,):
                    raise ValueError(f"loss_fn must return a scalar tensor (the batch mean), got shape {tuple(values.shape[1:])}")
                term = values.double() * n
                total = term if total is None else total + term
                count += n
        if total is None:
            raise ValueError(NO_EXAMPLE)
        return total / count

    def stacked_losses_of(self, chunks: Iterable[Sequence[Tensor]], vectorize: Union[bool, str] = "auto",
                          what: str = "points") -> Iterator[tuple[Tensors, Tensor]]:
        """Losses for a stream of stacked chunks of corruptions: yields ``(chunk, losses)``.
        ``vectorize``: ``True`` evaluates every chunk with :meth:`stacked_losses` (vmap),
        ``False`` one corruption at a time (apply, evaluate, restore), ``"auto"`` vmap in eval
        mode, falling back to the loop with one warning where the model cannot be vmapped. The
        parameters are back at w after each chunk."""
        batched = vectorize is True or (vectorize == "auto" and not self.objective.train_mode)
        for chunk in chunks:
            values = None
            if batched:
                try:
                    values = self.stacked_losses(chunk)
                except (RuntimeError, NotImplementedError) as exc:
                    if vectorize is True:
                        raise
                    warnings.warn(f"{what} fall back to one evaluation each: vmap failed ({exc})")
                    batched = False
            if values is None:
                values = []
                for delta in _unstack(chunk):
                    self.set(delta)
                    values.append(self.loss())
                self.set(None)
                values = torch.stack(values)
            yield chunk, values

    def hvp_operator(self) -> Callable[[Sequence[Tensor]], Tensors]:
        """``v -> H v`` at the current parameters, for many products in a row (Krylov solvers).

        With one batch, the gradient's graph is built once here and each product is one
        backward through it (no forward pass, no first backward: about a third cheaper), the
        graph kept while the function lives (in train mode all products share that forward
        pass, so one dropout mask: a fixed symmetric operator); with several batches each
        product is ``hvp`` (one batch's graph at a time). Do not move the parameters while
        using it."""
        if not is_single_batch(self.objective.data):
            return self.hvp
        with torch.enable_grad(), _double_backward_attention():
            losses = list(self._losses(None, differentiable=True))
            if not losses:
                raise ValueError(NO_EXAMPLE)
            grads = torch.autograd.grad(losses[0][0], self.params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

        def product(vectors: Sequence[Tensor]) -> Tensors:
            if not used:  # a loss linear in the parameters
                return [torch.zeros_like(p) for p in self.params]
            hv = torch.autograd.grad([grads[i] for i in used], self.params, allow_unused=True, retain_graph=True,
                                     grad_outputs=[vectors[i].to(self.params[i].dtype) for i in used])
            return _own_memory(hv, self.params)

        return product

    def hvp(self, vectors: Sequence[Tensor], data: Any = None) -> Tensors:
        """Hessian-vector product ``H v`` of the loss at the current parameters (double backward)."""
        acc, count = None, 0
        vectors = [v.to(p.dtype) for v, p in zip(vectors, self.params)]
        with torch.enable_grad(), _double_backward_attention():
            for loss, n in self._losses(data, differentiable=True):
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                pairs = [(g, v) for g, v in zip(grads, vectors) if g is not None]
                dot = sum((g * v).sum() for g, v in pairs)
                if not isinstance(dot, Tensor) or not dot.requires_grad:
                    hv = [torch.zeros_like(p) for p in self.params]
                else:
                    hv = _own_memory(torch.autograd.grad(dot, self.params, allow_unused=True), self.params)
                if acc is None:
                    acc = hv
                    torch._foreach_mul_(acc, float(n))
                else:
                    torch._foreach_add_(acc, hv, alpha=float(n))
                count += n
        if acc is None:
            raise ValueError(NO_EXAMPLE)
        torch._foreach_div_(acc, float(count))
        return acc

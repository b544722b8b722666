"""Adversarial parameter defense: multi-step risk minimization as a
``torch.optim`` wrapper, with SAM, one-step corruption-resistant training and random weight
perturbation as presets of the same core.

For each mini-batch: a_0 = 0, a_{t+1} = project(a_t + alpha * steepest_unit(g_t)), where g_t is
the gradient at w + a_t; the base optimizer then steps from the clean w with the mean of
g_0..g_K (``include_clean=True``) or g_1..g_K. Exactly K+1 forward/backward passes.

Bookkeeping uses two parameter-sized buffers: ``w`` (so that the clean parameters come back bit for
bit; held only during the passes on accelerators, see ``release_buffers``) and the gradient sum
(flat, so that DDP needs one all-reduce). Each pass's gradients stay
where autograd put them and are the scratch memory of the corruption: after pass t they are added
to the sum and turned in place into ``a_{t+1} = project((w + a_t) + step - w)`` (so a_t is
recovered up to one rounding of w), and the parameters are set to ``w + a_{t+1}``. Every step of
this is one ``torch._foreach_*`` call over all tensors (one fused kernel on CUDA), with no hooks,
no host sync until the single finiteness check at the end, and no allocation besides autograd's.
"""

from __future__ import annotations

import math
import warnings
import weakref
from contextlib import closing, contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._checks import check_budget, check_count, check_not_sharded, check_real, check_seed, step_size_or_default
from ._progress import progress
from .budget import Budget, Geometry

Tensors = list[Tensor]


class _FlatBuffer:
    """One contiguous buffer per (device, dtype) with views shaped like ``tensors``, with the same
    strides where a tensor is dense (transposed, channels_last), so that gradients bound to them
    have the layout autograd would give and fused optimizers read the right elements."""

    def __init__(self, tensors: Tensors) -> None:
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.flats: list[Tensor] = []
        self.views: Tensors = [None] * len(tensors)  # type: ignore[list-item]
        for (device, dtype), idx in groups.items():
            flat = torch.zeros(sum(tensors[i].numel() for i in idx), device=device, dtype=dtype)
            self.flats.append(flat)
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                t = tensors[i]
                self.views[i] = flat[offset : offset + n].as_strided(t.shape, torch.empty_like(t).stride())
                offset += n


class _Workspace:
    """What one parameter set needs, allocated once: ``clean`` (w of the corrupted parameters)
    and, when more than one gradient is averaged (or DDP all-reduces it), ``gsum`` (the gradient
    sum, flat so that DDP needs one all-reduce; after the trajectory every ``.grad`` is a view of
    it holding the average). SAM and other one-gradient presets need no sum: the gradient of the
    one averaged pass is the result, so their extra memory is ``clean`` alone.

    The gradients of each pass stay where autograd put them and are the scratch memory of the
    corruption: on an accelerator every bookkeeping operation is one fused ``_foreach`` kernel
    over all tensors, and the extra memory is ``clean`` and ``gsum``. On the CPU a ``_foreach``
    op runs one kernel per tensor, which dominates when tensors are small (below ~64k entries on
    average): there, when the budget allows whole-buffer maths (every parameter corrupted, no
    per-layer scale) and gradients are summed, the gradients are gathered into a third flat
    buffer ``work`` by one copy and the rest runs as single kernels over it, memory traded for
    speed.
    """

    small_tensors = 1 << 16  # mean entries per tensor below which the CPU gathers

    def __init__(self, params: Tensors, corrupt_ids: Optional[set], layerwise: bool, summing: bool,
                 release: bool) -> None:
        self.params = params
        self.release = release
        self.key = _workspace_key(params)
        self.corrupt_index = [i for i, p in enumerate(params) if corrupt_ids is None or id(p) in corrupt_ids]
        self.corrupted = [params[i] for i in self.corrupt_index]
        self.clean = _FlatBuffer(self.corrupted)
        self.gsum = _FlatBuffer(params) if summing else None
        whole = len(self.corrupted) == len(params) and not layerwise
        small = sum(p.numel() for p in params) < self.small_tensors * len(params)
        gather = summing and whole and small and all(p.device.type == "cpu" for p in params)
        self.work = _FlatBuffer(params) if gather else None
        if self.gsum is not None:
            self.sum_into = self.gsum.views if self.work is None else self.gsum.flats
        self.budget_clean = self.clean.views if self.work is None else self.clean.flats
        self.geometry = Geometry(self.budget_clean)  # refreshed at each step's w
        self.batchnorms: Optional[list[nn.Module]] = None  # found by the first clean pass
        self.roots: list[nn.Module] = []  # the models whose forward the clean pass ran (their buffers)

    def hold_clean(self) -> None:
        """Give ``clean`` its memory back if :meth:`free_clean` released it (its views, and the
        geometry's, stay valid: they share the storage)."""
        for flat in self.clean.flats:
            storage = flat.untyped_storage()
            if storage.nbytes() == 0:
                storage.resize_(flat.numel() * flat.element_size())

    def free_clean(self) -> None:
        """After a step, when ``release`` is set: the memory of ``clean`` and of the scales cached
        from it goes back to the allocator until the next step (the peak of the base optimizer's
        step then has no copy of w beside it)."""
        if self.release:
            self.geometry.refresh()
            for flat in self.clean.flats:
                flat.untyped_storage().resize_(0)

    def take_grads(self) -> tuple[Tensors, list[bool]]:
        """The gradients of the pass just run, owned by the defense from here on: every ``.grad``
        is set to None (the next pass starts from zero, as after ``zero_grad``); a parameter
        the pass did not reach contributes zeros. Also says which parameters were reached."""
        grads, reached = [], []
        for p in self.params:
            g = p.grad
            p.grad = None
            reached.append(g is not None)
            if g is None:
                g = torch.zeros_like(p)
            elif g.is_sparse:
                g = g.to_dense()
            grads.append(g)
        return grads, reached

    def operands(self, grads: Tensors) -> tuple[Tensors, Tensors, Tensors]:
        """The pass's gradient as the bookkeeping sees it: (what is summed and checked, what the
        budget transforms into the corruption, the same per corrupted tensor)."""
        if self.work is None:
            corrupted = [grads[i] for i in self.corrupt_index]
            return grads, corrupted, corrupted
        torch._foreach_copy_(self.work.views, grads)
        return self.work.flats, self.work.flats, self.work.views


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_base_kwargs(kwargs: dict) -> None:
    """Numbers given to the base optimizer must be finite: torch's own range checks let NaN
    through (``nan < 0`` is False); the base optimizer checks the rest."""
    if isinstance(kwargs.get("lr"), bool):
        raise TypeError(f"lr must be a number, got {kwargs['lr']!r}")
    for name, value in kwargs.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, Tensor) and v.numel() == 1:
                v = float(v)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {value!r}")


def _fixed_by_preset(preset: str, kwargs: dict, fixed: dict[str, str]) -> None:
    """A preset sets some APD arguments itself: giving one again is an error that says why."""
    given = [k for k in fixed if k in kwargs]
    if given:
        k = given[0]
        raise TypeError(f"{preset} does not take {k}=: {fixed[k]}")


def _corrupt_ids(corrupt: object, groups: list, name: str = "corrupt") -> set:
    """Validate ``corrupt=`` (or the argument ``name``): a non-empty iterable of parameters this
    optimizer holds."""
    if isinstance(corrupt, (str, bytes, nn.Module, Tensor)) or not isinstance(corrupt, Iterable):
        raise TypeError(f"{name} must be None or an iterable of the optimizer's parameters, got {type(corrupt).__name__}")
    items = list(corrupt)
    if not items or not all(isinstance(p, Tensor) for p in items):
        raise ValueError(f"{name} must be None or a non-empty iterable of the optimizer's parameters")
    held = {id(p) for group in groups for p in group["params"]}
    if any(id(p) not in held for p in items):
        raise ValueError(f"{name} names parameters that this optimizer does not hold")
    return {id(p) for p in items}


def _finiteness_probe(grads: Tensors) -> Tensor:
    """A 0-dim value that is NaN/Inf where some entry of ``grads`` is. On an accelerator the
    largest ``|g|`` (one fused kernel, cannot overflow); on the CPU, where that reduction is not
    vectorized (~35x slower than a sum), the sum, which overflows only past ~3e38 in total and
    squares nothing, so small gradients do not turn into slow denormal arithmetic."""
    if all(g.device.type == "cpu" for g in grads):
        return sum(g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32) for g in grads)
    norms = torch._foreach_norm(grads, math.inf)
    if len(norms) == 1:
        return norms[0]
    if len({(n.device, n.dtype) for n in norms}) > 1:
        norms = [n.to(norms[0].device, torch.float64) for n in norms]
    return torch.stack(norms).amax()


def _grad_marks(params: Tensors) -> dict[int, tuple]:
    """What the defense itself left in ``.grad`` (the averaged gradient): the tensor (weakly) and
    its version counter, so that a later in-place accumulation into it is told apart."""
    return {id(p): (weakref.ref(p.grad), p.grad._version) for p in params if p.grad is not None}


def _own(g: Tensor, mark: Optional[tuple], unstepped: bool) -> bool:
    """Whether ``g`` is the defense's own averaged gradient: the same tensor, untouched since the
    base step, or touched in place in any way when that step never came (a GradScaler's
    ``unscale_`` and clipping before a skipped ``scaler.step``)."""
    return mark is not None and mark[0]() is g and (unstepped or g._version == mark[1])


def _check_no_pending_gradients(params: Tensors, left: dict[int, tuple], unstepped: bool) -> None:
    """Refuse to start a trajectory over gradients an earlier ``backward()`` left in ``.grad``
    (a framework's gradient accumulation, an outside backward): every pass's gradient is taken
    at its own corruption, so they could be neither kept nor averaged in, and dropping them would
    lose them silently. The defense's own averaged gradient of the last step (``left``, untouched
    since) and zeros (``zero_grad(set_to_none=False)``) are fine; the check costs one host sync,
    and only when some other ``.grad`` is set."""
    held = [p.grad for p in params if p.grad is not None and not _own(p.grad, left.get(id(p)), unstepped)]
    if not held:
        return
    nonzero = [(g._values() if g.is_sparse else g).ne(0).any() for g in held]
    if len({t.device for t in nonzero}) > 1:
        nonzero = [t.cpu() for t in nonzero]
    if bool(torch.stack(nonzero).any()):
        raise RuntimeError(
            "the parameters already hold gradients from an earlier backward() (an outside backward or a "
            "framework's gradient accumulation) when the defense step starts; APD/SAM compute every pass's "
            "gradient at that pass's corruption and cannot include them. Call optimizer.zero_grad() before "
            "the step and accumulate micro-batches inside the closure or the trajectory() body (one backward "
            "per micro-batch per pass); for Trainer/Lightning/Accelerate see parashield.integrations"
        )


def _workspace_key(params: Tensors) -> tuple:
    return tuple((id(p), p.dtype, p.device, tuple(p.shape), p.stride()) for p in params)


def _running_statistics(module: nn.Module) -> list[Tensor]:
    """The buffers a train-mode forward of a BatchNorm moves."""
    return [b for b in (module.running_mean, module.running_var, module.num_batches_tracked) if b is not None]


def _batchnorms(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


_GLOBAL_HOOK_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"


@contextmanager
def _discovering_batchnorms(found: list[nn.Module], roots: list[nn.Module], undo: list[Callable[[], None]]) -> Iterator[None]:
    """Within the block (one clean forward), collect into ``found`` the BatchNorms of every model
    that runs and into ``roots`` those models, so that no model handle is needed: a global forward
    pre-hook walks the subtree of each module it sees first, before any of it runs, so ``undo``
    gets the restore of its buffers as they were. Compiled code (``torch.compile(model)``, ``model.compile()``) runs
    eagerly for this one pass (``set_stance("force_eager")``), since hooks do not fire inside it,
    and registering one there would recompile the model at every pass."""
    walked: set[int] = set()

    def hook(module: nn.Module, args: Any) -> None:
        if id(module) not in walked:
            roots.append(module)
            undo.append(_snapshot([module]))
            for m in module.modules():
                if id(m) not in walked:
                    walked.add(id(m))
                    if isinstance(m, _BatchNorm) and m.track_running_stats:
                        found.append(m)

    set_stance = getattr(torch.compiler, "set_stance", None)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with warnings.catch_warnings(), (set_stance("force_eager") if set_stance else nullcontext()):
            warnings.filterwarnings("ignore", message=_GLOBAL_HOOK_WARNING)  # the hook is meant to fire there
            yield
    finally:
        handle.remove()


def _snapshot(roots: list[nn.Module]) -> Callable[[], None]:
    """Copies of every buffer of ``roots`` and their submodules now; returns the function that
    puts them back bit for bit (the same tensor objects, also where a forward replaced one): a
    refused step undoes what its clean pass moved (BatchNorm statistics, counters), in compiled
    models too, since no hook is involved."""
    saved = [(m, name, b, b.detach().clone()) for root in roots for m in root.modules()
             for name, b in m._buffers.items() if b is not None]

    def restore() -> None:
        with torch.no_grad():
            for module, name, buffer, copy in saved:
                module._buffers[name] = buffer
                buffer.copy_(copy)

    return restore


@contextmanager
def _frozen_statistics(batchnorms: list[nn.Module]) -> Iterator[None]:
    """Restore the running statistics (and ``num_batches_tracked``) of ``batchnorms`` bit for bit
    after the block: corrupted passes must not move them. Restoring buffers, rather than patching
    momentum, is exact and works in compiled code without recompiling it."""
    saved = [[b.detach().clone() for b in _running_statistics(m)] for m in batchnorms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, copies in zip(batchnorms, saved):
                for b, c in zip(_running_statistics(module), copies):
                    b.copy_(c)


class _Progress:
    """Where the defense's step stands, in one object that copies of the optimizer's attributes
    share: Lightning's ``LightningOptimizer`` wraps an optimizer by copying its ``__dict__``, so
    that ``trajectory()`` called on the wrapper and ``step()`` reaching the wrapped optimizer
    must see the same state."""

    __slots__ = ("ready", "left", "in_trajectory")

    def __init__(self) -> None:
        self.ready = False  # a completed trajectory has left the averaged gradient for the base step
        self.left: dict[int, tuple] = {}  # that gradient's marks (see _grad_marks)
        self.in_trajectory = False


class NonFiniteGradientError(FloatingPointError):
    """A pass of the defense produced a NaN/Inf loss or gradient."""


class APD(torch.optim.Optimizer):
    """Adversarial parameter defense: multi-step risk minimization around any torch optimizer.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer: a ``torch.optim.Optimizer`` subclass (e.g. ``torch.optim.SGD``); it is
            built on the same ``param_groups``, so LR schedulers, ``zero_grad`` and
            ``state_dict`` work on this wrapper.
        budget: the corruption budget (default ``Budget("l2", 0.05)``); any norm, sparsity or
            scale.
        steps: K, the number of corruptions in the trajectory (K+1 passes per step).
        step_size: alpha, in the budget's units; default ``1.5 * eps / K``.
        include_clean: average over t = 0..K (clean loss included) or over t = 1..K.
        corruption: ``"adversarial"`` (the trajectory above) or ``"random"`` (each a_t a fresh
            random sample on the budget's boundary; random weight perturbation).
        corrupt: which parameters are corrupted: ``None`` for all the optimizer holds, or an
            iterable of parameters (the others still receive the averaged gradient).
        release_buffers: free the copy of w between steps (it is needed only during the passes), so
            that the base optimizer's step has no extra parameter-sized buffer beside it: peak
            memory above the base optimizer falls from 1.09 to 0.12 parameter copies for SAM
            (AdamW, 8.5M-parameter MLP, CPU). ``None`` (default): on accelerators, whose caching
            allocator makes the next step's allocation free; not on the CPU, where a large fresh
            allocation is page-faulted in again (SAM's step 7% slower on that MLP).
        distributed: for DistributedDataParallel ``model``: ``"local"`` (default) runs every pass
            under ``model.no_sync()`` so each worker corrupts with its local gradient, then
            all-reduces the averaged gradient once per step (communication equals plain SGD);
            ``"sync"`` lets DDP average every pass, which equals single-process APD on the union
            of the workers' batches.
        model: the model being trained (optional): the DDP-wrapped model for
            ``distributed="local"``; also where the BatchNorms are found whose running statistics
            corrupted passes must not move. Without it they are found by the first clean pass,
            which runs eagerly (also for a compiled model) with a global forward pre-hook.
        seed: seed of the random corruptions (``corruption="random"``).
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        budget: Optional[Budget] = None,
        steps: int = 3,
        step_size: Optional[float] = None,
        include_clean: bool = True,
        corruption: str = "adversarial",
        corrupt: Optional[Iterable[Tensor]] = None,
        distributed: str = "local",
        model: Optional[nn.Module] = None,
        seed: int = 0,
        release_buffers: Optional[bool] = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD, got {base_optimizer!r}"
            )
        budget = check_budget(Budget("l2", 0.05) if budget is None else budget)
        steps = check_count("steps", steps)
        step_size = step_size_or_default(step_size, budget, steps)
        if corruption not in ("adversarial", "random"):
            raise ValueError(f"corruption must be 'adversarial' or 'random', got {corruption!r}")
        if distributed not in ("local", "sync"):
            raise ValueError(f"distributed must be 'local' or 'sync', got {distributed!r}")
        if not isinstance(include_clean, bool):
            raise TypeError(f"include_clean must be a bool, got {include_clean!r}")
        if release_buffers is not None and not isinstance(release_buffers, bool):
            raise TypeError(f"release_buffers must be None (automatic) or a bool, got {release_buffers!r}")
        check_seed(seed)
        _check_base_kwargs(base_kwargs)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be None or the DDP-wrapped torch.nn.Module, got {type(model).__name__}")
        if distributed == "local" and model is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            warnings.warn("APD(distributed='local') needs model=<the DDP module> to skip the inner all-reduces; "
                          "without it DDP synchronizes every pass, as distributed='sync' does")
        params = list(params)
        if not params:
            raise ValueError("params is empty: APD needs at least one parameter to optimize")
        super().__init__(params, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # schedulers such as OneCycleLR / CyclicLR look for 'momentum' / 'betas' in defaults
        self.defaults = self.base_optimizer.defaults
        self.budget = budget
        self.steps = steps
        self.step_size = float(step_size)
        self.include_clean = bool(include_clean)
        self.corruption = corruption
        self.distributed = distributed
        self.model = model
        self.release_buffers = release_buffers
        self._corrupt_ids = None if corrupt is None else _corrupt_ids(corrupt, self.param_groups)
        self._generator = torch.Generator().manual_seed(seed)
        self._workspace: Optional[_Workspace] = None
        self._progress = _Progress()

    # ------------------------------------------------------------------ the core
    def _parameters(self) -> Tensors:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _ddp_local(self) -> bool:
        ddp = torch.nn.parallel.DistributedDataParallel
        return self.distributed == "local" and isinstance(self.model, ddp)

    def _workspace_for(self, params: Tensors) -> _Workspace:
        ws = self._workspace
        if ws is None or ws.key != _workspace_key(params):
            check_not_sharded(params, type(self).__name__)
            summing = self.steps + (1 if self.include_clean else 0) > 1 or self._ddp_local()
            release = self.release_buffers
            if release is None:
                release = any(p.device.type != "cpu" for p in params)
            ws = self._workspace = _Workspace(params, self._corrupt_ids, self.budget.scale == "layer", summing, release)
        return ws

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``; inside a trajectory the gradients always become None:
        each pass's gradient must be autograd's own fresh tensor, which the defense consumes.
        Setting to None is ``Optimizer.zero_grad``'s own loop without its profiler range and
        compiler guard (~40 us a call on the CPU, and a step calls it once per pass), unless a
        profiler is recording."""
        to_none = set_to_none or self._progress.in_trajectory
        if not to_none or torch.autograd.profiler._is_profiler_enabled:
            super().zero_grad(to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def _next_corruption(self, t: int, ws: _Workspace, grads: Tensors, per_tensor: Tensors) -> None:
        """Turn the gradient g_t (``grads``, scratch from here on; ``per_tensor`` is the same
        memory split like the corrupted parameters) into a_{t+1} in place and move the corrupted
        parameters to w + a_{t+1}."""
        geometry = ws.geometry
        if self.corruption == "random":
            torch._foreach_copy_(grads, self.budget.sample(geometry, self._generator))
        else:
            self.budget.steepest_(grads, geometry, radius=self.step_size)
            if t > 0:  # a_t = (w + a_t) - w; a_0 = 0 needs no recovery
                torch._foreach_add_(per_tensor, ws.corrupted)
                torch._foreach_sub_(grads, ws.budget_clean)
            if t > 0 or self.step_size > self.budget.eps:  # a_1 = steepest of radius alpha <= eps is in S
                self.budget.project_(grads, geometry)
        if t > 0:  # after the clean pass the parameters are w already
            torch._foreach_copy_(ws.corrupted, ws.clean.views)
        torch._foreach_add_(ws.corrupted, per_tensor)

    def trajectory(self, scaler: Optional["torch.amp.GradScaler"] = None) -> Iterator[int]:
        """Two-phase API for loops that cannot pass a closure: iterate, and do one forward and
        backward per yielded pass index (t = 0 clean, then the corruptions 1..K)::

            for _ in optimizer.trajectory():
                loss = loss_fn(model(x), y)
                loss.backward()
            optimizer.step()   # base step from the clean w with the averaged gradient

        Between passes the parameters are moved and the gradients taken (``.grad`` is None at the
        start of every pass), so the body need not call ``zero_grad``. On exit (also on an
        exception or ``break`` in a ``for`` loop; a generator kept in a variable restores when it
        is closed) the parameters are back at the clean w bit for bit. After the loop ``.grad``
        holds the averaged gradient (views of one buffer that the next trajectory overwrites:
        clone to keep it); clip it there if wanted. A NaN/Inf gradient in any pass raises
        ``NonFiniteGradientError`` naming the pass, with the parameters and the buffers the clean
        pass changed (BatchNorm statistics, counters) as they were before the step, unless a
        ``GradScaler`` is given, in which case the gradient is left non-finite so that
        ``scaler.step(optimizer)`` skips the step (fp16 recipe in the user guide, docs/guide.md).
        """
        return self._trajectory(scaler, None)

    def _trajectory(self, scaler: Optional["torch.amp.GradScaler"], losses: Optional[list]) -> Iterator[int]:
        """The core of ``trajectory``; ``losses`` (filled by ``step`` with the closure's return
        values, one per pass) joins the finiteness check, so a step has one host sync."""
        params = self._parameters()
        if not params:
            raise ValueError("no parameter of this optimizer requires grad")
        if self._progress.ready and scaler is None:
            raise RuntimeError(
                "a new trajectory() started before step() took the last one's averaged gradient (a framework's "
                "gradient accumulation skipping optimizer.step()?); its passes would be lost. Call step() after "
                "every trajectory, and accumulate micro-batches inside the trajectory body (one backward per "
                "micro-batch per pass)"
            )
        _check_no_pending_gradients(params, self._progress.left, unstepped=self._progress.ready)
        self._progress.ready = False
        ws = self._workspace_for(params)
        if ws.batchnorms is None and self.model is not None:
            ws.batchnorms, ws.roots = _batchnorms(self.model), [self.model]
        discovered: list[nn.Module] = []
        no_sync = self.model.no_sync if self._ddp_local() else nullcontext
        count = self.steps + (1 if self.include_clean else 0)
        first = 0 if self.include_clean else 1
        flags: Tensors = []  # per pass: NaN/Inf where the gradient has a NaN/Inf
        reached: list[bool] = []
        single: Optional[Tensors] = None  # the gradient itself when only one pass is averaged
        started = restored = False
        undo_clean_pass: list[Callable[[], None]] = []  # a refused step leaves the buffers as found
        self._progress.left = {}
        self._progress.in_trajectory = True
        try:
            self.zero_grad()  # inside the trajectory: every .grad (frozen parameters too) to None
            for t in progress(range(self.steps + 1), min_total=50, desc="APD passes", unit="pass", leave=False):
                if t == 0:  # the clean pass moves the statistics; a refused step puts them back
                    if ws.batchnorms is None:
                        guard = _discovering_batchnorms(discovered, ws.roots, undo_clean_pass)
                    else:
                        guard = nullcontext()
                        undo_clean_pass.append(_snapshot(ws.roots))
                else:
                    guard = _frozen_statistics(ws.batchnorms)
                with guard, no_sync():
                    yield t
                with torch.no_grad():
                    grads, seen = ws.take_grads()
                    if t == 0:
                        if ws.batchnorms is None:
                            ws.batchnorms = discovered
                        reached = seen
                        if not any(reached):
                            raise ValueError("the clean pass produced no gradient: did the closure call backward()?")
                        ws.hold_clean()
                        torch._foreach_copy_(ws.clean.views, ws.corrupted)
                        ws.geometry.refresh()  # scales of this step's w, computed once
                        started = True
                    if t >= first and ws.gsum is None:
                        single = grads  # the average of one gradient is itself: no copy
                        flags.append(_finiteness_probe(grads))
                        continue
                    summed, corrupting, per_tensor = ws.operands(grads)
                    del grads
                    flags.append(_finiteness_probe(summed))
                    if t == first:
                        torch._foreach_copy_(ws.sum_into, summed)
                    elif t > first:
                        torch._foreach_add_(ws.sum_into, summed)
                    if t < self.steps:
                        self._next_corruption(t, ws, corrupting, per_tensor)
                    del summed, corrupting, per_tensor  # free g_t before the next pass's backward
            with torch.no_grad():
                torch._foreach_copy_(ws.corrupted, ws.clean.views)
                restored = True
                ws.free_clean()
                if single is None:
                    if self._ddp_local():
                        import torch.distributed as dist

                        count *= dist.get_world_size(self.model.process_group)
                        for flat in ws.gsum.flats:
                            dist.all_reduce(flat, group=self.model.process_group)
                    for flat in ws.gsum.flats:
                        flat.mul_(1.0 / count)
                final = ws.gsum.views if single is None else single
                everywhere = _distributed()  # under DDP every replica must step the same parameters
                for p, g, r in zip(params, final, reached):
                    # no gradient in the clean pass: None, as plain training leaves it
                    p.grad = g if r or everywhere else None
                self._progress.left = _grad_marks(params)
                if scaler is None:
                    if len({(f.device, f.dtype) for f in flags}) > 1:
                        flags = [f.to(flags[0].device, torch.float64) for f in flags]
                    finite = torch.isfinite(torch.stack(flags))
                    if losses and all(isinstance(v, Tensor) for v in losses):
                        values = torch.stack([v.detach().reshape(()).to(finite.device, torch.float64) for v in losses])
                        finite &= torch.isfinite(values)
                    bad = torch.nonzero(~finite)
                    if bad.numel():  # the step's single host sync
                        t_bad = int(bad[0])
                        which = "the clean pass (t = 0)" if t_bad == 0 else f"corruption pass t = {t_bad}"
                        raise NonFiniteGradientError(
                            f"non-finite loss or gradient in {which}; the parameters were restored to the clean w "
                            f"and no step was taken (lower the learning rate or eps, or check the data)"
                        )
            self._progress.ready = True
        finally:
            self._progress.in_trajectory = False
            if started and not restored:
                with torch.no_grad():
                    torch._foreach_copy_(ws.corrupted, ws.clean.views)
                ws.free_clean()
            if not self._progress.left:  # abandoned before the average: what .grad holds is one pass's leftover
                for p in params:
                    p.grad = None
            if not self._progress.ready:
                for undo in reversed(undo_clean_pass):
                    undo()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """With a closure (zero_grad, forward, backward, return loss): run the K+1 passes, calling
        the closure exactly K+1 times, then take the base step; returns the clean loss. A NaN/Inf
        returned loss stops the step like a non-finite gradient (also a loss term without
        gradient).

        After a completed ``trajectory()``: take the base step with its averaged gradient. A
        closure given then is called once, under ``torch.no_grad()`` (so a forward/backward in
        it fails loudly instead of adding to the average), and its value returned: frameworks
        that always pass one route their pre-step hooks and clipping through it (Lightning)."""
        if self._progress.ready:
            value = None
            if closure is not None:
                with torch.no_grad():
                    value = closure()
            self._progress.ready = False
            out = self._base_step()
            return value if closure is not None else out
        if closure is None:
            raise RuntimeError(
                "step() without a closure needs a completed trajectory() first: a plain "
                "'loss.backward(); optimizer.step()' loop gives one gradient, the defense needs K+1 passes. "
                "Write 'optimizer.step(closure)' (closure: zero_grad, forward, backward, return loss) or "
                "'for _ in optimizer.trajectory(): loss_fn(model(x), y).backward()' then 'optimizer.step()'; "
                "for Trainer/Lightning/Accelerate see parashield.integrations"
            )
        from .integrations import check_framework_closure  # here: the integrations import this module

        if not callable(closure):
            raise TypeError("closure must be callable (zero_grad, forward, backward, return the loss), "
                            f"got {type(closure).__name__}")
        check_framework_closure(closure)
        losses: list = []
        with closing(self._trajectory(None, losses)) as passes:  # an error in a pass restores w at once
            for t in passes:
                with torch.enable_grad():
                    loss = closure()
                if isinstance(loss, Tensor) and loss.numel() != 1:  # found at the first pass, not after all
                    raise ValueError(f"closure must return the scalar loss of the batch, got a tensor of shape "
                                     f"{tuple(loss.shape)} in pass t = {t}")
                losses.append(loss)
        self._progress.ready = False
        self._base_step()
        return losses[0]

    def _base_step(self) -> Optional[Tensor]:
        """The base optimizer's step; whatever it or a clipping did to ``.grad`` before it still
        counts as the defense's own gradient for the next step's pending-gradient check."""
        out = self.base_optimizer.step()
        self._progress.left = _grad_marks(self._parameters())
        return out

    # ------------------------------------------------------------------ torch.optim citizenship
    def state_dict(self) -> dict:
        sd = self.base_optimizer.state_dict()
        sd["parashield"] = {"generator": self._generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("parashield", None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        if extra is not None:
            self._generator.set_state(extra["generator"])

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # called by Optimizer.__init__ before the base optimizer exists
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(budget={self.budget}, steps={self.steps}, step_size={self.step_size:g}, "
            f"include_clean={self.include_clean}, corruption={self.corruption!r}, base={self.base_optimizer!r})"
        )


class SAM(APD):
    """Sharpness-aware minimization as an APD preset: K = 1, clean loss excluded, L2 ascent of
    radius rho (``e = rho g / ||g||``; adaptive: ``e = rho T^2 g / ||T g||`` with
    ``T = |w| + eta``, the ASAM paper's choice; ``eta=0`` gives the popular port's form)."""

    def __init__(self, params: Iterable, base_optimizer: type, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.01, **kwargs: Any) -> None:
        _fixed_by_preset("SAM", kwargs, {
            "steps": "SAM is one ascent step; for several use APD(steps=K, include_clean=False, budget=...)",
            "include_clean": "SAM averages only the corrupted pass; APD(include_clean=True) averages the clean one too",
            "budget": "SAM's budget is the L2 ball of radius rho (element-scaled with adaptive=True); pass rho=",
            "step_size": "SAM's step is the whole radius rho",
            "corruption": "SAM's corruption is adversarial; RandomWeightPerturbation is the random one",
        })
        rho = check_real("rho", rho)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        budget = Budget("l2", rho, scale="element" if adaptive else None, eta=eta)
        super().__init__(params, base_optimizer, budget=budget, steps=1, step_size=rho or 1.0,
                         include_clean=False, **kwargs)


class OneStepDefense(APD):
    """One-step corruption-resistant training (Sun et al., AAAI 2021): APD with K = 1, averaging
    the clean gradient and the gradient at the one-step corruption."""

    def __init__(self, params: Iterable, base_optimizer: type, budget: Optional[Budget] = None, **kwargs: Any) -> None:
        _fixed_by_preset("OneStepDefense", kwargs, {
            "steps": "it is one corruption step; APD(steps=K) is the multi-step defense",
            "include_clean": "it averages the clean and the corrupted gradient; use APD for other averages",
            "corruption": "its corruption is the one-step adversarial one; RandomWeightPerturbation is the random one",
        })
        super().__init__(params, base_optimizer, budget=budget, steps=1, include_clean=True, **kwargs)


class RandomWeightPerturbation(APD):
    """Random weight perturbation training: gradients at random boundary points of the budget
    (``steps`` samples, clean loss excluded by default)."""

    def __init__(self, params: Iterable, base_optimizer: type, budget: Optional[Budget] = None, steps: int = 1,
                 include_clean: bool = False, **kwargs: Any) -> None:
        _fixed_by_preset("RandomWeightPerturbation", kwargs, {
            "corruption": "its corruptions are random; APD(corruption='adversarial') is the adversarial defense",
        })
        super().__init__(params, base_optimizer, budget=budget, steps=steps, include_clean=include_clean,
                         corruption="random", **kwargs)

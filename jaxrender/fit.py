"""One Optax fitting loop for every inverse problem.

:func:`fit` minimises ``loss_fn(params, data)`` over the floating-point array
leaves of ``params`` (any pytree, ``equinox.Module``\\ s included) with any Optax
optimizer. It runs many steps per compiled call (``lax.scan``), shows a
progress bar between calls, keeps a per-step loss history, tracks the best
parameters, guards against NaN/inf, applies constraints after every step and
can checkpoint and resume. See ``docs/fitting.md``.

Step numbering: step ``k`` (0-based) evaluates the loss and its gradient at
the parameters ``p_k`` (after ``k`` updates) on the data of step ``k``, then
applies the update to get ``p_{k+1}`` (and the constraint, if any).
``history["loss"][k]`` is the loss of ``p_k``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import threading
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
    "fit",
    "FitResult",
    "Checkpoint",
    "load_checkpoint",
    "param_groups",
    "clamp",
    "nonnegative",
    "unit_norm",
    "project_rotation",
    "chain_constraints",
]

_NAN_POLICIES = ("stop", "raise", "ignore")
_CKPT_VERSION = 1


# ----------------------------------------------------------------------------
# Public containers
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        params: final parameters (same structure as the ``params`` given). After a
            non-finite step these are the last good parameters: the ones from
            before the bad step.
        best_params: the parameters with the lowest finite loss evaluated during
            the run (``history["loss"][best_step]``), or ``params`` when
            ``track_best=False`` or no finite loss was seen.
        best_loss: that lowest loss (``inf`` if none).
        best_step: the step at which it was evaluated (``-1`` if none).
        history: NumPy arrays. ``"loss"``: one loss per applied step (length
            ``steps_run``, including steps run before a resume). With
            ``has_aux``: the aux metrics, logged every ``log_every`` steps at the
            steps in ``"log_steps"`` (a dict aux gives one key per entry, any
            other aux is stored under ``"aux"`` as a stacked pytree).
        steps_run: number of updates applied (the global step count).
        stopped_reason: ``"completed"``, or a sentence saying why the run
            stopped early (callback, non-finite value at step k, interrupt).
        bad_step: the step whose loss/gradient/update was non-finite, or ``None``.
        opt_state: the optimizer state matching ``params``.
        key: the PRNG key of the run (the one passed to ``data_fn`` is
            ``jax.random.fold_in(key, step)``).
        wall_time: seconds spent in :func:`fit` (compilation included).
    """

    params: Any
    best_params: Any
    best_loss: float
    best_step: int
    history: dict
    steps_run: int
    stopped_reason: str
    bad_step: int | None
    opt_state: Any
    key: Any
    wall_time: float = 0.0

    @property
    def final_loss(self) -> float:
        """The last recorded loss (``nan`` if no step ran)."""
        h = self.history.get("loss")
        return float(h[-1]) if h is not None and len(h) else float("nan")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where and how often :func:`fit` saves its state.

    Args:
        path: file to write (a ``.npz`` archive; written atomically through a
            temporary file in the same folder).
        every: save every ``every`` steps (the compiled chunks are cut so a save
            falls exactly on multiples of ``every``). ``None``: save only at the
            end of the run (and when it stops early or is interrupted).
    """

    path: str | os.PathLike
    every: int | None = None

    def __post_init__(self):
        if self.every is not None and (not isinstance(self.every, (int, np.integer)) or self.every < 1):
            raise ValueError(f"Checkpoint.every must be a positive int or None, got {self.every!r}")


# ----------------------------------------------------------------------------
# Optimizer helpers
# ----------------------------------------------------------------------------


def param_groups(optimizers: Mapping[Any, optax.GradientTransformation], labels) -> optax.GradientTransformation:
    """Per-group optimizers / learning rates: a thin wrapper of ``optax.multi_transform``.

    Args:
        optimizers: group label -> Optax transformation, e.g.
            ``{"shape": optax.adam(1e-2), "pose": optax.adam(1e-3),
            "frozen": optax.set_to_zero()}``.
        labels: the label of every trainable leaf. Either a pytree with the
            structure of ``params`` (or a prefix of it, e.g. a dict
            ``{"shape": "shape", "pose": "pose"}`` for dict params) whose leaves
            are labels, or a callable ``trainable_params -> label pytree``.
            :func:`fit` hands the optimizer only the trainable part of ``params``
            (non-float leaves replaced by ``None``); a label pytree with the full
            structure still works there because a label leaf is a prefix of the
            empty ``None`` subtree.

    Returns:
        An ``optax.GradientTransformation``.
    """
    if not isinstance(optimizers, Mapping) or not optimizers:
        raise TypeError("param_groups: optimizers must be a non-empty dict label -> GradientTransformation")
    for k, o in optimizers.items():
        if not _is_optimizer(o):
            raise TypeError(f"param_groups: optimizers[{k!r}] is not an optax GradientTransformation (got {type(o).__name__})")
    return optax.multi_transform(dict(optimizers), labels)


# ----------------------------------------------------------------------------
# Constraints
# ----------------------------------------------------------------------------


def _map_float_leaves(f, tree):
    return jax.tree_util.tree_map(lambda x: f(x) if eqx.is_inexact_array(x) else x, tree)


def _at(where, fn):
    """Build a ``params -> params`` constraint applying ``fn`` to float leaves (of ``where(params)``)."""

    def constraint(params):
        if where is None:
            return _map_float_leaves(fn, params)
        return eqx.tree_at(where, params, replace_fn=lambda node: _map_float_leaves(fn, node))

    return constraint


def clamp(lo=None, hi=None, *, where: Callable | None = None) -> Callable:
    """Constraint clamping parameters to ``[lo, hi]`` after every step.

    Args:
        lo: lower bound (scalar or array broadcasting against the leaves), or ``None``.
        hi: upper bound, or ``None``.
        where: optional selector ``params -> node`` (or a tuple of nodes), as in
            ``eqx.tree_at``, e.g. ``lambda p: p["albedo"]``; ``None`` clamps
            every floating-point leaf.

    Returns:
        A callable ``params -> params`` for ``fit(..., constraints=...)``.
    """
    if lo is None and hi is None:
        raise ValueError("clamp: give at least one of lo, hi")

    def fn(x):
        lo_ = None if lo is None else jnp.asarray(lo, x.dtype)
        hi_ = None if hi is None else jnp.asarray(hi, x.dtype)
        return jnp.clip(x, lo_, hi_)

    return _at(where, fn)


def nonnegative(*, where: Callable | None = None) -> Callable:
    """Constraint ``x = max(x, 0)``; ``where`` as in :func:`clamp`.

    Returns:
        A callable ``params -> params``.
    """
    return clamp(0.0, None, where=where)


def unit_norm(axis: int = -1, *, where: Callable | None = None, eps: float = 1e-12) -> Callable:
    """Constraint normalising vectors along ``axis`` to unit length (rows by default).

    Args:
        axis: the vector axis.
        where: selector as in :func:`clamp`; ``None``: every float leaf.
        eps: guard against dividing by zero.

    Returns:
        A callable ``params -> params``.
    """

    def fn(x):
        n = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
        return x / jnp.maximum(n, jnp.asarray(eps, x.dtype))

    return _at(where, fn)


def project_rotation(*, where: Callable | None = None) -> Callable:
    """Constraint projecting ``(..., 3, 3)`` matrices onto the nearest rotation (SVD, det +1).

    Args:
        where: selector as in :func:`clamp`; ``None``: every float leaf (each
            must end in ``(3, 3)``).

    Returns:
        A callable ``params -> params``.
    """

    def fn(x):
        if x.shape[-2:] != (3, 3):
            raise ValueError(f"project_rotation: expected (..., 3, 3) matrices, got shape {x.shape}")
        u, _, vt = jnp.linalg.svd(x)
        d = jnp.sign(jnp.linalg.det(u @ vt))
        d = jnp.where(d == 0, 1.0, d).astype(x.dtype)
        u = u.at[..., :, -1].multiply(d[..., None])
        return u @ vt

    return _at(where, fn)


def chain_constraints(*constraints: Callable | None) -> Callable:
    """Compose constraints, applied left to right (``None`` entries are skipped).

    Returns:
        A callable ``params -> params``.
    """
    cs = [c for c in constraints if c is not None]
    for c in cs:
        if not callable(c):
            raise TypeError(f"chain_constraints: {c!r} is not callable")

    def constraint(params):
        for c in cs:
            params = c(params)
        return params

    return constraint


# ----------------------------------------------------------------------------
# Internals
# ----------------------------------------------------------------------------


def _is_optimizer(o) -> bool:
    return hasattr(o, "init") and hasattr(o, "update") and callable(o.init) and callable(o.update)


def _strong(tree):
    """Copy array leaves into strongly typed JAX arrays (stable scan/cond carry types)."""

    def f(x):
        if eqx.is_array(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return x
            return jnp.asarray(x, dtype=x.dtype)
        return x

    return jax.tree_util.tree_map(f, tree)


def _tree_where(pred, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y) if eqx.is_array(x) else x, a, b)


def _all_finite(tree):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if eqx.is_inexact_array(x)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _treedef_sig(tree) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(jax.tree_util.tree_structure(tree)))


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_to_np(key):
    if _is_typed_key(key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def _key_from_np(arr, like):
    if _is_typed_key(like):
        return jax.random.wrap_key_data(jnp.asarray(arr), impl=jax.random.key_impl(like))
    return jnp.asarray(arr, dtype=like.dtype)


def _save_npz(path, arrays: dict):
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _check_and_unflatten(z, prefix, template, what, path):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    sig = str(z[f"{prefix}__treedef"])
    n = int(z[f"{prefix}__n"])
    if n != len(leaves) or sig != _treedef_sig(template):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r}: the saved {what} does not match the current one "
            f"({n} leaves vs {len(leaves)}; structure {'equal' if sig == _treedef_sig(template) else 'differs'}). "
            "Use the same params structure and optimizer as the run that wrote it."
        )
    out = []
    for i, ref in enumerate(leaves):
        a = z[f"{prefix}{i}"]
        if eqx.is_array(ref) and not _is_typed_key(ref):
            if tuple(a.shape) != tuple(ref.shape) or np.dtype(a.dtype) != np.dtype(ref.dtype):
                raise ValueError(
                    f"checkpoint {os.fspath(path)!r}: {what} leaf {i} has shape {a.shape} {a.dtype}, "
                    f"expected {tuple(ref.shape)} {np.dtype(ref.dtype)}"
                )
            out.append(jnp.asarray(a, dtype=ref.dtype))
        elif _is_typed_key(ref):
            out.append(_key_from_np(a, ref))
        else:
            out.append(ref)
    return jax.tree_util.tree_unflatten(treedef, out)


def _flatten_into(arrays, prefix, tree):
    leaves = jax.tree_util.tree_leaves(tree)
    arrays[f"{prefix}__treedef"] = np.asarray(_treedef_sig(tree))
    arrays[f"{prefix}__n"] = np.asarray(len(leaves))
    for i, x in enumerate(leaves):
        arrays[f"{prefix}{i}"] = _key_to_np(x) if _is_typed_key(x) else np.asarray(x)


def _split_params(params, filter_spec):
    selected, unselected = eqx.partition(params, filter_spec)
    diff, sel_rest = eqx.partition(selected, eqx.is_inexact_array)
    static = eqx.combine(sel_rest, unselected)
    static_arr, static_rest = eqx.partition(static, eqx.is_array)
    return diff, static_arr, static_rest


# ----------------------------------------------------------------------------
# The compiled step, cached across fit calls
# ----------------------------------------------------------------------------

#: How many step programs (loss/optimizer/constraint/data_fn and the static
#: parts of params and data) keep their compiled code between fit calls;
#: the least recently used one is dropped first.
_STEP_CACHE_SIZE = 32
_STEP_CACHE: collections.OrderedDict = collections.OrderedDict()
_STEP_CACHE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _default_optimizer():
    # One object, so that fits without an optimizer share their compiled step.
    return optax.adam(1e-2)


def _as_pytree_callable(f):
    """A ``functools.partial`` as a ``jax.tree_util.Partial``: its array
    arguments become traced leaves, its function and other arguments the cache key."""
    if type(f) is functools.partial:
        return jax.tree_util.Partial(f.func, *f.args, **f.keywords)
    return f


class _StepSpec(NamedTuple):
    """What a compiled step depends on besides the shapes of its array arguments."""

    fns: Any  # (loss_fn, optimizer, constraints, data_fn) without their array leaves
    static_rest: Any  # params without their array leaves
    data_rest: Any  # data without its array leaves
    filter_spec: Any
    has_aux: bool
    uses_data: bool
    has_data: bool
    check: bool
    track_best: bool


class _Step(NamedTuple):
    probe: Callable  # jitted (diff, s_arr, d_arr, fn_arr, key) -> (loss, aux); used for eval_shape
    run_chunk: Callable  # jitted (carry, first, n_active, s_arr, d_arr, fn_arr, key, *, chunk_len)


def _spec_key(spec: _StepSpec):
    """A hashable key equal for specs that trace to the same program; raises
    ``TypeError`` when a static part is unhashable."""
    leaves, treedef = jax.tree_util.tree_flatten(spec)
    key = (treedef, tuple((type(x), x) for x in leaves))
    hash(key)
    return key


def _get_step(spec: _StepSpec) -> _Step:
    """The cached :class:`_Step` of ``spec`` (built on a miss). Callables are
    compared by identity (or hash/equality, e.g. equal ``equinox.Module`` s);
    the cache holds at most ``_STEP_CACHE_SIZE`` of them."""
    try:
        key = _spec_key(spec)
        with _STEP_CACHE_LOCK:
            step = _STEP_CACHE.get(key)
            if step is not None:
                _STEP_CACHE.move_to_end(key)
                return step
    except (TypeError, ValueError):  # an unhashable (or array-valued ==) static part: compile for this call only
        return _build_step(spec)
    step = _build_step(spec)
    with _STEP_CACHE_LOCK:
        step = _STEP_CACHE.setdefault(key, step)
        while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
            _STEP_CACHE.popitem(last=False)
    return step


def _build_step(spec: _StepSpec) -> _Step:
    """Jit the loss probe and the ``lax.scan`` chunk of fit steps for ``spec``.

    Everything that changes between calls of the same program (params, data,
    the array leaves of the callables, the PRNG key) is an argument.
    """

    def unpack(fn_arr):
        return eqx.combine(fn_arr, spec.fns)

    def combine(d, s_arr):
        return eqx.combine(d, s_arr, spec.static_rest)

    def get_data(step, d_arr, data_fn, key):
        d = eqx.combine(d_arr, spec.data_rest)
        if data_fn is None:
            return d
        k = jax.random.fold_in(key, step)
        return data_fn(k, step, d) if spec.has_data else data_fn(k, step)

    def call_loss(loss_fn, d, s_arr, batch):
        p = combine(d, s_arr)
        out = loss_fn(p, batch) if spec.uses_data else loss_fn(p)
        if spec.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"fit: with has_aux=True, loss_fn must return (loss, aux), got {type(out).__name__}")
            loss, aux = out
        else:
            if isinstance(out, tuple):
                raise TypeError("fit: loss_fn returned a tuple; pass has_aux=True to return (loss, aux)")
            loss, aux = out, None
        return loss, aux

    @jax.jit
    def probe(d, s_arr, d_arr, fn_arr, key):
        loss_fn, _, _, data_fn = unpack(fn_arr)
        return call_loss(loss_fn, d, s_arr, get_data(jnp.int32(0), d_arr, data_fn, key))

    @functools.partial(jax.jit, static_argnames="chunk_len")
    def run_chunk(c, first, n_active, s_arr, d_arr, fn_arr, key, *, chunk_len):
        loss_fn, optimizer, constraints, data_fn = unpack(fn_arr)
        loss_dtype = c["best_loss"].dtype
        aux_shape = probe.eval_shape(c["diff"], s_arr, d_arr, fn_arr, key)[1]
        aux_zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

        def do_step(c, step):
            batch = get_data(step, d_arr, data_fn, key)
            (loss, aux), grads = jax.value_and_grad(
                lambda d: call_loss(loss_fn, d, s_arr, batch), has_aux=True
            )(c["diff"])
            loss = loss.astype(loss_dtype)
            if extra_args:
                # Line-search optimizers (optax.lbfgs, ...): pass the loss, the gradient
                # and the loss as a function of the trainable params on this step's data.
                updates, new_opt = optimizer.update(
                    grads, c["opt"], c["diff"], value=loss, grad=grads,
                    value_fn=lambda d: call_loss(loss_fn, d, s_arr, batch)[0].astype(loss_dtype),
                )
            else:
                updates, new_opt = optimizer.update(grads, c["opt"], c["diff"])
            new_diff = optax.apply_updates(c["diff"], updates)
            if constraints is not None:
                full = constraints(combine(new_diff, s_arr))
                nd, _, _ = _split_params(full, spec.filter_spec)
                if jax.tree_util.tree_structure(nd) != jax.tree_util.tree_structure(new_diff):
                    raise ValueError("fit: constraints must return params with the same structure as params")
                new_diff = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), nd, new_diff)
            new_diff = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_diff, c["diff"])
            new_opt = jax.tree_util.tree_map(
                lambda a, b: a.astype(b.dtype) if eqx.is_array(b) and not _is_typed_key(b) else a, new_opt, c["opt"]
            )
            out = dict(c)
            loss_ok = jnp.isfinite(loss)
            if spec.check:
                grad_ok = _all_finite(grads)
                par_ok = _all_finite(new_diff)
                ok = loss_ok & grad_ok & par_ok
                out["diff"] = _tree_where(ok, new_diff, c["diff"])
                out["opt"] = _tree_where(ok, new_opt, c["opt"])
                out["bad"] = jnp.logical_not(ok)
                out["bad_step"] = jnp.where(ok, jnp.int32(-1), step).astype(jnp.int32)
                out["bad_kind"] = jnp.where(ok, 0, jnp.where(~loss_ok, 1, jnp.where(~grad_ok, 2, 3))).astype(jnp.int32)
                out["bad_loss"] = loss
                applied = ok
            else:
                out["diff"], out["opt"] = new_diff, new_opt
                applied = jnp.asarray(True)
            if spec.track_best:
                improved = loss_ok & (loss < c["best_loss"]) & applied
                out["best"] = _tree_where(improved, c["diff"], c["best"])
                out["best_loss"] = jnp.where(improved, loss, c["best_loss"])
                out["best_step"] = jnp.where(improved, step, c["best_step"]).astype(jnp.int32)
            return out, (loss, aux, applied)

        def skip_step(c, step):
            return c, (jnp.asarray(jnp.nan, loss_dtype), aux_zero, jnp.asarray(False))

        def body(c, i):
            step = (first + i).astype(jnp.int32)
            active = (i < n_active) & jnp.logical_not(c["bad"])
            return lax.cond(active, do_step, skip_step, c, step)

        return lax.scan(body, c, jnp.arange(chunk_len, dtype=jnp.int32))

    return _Step(probe, run_chunk)


# ----------------------------------------------------------------------------
# Checkpoint loading (public)
# ----------------------------------------------------------------------------


def load_checkpoint(path, params, optimizer: optax.GradientTransformation | None = None, *, filter_spec=eqx.is_inexact_array) -> dict:
    """Read a checkpoint written by :func:`fit`.

    Args:
        path: the checkpoint file (or a :class:`Checkpoint`).
        params: a template with the structure of the fitted params (the
            initial params of the run are fine); its non-trainable parts
            (static fields, integer arrays) are reused as they are.
        optimizer: the run's optimizer, to restore ``opt_state``; ``None`` skips it.
        filter_spec: the ``filter_spec`` the run used.

    Returns:
        A dict with ``params``, ``best_params``, ``best_loss``, ``best_step``,
        ``step``, ``history``, ``key`` and (with ``optimizer``) ``opt_state``.
    """
    if isinstance(path, Checkpoint):
        path = path.path
    diff, static_arr, static_rest = _split_params(params, filter_spec)
    diff = _strong(diff)
    with np.load(os.fspath(path), allow_pickle=False) as z:
        z = dict(z)
    if int(z.get("__version__", -1)) != _CKPT_VERSION:
        raise ValueError(f"checkpoint {os.fspath(path)!r}: not a jaxrender.fit checkpoint (or an unknown version)")
    d = _check_and_unflatten(z, "p", diff, "params", path)
    b = _check_and_unflatten(z, "b", diff, "best params", path) if int(z["has_best"]) else d
    out = {
        "params": eqx.combine(d, static_arr, static_rest),
        "best_params": eqx.combine(b, static_arr, static_rest),
        "best_loss": float(z["best_loss"]),
        "best_step": int(z["best_step"]),
        "step": int(z["step"]),
        "history": _history_from_npz(z),
        "key": jnp.asarray(z["key"]),
    }
    if optimizer is not None:
        out["opt_state"] = _check_and_unflatten(z, "o", _strong(optimizer.init(d)), "optimizer state", path)
    return out


def _history_from_npz(z) -> dict:
    h = {"loss": z["h_loss"]}
    if "h_log_steps" in z:
        h["log_steps"] = z["h_log_steps"]
    for k in z:
        if k.startswith("h_aux_"):
            h[k[len("h_aux_"):]] = z[k]
    n_leaves = sum(1 for k in z if k.startswith("h_auxleaf_"))
    if n_leaves:
        h["_auxleaves"] = [z[f"h_auxleaf_{i}"] for i in range(n_leaves)]
    return h


# ----------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------


def fit(
    loss_fn: Callable,
    params,
    data=None,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 1000,
    *,
    data_fn: Callable | None = None,
    key=None,
    constraints: Callable | None = None,
    steps_per_call: int = 50,
    progress: bool | str = True,
    log_every: int = 1,
    callback: Callable | None = None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    resume: bool = False,
    nan_policy: str = "stop",
    has_aux: bool = False,
    track_best: bool = True,
    filter_spec=eqx.is_inexact_array,
) -> FitResult:
    """Minimise ``loss_fn`` over the floating-point leaves of ``params`` with Optax.

    Args:
        loss_fn: ``loss_fn(params, data) -> loss`` (``loss_fn(params)`` when there
            is neither ``data`` nor ``data_fn``). ``loss`` must be a real scalar;
            with ``has_aux=True`` return ``(loss, aux)`` where ``aux`` holds
            metrics (a dict of small arrays is best) recorded into the history.
            Must be JAX-traceable (it runs inside ``jit``/``lax.scan``).
        params: initial parameters: any pytree, ``equinox.Module`` s included.
            Only floating-point array leaves are optimised; static fields,
            integer/bool arrays (e.g. mesh faces) and Python scalars are left
            untouched (and are not differentiated).
        data: fixed data passed to ``loss_fn`` at every step (any pytree; its
            arrays become arguments of the compiled function, not constants).
        optimizer: any ``optax.GradientTransformation`` (default
            ``optax.adam(1e-2)``). Per-group learning rates: ``optax.multi_transform``
            / ``optax.partition`` or :func:`param_groups`; schedules: pass an
            Optax schedule as the learning rate. Transformations taking extra
            arguments (``optax.GradientTransformationExtraArgs``) get
            ``value=loss, grad=grads, value_fn=...`` so line-search optimizers
            such as ``optax.lbfgs()`` work.
        steps: total number of steps. With ``resume`` this counts the steps
            already done, so a resumed run stops at the same step as an
            uninterrupted one.
        data_fn: per-step data (e.g. a random view): ``data_fn(key, step)``, or
            ``data_fn(key, step, data)`` when ``data`` is given (pass large
            datasets as ``data`` so they are not baked into the program). ``key``
            is ``jax.random.fold_in(key_of_fit, step)``, ``step`` an int32 scalar.
            Runs inside the compiled step: must be JAX-traceable.
        key: PRNG key for ``data_fn`` (default ``jax.random.PRNGKey(0)``).
        constraints: callable ``params -> params`` applied to the full params
            after every update inside the compiled step (clamps, projections,
            normalisations). It must keep the structure. See :func:`clamp`,
            :func:`nonnegative`, :func:`unit_norm`, :func:`project_rotation`,
            :func:`chain_constraints`. The initial params are not constrained.
        steps_per_call: steps per compiled call (``lax.scan``). One chunk
            function serves the whole run; shorter chunks (the last one, or
            ones cut at checkpoint steps) reuse it and skip their unused steps
            with ``lax.cond``. It is also reused by later calls (see
            "Compilation cache" below).
        progress: ``True``: a tqdm bar (plain prints without tqdm), ``"tqdm"``,
            ``"print"`` (one line per compiled call), ``False``: silent.
        log_every: aux metrics are recorded every ``log_every`` steps (the loss
            always at every step).
        callback: ``callback(step, params, loss)`` called between compiled calls
            with the number of steps done, the current params and the latest
            loss. Return ``False`` to stop the run (any other value continues).
        checkpoint: a path or a :class:`Checkpoint`: save params, optimizer
            state, best params, step, history and PRNG key (every
            ``Checkpoint.every`` steps and at the end).
        resume: with ``checkpoint``: continue from the saved state if the file
            exists (otherwise start fresh). The resumed run equals an
            uninterrupted one. The given ``params`` then serve as the template
            (structure and non-trainable parts).
        nan_policy: ``"stop"`` (default): when the loss, the gradient or the
            updated params become non-finite at step ``k``, the update is not
            applied, the run stops with a warning naming ``k`` and returns the
            params from before step ``k``; ``"raise"``: same, but raises
            ``FloatingPointError``; ``"ignore"``: no checks.
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        track_best: keep a copy of the best params (costs one copy of the
            trainable params in memory).
        filter_spec: an Equinox filter selecting the trainable leaves (default
            ``eqx.is_inexact_array``; a bool pytree freezes parts). Only
            floating-point arrays are ever trained.

    Compilation cache:
        The compiled step is kept between calls (the 32 most recently used
        programs), so fitting many images in a loop compiles once. A later
        call reuses it when it has the same ``loss_fn``, ``optimizer``,
        ``constraints`` and ``data_fn``, the same flags (``has_aux``,
        ``nan_policy`` checking or not, ``track_best``), the same chunk length
        (``min(steps_per_call, steps)``) and params/data of the same
        structure, shapes and dtypes with equal non-array parts. Plain
        functions and optimizers are compared by identity: create them once,
        outside the loop (``optax.adam(1e-2)`` builds new functions on each
        call; a closure over an image is a new function for each image). For
        callables that carry arrays, pass an ``equinox.Module`` (its array
        fields are traced arguments, its other fields compared by value) or a
        ``functools.partial`` of a module-level function (array arguments
        traced, the others compared by value). Callables, params or data with
        unhashable non-array parts are compiled for their call only.
        ``jax.clear_caches()`` frees the compiled code.

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError / TypeError: bad arguments, a non-scalar or non-float loss,
            an aux/has_aux mismatch, or a checkpoint that does not match.
        FloatingPointError: with ``nan_policy="raise"`` on a non-finite step.
    """
    t0 = time.perf_counter()
    # ---------------- argument checks ----------------
    if not callable(loss_fn):
        raise TypeError(f"fit: loss_fn must be callable, got {type(loss_fn).__name__}")
    if optimizer is None:
        optimizer = _default_optimizer()
    if _is_optimizer(data) and not isinstance(data, eqx.Module):
        raise TypeError(
            "fit: `data` (the 3rd positional argument) is an optax optimizer; pass it as optimizer=... "
            "(or data=None positionally: fit(loss_fn, params, None, optimizer))"
        )
    if not _is_optimizer(optimizer):
        raise TypeError(f"fit: optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"fit: steps must be a non-negative int, got {steps!r}")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, (int, np.integer)) or steps_per_call < 1:
        raise ValueError(f"fit: steps_per_call must be a positive int, got {steps_per_call!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) or log_every < 1:
        raise ValueError(f"fit: log_every must be a positive int, got {log_every!r}")
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"fit: nan_policy must be one of {_NAN_POLICIES}, got {nan_policy!r}")
    if progress not in (True, False, "tqdm", "print", None):
        raise ValueError(f"fit: progress must be True, False, 'tqdm' or 'print', got {progress!r}")
    if constraints is not None and not callable(constraints):
        raise TypeError(
            "fit: constraints must be a callable params -> params (combine several with chain_constraints), "
            f"got {type(constraints).__name__}"
        )
    if data_fn is not None and not callable(data_fn):
        raise TypeError(f"fit: data_fn must be callable (key, step[, data]) -> data, got {type(data_fn).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"fit: callback must be callable (step, params, loss), got {type(callback).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"fit: checkpoint must be a path or a Checkpoint, got {type(checkpoint).__name__}")
        checkpoint = Checkpoint(checkpoint)
    if resume and checkpoint is None:
        raise ValueError("fit: resume=True needs checkpoint=")
    steps = int(steps)
    steps_per_call = int(steps_per_call)
    log_every = int(log_every)

    # ---------------- split params ----------------
    diff, static_arr, static_rest = _split_params(params, filter_spec)
    diff = _strong(diff)
    if not jax.tree_util.tree_leaves(diff):
        raise ValueError(
            "fit: params has no floating-point array leaves to optimise (Python floats are treated as "
            "constants: wrap them in jnp.asarray)"
        )
    data_arr, data_rest = eqx.partition(data, eqx.is_array)
    if key is None:
        key = jax.random.PRNGKey(0)
    uses_data = data is not None or data_fn is not None
    check = nan_policy != "ignore"

    def combine(d, s_arr):
        return eqx.combine(d, s_arr, static_rest)

    # ---------------- the compiled step (cached across calls) ----------------
    # The callables' array leaves (equinox.Module fields, partial arguments) are
    # traced arguments; the rest of them, with the static parts of params and
    # data and the flags, picks the cached step (see _get_step).
    fns = (_as_pytree_callable(loss_fn), optimizer, _as_pytree_callable(constraints), _as_pytree_callable(data_fn))
    fn_arr, fns_static = eqx.partition(fns, eqx.is_array)
    step_fns = _get_step(_StepSpec(
        fns=fns_static, static_rest=static_rest, data_rest=data_rest, filter_spec=filter_spec, has_aux=has_aux,
        uses_data=uses_data, has_data=data is not None, check=check, track_best=track_best,
    ))
    key_arg = key if data_fn is not None else None

    # ---------------- validate loss_fn output ----------------
    loss_shape, aux_shape = step_fns.probe.eval_shape(diff, static_arr, data_arr, fn_arr, key_arg)
    if not hasattr(loss_shape, "shape") or loss_shape.shape != ():
        raise ValueError(
            f"fit: loss_fn must return a scalar loss, got shape {getattr(loss_shape, 'shape', type(loss_shape).__name__)}"
            + (" (reduce it, e.g. with jnp.mean/jnp.sum)" if hasattr(loss_shape, "shape") else "")
        )
    if not jnp.issubdtype(loss_shape.dtype, jnp.floating):
        raise TypeError(f"fit: loss_fn must return a real floating-point scalar, got dtype {loss_shape.dtype}")
    loss_dtype = loss_shape.dtype

    # ---------------- initial state ----------------
    opt_state = _strong(optimizer.init(diff))
    start = 0
    best_diff = diff if track_best else None
    best_loss = jnp.asarray(jnp.inf, loss_dtype)
    best_step = jnp.asarray(-1, jnp.int32)
    hist_loss: list[np.ndarray] = []
    hist_aux: list = []
    hist_log_steps: list[np.ndarray] = []
    prev_aux_hist = None
    ckpt_path = os.fspath(checkpoint.path) if checkpoint is not None else None
    if resume and os.path.exists(ckpt_path):
        with np.load(ckpt_path, allow_pickle=False) as z:
            z = dict(z)
        if int(z.get("__version__", -1)) != _CKPT_VERSION:
            raise ValueError(f"checkpoint {ckpt_path!r}: not a jaxrender.fit checkpoint (or an unknown version)")
        diff = _check_and_unflatten(z, "p", diff, "params", ckpt_path)
        opt_state = _check_and_unflatten(z, "o", opt_state, "optimizer state", ckpt_path)
        if track_best:
            best_diff = _check_and_unflatten(z, "b", diff, "best params", ckpt_path) if int(z["has_best"]) else diff
        best_loss = jnp.asarray(z["best_loss"], loss_dtype)
        best_step = jnp.asarray(z["best_step"], jnp.int32)
        start = int(z["step"])
        key = _key_from_np(z["key"], key)
        hist_loss.append(np.asarray(z["h_loss"]))
        if has_aux and "h_log_steps" in z:
            hist_log_steps.append(np.asarray(z["h_log_steps"]))
            prev_aux_hist = _history_from_npz(z)

    carry = {
        "diff": diff,
        "opt": opt_state,
        "best": best_diff,
        "best_loss": best_loss,
        "best_step": best_step,
        "bad": jnp.asarray(False),
        "bad_step": jnp.asarray(-1, jnp.int32),
        "bad_kind": jnp.asarray(0, jnp.int32),
        "bad_loss": jnp.asarray(jnp.nan, loss_dtype),
    }

    # ---------------- compiled chunk ----------------
    chunk_len = max(1, min(steps_per_call, steps - start)) if steps > start else 1

    def run_chunk(c, first, n_active):
        return step_fns.run_chunk(c, first, n_active, static_arr, data_arr, fn_arr, key_arg, chunk_len=chunk_len)

    # ---------------- helpers on the host ----------------
    def full_params(d):
        return combine(d, static_arr)

    def build_history():
        h = {"loss": np.concatenate(hist_loss) if hist_loss else np.zeros((0,), np.dtype(loss_dtype))}
        if has_aux:
            h["log_steps"] = np.concatenate(hist_log_steps).astype(np.int64) if hist_log_steps else np.zeros((0,), np.int64)
            new_aux = None
            if hist_aux:
                new_aux = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *hist_aux)
            if isinstance(aux_shape, dict):
                for k in aux_shape:
                    if k in ("loss", "log_steps"):
                        raise ValueError(f"fit: aux metric name {k!r} is reserved")
                    parts = []
                    if prev_aux_hist is not None and k in prev_aux_hist:
                        parts.append(prev_aux_hist[k])
                    if new_aux is not None:
                        parts.append(np.asarray(new_aux[k]))
                    h[k] = np.concatenate(parts, axis=0) if parts else np.zeros((0,) + tuple(aux_shape[k].shape))
            else:
                if new_aux is not None or prev_aux_hist is not None:
                    h["aux"] = new_aux if prev_aux_hist is None else _merge_prev_aux(prev_aux_hist, new_aux, aux_shape)
        return h

    def save(c, step_done):
        if checkpoint is None:
            return
        arrays = {"__version__": np.asarray(_CKPT_VERSION), "step": np.asarray(step_done)}
        _flatten_into(arrays, "p", c["diff"])
        _flatten_into(arrays, "o", c["opt"])
        arrays["has_best"] = np.asarray(int(track_best))
        if track_best:
            _flatten_into(arrays, "b", c["best"])
        arrays["best_loss"] = np.asarray(c["best_loss"])
        arrays["best_step"] = np.asarray(c["best_step"])
        arrays["key"] = _key_to_np(key)
        h = build_history()
        arrays["h_loss"] = h["loss"]
        if has_aux:
            arrays["h_log_steps"] = h["log_steps"]
            if isinstance(aux_shape, dict):
                for k in aux_shape:
                    arrays[f"h_aux_{k}"] = np.asarray(h[k])
            else:
                for i, leaf in enumerate(jax.tree_util.tree_leaves(h.get("aux"))):
                    arrays[f"h_auxleaf_{i}"] = np.asarray(leaf)
        _save_npz(ckpt_path, arrays)

    # progress
    mode = None
    if progress in (True, "tqdm"):
        try:
            from tqdm.auto import tqdm  # noqa: F401

            mode = "tqdm"
        except ImportError:  # pragma: no cover - tqdm is a soft dependency
            if progress == "tqdm":
                raise
            mode = "print"
    elif progress == "print":
        mode = "print"
    bar = None
    if mode == "tqdm" and steps > start:
        from tqdm.auto import tqdm  # noqa: F811 - imported above only to probe availability

        bar = tqdm(total=steps, initial=start, desc="fit", unit="step", dynamic_ncols=True)

    # ---------------- main loop ----------------
    step = start
    stopped = "completed"
    bad_step = None
    last_loss = float("nan")
    every = checkpoint.every if checkpoint is not None else None
    committed = (carry, step, len(hist_loss), len(hist_aux))
    try:
        while step < steps:
            n = min(chunk_len, steps - step)
            if every is not None:
                n = min(n, every - step % every)
            new_carry, (losses, auxs, applied) = run_chunk(carry, jnp.int32(step), jnp.int32(n))
            applied = np.asarray(applied)
            n_done = int(applied.sum())
            losses = np.asarray(losses)[:n_done]
            new_log, new_aux = None, None
            if has_aux and n_done:
                idx = np.nonzero((np.arange(step, step + n_done) % log_every) == 0)[0]
                if idx.size:
                    new_log = step + idx
                    new_aux = jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], auxs)
            # Commit the chunk in one assignment, so a KeyboardInterrupt leaves a
            # consistent (carry, step, history) state.
            committed = (new_carry, step + n_done, len(hist_loss) + 1, len(hist_aux) + (new_aux is not None))
            hist_loss.append(losses)
            if new_aux is not None:
                hist_log_steps.append(new_log)
                hist_aux.append(new_aux)
            carry, step = committed[0], committed[1]
            if n_done:
                last_loss = float(losses[-1])
            if bar is not None:
                bar.update(n_done)
                bar.set_postfix(loss=f"{last_loss:.4g}", best=f"{float(carry['best_loss']):.4g}")
            elif mode == "print":
                print(f"fit: step {step}/{steps}  loss {last_loss:.6g}  best {float(carry['best_loss']):.6g}", flush=True)
            if bool(carry["bad"]):
                bad_step = int(carry["bad_step"])
                kind = {1: "loss", 2: "gradient", 3: "updated parameters"}[int(carry["bad_kind"])]
                what = f"non-finite {kind} at step {bad_step}"
                if kind == "loss":
                    what += f" (loss={float(carry['bad_loss'])})"
                stopped = (
                    f"{what}; stopped and returned the last good parameters "
                    f"(from before step {bad_step}, after {bad_step} updates)"
                )
                break
            if every is not None and step % every == 0 and step < steps:
                save(carry, step)
            if callback is not None:
                r = callback(step, full_params(carry["diff"]), last_loss)
                if r is False:
                    stopped = f"callback returned False at step {step}"
                    break
    except KeyboardInterrupt:
        carry, step, n_h, n_a = committed
        del hist_loss[n_h:], hist_aux[n_a:], hist_log_steps[n_a:]
        stopped = f"interrupted (KeyboardInterrupt) after {step} steps"
        warnings.warn(f"fit: {stopped}; returning the current parameters", stacklevel=2)
    finally:
        if bar is not None:
            bar.close()

    save(carry, step)
    if bad_step is not None:
        msg = f"fit: {stopped}"
        if nan_policy == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    best = carry["best"] if track_best and int(carry["best_step"]) >= 0 else carry["diff"]
    return FitResult(
        params=full_params(carry["diff"]),
        best_params=full_params(best),
        best_loss=float(carry["best_loss"]),
        best_step=int(carry["best_step"]),
        history=build_history(),
        steps_run=step,
        stopped_reason=stopped,
        bad_step=bad_step,
        opt_state=carry["opt"],
        key=key,
        wall_time=time.perf_counter() - t0,
    )


def _merge_prev_aux(prev_hist, new_aux, aux_shape):
    # Non-dict aux restored from a checkpoint: leaves saved as h_auxleaf_i.
    leaves_prev = prev_hist.get("_auxleaves")
    if leaves_prev is None:
        return new_aux
    treedef = jax.tree_util.tree_structure(aux_shape)
    if new_aux is None:
        return jax.tree_util.tree_unflatten(treedef, leaves_prev)
    new_leaves = jax.tree_util.tree_leaves(new_aux)
    return jax.tree_util.tree_unflatten(
        treedef, [np.concatenate([a, b], axis=0) for a, b in zip(leaves_prev, new_leaves)]
    )

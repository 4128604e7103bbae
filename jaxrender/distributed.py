"""Batched fitting sharded over a device mesh.

Many independent fits of the same kind (one face per image, one pose per
view) run as one batched problem: the parameters and the data carry a leading
batch axis, the per-example ``loss_fn(params, data)`` is ``vmap``-ed over it,
and the batch axis is split over the devices of a :class:`jax.sharding.Mesh`
with ``NamedSharding(mesh, P("batch"))``. Nothing is communicated between
devices during a step: every example has its own parameters, its own
gradient and its own optimizer state.

* :func:`fit_batched` — the batched counterpart of :func:`jaxrender.fit.fit`.
* :func:`fit_dataset` — fit a dataset (in host memory, or any iterable of
  batches) in groups of ``batch_size`` examples streamed to the devices.
* :func:`prefetch_to_mesh` — host-side prefetch of batches onto the mesh.
* :func:`fit_faces_sharded` — batched face fitting with the synthetic-face /
  FaceVerse forward pass (landmarks, optional photometric term).
* :func:`batch_mesh`, :func:`pad_batch`, :func:`shard_batch`,
  :func:`load_batched_checkpoint`.

Per-example semantics: the optimizer's ``init`` and ``update`` are ``vmap``-ed
over the batch axis, so each example's state is exactly the state of an
independent :func:`jaxrender.fit.fit` run on that example (for every Optax
transformation, including ones that are not elementwise such as
``optax.clip_by_global_norm`` or ``optax.lbfgs``). Summing the losses and
differentiating once would give the same gradients, but a global-norm clip,
a line search or a mean over the batch would then couple the examples.

See ``docs/distributed.md``.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import importlib

from jaxrender.fit import Checkpoint

# The module (``jaxrender.fit`` the attribute is the function, re-exported by the package).
_fit = importlib.import_module("jaxrender.fit")

__all__ = [
    "batch_mesh",
    "batch_sharding",
    "pad_batch",
    "shard_batch",
    "prefetch_to_mesh",
    "fit_batched",
    "fit_dataset",
    "BatchedFitResult",
    "load_batched_checkpoint",
    "face_fit_loss",
    "fit_faces_sharded",
]

_BATCHED_CKPT_VERSION = 1
_METHODS = ("shard_map", "jit")


# ----------------------------------------------------------------------------
# Version-guarded shard_map
# ----------------------------------------------------------------------------


def _shard_map(f, mesh, in_specs, out_specs):
    """``jax.shard_map`` (JAX >= 0.6) or ``jax.experimental.shard_map.shard_map``.

    The replication/varying-axis checker is switched off: the step is purely
    per-example (no collectives), and the skipped-step branch of ``lax.cond``
    returns constants that the checker would see as unvarying.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older JAX

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)  # pragma: no cover


# ----------------------------------------------------------------------------
# Mesh, padding, placement
# ----------------------------------------------------------------------------


def batch_mesh(devices=None, axis_name: str = "batch") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``) with one axis.

    Built with ``jax.sharding.Mesh`` directly (the default "auto" axis type),
    so ``jit`` propagates the shardings as usual.

    Args:
        devices: a sequence of devices, e.g. ``jax.devices()[:4]``, or an int
            ``n`` meaning ``jax.devices()[:n]``.
        axis_name: the name of the batch axis.

    Returns:
        A :class:`jax.sharding.Mesh` of shape ``{axis_name: len(devices)}``.
    """
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, (int, np.integer)):
        all_devices = jax.devices()
        if not 1 <= devices <= len(all_devices):
            raise ValueError(f"batch_mesh: asked for {devices} devices, {len(all_devices)} are available")
        devices = all_devices[: int(devices)]
    devices = list(devices)
    if not devices:
        raise ValueError("batch_mesh: devices is empty")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def batch_sharding(mesh: Mesh, axis_name: str = "batch") -> NamedSharding:
    """``NamedSharding(mesh, P(axis_name))``: the leading axis split over the mesh."""
    _check_axis(mesh, axis_name)
    return NamedSharding(mesh, P(axis_name))


def _check_axis(mesh, axis_name):
    if not isinstance(mesh, Mesh):
        raise TypeError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}, not the batch axis {axis_name!r}")


def _num_shards(mesh, axis_name):
    _check_axis(mesh, axis_name)
    return int(mesh.shape[axis_name])


def _batch_size(tree, what) -> int | None:
    sizes = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if eqx.is_array(x):
            if x.ndim == 0:
                raise ValueError(
                    f"{what}{jax.tree_util.keystr(path)} is a scalar; every array of {what} needs a leading batch axis "
                    "(pass arrays shared by all examples through shared=)"
                )
            sizes[jax.tree_util.keystr(path)] = int(x.shape[0])
    if not sizes:
        return None
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{what}: the leading (batch) axes differ: {sizes}")
    return next(iter(sizes.values()))


def pad_batch(tree, multiple: int):
    """Pad the leading axis of every array leaf to a multiple of ``multiple``.

    Padding repeats the last example (so padded rows hold valid, finite
    inputs); NumPy leaves stay NumPy (host memory), JAX leaves stay JAX.

    Args:
        tree: a pytree whose array leaves share the leading batch size ``n``.
        multiple: e.g. the number of devices on the batch axis.

    Returns:
        ``(padded_tree, n)``.
    """
    n = _batch_size(tree, "tree")
    if n is None:
        return tree, 0
    if n == 0:
        raise ValueError("pad_batch: the batch is empty")
    return _repeat_last(tree, n, -(-n // multiple) * multiple), n


def _repeat_last(tree, n: int, size: int):
    """Pad the ``n``-long leading axis of every array leaf to ``size`` by repeating the last example."""
    if size == n:
        return tree

    def pad(x):
        if not eqx.is_array(x):
            return x
        xp = np if isinstance(x, np.ndarray) else jnp
        return xp.concatenate([x, xp.broadcast_to(x[-1:], (size - n,) + tuple(x.shape[1:]))], axis=0)

    return jax.tree_util.tree_map(pad, tree)


def _put(tree, sharding):
    """Place array leaves on ``sharding`` (global arrays; multi-host: identical on every process)."""

    def put(x):
        if not eqx.is_array(x):
            return x
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if x.is_fully_addressable and not sharding.is_fully_addressable:  # pragma: no cover - multi-host
                x = np.asarray(x)  # a local array: every process passes the same global value
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)


def shard_batch(tree, mesh: Mesh, axis_name: str = "batch", *, pad: bool = True):
    """Place a batch on the mesh, the leading axis split over ``axis_name``.

    Args:
        tree: pytree of arrays with a common leading batch size ``n``.
        mesh: the device mesh.
        axis_name: the batch axis of ``mesh``.
        pad: pad to a multiple of the number of devices on the axis (repeating
            the last example); otherwise a batch that does not divide is an error.

    Returns:
        ``(sharded_tree, n)``: ``n`` is the number of real examples (the first
        ``n`` rows; the rest is padding).
    """
    d = _num_shards(mesh, axis_name)
    n = _batch_size(tree, "batch")
    if n is not None and n % d and not pad:
        raise ValueError(f"shard_batch: batch size {n} does not divide the {d} devices of axis {axis_name!r} (pass pad=True)")
    tree, n = pad_batch(tree, d)
    return _put(tree, batch_sharding(mesh, axis_name)), n


def prefetch_to_mesh(iterator: Iterable, mesh: Mesh, size: int = 2, *, axis_name: str = "batch",
                     pad: bool = True) -> Iterator:
    """Stream batches from the host onto the mesh, ``size`` batches ahead.

    Each batch (a pytree of NumPy/JAX arrays with a leading batch axis) is
    padded to a multiple of the devices on ``axis_name`` (repeating its last
    example) and sent with ``jax.device_put`` onto ``NamedSharding(mesh,
    P(axis_name))``. ``device_put`` is asynchronous, so the next ``size``
    transfers overlap with the computation on the current batch, and at most
    ``size + 1`` batches are on the devices at a time (never the whole
    dataset). On several hosts (``jax.process_count() > 1``) each process
    iterates over its own part of the batch and the global array is assembled
    with ``jax.make_array_from_process_local_data``.

    Args:
        iterator: any iterable of batches.
        mesh: the device mesh.
        size: how many batches to keep in flight (>= 1).
        axis_name: the batch axis of ``mesh``.
        pad: pad batches that do not divide the device count; without it they
            are an error.

    Yields:
        ``(batch_on_mesh, n)``: ``n`` is the number of real (unpadded) examples.
    """
    if size < 1:
        raise ValueError(f"prefetch_to_mesh: size must be >= 1, got {size}")
    sharding = batch_sharding(mesh, axis_name)
    d = _num_shards(mesh, axis_name)
    multi = jax.process_count() > 1

    def place(batch):
        if multi:  # pragma: no cover - needs several processes
            n_local = _batch_size(batch, "batch")
            n = n_local * jax.process_count()
            batch = jax.tree_util.tree_map(
                lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)) if eqx.is_array(x) else x, batch
            )
            return batch, n
        n = _batch_size(batch, "batch")
        if n is not None and n % d and not pad:
            raise ValueError(f"prefetch_to_mesh: batch size {n} does not divide the {d} devices (pass pad=True)")
        batch, n = pad_batch(batch, d)
        return _put(batch, sharding), n

    queue = deque()
    it = iter(iterator)
    for batch in it:
        queue.append(place(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _to_host(x):
    """Gather a (possibly sharded, possibly multi-host) array to a NumPy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # pragma: no cover - multi-host
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _take(tree, n):
    return jax.tree_util.tree_map(lambda x: x[:n] if eqx.is_array(x) and not _fit._is_typed_key(x) else x, tree)


# ----------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class BatchedFitResult:
    """What :func:`fit_batched` returns; every per-example field has the real batch size ``B`` first.

    Attributes:
        params: final parameters, leading axis ``B`` (padding removed). An
            example that hit a non-finite step keeps its last good parameters.
        best_params: per example, the parameters with the lowest finite loss.
        best_loss: ``(B,)`` NumPy, ``inf`` where no finite loss was seen.
        best_step: ``(B,)`` NumPy, ``-1`` where none.
        history: ``"loss"``: ``(steps_run, B)`` NumPy, ``nan`` where an example
            did not take the step (after its non-finite step); with
            ``has_aux`` a dict aux adds one ``(steps_run, B, ...)`` entry per key
            (other aux under ``"aux"``).
        steps_run: steps done (the global step count).
        stopped_reason: ``"completed"`` or why the run stopped early.
        bad_step: ``(B,)`` NumPy int: the non-finite step of each example, ``-1`` if none.
        opt_state: the per-example optimizer states (leading axis ``B``).
        key: the run's PRNG key.
        num_padded: the batch size after padding (a multiple of the device count).
        wall_time: seconds in :func:`fit_batched`, compilation included.
    """

    params: Any
    best_params: Any
    best_loss: np.ndarray
    best_step: np.ndarray
    history: dict
    steps_run: int
    stopped_reason: str
    bad_step: np.ndarray
    opt_state: Any
    key: Any
    num_padded: int = 0
    wall_time: float = 0.0

    @property
    def final_loss(self) -> np.ndarray:
        """``(B,)``: each example's last recorded finite loss (``nan`` if none)."""
        h = self.history.get("loss")
        if h is None or not len(h):
            return np.full(len(self.best_loss), np.nan)
        out = np.full(h.shape[1], np.nan, dtype=h.dtype)
        for j in range(h.shape[1]):
            f = np.nonzero(np.isfinite(h[:, j]))[0]
            if f.size:
                out[j] = h[f[-1], j]
        return out


# ----------------------------------------------------------------------------
# The compiled engine (shared by fit_batched and fit_dataset)
# ----------------------------------------------------------------------------


class _Engine:
    """Builds and caches the compiled chunk for one (loss, optimizer, mesh, shapes) setting."""

    def __init__(self, loss_fn, optimizer, *, mesh, axis_name, static_rest, data_rest, shared_rest, uses_data, uses_shared,
                 constraints, nan_policy, has_aux, track_best, filter_spec, chunk_len, method):
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.mesh = mesh
        self.axis = axis_name
        self.static_rest = static_rest
        self.data_rest = data_rest
        self.uses_data = uses_data
        self.uses_shared = uses_shared
        self.shared_rest = shared_rest
        self.constraints = constraints
        self.check = nan_policy != "ignore"
        self.has_aux = has_aux
        self.track_best = track_best
        self.filter_spec = filter_spec
        self.chunk_len = chunk_len
        self.method = method
        self.extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)
        self.bs = NamedSharding(mesh, P(axis_name))
        self.rep = NamedSharding(mesh, P())
        self.hs = NamedSharding(mesh, P(None, axis_name))
        self._run = None
        self._init = None

    # per-example pieces -------------------------------------------------
    def call_loss(self, d, s_arr, x_arr, shared):
        p = eqx.combine(d, s_arr, self.static_rest)
        x = eqx.combine(x_arr, self.data_rest)
        shared = eqx.combine(shared, self.shared_rest) if self.uses_shared else None
        if self.uses_shared:
            out = self.loss_fn(p, x, shared) if self.uses_data else self.loss_fn(p, shared)
        else:
            out = self.loss_fn(p, x) if self.uses_data else self.loss_fn(p)
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"fit_batched: with has_aux=True, loss_fn must return (loss, aux), got {type(out).__name__}")
            return out
        if isinstance(out, tuple):
            raise TypeError("fit_batched: loss_fn returned a tuple; pass has_aux=True to return (loss, aux)")
        return out, None

    def validate(self, d1, s1, x1, shared):
        """Check the per-example loss on example 0 (abstractly); returns (loss dtype, aux shape)."""
        loss_shape, aux_shape = jax.eval_shape(self.call_loss, d1, s1, x1, shared)
        if not hasattr(loss_shape, "shape") or loss_shape.shape != ():
            raise ValueError(
                "fit_batched: loss_fn(params, data) must return a scalar loss for ONE example, got shape "
                f"{getattr(loss_shape, 'shape', type(loss_shape).__name__)} (it is vmapped over the batch axis for you)"
            )
        if not jnp.issubdtype(loss_shape.dtype, jnp.floating):
            raise TypeError(f"fit_batched: loss_fn must return a real floating-point scalar, got dtype {loss_shape.dtype}")
        if isinstance(aux_shape, dict) and "loss" in aux_shape:
            raise ValueError("fit_batched: the aux metric name 'loss' is reserved (the loss is recorded anyway)")
        self.loss_dtype = loss_shape.dtype
        self.aux_shape = aux_shape
        return loss_shape.dtype, aux_shape

    def example_step(self, c, s_arr, x_arr, valid, step, shared):
        loss_dtype = self.loss_dtype
        (loss, aux), grads = jax.value_and_grad(self.call_loss, has_aux=True)(c["diff"], s_arr, x_arr, shared)
        loss = loss.astype(loss_dtype)
        opt = self.optimizer
        if self.extra_args:
            updates, new_opt = opt.update(
                grads, c["opt"], c["diff"], value=loss, grad=grads,
                value_fn=lambda d: self.call_loss(d, s_arr, x_arr, shared)[0].astype(loss_dtype),
            )
        else:
            updates, new_opt = opt.update(grads, c["opt"], c["diff"])
        new_diff = optax.apply_updates(c["diff"], updates)
        if self.constraints is not None:
            full = self.constraints(eqx.combine(new_diff, s_arr, self.static_rest))
            nd, _, _ = _fit._split_params(full, self.filter_spec)
            if jax.tree_util.tree_structure(nd) != jax.tree_util.tree_structure(new_diff):
                raise ValueError("fit_batched: constraints must return params with the same structure as params")
            new_diff = nd
        new_diff = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_diff, c["diff"])
        new_opt = jax.tree_util.tree_map(
            lambda a, b: a.astype(b.dtype) if eqx.is_array(b) and not _fit._is_typed_key(b) else a, new_opt, c["opt"]
        )
        live = valid & jnp.logical_not(c["bad"])
        if self.check:
            ok = jnp.isfinite(loss) & _fit._all_finite(grads) & _fit._all_finite(new_diff)
        else:
            ok = jnp.asarray(True)
        applied = live & ok
        out = dict(c)
        out["diff"] = _fit._tree_where(applied, new_diff, c["diff"])
        out["opt"] = _fit._tree_where(applied, new_opt, c["opt"])
        newly_bad = live & jnp.logical_not(ok)
        out["bad"] = c["bad"] | newly_bad
        out["bad_step"] = jnp.where(newly_bad, step, c["bad_step"]).astype(jnp.int32)
        if self.track_best:
            improved = applied & jnp.isfinite(loss) & (loss < c["best_loss"])
            out["best"] = _fit._tree_where(improved, c["diff"], c["best"])
            out["best_loss"] = jnp.where(improved, loss, c["best_loss"])
            out["best_step"] = jnp.where(improved, step, c["best_step"]).astype(jnp.int32)
        rec = jnp.where(applied, loss, jnp.asarray(jnp.nan, loss_dtype))
        return out, (rec, aux)

    # compiled chunk -----------------------------------------------------
    def local_chunk(self, c, first, n_active, s_arr, x_arr, valid, shared):
        vstep = jax.vmap(self.example_step, in_axes=(0, 0, 0, 0, None, None))
        aux_shape = self.aux_shape
        loss_dtype = self.loss_dtype

        def skip(c, step):
            nb = valid.shape[0]
            aux0 = jax.tree_util.tree_map(lambda s: jnp.zeros((nb,) + tuple(s.shape), s.dtype), aux_shape)
            return c, (jnp.full((nb,), jnp.nan, loss_dtype), aux0)

        def run(c, step):
            return vstep(c, s_arr, x_arr, valid, step, shared)

        def body(c, i):
            step = (first + i).astype(jnp.int32)
            return lax.cond(i < n_active, run, skip, c, step)

        return lax.scan(body, c, jnp.arange(self.chunk_len, dtype=jnp.int32))

    def run_chunk(self, carry, first, n_active, s_arr, x_arr, valid, shared):
        if self._run is None:
            if self.method == "shard_map":
                b, r, h = P(self.axis), P(), P(None, self.axis)
                f = _shard_map(self.local_chunk, self.mesh, in_specs=(b, r, r, b, b, b, r), out_specs=(b, (h, h)))
                self._run = jax.jit(f)
            else:
                b, r, h = self.bs, self.rep, self.hs
                self._run = jax.jit(self.local_chunk, in_shardings=(b, r, r, b, b, b, r), out_shardings=(b, (h, h)))
        return self._run(carry, first, n_active, s_arr, x_arr, valid, shared)

    def init_opt(self, diff):
        if self._init is None:
            self._init = jax.jit(jax.vmap(self.optimizer.init), in_shardings=(self.bs,), out_shardings=self.bs)
        return self._init(diff)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def _opt_template(optimizer, diff_host):
    """The per-example optimizer state for ``diff_host`` (host arrays), for checking a checkpoint."""
    return _fit._strong(jax.vmap(optimizer.init)(diff_host))


def _read_npz(path):
    with np.load(os.fspath(path), allow_pickle=False) as z:
        z = dict(z)
    if int(z.get("__batched_version__", -1)) != _BATCHED_CKPT_VERSION:
        hint = " (it was written by jaxrender.fit.fit: use fit / load_checkpoint)" if "__version__" in z else ""
        raise ValueError(f"checkpoint {os.fspath(path)!r}: not a jaxrender.distributed checkpoint{hint}")
    return z


def load_batched_checkpoint(path, params, optimizer: optax.GradientTransformation | None = None, *,
                            filter_spec=eqx.is_inexact_array) -> dict:
    """Read a checkpoint written by :func:`fit_batched` (host NumPy/JAX arrays, not sharded).

    The file holds the real ``B`` examples only (no padding), so it can be
    resumed on any number of devices.

    Args:
        path: the file, or a :class:`jaxrender.fit.Checkpoint`.
        params: a template with the batched structure (``B`` first), e.g. the
            initial params of the run.
        optimizer: the run's optimizer, to restore the per-example ``opt_state``.
        filter_spec: the run's ``filter_spec``.

    Returns:
        A dict with ``params``, ``best_params``, ``best_loss`` ``(B,)``,
        ``best_step`` ``(B,)``, ``bad_step`` ``(B,)``, ``step``, ``history``,
        ``key`` and (with ``optimizer``) ``opt_state``.
    """
    if isinstance(path, Checkpoint):
        path = path.path
    z = _read_npz(path)
    diff, static_arr, static_rest = _fit._split_params(params, filter_spec)
    diff = _fit._strong(diff)
    d = _fit._check_and_unflatten(z, "p", diff, "params", path)
    b = _fit._check_and_unflatten(z, "b", diff, "best params", path) if int(z["has_best"]) else d
    out = {
        "params": eqx.combine(d, static_arr, static_rest),
        "best_params": eqx.combine(b, static_arr, static_rest),
        "best_loss": np.asarray(z["best_loss"]),
        "best_step": np.asarray(z["best_step"]),
        "bad_step": np.asarray(z["bad_step"]),
        "step": int(z["step"]),
        "history": _fit._history_from_npz(z),
        "key": jnp.asarray(z["key"]),
    }
    if optimizer is not None:
        out["opt_state"] = _fit._check_and_unflatten(z, "o", _opt_template(optimizer, d), "optimizer state", path)
    return out


# ----------------------------------------------------------------------------
# fit_batched
# ----------------------------------------------------------------------------


def _resolve_mesh(mesh, devices, axis_name):
    if mesh is not None and devices is not None:
        raise ValueError("fit_batched: pass mesh= or devices=, not both")
    if mesh is None:
        mesh = batch_mesh(devices, axis_name)
    _check_axis(mesh, axis_name)
    return mesh


def _check_common(loss_fn, optimizer, steps, steps_per_call, nan_policy, progress, constraints, callback, method):
    if not callable(loss_fn):
        raise TypeError(f"fit_batched: loss_fn must be callable, got {type(loss_fn).__name__}")
    if not _fit._is_optimizer(optimizer):
        raise TypeError(f"fit_batched: optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"fit_batched: steps must be a non-negative int, got {steps!r}")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, (int, np.integer)) or steps_per_call < 1:
        raise ValueError(f"fit_batched: steps_per_call must be a positive int, got {steps_per_call!r}")
    if nan_policy not in _fit._NAN_POLICIES:
        raise ValueError(f"fit_batched: nan_policy must be one of {_fit._NAN_POLICIES}, got {nan_policy!r}")
    if progress not in (True, False, "tqdm", "print", None):
        raise ValueError(f"fit_batched: progress must be True, False, 'tqdm' or 'print', got {progress!r}")
    if constraints is not None and not callable(constraints):
        raise TypeError("fit_batched: constraints must be a callable params -> params (for ONE example)")
    if callback is not None and not callable(callback):
        raise TypeError("fit_batched: callback must be callable (step, params, losses)")
    if method not in _METHODS:
        raise ValueError(f"fit_batched: method must be one of {_METHODS}, got {method!r}")


def fit_batched(
    loss_fn: Callable,
    params,
    data=None,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 1000,
    *,
    mesh: Mesh | None = None,
    devices=None,
    batch_axis_name: str = "batch",
    shared=None,
    key=None,
    constraints: Callable | None = None,
    steps_per_call: int = 50,
    progress: bool | str = False,
    callback: Callable | None = None,
    checkpoint=None,
    resume: bool = False,
    nan_policy: str = "stop",
    has_aux: bool = False,
    track_best: bool = True,
    filter_spec=eqx.is_inexact_array,
    method: str = "shard_map",
    compile_cache: dict | None = None,
    _num_valid: int | None = None,
) -> BatchedFitResult:
    """Fit ``B`` independent problems at once, the batch axis sharded over a device mesh.

    Every array leaf of ``params`` and ``data`` has a leading batch axis of
    size ``B``; ``loss_fn`` is written for **one** example and is ``vmap``-ed.
    Each example gets its own gradient and its own optimizer state (the
    optimizer's ``init``/``update`` are vmapped), so example ``i`` of the
    result equals ``jaxrender.fit.fit(loss_fn, params[i], data[i], optimizer,
    steps)`` up to floating-point reassociation.

    The batch is padded to a multiple of the number of devices on the batch
    axis by repeating the last example; padded examples never update, never
    enter the recorded losses and are cut from the result. Params, optimizer
    states and data are placed with ``NamedSharding(mesh, P(batch_axis_name))``
    and each compiled call runs ``steps_per_call`` steps (``lax.scan``) inside
    ``shard_map`` (``method="shard_map"``, default) or a ``jit`` with
    in/out shardings (``method="jit"``, GSPMD); no step communicates between
    devices.

    Args:
        loss_fn: ``loss_fn(params_i, data_i) -> scalar`` for one example
            (``loss_fn(params_i, data_i, shared)`` when ``shared`` is given;
            ``data`` may be ``None``: then ``loss_fn(params_i[, shared])``).
            With ``has_aux``: ``(loss, aux)``.
        params: batched initial parameters (any pytree; float leaves are
            trained, other array leaves are passed along; all array leaves are
            batched).
        data: batched data (pytree of arrays with leading ``B``), or ``None``.
        optimizer: any Optax transformation (default ``optax.adam(1e-2)``),
            applied per example.
        steps: total steps (with ``resume``, including the steps already done).
        mesh: a mesh with an axis ``batch_axis_name`` (see :func:`batch_mesh`).
        devices: alternative to ``mesh``: a device list or a count; default all devices.
        batch_axis_name: the mesh axis the batch is split over.
        shared: a pytree used by every example (a face model, a camera),
            replicated on every device and passed as ``loss_fn``'s last argument.
        key: recorded in the checkpoint and the result (default ``PRNGKey(0)``);
            draw per-example randomness from data instead.
        constraints: ``params_i -> params_i`` for one example, applied after every update.
        steps_per_call: steps per compiled call.
        progress: ``False`` (default), ``True``/``"tqdm"``, ``"print"``.
        callback: ``callback(step, params, losses)`` between compiled calls with
            the unpadded params and the ``(B,)`` latest losses (``nan`` for
            stopped examples); return ``False`` to stop.
        checkpoint: a path or a :class:`jaxrender.fit.Checkpoint`. The state is
            gathered to the host (all processes take part; process 0 writes)
            and saved without the padding, in ``jaxrender.fit``'s ``.npz``
            layout with per-example best loss/step and a ``(steps, B)`` history.
        resume: continue from ``checkpoint`` if it exists (re-padded and
            re-sharded for the current mesh, which may have another device count).
        nan_policy: ``"stop"``: an example whose loss, gradient or update is
            non-finite at step ``k`` is frozen at its last good params
            (``bad_step[i] = k``) while the others continue (the run stops when
            all are frozen) and a ``RuntimeWarning`` lists them; ``"raise"``:
            ``FloatingPointError`` after the chunk; ``"ignore"``: no checks.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is recorded per step and example.
        track_best: keep each example's best params.
        filter_spec: Equinox filter of the trainable leaves (as in ``fit``).
        method: ``"shard_map"`` or ``"jit"``.
        compile_cache: a dict shared by calls with the same ``loss_fn``,
            optimizer, mesh, options and shapes (e.g. successive groups of a
            dataset): the first call stores its compiled step there and the
            others reuse it instead of compiling again. Its ``steps_per_call``,
            mesh and options win over the later calls' arguments.

    Returns:
        A :class:`BatchedFitResult`.
    """
    t0 = time.perf_counter()
    if optimizer is None:
        optimizer = optax.adam(1e-2)
    _check_common(loss_fn, optimizer, steps, steps_per_call, nan_policy, progress, constraints, callback, method)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"fit_batched: checkpoint must be a path or a Checkpoint, got {type(checkpoint).__name__}")
        checkpoint = Checkpoint(checkpoint)
    if resume and checkpoint is None:
        raise ValueError("fit_batched: resume=True needs checkpoint=")
    steps, steps_per_call = int(steps), int(steps_per_call)
    _engine = compile_cache.get("engine") if compile_cache is not None else None
    mesh = _engine.mesh if _engine is not None else _resolve_mesh(mesh, devices, batch_axis_name)
    axis = batch_axis_name
    n_dev = _num_shards(mesh, axis)
    if key is None:
        key = jax.random.PRNGKey(0)

    # ---------------- batch sizes and padding ----------------
    bp = _batch_size(params, "params")
    bd = _batch_size(data, "data")
    if bp is None:
        raise ValueError("fit_batched: params has no array leaves (it needs a leading batch axis)")
    if bd is not None and bd != bp:
        raise ValueError(f"fit_batched: params have batch size {bp}, data {bd}")
    if _num_valid is None:
        n_real = bp
        params, _ = pad_batch(params, n_dev)
        data, _ = pad_batch(data, n_dev)
    else:  # pre-padded input (fit_dataset)
        n_real = int(_num_valid)
        if bp % n_dev:
            raise ValueError(f"fit_batched: pre-padded batch {bp} does not divide {n_dev} devices")
    n_pad = _batch_size(params, "params")

    diff, static_arr, static_rest = _fit._split_params(params, filter_spec)
    if not jax.tree_util.tree_leaves(diff):
        raise ValueError("fit_batched: params has no floating-point array leaves to optimise")
    data_arr, data_rest = eqx.partition(data, eqx.is_array)
    shared_arr, shared_rest = eqx.partition(shared, eqx.is_array)
    bs = NamedSharding(mesh, P(axis))
    rep = NamedSharding(mesh, P())

    # ---------------- engine ----------------
    chunk_len = max(1, steps_per_call)
    eng = _engine
    if eng is not None:
        chunk_len = eng.chunk_len
    else:
        eng = _Engine(
            loss_fn, optimizer, mesh=mesh, axis_name=axis, static_rest=static_rest, data_rest=data_rest,
            shared_rest=shared_rest,
            uses_data=data is not None, uses_shared=shared is not None, constraints=constraints,
            nan_policy=nan_policy, has_aux=has_aux, track_best=track_best, filter_spec=filter_spec,
            chunk_len=chunk_len, method=method,
        )
        if compile_cache is not None:
            compile_cache["engine"] = eng
    one = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if eqx.is_array(x) else x, t
    )
    loss_dtype, aux_shape = eng.validate(one(diff), one(static_arr), one(data_arr), shared_arr)

    # ---------------- state ----------------
    diff = _put(_fit._strong(diff), bs)
    static_arr = _put(static_arr, bs)
    data_arr = _put(data_arr, bs)
    shared_arr = _put(shared_arr, rep)
    valid = _put(np.arange(n_pad) < n_real, bs)
    ckpt_path = os.fspath(checkpoint.path) if checkpoint is not None else None
    start = 0
    hist_loss: list[np.ndarray] = []
    hist_aux: list = []
    prev_aux = None
    if resume and os.path.exists(ckpt_path):
        host_diff = jax.tree_util.tree_map(lambda x: _to_host(x)[:n_real], diff)
        z = _read_npz(ckpt_path)
        d0 = _fit._check_and_unflatten(z, "p", _fit._strong(host_diff), "params", ckpt_path)
        o0 = _fit._check_and_unflatten(z, "o", _opt_template(optimizer, d0), "optimizer state", ckpt_path)
        b0 = _fit._check_and_unflatten(z, "b", d0, "best params", ckpt_path) if (track_best and int(z["has_best"])) else d0
        pad = lambda t: _put(pad_batch(t, n_dev)[0], bs)  # noqa: E731
        carry = {
            "diff": pad(d0),
            "opt": pad(o0),
            "bad": pad(np.asarray(z["bad_step"]) >= 0),
            "bad_step": pad(np.asarray(z["bad_step"], np.int32)),
        }
        if track_best:
            carry["best"] = pad(b0)
            carry["best_loss"] = pad(np.asarray(z["best_loss"]).astype(loss_dtype))
            carry["best_step"] = pad(np.asarray(z["best_step"], np.int32))
        start = int(z["step"])
        key = _fit._key_from_np(z["key"], key)
        hist_loss.append(np.asarray(z["h_loss"]).reshape(-1, n_real))
        if has_aux:
            prev_aux = {k[len("h_aux_"):]: z[k] for k in z if k.startswith("h_aux_")}
    else:
        carry = {
            "diff": diff,
            "opt": eng.init_opt(diff),
            "bad": _put(np.zeros((n_pad,), bool), bs),
            "bad_step": _put(np.full((n_pad,), -1, np.int32), bs),
        }
        if track_best:
            carry["best"] = diff
            carry["best_loss"] = _put(np.full((n_pad,), np.inf, np.dtype(loss_dtype)), bs)
            carry["best_step"] = _put(np.full((n_pad,), -1, np.int32), bs)

    # ---------------- host helpers ----------------
    def unpad_full(d):
        return _take(eqx.combine(d, static_arr, static_rest), n_real)

    def build_history():
        h = {"loss": np.concatenate(hist_loss, axis=0) if hist_loss else np.zeros((0, n_real), np.dtype(loss_dtype))}
        if has_aux:
            new = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *hist_aux) if hist_aux else None
            if isinstance(aux_shape, dict):
                for k, s in aux_shape.items():
                    parts = [] if prev_aux is None or k not in prev_aux else [prev_aux[k]]
                    if new is not None:
                        parts.append(np.asarray(new[k]))
                    h[k] = np.concatenate(parts, 0) if parts else np.zeros((0, n_real) + tuple(s.shape), s.dtype)
            elif new is not None:
                h["aux"] = new
        return h

    def save(c, step_done):
        if checkpoint is None:
            return
        host = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda x: _to_host(x)[:n_real] if eqx.is_array(x) else x, t
        )
        arrays = {"__batched_version__": np.asarray(_BATCHED_CKPT_VERSION), "step": np.asarray(step_done),
                  "batch_size": np.asarray(n_real)}
        _fit._flatten_into(arrays, "p", host(c["diff"]))
        _fit._flatten_into(arrays, "o", host(c["opt"]))
        arrays["has_best"] = np.asarray(int(track_best))
        if track_best:
            _fit._flatten_into(arrays, "b", host(c["best"]))
            arrays["best_loss"] = _to_host(c["best_loss"])[:n_real]
            arrays["best_step"] = _to_host(c["best_step"])[:n_real]
        else:
            arrays["best_loss"] = np.full((n_real,), np.inf)
            arrays["best_step"] = np.full((n_real,), -1)
        arrays["bad_step"] = _to_host(c["bad_step"])[:n_real]
        arrays["key"] = _fit._key_to_np(key)
        h = build_history()
        arrays["h_loss"] = h["loss"]
        if has_aux and isinstance(aux_shape, dict):
            for k in aux_shape:
                arrays[f"h_aux_{k}"] = np.asarray(h[k])
        if jax.process_index() == 0:
            _fit._save_npz(ckpt_path, arrays)

    mode = None
    if progress in (True, "tqdm"):
        try:
            from tqdm.auto import tqdm

            mode = "tqdm"
        except ImportError:  # pragma: no cover
            mode = "print"
    elif progress == "print":
        mode = "print"
    bar = tqdm(total=steps, initial=start, desc="fit_batched", unit="step") if mode == "tqdm" and steps > start else None

    # ---------------- main loop ----------------
    step = start
    stopped = "completed"
    every = checkpoint.every if checkpoint is not None else None
    committed = (carry, step, 0, 0)
    first_i = jnp.int32
    try:
        while step < steps:
            n = min(chunk_len, steps - step)
            if every is not None:
                n = min(n, every - step % every)
            new_carry, (losses, auxs) = eng.run_chunk(
                carry, first_i(step), first_i(n), static_arr, data_arr, valid, shared_arr
            )
            losses = _to_host(losses)[:n, :n_real]
            new_aux = None
            if has_aux:
                new_aux = jax.tree_util.tree_map(lambda a: _to_host(a)[:n, :n_real], auxs)
            committed = (new_carry, step + n, len(hist_loss) + 1, len(hist_aux) + int(new_aux is not None))
            hist_loss.append(losses)
            if new_aux is not None:
                hist_aux.append(new_aux)
            carry, step = new_carry, step + n
            bad = _to_host(carry["bad"])[:n_real]
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{np.nanmean(losses[-1]) if np.isfinite(losses[-1]).any() else np.nan:.4g}")
            elif mode == "print":
                fin = losses[-1][np.isfinite(losses[-1])]
                print(f"fit_batched: step {step}/{steps}  mean loss {fin.mean() if fin.size else np.nan:.6g}"
                      f"  ({int(bad.sum())}/{n_real} stopped)", flush=True)
            if bad.any() and nan_policy == "raise":
                break
            if bad.all():
                stopped = "every example hit a non-finite step"
                break
            if every is not None and step % every == 0 and step < steps:
                save(carry, step)
            if callback is not None:
                r = callback(step, unpad_full(carry["diff"]), losses[-1])
                if r is False:
                    stopped = f"callback returned False at step {step}"
                    break
    except KeyboardInterrupt:
        carry, step, n_h, n_a = committed
        del hist_loss[n_h:], hist_aux[n_a:]
        stopped = f"interrupted (KeyboardInterrupt) after {step} steps"
        warnings.warn(f"fit_batched: {stopped}; returning the current parameters", stacklevel=2)
    finally:
        if bar is not None:
            bar.close()

    save(carry, step)
    bad_step = _to_host(carry["bad_step"])[:n_real].astype(np.int64)
    if (bad_step >= 0).any():
        idx = np.nonzero(bad_step >= 0)[0]
        listed = ", ".join(f"{i} (step {bad_step[i]})" for i in idx[:10]) + (" ..." if idx.size > 10 else "")
        msg = (f"fit_batched: non-finite loss/gradient/update for {idx.size} of {n_real} examples: {listed}; "
               "each was frozen at its last good parameters")
        if nan_policy == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    if track_best:
        best_step = _to_host(carry["best_step"])[:n_real].astype(np.int64)
        has = _put(pad_batch(np.asarray(best_step >= 0), n_dev)[0], bs)
        best_d = jax.tree_util.tree_map(
            lambda b, d: jnp.where(has.reshape((-1,) + (1,) * (b.ndim - 1)), b, d), carry["best"], carry["diff"]
        )
        best_loss = _to_host(carry["best_loss"])[:n_real]
    else:
        best_step = np.full((n_real,), -1, np.int64)
        best_d = carry["diff"]
        best_loss = np.full((n_real,), np.inf)
    return BatchedFitResult(
        params=unpad_full(carry["diff"]),
        best_params=unpad_full(best_d),
        best_loss=best_loss,
        best_step=best_step,
        history=build_history(),
        steps_run=step,
        stopped_reason=stopped,
        bad_step=bad_step,
        opt_state=_take(carry["opt"], n_real),
        key=key,
        num_padded=n_pad,
        wall_time=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------
# fit_dataset: groups of batch_size examples streamed through the mesh
# ----------------------------------------------------------------------------


def _iter_groups(dataset, batch_size):
    """Yield host batches of at most ``batch_size`` examples."""
    if isinstance(dataset, (dict, tuple, np.ndarray, jax.Array, eqx.Module)):
        n = _batch_size(dataset, "dataset")
        if n is None:
            raise ValueError("fit_dataset: the dataset has no arrays")
        for lo in range(0, n, batch_size):
            yield jax.tree_util.tree_map(lambda x: x[lo: lo + batch_size] if eqx.is_array(x) else x, dataset)
    else:
        for g, batch in enumerate(dataset):
            n = _batch_size(batch, f"dataset batch {g}")
            if n is None or n == 0 or n > batch_size:
                raise ValueError(f"fit_dataset: batch {g} has {n} examples; expected 1..{batch_size}")
            yield batch


def _pad_to(tree, size):
    n = _batch_size(tree, "batch")
    return _repeat_last(tree, n, size), n


def _prefetch_padded(groups, mesh, axis_name, size, padded_size):
    """prefetch_to_mesh for fit_dataset: every group padded to the same ``padded_size`` (one compile)."""
    sharding = batch_sharding(mesh, axis_name)
    queue = deque()
    for batch in groups:
        batch = jax.tree_util.tree_map(lambda x: np.asarray(x) if eqx.is_array(x) else x, batch)
        b, n = _pad_to(batch, padded_size)
        queue.append((_put(b, sharding), n))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _broadcast_params(params_one, size):
    return jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (size,) + tuple(jnp.shape(x))) if eqx.is_array(x) else x, params_one
    )


def fit_dataset(
    loss_fn: Callable,
    init_params,
    dataset,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 1000,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    devices=None,
    batch_axis_name: str = "batch",
    shared=None,
    prefetch: int = 2,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | str = False,
    on_group: Callable | None = None,
    **fit_kwargs,
) -> BatchedFitResult:
    """Fit every example of a dataset, ``batch_size`` examples at a time, streamed to the mesh.

    The dataset stays on the host; :func:`prefetch_to_mesh`-style prefetching
    sends the next ``prefetch`` groups to the devices while the current one is
    fitted. Every group is padded to the same size (``batch_size`` rounded up
    to a multiple of the devices), so the step compiles once for the whole
    dataset. Results are gathered to the host (NumPy) group by group.

    Args:
        loss_fn: per-example loss, as in :func:`fit_batched`.
        init_params: the initial parameters of **one** example (broadcast to
            every example), or a callable ``init_params(batch) -> params`` that
            returns batched initial params for a (padded, on-mesh) data group.
        dataset: a pytree (a dict, tuple, array or ``equinox.Module``) of host
            arrays with a leading example axis ``N``, sliced into groups; or any
            other iterable (a list, a generator, a data loader) of batches of at
            most ``batch_size`` examples each.
        optimizer, steps: as in :func:`fit_batched` (per group).
        batch_size: examples fitted at once (memory grows linearly with it).
        mesh, devices, batch_axis_name, shared: as in :func:`fit_batched`.
        prefetch: groups kept in flight on the devices ahead of the current one.
        checkpoint_dir: one checkpoint per group (``group_00000.npz``, ...); with
            ``resume`` a finished group is read back instead of being fitted
            again, an unfinished one continues.
        progress: ``"print"`` / ``True``: one line per group; ``False``: silent.
        on_group: ``on_group(index, result)`` after each group (e.g. to write
            results out); return ``False`` to stop after that group.
        **fit_kwargs: passed to :func:`fit_batched` (``constraints``,
            ``steps_per_call``, ``nan_policy``, ``has_aux``, ``track_best``,
            ``filter_spec``, ``method``, ``key``, ``callback``).

    Returns:
        A :class:`BatchedFitResult` over all ``N`` examples with NumPy arrays
        (``history["loss"]`` is ``(steps, N)``; ``steps_run`` the smallest over
        groups; ``stopped_reason`` lists the groups that stopped early).
    """
    t0 = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"fit_dataset: batch_size must be a positive int, got {batch_size!r}")
    for k in ("checkpoint", "resume", "compile_cache", "mesh", "devices"):
        if k in fit_kwargs:
            raise TypeError(f"fit_dataset: {k}= is not accepted here" + (" (use checkpoint_dir=)" if k == "checkpoint" else ""))
    mesh = _resolve_mesh(mesh, devices, batch_axis_name)
    n_dev = _num_shards(mesh, batch_axis_name)
    padded = -(-int(batch_size) // n_dev) * n_dev
    cache: dict = {}
    results = []
    stops = []
    groups = _prefetch_padded(_iter_groups(dataset, int(batch_size)), mesh, batch_axis_name, max(1, int(prefetch)), padded)
    for g, (batch, n) in enumerate(groups):
        p0 = init_params(batch) if callable(init_params) else _broadcast_params(init_params, padded)
        ck = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), f"group_{g:05d}.npz")
        r = fit_batched(
            loss_fn, p0, batch, optimizer, steps, mesh=mesh, batch_axis_name=batch_axis_name, shared=shared,
            checkpoint=ck, resume=resume and ck is not None, compile_cache=cache, _num_valid=n, progress=False,
            **fit_kwargs,
        )
        host = lambda t: jax.tree_util.tree_map(lambda x: _to_host(x) if eqx.is_array(x) else x, t)  # noqa: E731
        r.params, r.best_params, r.opt_state = host(r.params), host(r.best_params), host(r.opt_state)
        results.append(r)
        if r.stopped_reason != "completed":
            stops.append(f"group {g}: {r.stopped_reason}")
        if progress:
            fl = r.final_loss
            print(f"fit_dataset: group {g} ({n} examples) done, mean final loss {np.nanmean(fl):.6g}, "
                  f"{r.wall_time:.2f}s", flush=True)
        if on_group is not None and on_group(g, r) is False:
            stops.append(f"on_group returned False after group {g}")
            break
    if not results:
        raise ValueError("fit_dataset: the dataset is empty")
    cat = lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0)  # noqa: E731

    def cat_tree(trees):
        return jax.tree_util.tree_map(lambda *xs: cat(*xs) if eqx.is_array(xs[0]) else xs[0], *trees)

    t_max = max(r.history["loss"].shape[0] for r in results)
    hl = []
    for r in results:
        h = r.history["loss"]
        if h.shape[0] < t_max:
            h = np.concatenate([h, np.full((t_max - h.shape[0],) + h.shape[1:], np.nan, h.dtype)], 0)
        hl.append(h)
    history = {"loss": np.concatenate(hl, axis=1)}
    for k in results[0].history:
        if k != "loss" and all(r.history[k].shape[0] == t_max for r in results if k in r.history):
            try:
                history[k] = np.concatenate([np.asarray(r.history[k]) for r in results], axis=1)
            except (TypeError, ValueError):  # non-array aux
                pass
    return BatchedFitResult(
        params=cat_tree([r.params for r in results]),
        best_params=cat_tree([r.best_params for r in results]),
        best_loss=cat(*[r.best_loss for r in results]),
        best_step=cat(*[r.best_step for r in results]),
        history=history,
        steps_run=min(r.steps_run for r in results),
        stopped_reason="completed" if not stops else "; ".join(stops),
        bad_step=cat(*[r.bad_step for r in results]),
        opt_state=cat_tree([r.opt_state for r in results]),
        key=results[0].key,
        num_padded=padded,
        wall_time=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------
# Faces
# ----------------------------------------------------------------------------


def _face_unit(model):
    lm = np.asarray(model.mean_shape)[np.asarray(model.landmark_indices)]
    return float(np.sqrt(np.mean(np.sum((lm - lm.mean(0)) ** 2, -1))))


def face_fit_loss(params, data, shared, *, settings=None, hard: bool = True, sigma: float = 1e-6,
                  regularize=("id", "exp", "tex")):
    """The per-image face loss in :func:`fit_batched`'s form ``loss(params, data, shared)``.

    A thin adapter of :func:`jaxrender.morphable.fitting.face_loss` (landmark,
    photometric, coefficient and lighting terms; Deep3DFaceRecon weights):
    ``shared`` holds what every image uses (``model``, ``weights``,
    ``lm_weights``, ``unit`` and, unless given per image, ``camera``) and
    ``data`` the per-image ``landmarks`` ``(L, 2)``, ``image`` ``(H, W, 3)``,
    ``mask`` ``(H, W)`` (and optionally ``camera``).

    Returns:
        ``(loss, terms)`` (use ``has_aux=True``).
    """
    from jaxrender.morphable.fitting import face_loss

    d = dict(data)
    for k in ("camera", "lm_weights", "unit"):
        if k not in d and k in shared:
            d[k] = shared[k]
    loss, terms = face_loss(shared["model"], params, d, shared["weights"], settings, hard=hard, sigma=sigma,
                            regularize=regularize)
    return loss, {k: v for k, v in terms.items() if k != "loss"}


def _face_optimizer(lrs, groups, frozen=()):
    opts = {k: (optax.set_to_zero() if k in frozen else optax.adam(lrs[k])) for k in groups}
    opts["frozen"] = optax.set_to_zero()

    def labels(p):
        return {k: jax.tree_util.tree_map(lambda _: (k if k in groups else "frozen"), v) for k, v in p.items()}

    return _fit.param_groups(opts, labels)


def fit_faces_sharded(model, images, landmarks=None, mesh: Mesh | None = None, masks=None, *, camera=None,
                      steps=(300, 200), weights=None, lr=None, soft: bool = False, faces_per_pixel: int = 8,
                      blur_radius: float = 1e-5, sigma: float = 1e-6, coeff_bound: float | None = 4.0, init=None,
                      steps_per_call: int = 50, batch_axis_name: str = "batch", method: str = "shard_map",
                      checkpoint_dir=None, resume: bool = False, callback=None, progress=False):
    """:func:`jaxrender.morphable.fitting.fit_faces_batched` with the images sharded over a mesh.

    Same two stages (landmarks: pose, identity, expression; then photometric:
    everything, with albedo and SH lighting), same per-image loss
    (:func:`face_fit_loss`), same weights and learning rates; but each image
    has its own Adam state (vmapped update), the batch axis is split over the
    devices of ``mesh`` (padding a batch that does not divide them), the
    model and camera are replicated, and each stage reports per-image losses.

    Args:
        model: the :class:`~jaxrender.morphable.MorphableModel`.
        images: ``(B, H, W, 3)`` in ``[0, 1]`` (NumPy or JAX).
        landmarks: ``(B, L, 2)`` pixels, or ``None`` (no landmark stage).
        mesh: the device mesh (default: all devices, see :func:`batch_mesh`).
        masks: ``(B, H, W)`` pixel weights (default ones).
        camera: one camera for all images (default
            :func:`~jaxrender.morphable.fitting.default_camera`).
        steps: ``(landmark_steps, photometric_steps)`` or one int for both.
        weights, lr, soft, faces_per_pixel, blur_radius, sigma, coeff_bound,
            init: as in :func:`~jaxrender.morphable.fitting.fit_faces_batched`.
        steps_per_call, batch_axis_name, method, callback, progress: as in :func:`fit_batched`.
        checkpoint_dir: one checkpoint per stage (``landmark.npz``, ``photo.npz``);
            ``resume`` continues from them.

    Returns:
        ``(params, stages)``: the fitted params dict (``(B, ...)`` arrays: ``id``,
        ``exp``, ``tex``, ``angles``, ``translation``, ``gamma``) and a dict
        stage name -> :class:`BatchedFitResult`.
    """
    from jaxrender.morphable import fitting as F

    if mesh is None:
        mesh = batch_mesh(None, batch_axis_name)
    images = np.asarray(images) if not isinstance(images, jax.Array) else images
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"fit_faces_sharded: images must be (B, H, W, 3), got shape {tuple(images.shape)}")
    B, H, W = images.shape[:3]
    dtype = jnp.float32
    images = images[..., :3]
    if np.issubdtype(images.dtype, np.integer):
        images = images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if camera is None:
        camera = F.default_camera(model, (H, W))
    if (camera.height, camera.width) != (H, W):
        raise ValueError(f"fit_faces_sharded: images are {H}x{W} but the camera is {camera.height}x{camera.width}")
    if landmarks is not None:
        landmarks = np.asarray(landmarks, np.float32)
        if landmarks.shape != (B, model.num_landmarks, 2):
            raise ValueError(f"fit_faces_sharded: landmarks must be (B, {model.num_landmarks}, 2), got {landmarks.shape}")
    masks = np.ones((B, H, W), np.float32) if masks is None else np.asarray(masks, np.float32)
    w = dict(F.DEFAULT_WEIGHTS)
    if weights:
        unknown = set(weights) - set(w)
        if unknown:
            raise ValueError(f"fit_faces_sharded: unknown loss weights {sorted(unknown)}")
        w.update(weights)
    lrs = dict(F.DEFAULT_LR)
    if isinstance(lr, (int, float)):
        lrs = {k: float(lr) * v / F.DEFAULT_LR["id"] for k, v in lrs.items()}
    elif lr:
        lrs.update(lr)
    s_lm, s_ph = (steps, steps) if isinstance(steps, int) else (int(steps[0]), int(steps[1]))
    unit = _face_unit(model)
    shared = dict(model=model, camera=camera, weights={k: jnp.asarray(v, dtype) for k, v in w.items()},
                  lm_weights=F.landmark_weights(model.num_landmarks, dtype), unit=jnp.asarray(unit, dtype))
    if init is None:
        lm_j = None if landmarks is None else jnp.asarray(landmarks)
        init = jax.jit(jax.vmap(lambda l: F.init_params(model, camera, l, dtype)))(lm_j) if lm_j is not None else \
            _broadcast_params(F.init_params(model, camera, None, dtype), B)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), dict(init))
    groups = tuple(k for k in ("id", "exp", "tex", "angles", "translation", "gamma") if k in params)
    cons = None if coeff_bound is None else _fit.clamp(-float(coeff_bound), float(coeff_bound),
                                                         where=lambda p: (p["id"], p["exp"], p["tex"]))
    settings = _raster_settings(H, W, soft, faces_per_pixel, blur_radius)
    stages = {}
    common = dict(mesh=mesh, batch_axis_name=batch_axis_name, shared=shared, constraints=cons, has_aux=True,
                  steps_per_call=steps_per_call, method=method, callback=callback, progress=progress)

    def ckpt(name):
        return None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), f"{name}.npz")

    if landmarks is not None and s_lm > 0:
        def lm_loss(p, d, sh):
            return face_fit_loss(p, d, sh, settings=None, regularize=("id", "exp", "tex"))

        r = fit_batched(lm_loss, params, {"landmarks": landmarks}, _face_optimizer(lrs, groups, ("tex", "gamma")), s_lm,
                        checkpoint=ckpt("landmark"), resume=resume and checkpoint_dir is not None, **common)
        stages["landmark"] = r
        params = r.params
    if s_ph > 0:
        data = {"image": images, "mask": masks}
        if landmarks is not None:
            data["landmarks"] = landmarks

        def ph_loss(p, d, sh):
            return face_fit_loss(p, d, sh, settings=settings, hard=not soft, sigma=sigma)

        r = fit_batched(ph_loss, params, data, _face_optimizer(lrs, groups), s_ph,
                        checkpoint=ckpt("photo"), resume=resume and checkpoint_dir is not None, **common)
        stages["photo"] = r
        params = r.params
    return params, stages


def _raster_settings(H, W, soft, faces_per_pixel, blur_radius):
    from jaxrender.raster import RasterSettings

    if not soft:
        return RasterSettings(image_size=(H, W), faces_per_pixel=1, blur_radius=0.0)
    return RasterSettings(image_size=(H, W), faces_per_pixel=int(faces_per_pixel), blur_radius=float(blur_radius))

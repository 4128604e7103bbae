"""Tests for jaxrender.fit: the Optax fitting loop."""
import importlib
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrender.fit import (
    Checkpoint,
    FitResult,
    chain_constraints,
    clamp,
    fit,
    load_checkpoint,
    nonnegative,
    param_groups,
    project_rotation,
    unit_norm,
)
from jaxrender.fit import _STEP_CACHE, _STEP_CACHE_SIZE

TARGET = jnp.array([1.0, -2.0, 3.0])


def quad(p, data=None):
    t = TARGET if data is None else data
    return jnp.sum((p["x"] - t) ** 2)


def manual_loop(loss_fn, params, optimizer, steps, data_of_step=lambda k: None, constraint=None):
    """Reference: a plain Python Optax loop."""
    state = optimizer.init(params)
    for k in range(steps):
        d = data_of_step(k)
        g = jax.grad(loss_fn)(params, d) if d is not None else jax.grad(loss_fn)(params)
        u, state = optimizer.update(g, state, params)
        params = optax.apply_updates(params, u)
        if constraint is not None:
            params = constraint(params)
    return params


def test_quadratic_converges_to_closed_form():
    # min_x |A x - b|^2 has the closed-form optimum x* = lstsq(A, b).
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    x_star = np.linalg.lstsq(np.asarray(A), np.asarray(b), rcond=None)[0]
    res = fit(lambda p, d: jnp.sum((d[0] @ p - d[1]) ** 2), jnp.zeros(3), (A, b),
              optax.adam(0.05), steps=600, progress=False)
    assert isinstance(res, FitResult)
    assert res.stopped_reason == "completed" and res.steps_run == 600 and res.bad_step is None
    np.testing.assert_allclose(res.params, x_star, atol=1e-4)
    assert res.history["loss"].shape == (600,) and isinstance(res.history["loss"], np.ndarray)
    assert res.history["loss"][-1] < res.history["loss"][0]


def test_lbfgs_line_search():
    # optax.lbfgs needs value/grad/value_fn extra args; on a 3-d least squares it converges fast.
    rng = np.random.default_rng(1)
    A = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    x_star = np.linalg.lstsq(np.asarray(A), np.asarray(b), rcond=None)[0]
    res = fit(lambda p, d: jnp.sum((d[0] @ p - d[1]) ** 2), jnp.zeros(3), (A, b), optax.lbfgs(), steps=20,
              progress=False)
    np.testing.assert_allclose(res.params, x_star, atol=1e-4)


def test_matches_manual_optax_loop_and_partial_chunk():
    # 130 steps with chunks of 50: the last chunk is partial (masked steps).
    opt = optax.sgd(0.01, momentum=0.9)
    p0 = {"x": jnp.zeros(3)}
    res = fit(quad, p0, optimizer=opt, steps=130, steps_per_call=50, progress=False)
    ref = manual_loop(quad, p0, opt, 130)
    np.testing.assert_allclose(res.params["x"], ref["x"], rtol=1e-5, atol=1e-6)
    assert res.steps_run == 130 and res.history["loss"].shape == (130,)
    np.testing.assert_allclose(res.history["loss"][0], quad(p0), rtol=1e-6)


def test_partial_chunk_compiles_once():
    traces = []

    def loss(p):
        traces.append(1)
        return quad(p)

    _STEP_CACHE.clear()
    fit(loss, {"x": jnp.zeros(3)}, steps=50, steps_per_call=50, progress=False)
    n_one_chunk = len(traces)
    traces.clear()
    _STEP_CACHE.clear()  # compile afresh: the 4 chunks of this run (last partial) share one compiled function
    fit(loss, {"x": jnp.zeros(3)}, steps=171, steps_per_call=50, progress=False)
    assert len(traces) == n_one_chunk


def _counting(f):
    """``f`` with a count of its Python calls (one per trace under jit)."""
    def g(*args, **kwargs):
        g.traces += 1
        return f(*args, **kwargs)
    g.traces = 0
    return g


def test_repeated_fit_reuses_the_compiled_step():
    loss = _counting(quad)
    opt = optax.adam(0.05)
    targets = [jnp.array([1.0, -2.0, 3.0]), jnp.array([0.5, 4.0, -1.0])]
    results = []
    for t in targets:
        results.append(fit(loss, {"x": jnp.zeros(3)}, t, opt, steps=60, steps_per_call=25, progress=False))
        if len(results) == 1:
            assert loss.traces > 0
            first_traces = loss.traces
    assert loss.traces == first_traces  # the second fit (other data, same shapes) traced nothing
    # ... and ran on its own data: the same numbers as a fit compiled afresh
    _STEP_CACHE.clear()
    fresh = fit(quad, {"x": jnp.zeros(3)}, targets[1], opt, steps=60, steps_per_call=25, progress=False)
    np.testing.assert_array_equal(results[1].params["x"], fresh.params["x"])
    np.testing.assert_array_equal(results[1].history["loss"], fresh.history["loss"])
    assert not np.allclose(results[0].params["x"], results[1].params["x"])
    # other shapes compile again (and still fit)
    n = loss.traces
    r4 = fit(loss, {"x": jnp.zeros(4)}, jnp.arange(4.0), opt, steps=300, progress=False)
    assert loss.traces > n
    np.testing.assert_allclose(r4.params["x"], np.arange(4.0), atol=1e-2)
    # the default optimizer is one shared object too
    n = loss.traces
    fit(loss, {"x": jnp.zeros(3)}, targets[0], steps=10, progress=False)
    m = loss.traces
    fit(loss, {"x": jnp.zeros(3)}, targets[1], steps=10, progress=False)
    assert m > n and loss.traces == m
    # a new optimizer object (optax builds new functions) compiles again
    fit(loss, {"x": jnp.zeros(3)}, targets[0], optax.adam(0.05), steps=60, steps_per_call=25, progress=False)
    assert loss.traces > m


class QuadLoss(eqx.Module):
    target: jax.Array
    power: int = eqx.field(static=True)
    calls: list = eqx.field(static=True)  # a trace counter (static: compared by identity)

    def __call__(self, p):
        self.calls.append(1)
        return jnp.sum(jnp.abs(p["x"] - self.target) ** self.power)


def _quad_to(p, target, scale=1.0):
    return scale * jnp.sum((p["x"] - target) ** 2)


def test_module_and_partial_losses_are_cached_with_traced_arrays():
    calls = []
    t1, t2 = jnp.array([1.0, -2.0, 3.0]), jnp.array([-3.0, 0.5, 2.0])
    opt = optax.adam(0.1)
    r1 = fit(QuadLoss(t1, 2, calls), {"x": jnp.zeros(3)}, None, opt, steps=300, progress=False)
    n = len(calls)
    r2 = fit(QuadLoss(t2, 2, calls), {"x": jnp.zeros(3)}, None, opt, steps=300, progress=False)
    assert len(calls) == n  # an equal module with other arrays: no new trace ...
    np.testing.assert_allclose(r1.params["x"], t1, atol=1e-3)
    np.testing.assert_allclose(r2.params["x"], t2, atol=1e-3)  # ... and its arrays are not baked in
    _STEP_CACHE.clear()
    r2_fresh = fit(QuadLoss(t2, 2, calls), {"x": jnp.zeros(3)}, None, opt, steps=300, progress=False)
    np.testing.assert_array_equal(r2.params["x"], r2_fresh.params["x"])
    n = len(calls)
    fit(QuadLoss(t2, 4, calls), {"x": jnp.zeros(3)}, None, opt, steps=300, progress=False)
    assert len(calls) > n  # another static field: another program

    # functools.partial of a module-level function: its array arguments are traced
    import functools

    counted = _counting(_quad_to)
    ra = fit(functools.partial(counted, target=t1), {"x": jnp.zeros(3)}, None, opt, steps=300, progress=False)
    n = counted.traces
    rb = fit(functools.partial(counted, target=t2), {"x": jnp.zeros(3)}, None, opt, steps=300, progress=False)
    assert counted.traces == n
    np.testing.assert_allclose(ra.params["x"], t1, atol=1e-3)
    np.testing.assert_allclose(rb.params["x"], t2, atol=1e-3)
    fit(functools.partial(counted, target=t2, scale=2.0), {"x": jnp.zeros(3)}, None, opt, steps=300, progress=False)
    assert counted.traces > n  # a non-array argument is part of the program


def test_cached_step_keeps_per_call_state():
    # NaN stop, data_fn keys and resume must come from this call, not the cached program's first one.
    loss = _counting(lambda p, d: jnp.sum((p["x"] - d) ** 2) + jnp.sqrt(d[0]))
    opt = optax.adam(0.05)
    good = fit(loss, {"x": jnp.zeros(3)}, jnp.array([1.0, 2.0, 3.0]), opt, steps=20, progress=False)
    assert good.stopped_reason == "completed"
    n = loss.traces
    with pytest.warns(RuntimeWarning, match="non-finite loss at step 0"):
        bad = fit(loss, {"x": jnp.zeros(3)}, jnp.array([-1.0, 2.0, 3.0]), opt, steps=20, progress=False)
    assert loss.traces == n and bad.bad_step == 0 and bad.steps_run == 0
    np.testing.assert_array_equal(bad.params["x"], np.zeros(3))
    again = fit(loss, {"x": jnp.zeros(3)}, jnp.array([1.0, 2.0, 3.0]), opt, steps=20, progress=False)
    np.testing.assert_array_equal(again.params["x"], good.params["x"])

    dfn = lambda k, s, d: d + jax.random.normal(k, (3,))  # noqa: E731
    kw = dict(data_fn=dfn, steps=15, steps_per_call=4, progress=False)
    r1 = fit(quad, {"x": jnp.zeros(3)}, TARGET, opt, key=jax.random.PRNGKey(1), **kw)
    r2 = fit(quad, {"x": jnp.zeros(3)}, TARGET, opt, key=jax.random.PRNGKey(2), **kw)
    assert not np.allclose(r1.params["x"], r2.params["x"])  # the key is an argument, not a baked constant
    _STEP_CACHE.clear()
    r2_fresh = fit(quad, {"x": jnp.zeros(3)}, TARGET, opt, key=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(r2.params["x"], r2_fresh.params["x"])


def test_step_cache_is_bounded_and_unhashable_statics_still_fit(monkeypatch):
    assert _STEP_CACHE_SIZE == 32
    monkeypatch.setattr(importlib.import_module("jaxrender.fit"), "_STEP_CACHE_SIZE", 3)
    _STEP_CACHE.clear()
    losses = [_counting(lambda p, i=i: quad(p) + i) for i in range(5)]  # 5 programs
    for f in losses:
        fit(f, {"x": jnp.zeros(3)}, steps=2, progress=False)
    assert len(_STEP_CACHE) == 3
    traces = [f.traces for f in losses]
    for f in losses[::-1]:  # most recent first, so the refits evict nothing still to be checked
        fit(f, {"x": jnp.zeros(3)}, steps=2, progress=False)
    assert [f.traces - t for f, t in zip(losses, traces)] == [2, 2, 0, 0, 0]  # the least recently used went
    # a non-array leaf that cannot be hashed (here in data) just skips the cache
    loss = _counting(lambda p, d: quad(p, d["t"]))
    data = {"t": TARGET, "tags": {"a", "b"}}
    r1 = fit(loss, {"x": jnp.zeros(3)}, data, optax.adam(0.1), steps=300, progress=False)
    n = loss.traces
    fit(loss, {"x": jnp.zeros(3)}, data, optax.adam(0.1), steps=3, progress=False)
    assert loss.traces > n
    np.testing.assert_allclose(r1.params["x"], TARGET, atol=1e-3)


class Model(eqx.Module):
    w: jax.Array
    faces: jax.Array
    scale: float
    n: int = eqx.field(static=True)


def test_equinox_module_int_leaves_untouched():
    faces = jnp.array([[0, 1, 2], [2, 1, 3]], jnp.int32)
    m = Model(w=jnp.zeros(3), faces=faces, scale=2.0, n=7)

    def loss(m):
        assert m.n == 7
        return jnp.sum((m.w * m.scale - TARGET) ** 2) + 0.0 * jnp.sum(m.faces)

    res = fit(loss, m, optimizer=optax.adam(0.1), steps=300, progress=False)
    assert isinstance(res.params, Model)
    assert res.params.n == 7 and res.params.scale == 2.0
    assert res.params.faces.dtype == jnp.int32
    np.testing.assert_array_equal(res.params.faces, faces)
    np.testing.assert_allclose(res.params.w, TARGET / 2, atol=1e-3)


def test_per_group_learning_rates_frozen_group():
    p0 = {"a": jnp.zeros(3), "b": jnp.zeros(3)}

    def loss(p):
        return jnp.sum((p["a"] - TARGET) ** 2) + jnp.sum((p["b"] - TARGET) ** 2)

    opt = param_groups({"fast": optax.sgd(0.1), "frozen": optax.set_to_zero()}, {"a": "fast", "b": "frozen"})
    res = fit(loss, p0, optimizer=opt, steps=100, progress=False)
    np.testing.assert_array_equal(res.params["b"], p0["b"])
    np.testing.assert_allclose(res.params["a"], TARGET, atol=1e-4)

    # Two learning rates with optax.partition and a label *function*, on an equinox module.
    m = Model(w=jnp.zeros(3), faces=jnp.zeros((1, 3), jnp.int32), scale=1.0, n=1)
    labels = lambda tree: jax.tree_util.tree_map(lambda _: "slow", tree)  # noqa: E731
    opt2 = optax.partition({"slow": optax.sgd(0.01)}, labels)
    r2 = fit(lambda m: jnp.sum((m.w - TARGET) ** 2), m, optimizer=opt2, steps=1, progress=False)
    np.testing.assert_allclose(r2.params.w, 0.01 * 2 * TARGET, rtol=1e-6)


def test_schedule():
    sched = optax.piecewise_constant_schedule(0.1, {5: 0.1})  # lr 0.1 then 0.01
    opt = optax.sgd(sched)
    p0 = {"x": jnp.zeros(3)}
    res = fit(quad, p0, optimizer=opt, steps=12, steps_per_call=4, progress=False)
    ref = manual_loop(quad, p0, opt, 12)
    np.testing.assert_allclose(res.params["x"], ref["x"], rtol=1e-6)
    # Check the schedule actually changed: a constant-lr run ends elsewhere.
    const = manual_loop(quad, p0, optax.sgd(0.1), 12)
    assert not np.allclose(const["x"], ref["x"])


def test_clamp_respected_every_step():
    seen = []

    def cb(step, params, loss):
        seen.append(np.asarray(params["x"]))

    res = fit(quad, {"x": jnp.zeros(3)}, optimizer=optax.adam(0.3), steps=40, steps_per_call=1,
              constraints=clamp(-1.0, 0.5), callback=cb, progress=False)
    allp = np.stack(seen)
    assert allp.max() <= 0.5 and allp.min() >= -1.0
    np.testing.assert_allclose(res.params["x"], [0.5, -1.0, 0.5], atol=1e-6)
    # Matches a manual loop with the same projection.
    ref = manual_loop(quad, {"x": jnp.zeros(3)}, optax.adam(0.3), 40, constraint=clamp(-1.0, 0.5))
    np.testing.assert_allclose(res.params["x"], ref["x"], atol=1e-6)


def test_constraint_helpers():
    p = {"v": jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]), "c": jnp.array([-1.0, 2.0]),
         "R": jnp.eye(3) + 0.1 * jnp.arange(9.0).reshape(3, 3)}
    q = jax.jit(unit_norm(where=lambda p: p["v"]))(p)
    np.testing.assert_allclose(jnp.linalg.norm(q["v"], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(q["c"], p["c"])
    q = jax.jit(nonnegative(where=lambda p: p["c"]))(p)
    np.testing.assert_array_equal(q["c"], [0.0, 2.0])
    q = jax.jit(project_rotation(where=lambda p: p["R"]))(p)
    np.testing.assert_allclose(q["R"] @ q["R"].T, np.eye(3), atol=1e-5)
    assert abs(float(jnp.linalg.det(q["R"])) - 1) < 1e-5
    q = jax.jit(chain_constraints(clamp(hi=1.0, where=lambda p: p["c"]), None, nonnegative(where=lambda p: p["c"])))(p)
    np.testing.assert_array_equal(q["c"], [0.0, 1.0])


def nan_at(k):
    """Loss that becomes NaN at step k (the step comes from data_fn)."""

    def loss(p, step):
        return quad(p) + jnp.where(step >= k, jnp.nan, 0.0)

    return loss


def test_nan_guard_stops_and_returns_last_good():
    p0 = {"x": jnp.zeros(3)}
    with pytest.warns(RuntimeWarning, match="step 37"):
        res = fit(nan_at(37), p0, data_fn=lambda key, step: step, optimizer=optax.adam(0.05),
                  steps=100, steps_per_call=16, progress=False)
    assert res.bad_step == 37 and res.steps_run == 37
    assert "step 37" in res.stopped_reason and "non-finite loss" in res.stopped_reason
    assert res.history["loss"].shape == (37,) and np.all(np.isfinite(res.history["loss"]))
    ref = fit(quad, p0, optimizer=optax.adam(0.05), steps=37, progress=False)
    np.testing.assert_allclose(res.params["x"], ref.params["x"], rtol=1e-6)
    assert np.all(np.isfinite(res.best_params["x"]))


def test_nan_guard_params_and_policies():
    # Gradient blows up to inf: sqrt'(0) when x reaches exactly 1 -> non-finite gradient.
    p0 = {"x": jnp.array(0.0)}
    loss = lambda p: -p["x"] + 0.0 * jnp.sqrt(1.0 - p["x"])  # noqa: E731
    with pytest.warns(RuntimeWarning, match="non-finite gradient at step 4"):
        res = fit(loss, p0, optimizer=optax.sgd(0.25), steps=10, progress=False)
    assert res.bad_step == 4 and float(res.params["x"]) == 1.0
    with pytest.raises(FloatingPointError, match="step 4"):
        fit(loss, p0, optimizer=optax.sgd(0.25), steps=10, progress=False, nan_policy="raise")
    res = fit(loss, p0, optimizer=optax.sgd(0.25), steps=10, progress=False, nan_policy="ignore")
    assert res.steps_run == 10 and res.bad_step is None and not np.isfinite(float(res.params["x"]))


def test_best_params():
    # Loss oscillates: SGD with lr too large on a quadratic diverges after the first step.
    p0 = {"x": jnp.array([0.5])}
    loss = lambda p: jnp.sum((p["x"] - 1.0) ** 2)  # noqa: E731
    res = fit(loss, p0, optimizer=optax.sgd(1.1), steps=20, progress=False)
    h = res.history["loss"]
    assert res.best_step == int(np.argmin(h)) == 0
    assert res.best_loss == pytest.approx(float(h.min()))
    np.testing.assert_allclose(res.best_params["x"], p0["x"])
    assert res.final_loss > res.best_loss
    # Converging run: best is near the end and equals the loss of best_params.
    res = fit(quad, {"x": jnp.zeros(3)}, optimizer=optax.adam(0.1), steps=200, progress=False)
    assert res.best_loss == pytest.approx(float(quad(res.best_params)), rel=1e-4, abs=1e-9)


def test_has_aux_history_and_log_every():
    def loss(p):
        l = quad(p)
        return l, {"l2": jnp.sum(p["x"] ** 2), "vec": p["x"]}

    res = fit(loss, {"x": jnp.zeros(3)}, steps=23, steps_per_call=10, has_aux=True, log_every=5, progress=False)
    h = res.history
    assert h["loss"].shape == (23,)
    np.testing.assert_array_equal(h["log_steps"], [0, 5, 10, 15, 20])
    assert h["l2"].shape == (5,) and h["vec"].shape == (5, 3)
    assert h["l2"][0] == 0.0 and h["l2"][-1] > 0


def test_callback_early_stop():
    calls = []

    def cb(step, params, loss):
        calls.append((step, loss))
        return False if step >= 30 else None

    res = fit(quad, {"x": jnp.zeros(3)}, steps=100, steps_per_call=10, callback=cb, progress=False)
    assert res.steps_run == 30 and [c[0] for c in calls] == [10, 20, 30]
    assert "callback" in res.stopped_reason and "30" in res.stopped_reason
    assert res.history["loss"].shape == (30,)


def _noisy(p, batch):
    return jnp.sum((p["x"] - batch) ** 2)


def _batch(key, step, data):
    return data + 0.1 * jax.random.normal(key, (3,))


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    p0 = {"x": jnp.zeros(3)}
    kw = dict(data_fn=_batch, optimizer=optax.adam(0.05), steps_per_call=16, progress=False,
              key=jax.random.PRNGKey(3), has_aux=True)
    loss = lambda p, b: (_noisy(p, b), {"m": p["x"][0]})  # noqa: E731
    full = fit(loss, p0, TARGET, steps=90, **kw)

    path = tmp_path / "ck.npz"
    # First part "interrupted" by a callback at step 40 (checkpoint every 20).
    part = fit(loss, p0, TARGET, steps=90, checkpoint=Checkpoint(path, every=20),
               callback=lambda s, p, l: s < 40, **kw)
    assert part.steps_run == 40 and os.path.exists(path)
    resumed = fit(loss, p0, TARGET, steps=90, checkpoint=path, resume=True, **kw)
    assert resumed.steps_run == 90
    np.testing.assert_allclose(resumed.params["x"], full.params["x"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed.best_params["x"], full.best_params["x"], atol=1e-6)
    assert resumed.best_step == full.best_step
    np.testing.assert_allclose(resumed.history["loss"], full.history["loss"], atol=1e-6)
    np.testing.assert_allclose(resumed.history["m"], full.history["m"], atol=1e-6)
    # The file holds the final state; loading it gives params, step and optimizer state.
    ck = load_checkpoint(path, p0, optax.adam(0.05))
    assert ck["step"] == 90
    np.testing.assert_allclose(ck["params"]["x"], full.params["x"], atol=1e-6)
    assert ck["history"]["loss"].shape == (90,)
    # A finished run resumes to a no-op.
    again = fit(loss, p0, TARGET, steps=90, checkpoint=path, resume=True, **kw)
    assert again.steps_run == 90
    np.testing.assert_allclose(again.params["x"], full.params["x"], atol=1e-6)
    # Mismatched params structure gives a clear error.
    with pytest.raises(ValueError, match="does not match"):
        fit(loss, {"x": jnp.zeros(3), "y": jnp.zeros(2)}, TARGET, steps=90, checkpoint=path, resume=True, **kw)


def test_data_fn_random_batches():
    # Random views: each step sees target + noise; the fit averages the noise out.
    res = fit(_noisy, {"x": jnp.zeros(3)}, TARGET, data_fn=_batch, optimizer=optax.adam(0.02),
              steps=500, progress=False, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(res.params["x"], TARGET, atol=0.05)
    # Same key -> same run (the key is res.key); different key -> different run.
    a = fit(_noisy, {"x": jnp.zeros(3)}, TARGET, data_fn=_batch, optimizer=optax.adam(0.02), steps=20,
            progress=False, key=res.key)
    c = fit(_noisy, {"x": jnp.zeros(3)}, TARGET, data_fn=_batch, optimizer=optax.adam(0.02), steps=20,
            progress=False, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a.history["loss"], res.history["loss"][:20])
    assert not np.array_equal(a.history["loss"], c.history["loss"])
    # data_fn without fixed data gets (key, step).
    r = fit(_noisy, {"x": jnp.zeros(3)}, data_fn=lambda key, step: TARGET + 0 * step, steps=300,
            optimizer=optax.adam(0.05), progress=False)
    np.testing.assert_allclose(r.params["x"], TARGET, atol=1e-3)


def test_float64(x64):
    p0 = {"x": jnp.zeros(3, jnp.float64)}
    res = fit(lambda p: jnp.sum((p["x"] - 1.0 / 3.0) ** 2), p0, optimizer=optax.sgd(0.25),
              steps=60, progress=False)
    assert res.params["x"].dtype == jnp.float64 and res.history["loss"].dtype == np.float64
    np.testing.assert_allclose(res.params["x"], 1.0 / 3.0, rtol=1e-12)


def test_progress_print(capsys):
    fit(quad, {"x": jnp.zeros(3)}, steps=20, steps_per_call=10, progress="print")
    out = capsys.readouterr().out
    assert "step 10/20" in out and "step 20/20" in out
    fit(quad, {"x": jnp.zeros(3)}, steps=5, progress=False)
    assert capsys.readouterr().out == ""
    fit(quad, {"x": jnp.zeros(3)}, steps=5, progress=True)  # tqdm bar, must not fail


def test_bad_arguments():
    p0 = {"x": jnp.zeros(3)}
    with pytest.raises(ValueError, match="steps"):
        fit(quad, p0, steps=-1)
    with pytest.raises(ValueError, match="nan_policy"):
        fit(quad, p0, steps=1, nan_policy="skip")
    with pytest.raises(ValueError, match="scalar"):
        fit(lambda p: p["x"] ** 2, p0, steps=1, progress=False)
    with pytest.raises(TypeError, match="has_aux"):
        fit(lambda p: (quad(p), {}), p0, steps=1, progress=False)
    with pytest.raises(TypeError, match=r"\(loss, aux\)"):
        fit(quad, p0, steps=1, has_aux=True, progress=False)
    with pytest.raises(TypeError, match="optimizer"):
        fit(quad, p0, optimizer="adam", steps=1)
    with pytest.raises(TypeError, match="optimizer="):
        fit(quad, p0, optax.adam(0.1), steps=1)  # optimizer passed positionally as data
    with pytest.raises(ValueError, match="steps_per_call"):
        fit(quad, p0, steps=1, steps_per_call=0)
    with pytest.raises(ValueError, match="floating-point"):
        fit(lambda p: jnp.sum(p["n"]) * 1.0, {"n": jnp.arange(3)}, steps=1)
    with pytest.raises(ValueError, match="resume"):
        fit(quad, p0, steps=1, resume=True)
    with pytest.raises(TypeError, match="constraints"):
        fit(quad, p0, steps=1, constraints=[clamp(0, 1)])
    # steps=0 is a no-op.
    r = fit(quad, p0, steps=0, progress=False)
    assert r.steps_run == 0 and r.history["loss"].shape == (0,)


def test_keyboard_interrupt_returns_consistent_state(tmp_path):
    def cb(step, params, loss):
        if step == 20:
            raise KeyboardInterrupt

    path = tmp_path / "ck.npz"
    with pytest.warns(UserWarning, match="interrupted"):
        res = fit(quad, {"x": jnp.zeros(3)}, steps=100, steps_per_call=10, callback=cb, checkpoint=path,
                  progress=False)
    assert res.steps_run == 20 and res.history["loss"].shape == (20,)
    assert load_checkpoint(path, {"x": jnp.zeros(3)})["step"] == 20


def test_resume_typed_key_and_tuple_aux(tmp_path):
    path = tmp_path / "ck.npz"
    loss = lambda p, b: (jnp.sum((p - b) ** 2), (p[0], p[1:]))  # noqa: E731
    kw = dict(data_fn=lambda k, s, d: d + jax.random.normal(k, (3,)), key=jax.random.key(5), has_aux=True,
              progress=False, steps_per_call=7)
    full = fit(loss, jnp.zeros(3), TARGET, steps=30, **kw)
    fit(loss, jnp.zeros(3), TARGET, steps=12, checkpoint=path, **kw)
    res = fit(loss, jnp.zeros(3), TARGET, steps=30, checkpoint=path, resume=True, **kw)
    np.testing.assert_allclose(res.params, full.params, atol=1e-6)
    assert res.history["aux"][1].shape == (30, 2)
    np.testing.assert_allclose(res.history["aux"][1], full.history["aux"][1], atol=1e-6)

"""Tests for jaxrender.distributed: sharded batch fitting, padding, checkpoints, prefetch.

The multi-device checks run in ONE subprocess that sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing JAX
(this process may already have initialised JAX with one CPU device); the
subprocess prints a JSON dict of measurements that the tests below assert on.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrender.distributed import (
    BatchedFitResult,
    batch_mesh,
    fit_batched,
    fit_dataset,
    load_batched_checkpoint,
    pad_batch,
    prefetch_to_mesh,
)
from jaxrender.fit import fit, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_fn(p, d):
    # Not separable in the coordinates, with a non-elementwise optimizer below
    # (global-norm clipping): per-example optimizer states are really needed.
    r = p["s"] * p["x"] - d["t"]
    return jnp.sum(r * r) + 0.1 * jnp.sum(p["x"] ** 4)


OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))


def problem(B, seed=0):
    """``B`` examples; the first rows of a larger problem are the same examples."""
    rng = np.random.default_rng(seed)
    x, t = rng.normal(size=(2, 16, 3))
    params = {"x": jnp.asarray(x[:B], jnp.float32), "s": jnp.ones((B,), jnp.float32)}
    data = {"t": jnp.asarray(t[:B], jnp.float32)}
    return params, data


def one(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


# ----------------------------------------------------------------------------
# Single-process (whatever devices this process has)
# ----------------------------------------------------------------------------


def test_pad_batch_repeats_last_example():
    t = {"a": np.arange(5.0), "b": jnp.arange(10).reshape(5, 2)}
    p, n = pad_batch(t, 4)
    assert n == 5 and p["a"].shape == (8,) and p["b"].shape == (8, 2)
    assert isinstance(p["a"], np.ndarray) and isinstance(p["b"], jax.Array)
    np.testing.assert_array_equal(p["a"], [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(np.asarray(p["b"])[5:], [[8, 9]] * 3)
    same, n = pad_batch(t, 5)
    assert n == 5 and same["a"].shape == (5,)
    with pytest.raises(ValueError, match="leading"):
        pad_batch({"a": np.zeros(3), "b": np.zeros(4)}, 2)


@pytest.fixture(scope="module")
def ref():
    """30 steps of 16 examples on one device."""
    params, data = problem(16)
    return fit_batched(loss_fn, params, data, OPT, 30, devices=1, steps_per_call=10)


def test_per_example_equals_independent_fits(ref):
    """Each example of fit_batched equals jaxrender.fit.fit on that example alone."""
    steps = 30
    params, data = problem(3)
    r = ref
    assert isinstance(r, BatchedFitResult)
    assert r.history["loss"].shape == (steps, 16) and r.steps_run == steps and r.stopped_reason == "completed"
    for i in range(3):
        ri = fit(loss_fn, one(params, i), one(data, i), OPT, steps, progress=False, steps_per_call=10)
        np.testing.assert_allclose(np.asarray(r.params["x"][i]), np.asarray(ri.params["x"]), atol=1e-5)
        np.testing.assert_allclose(r.history["loss"][:, i], ri.history["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(r.best_params["x"][i]), np.asarray(ri.best_params["x"]), atol=1e-5)
        assert r.best_step[i] == ri.best_step
    np.testing.assert_allclose(r.final_loss, r.history["loss"][-1])


def test_non_finite_example_is_frozen_others_continue():
    params = {"x": jnp.asarray([[1.0], [2.0], [3.0]])}
    data = {"t": jnp.asarray([0.0, 10.0, 0.0])}

    def lf(p, d):  # log of a negative number from step 0 for example 1
        return jnp.sum(p["x"] ** 2) + jnp.log(1.0 - d["t"] / 5.0)

    with pytest.warns(RuntimeWarning, match="1 of 3 examples: 1 \\(step 0\\)"):
        r = fit_batched(lf, params, data, optax.sgd(0.1), 5, devices=1)
    np.testing.assert_array_equal(r.bad_step, [-1, 0, -1])
    assert np.isnan(r.history["loss"][:, 1]).all() and np.isfinite(r.history["loss"][:, [0, 2]]).all()
    assert float(r.params["x"][1, 0]) == 2.0  # frozen at its initial value
    np.testing.assert_allclose(np.asarray(r.params["x"][[0, 2], 0]), np.array([1.0, 3.0]) * 0.8 ** 5, rtol=1e-5)
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_batched(lf, params, data, optax.sgd(0.1), 5, devices=1, nan_policy="raise")


def test_argument_errors():
    params, data = problem(3)
    with pytest.raises(ValueError, match="batch size 3, data 4"):
        fit_batched(loss_fn, params, problem(4)[1], OPT, 2, devices=1)
    with pytest.raises(ValueError, match="scalar loss for ONE example"):
        fit_batched(lambda p, d: p["x"], params, data, OPT, 2, devices=1)
    with pytest.raises(ValueError, match="mesh= or devices="):
        fit_batched(loss_fn, params, data, OPT, 2, devices=1, mesh=batch_mesh(1))
    with pytest.raises(ValueError, match="batch axis 'b'"):
        fit_batched(loss_fn, params, data, OPT, 2, mesh=batch_mesh(1), batch_axis_name="b")
    with pytest.raises(ValueError, match="scalar"):
        fit_batched(loss_fn, {**params, "c": jnp.float32(1.0)}, data, OPT, 2, devices=1)


def test_checkpoint_format_and_load(tmp_path):
    params, data = problem(3)
    path = tmp_path / "b.npz"
    r = fit_batched(loss_fn, params, data, OPT, 12, devices=1, checkpoint=path)
    z = load_batched_checkpoint(path, params, OPT)
    assert z["step"] == 12 and z["history"]["loss"].shape == (12, 3)
    np.testing.assert_array_equal(np.asarray(z["params"]["x"]), np.asarray(r.params["x"]))
    np.testing.assert_array_equal(z["best_step"], r.best_step)
    assert jax.tree_util.tree_structure(z["opt_state"]) == jax.tree_util.tree_structure(r.opt_state)
    with pytest.raises(ValueError, match="not a jaxrender.fit checkpoint"):
        load_checkpoint(path, one(params, 0))
    single = tmp_path / "s.npz"
    fit(loss_fn, one(params, 0), one(data, 0), OPT, 2, progress=False, checkpoint=single)
    with pytest.raises(ValueError, match="written by jaxrender.fit.fit"):
        load_batched_checkpoint(single, params)


def test_fit_dataset_single_device_and_iterable(ref):
    params, data = problem(7)
    host = {"t": np.asarray(data["t"]), "x0": np.asarray(params["x"])}

    def init(batch):
        return {"x": batch["x0"], "s": jnp.ones(batch["x0"].shape[:1])}

    def loss2(p, d):
        return loss_fn(p, {"t": d["t"]})

    seen = []
    r = fit_dataset(loss2, init, host, OPT, 30, batch_size=3, devices=1, steps_per_call=10,
                    on_group=lambda g, res: seen.append(g))
    assert seen == [0, 1, 2] and r.history["loss"].shape == (30, 7) and r.params["x"].shape == (7, 3)
    assert isinstance(r.params["x"], np.ndarray) and r.num_padded == 3
    np.testing.assert_allclose(r.params["x"], np.asarray(ref.params["x"][:7]), atol=1e-5)
    np.testing.assert_allclose(r.history["loss"], ref.history["loss"][:, :7], rtol=1e-5, atol=1e-6)
    # an iterable of batches; a per-example init broadcast to the batch
    batches = [{"t": host["t"][i:i + 3]} for i in range(0, 7, 3)]
    r2 = fit_dataset(loss_fn, {"x": jnp.zeros(3), "s": jnp.ones(())}, batches, OPT, 5, batch_size=3, devices=1)
    assert r2.params["x"].shape == (7, 3) and r2.history["loss"].shape == (5, 7)
    with pytest.raises(ValueError, match="expected 1..2"):
        fit_dataset(loss_fn, {"x": jnp.zeros(3), "s": jnp.ones(())}, iter(batches), OPT, 5, batch_size=2, devices=1)


# ----------------------------------------------------------------------------
# Multi-device checks (8 fake CPU devices, in a subprocess)
# ----------------------------------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxrender.distributed import batch_mesh, fit_batched, fit_dataset, prefetch_to_mesh, shard_batch
    from jaxrender.fit import Checkpoint
    from tests.test_distributed import OPT, loss_fn, problem

    out = {"n_devices": jax.device_count()}
    diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))

    def run(B, n_dev, steps=30, method="shard_map", **kw):
        params, data = problem(B)
        return fit_batched(loss_fn, params, data, OPT, steps, mesh=batch_mesh(n_dev), method=method,
                           steps_per_call=10, **kw)

    # sharded == single device (the first B rows of one 16-example run); padding: 5 on 8, 11 on 4, 3 on 2
    ref = run(16, 1)
    for B, n, method in [(8, 8, "shard_map"), (8, 8, "jit"), (5, 8, "shard_map"), (5, 8, "jit"), (11, 4, "shard_map"),
                         (3, 2, "shard_map")]:
        r = run(B, n, method=method)
        out[f"eq_{B}_{n}_{method}"] = {
            "params": diff(r.params["x"], ref.params["x"][:B]),
            "best": diff(r.best_params["x"], ref.best_params["x"][:B]),
            "hist": diff(r.history["loss"], ref.history["loss"][:, :B]),
            "best_step_equal": bool((r.best_step == ref.best_step[:B]).all()),
            "shape": list(r.params["x"].shape), "hist_shape": list(r.history["loss"].shape),
            "num_padded": r.num_padded,
        }

    # the padded copies never update: a NaN-producing last example does not leak into padding
    params, data = problem(5)
    data["t"] = data["t"].at[4].set(jnp.nan)
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = fit_batched(loss_fn, params, data, OPT, 5, mesh=batch_mesh(8))
    out["nan_pad"] = {"bad_step": r.bad_step.tolist(), "warned": len(w), "shape": list(r.bad_step.shape)}

    # checkpoint: stop at 10 on 8 devices, resume on 4 devices (re-padded, re-sharded) up to 30
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "ck.npz")
    full = jax.tree_util.tree_map(lambda x: x[:5], {"params": ref.params, "best": ref.best_params, "opt": ref.opt_state})
    a = run(5, 8, steps=30, checkpoint=Checkpoint(path, every=10), callback=lambda s, p, l: s < 10)
    b = run(5, 4, steps=30, checkpoint=Checkpoint(path, every=10), resume=True)
    c = run(5, 8, steps=30, checkpoint=Checkpoint(path, every=10), resume=True)  # already done: no steps
    out["resume"] = {"stopped_at": a.steps_run, "steps": b.steps_run,
                     "params": diff(b.params["x"], full["params"]["x"]), "hist": diff(b.history["loss"], ref.history["loss"][:, :5]),
                     "hist_shape": list(b.history["loss"].shape), "best": diff(b.best_params["x"], full["best"]["x"]),
                     "opt": max(diff(x, y) for x, y in zip(jax.tree_util.tree_leaves(b.opt_state),
                                                         jax.tree_util.tree_leaves(full["opt"]))),
                     "again": diff(c.params["x"], full["params"]["x"]), "again_steps": c.steps_run}

    # placement
    mesh = batch_mesh(8)
    xs, n = shard_batch({"a": np.arange(5.0)}, mesh)
    out["shard_batch"] = {"n": n, "shape": list(xs["a"].shape), "spec": list(xs["a"].sharding.spec),
                          "n_shards": len(xs["a"].addressable_shards)}

    # prefetch: all batches, in order, placed on the sharding, padded
    sizes = [8, 5, 16, 3, 8, 1]
    src = ({"i": np.full((s, 2), k, np.int32), "j": np.arange(s)} for k, s in enumerate(sizes))
    got = []
    for batch, n in prefetch_to_mesh(src, mesh, size=2):
        got.append({"k": int(batch["i"][0, 0]), "n": n, "rows": int(batch["i"].shape[0]),
                    "j": np.asarray(batch["j"]).tolist(), "spec": list(batch["i"].sharding.spec)})
    out["prefetch"] = got

    # fit_dataset on 8 devices (groups of 5, the initial params carried in the data) == the 1-device run
    params, data = problem(11)
    host = {"t": np.asarray(data["t"]), "x0": np.asarray(params["x"])}
    init = lambda batch: {"x": batch["x0"], "s": jnp.ones(batch["x0"].shape[:1])}
    loss2 = lambda p, d: loss_fn(p, {"t": d["t"]})
    kw = dict(batch_size=5, mesh=batch_mesh(8), checkpoint_dir=os.path.join(tmp, "ds"), steps_per_call=10)
    ds = fit_dataset(loss2, init, host, OPT, 30, **kw)
    ds2 = fit_dataset(loss2, init, host, OPT, 30, resume=True, **kw)
    out["dataset"] = {"params": diff(ds.params["x"], ref.params["x"][:11]), "shape": list(ds.params["x"].shape),
                      "hist": diff(ds.history["loss"], ref.history["loss"][:, :11]), "num_padded": ds.num_padded,
                      "files": sorted(os.listdir(os.path.join(tmp, "ds"))),
                      "resumed": diff(ds2.params["x"], ref.params["x"][:11])}
    print("RESULT" + json.dumps(out))
    """
)


def _start_multi():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# Started by the autouse fixture below when the module's first test runs, so the
# subprocess works while the single-process tests run; `multi` waits for it.
_MULTI = {"proc": None}


@pytest.fixture(scope="module")
def multi():
    proc = _MULTI["proc"] or _start_multi()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise AssertionError(f"multi-device subprocess failed:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    line = [l for l in stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module", autouse=True)
def _multi_in_background(request):
    """Start the multi-device subprocess at the start of the module when a test needs it."""
    if any("multi" in getattr(item, "fixturenames", ()) for item in request.session.items):
        _MULTI["proc"] = _start_multi()
    yield
    p = _MULTI["proc"]
    if p is not None and p.poll() is None:
        p.kill()
        p.communicate()


def test_multi_sharded_equals_single_device(multi):
    assert multi["n_devices"] == 8
    for key in ("eq_8_8_shard_map", "eq_8_8_jit", "eq_5_8_shard_map", "eq_5_8_jit", "eq_11_4_shard_map",
                "eq_3_2_shard_map"):
        m = multi[key]
        assert m["params"] <= 1e-5 and m["best"] <= 1e-5 and m["hist"] <= 1e-5, (key, m)
        assert m["best_step_equal"]


def test_multi_padding_and_masking(multi):
    for B, n, padded in [(5, 8, 8), (11, 4, 12), (3, 2, 4), (8, 8, 8)]:
        m = multi[f"eq_{B}_{n}_shard_map"]
        assert m["num_padded"] == padded
        assert m["shape"] == [B, 3] and m["hist_shape"] == [30, B]
    # example 4 is NaN; its 3 padded copies (rows 5..7) must not be reported
    assert multi["nan_pad"] == {"bad_step": [-1, -1, -1, -1, 0], "warned": 1, "shape": [5]}


def test_multi_checkpoint_resume_on_other_device_count(multi):
    m = multi["resume"]
    assert m["stopped_at"] == 10 and m["steps"] == 30 and m["hist_shape"] == [30, 5]
    assert m["params"] <= 1e-5 and m["hist"] <= 1e-5 and m["best"] <= 1e-5 and m["opt"] <= 1e-5, m
    assert m["again_steps"] == 30 and m["again"] <= 1e-5


def test_multi_shard_batch_and_prefetch(multi):
    assert multi["shard_batch"] == {"n": 5, "shape": [8], "spec": ["batch"], "n_shards": 8}
    got = multi["prefetch"]
    sizes = [8, 5, 16, 3, 8, 1]
    assert [g["k"] for g in got] == list(range(len(sizes)))
    assert [g["n"] for g in got] == sizes
    assert [g["rows"] for g in got] == [8, 8, 16, 8, 8, 8]
    assert all(g["spec"] == ["batch"] for g in got)
    assert got[1]["j"] == [0, 1, 2, 3, 4, 4, 4, 4]


def test_multi_fit_dataset(multi):
    m = multi["dataset"]
    assert m["shape"] == [11, 3] and m["num_padded"] == 8
    assert m["params"] <= 1e-5 and m["hist"] <= 1e-5 and m["resumed"] <= 1e-5
    assert m["files"] == ["group_00000.npz", "group_00001.npz", "group_00002.npz"]


def test_prefetch_rejects_unpadded_when_asked():
    mesh = batch_mesh(1)
    items = list(prefetch_to_mesh(iter([{"a": np.zeros(3)}]), mesh, size=1, pad=False))
    assert items[0][1] == 3
    with pytest.raises(ValueError, match="size must be"):
        list(prefetch_to_mesh(iter([]), mesh, size=0))


def test_shared_pytree_with_python_scalars():
    params, data = problem(2)
    shared = {"w": 2.0, "c": jnp.asarray([1.0, 0.0, 0.0]), "name": "x"}

    def lf(p, d, sh):
        return sh["w"] * loss_fn(p, {"t": d["t"] + sh["c"]})

    r = fit_batched(lf, params, data, OPT, 4, devices=1, shared=shared)
    r0 = fit(lambda p, d: lf(p, d, shared), one(params, 1), one(data, 1), OPT, 4, progress=False)
    np.testing.assert_allclose(np.asarray(r.params["x"][1]), np.asarray(r0.params["x"]), atol=1e-6)


@pytest.mark.slow
def test_fit_faces_sharded_matches_fit_faces_batched():
    F = pytest.importorskip("jaxrender.morphable.fitting")
    from jaxrender.data.synthetic_face import synthetic_face_model
    from jaxrender.distributed import fit_faces_sharded
    from jaxrender.raster import RasterSettings

    model = synthetic_face_model(resolution=16, n_id=4, n_exp=2, n_albedo=2)
    cam = F.default_camera(model, 24)
    base = F.init_params(model, cam, None)
    settings = RasterSettings(image_size=(24, 24), faces_per_pixel=1, blur_radius=0.0)

    def target(key):
        p = dict(base, id=0.5 * jax.random.normal(key, base["id"].shape))
        out = F.face_forward(model, p, cam)
        return F.render_face(model, out, cam, settings)[..., :3], out["landmarks_2d"]

    images, lms = jax.jit(jax.vmap(target))(jax.random.split(jax.random.PRNGKey(0), 2))
    params, stages = fit_faces_sharded(model, np.asarray(images), np.asarray(lms), batch_mesh(1), camera=cam,
                                       steps=(6, 3), steps_per_call=3)
    assert set(stages) == {"landmark", "photo"} and stages["photo"].history["photo"].shape == (3, 2)
    assert np.isfinite(stages["landmark"].history["landmark"]).all() and (stages["photo"].bad_step == -1).all()
    # the landmark stage against fit_faces_batched's (the photometric stage is the same loss, rendered)
    ref = F.fit_faces_batched(model, images, lms, camera=cam, steps=(6, 0), steps_per_call=3)
    for k in params:
        np.testing.assert_allclose(np.asarray(stages["landmark"].params[k]), np.asarray(ref.params[k]), atol=1e-4,
                                   err_msg=k)
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())

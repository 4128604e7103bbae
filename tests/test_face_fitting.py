"""Face fitting (jaxrender.morphable.fitting) on a tiny synthetic face model."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrender.data.synthetic_face import synthetic_face_model
from jaxrender.fit import _STEP_CACHE
from jaxrender.morphable import fitting as F
from jaxrender.raster import RasterSettings

SIZE = 40
NO_REG = dict(id=0.0, exp=0.0, tex=0.0)


@pytest.fixture(scope="module")
def model():
    return synthetic_face_model(resolution=20, n_id=6, n_exp=4, n_albedo=4, n_population=12)


@pytest.fixture(scope="module")
def camera(model):
    return F.default_camera(model, SIZE)


def _target(model, camera, seed, pose_deg=15.0):
    rng = np.random.default_rng(seed)
    p = F.init_params(model, camera)
    p.update(
        id=jnp.asarray(rng.uniform(-1, 1, model.num_id), jnp.float32),
        exp=jnp.asarray(rng.uniform(0, 0.5, model.num_exp), jnp.float32),
        tex=jnp.asarray(rng.uniform(-1, 1, model.num_albedo), jnp.float32),
        angles=p["angles"] + jnp.asarray(np.deg2rad(rng.uniform(-pose_deg, pose_deg, 3)), jnp.float32),
        translation=p["translation"] + jnp.asarray(rng.uniform(-0.1, 0.1, 3), jnp.float32),
        gamma=jnp.asarray(np.tile(rng.uniform(-0.1, 0.1, 9), 3), jnp.float32),
    )
    img, lm, _ = _render(model, p, camera)
    image = img[..., :3] + (1 - img[..., 4:5]) * 0.5
    return p, np.asarray(image), np.asarray(lm)


@eqx.filter_jit
def _render(model, p, camera):
    out = F.face_forward(model, p, camera)
    return F.render_face(model, out, camera, RasterSettings(image_size=SIZE)), out["landmarks_2d"], out["vertices_model"]


def _similarity_align(src, dst):
    """``src`` moved onto ``dst`` by the least-squares similarity (Umeyama)."""
    ms, md = src.mean(0), dst.mean(0)
    U, S, Vt = np.linalg.svd((dst - md).T @ (src - ms) / len(src))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt))])
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / (src - ms).var(0).sum()
    return s * (src - ms) @ R.T + md


def test_landmark_fit_recovers_pose_and_identity(model, camera, monkeypatch):
    traces = []
    face_loss = F.face_loss

    def counting_face_loss(*args, **kwargs):
        traces.append(1)
        return face_loss(*args, **kwargs)

    monkeypatch.setattr(F, "face_loss", counting_face_loss)
    _STEP_CACHE.clear()
    for seed in (0, 7):
        p, image, lm = _target(model, camera, seed)
        r = F.fit_face(model, image, lm, camera=camera, steps=(200, 0), weights=NO_REG, lr=dict(id=0.1, exp=0.1))
        if seed == 0:
            n_first = len(traces)
        assert set(r.stages) == {"landmark"}
        err = np.linalg.norm(np.asarray(r.landmarks_2d) - lm, axis=1).mean()
        assert err < 0.1, (seed, err)
        np.testing.assert_allclose(np.asarray(r.params["angles"]), np.asarray(p["angles"]), atol=np.deg2rad(3.0))
        # shape in the model frame (landmarks alone leave some of it free): within 5% of the face size
        v_true = _render(model, p, camera)[2]
        verr = np.linalg.norm(np.asarray(r.vertices_model - v_true), axis=1).mean() / r.unit
        assert verr < 0.05, (seed, verr)
        assert r.coeffs.shape == (model.num_id + model.num_exp + model.num_albedo + 38,)
    # the second image reused the first one's compiled fit step (its loss was not traced again)
    assert n_first > 0 and len(traces) == n_first


def test_photometric_stage_lowers_loss(model, camera):
    _, image, lm = _target(model, camera, 1)
    r = F.fit_face(model, image, lm, camera=camera, steps=(60, 30))
    h = r.stages["photo"].history
    assert np.all(np.isfinite(h["loss"]))
    assert h["photo"][-1] < 0.8 * h["photo"][0]
    assert r.stages["photo"].final_loss < h["loss"][0]
    assert r.image.shape == (SIZE, SIZE, 5)


@pytest.mark.parametrize("steps", [(20, 0), pytest.param((20, 5), marks=pytest.mark.slow)])  # slow: ~70 s on 2 cores
def test_batched_equals_per_image(model, camera, steps):
    targets = [_target(model, camera, s) for s in (2, 3)]
    images = np.stack([t[1] for t in targets])
    lms = np.stack([t[2] for t in targets])
    kw = dict(camera=camera, steps=steps, steps_per_call=20)
    rb = F.fit_faces_batched(model, images, lms, **kw)
    for i in range(1):  # the second image is fitted alongside; one per-image fit is enough to compare
        ri = F.fit_face(model, images[i], lms[i], **kw)
        for k in ri.params:
            np.testing.assert_allclose(np.asarray(rb.params[k][i]), np.asarray(ri.params[k]), rtol=1e-3, atol=2e-4,
                                       err_msg=k)


def test_track_face_three_frames(model, camera):
    p0, _, _ = _target(model, camera, 4)
    frames, lms, truth = [], [], []
    for t in range(3):
        p = dict(p0)
        p["angles"] = p0["angles"] + jnp.array([0.0, 0.05 * t, 0.0])
        p["exp"] = p0["exp"] * (1.0 + 0.2 * t)
        img, lm, vm = _render(model, p, camera)
        frames.append(np.asarray(img[..., :3] + (1 - img[..., 4:5]) * 0.5))
        lms.append(np.asarray(lm))
        truth.append(np.asarray(vm))
    # the key-frame fit has a (short) photometric stage; the windows track from landmarks only
    r = F.track_face(model, np.stack(frames), np.stack(lms), camera=camera, steps=(150, 0),
                     keyframe_steps=(150, 3), num_keyframes=2,
                     window=2, weights=dict(NO_REG, smooth=0.1))
    assert r.vertices.shape == (3, model.num_vertices, 3)
    assert r.params["id"].shape == (model.num_id,) and r.params["exp"].shape == (3, model.num_exp)
    err = np.linalg.norm(np.asarray(r.landmarks_2d) - np.stack(lms), axis=-1).mean()
    assert err < 0.5, err
    # shape up to a similarity: a bigger head further away projects the same landmarks
    for t in range(3):
        vf, vt = np.asarray(r.vertices_model[t]), truth[t]
        verr = np.linalg.norm(_similarity_align(vf, vt) - vt, axis=-1).mean() / F._unit(model)
        assert verr < 0.08, (t, verr)
    assert any(k.startswith("frames 2-2") for k in r.stages)  # second window ran, warm-started


def test_loss_jit_vmap(model, camera):
    targets = [_target(model, camera, s) for s in (5, 6)]
    data = dict(camera=camera, image=jnp.stack([t[1] for t in targets]), mask=jnp.ones((2, SIZE, SIZE)),
                landmarks=jnp.stack([t[2] for t in targets]), lm_weights=F.landmark_weights(68), unit=F._unit(model))
    params = jax.vmap(lambda l: F.init_params(model, camera, l))(data["landmarks"])
    st = RasterSettings(image_size=SIZE)
    w = F.DEFAULT_WEIGHTS
    axes = dict(camera=None, image=0, mask=0, landmarks=0, lm_weights=None, unit=None)
    f = jax.jit(jax.vmap(lambda p, d: F.face_loss(model, p, d, w, st)[0], in_axes=(0, axes)))
    batched = np.asarray(f(params, data))
    single = jax.jit(lambda p, d: F.face_loss(model, p, d, w, st)[0])
    for i in range(2):
        di = {k: (v[i] if axes[k] == 0 else v) for k, v in data.items()}
        pi = {k: v[i] for k, v in params.items()}
        np.testing.assert_allclose(batched[i], float(single(pi, di)), rtol=1e-5)
    g = jax.jit(jax.grad(lambda p: jnp.sum(f(p, data))))(params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g))


def test_bad_inputs(model, camera):
    with pytest.raises(ValueError, match="landmarks"):
        F.fit_faces_batched(model, np.zeros((1, SIZE, SIZE, 3)), np.zeros((1, 5, 2)), camera=camera, steps=(1, 0))
    with pytest.raises(ValueError, match="camera"):
        F.fit_face(model, np.zeros((SIZE + 1, SIZE, 3)), camera=camera, steps=(0, 1))
    with pytest.raises(ValueError, match="unknown loss weights"):
        F.fit_face(model, np.zeros((SIZE, SIZE, 3)), camera=camera, steps=(0, 1), weights=dict(foo=1.0))


def test_track_face_warm_start_from_interpolated_keyframes():
    pk = {k: jnp.arange(3.0)[:, None] * jnp.ones((3, 2)) for k in ("exp", "angles", "translation", "gamma")}
    p = F._interpolate_keyframes(pk, np.array([0, 4, 8]), np.arange(10))
    np.testing.assert_allclose(np.asarray(p["angles"][:, 0]), [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2], rtol=1e-5)
    one = F._interpolate_keyframes({k: v[:1] for k, v in pk.items()}, np.array([3]), np.arange(3))
    np.testing.assert_allclose(np.asarray(one["exp"]), 0.0)
    # angles take the shorter way round: from 3.1 to -3.1 through pi, not through 0
    pa = dict(pk, angles=jnp.array([[3.1], [-3.1]]))
    mid = F._interpolate_keyframes({k: v[:2] for k, v in pa.items()}, np.array([0, 2]), np.array([1]))["angles"]
    assert abs(abs(float(mid[0, 0])) - np.pi) < 1e-5, mid
    with pytest.raises(ValueError, match="warm_start"):
        F.track_face(None, np.zeros((1, SIZE, SIZE, 3)), np.zeros((1, 68, 2)), warm_start="nearest")

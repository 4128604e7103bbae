"""The procedural face model: determinism, sizes, semantic landmarks, a sane
geometry and albedo, expressions that do what their names say, and a round
trip through the Basel Face Model file layout."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrender.morphable as M
from jaxrender.data import synthetic_face as sf
from jaxrender.data.synthetic_face import EXPRESSION_NAMES, synthetic_face_model

RES = 40  # small and fast for most tests


@pytest.fixture(scope="module")
def model():
    return synthetic_face_model(resolution=RES, n_id=10, n_exp=len(EXPRESSION_NAMES), n_albedo=6, n_population=30)


def test_default_model_build_time_and_size():
    sf._build.cache_clear()
    t0 = time.perf_counter()
    m = synthetic_face_model()
    dt = time.perf_counter() - t0
    assert 15_000 < m.num_vertices < 25_000
    assert (m.num_id, m.num_exp, m.num_albedo, m.num_landmarks) == (40, len(EXPRESSION_NAMES), 20, 68)
    # < 3 s on an idle 2-core CPU; allow slack for loaded CI machines
    assert dt < 8.0, f"default synthetic face took {dt:.1f} s"
    t0 = time.perf_counter()
    assert synthetic_face_model() is not None  # cached
    assert time.perf_counter() - t0 < 0.5


def test_resolution_controls_vertex_count():
    small = synthetic_face_model(resolution=48, n_population=10, n_id=5, n_albedo=5)
    assert 4_000 < small.num_vertices < 6_500
    assert small.num_faces == 2 * small.num_vertices - 12  # three closed surfaces: head + two eyeballs
    # the largest setting documented (~50k) follows the same count formula
    head = 2 * 156 ** 2 + 2
    assert 45_000 < head < 55_000


def test_deterministic_and_seeded(model):
    again = sf._build.__wrapped__(RES, 10, len(EXPRESSION_NAMES), 6, 0, 30)
    np.testing.assert_array_equal(np.asarray(model.id_basis), again["id_basis"])
    np.testing.assert_array_equal(np.asarray(model.albedo_basis), again["albedo_basis"])
    other = sf._build.__wrapped__(RES, 10, len(EXPRESSION_NAMES), 6, 1, 30)
    assert np.abs(other["id_basis"] - again["id_basis"]).max() > 1e-3


def test_geometry_is_a_closed_outward_head(model):
    v, f = np.asarray(model.mean_shape, np.float64), np.asarray(model.faces)
    # every edge is shared by exactly two faces (closed, manifold)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    assert (counts == 2).all()
    # outward winding: positive signed volume of each closed part
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert vol > 0
    # millimetres, face looking along +z, y up
    ext = v.max(0) - v.min(0)
    assert 130 < ext[0] < 200 and 250 < ext[1] < 400 and 170 < ext[2] < 260
    n = M.vertex_normals(model, model.mean_shape)
    assert np.isfinite(np.asarray(n)).all()


def test_landmarks_are_semantic(model):
    lm = np.asarray(M.landmarks(model, model.mean_shape))
    x, y, z = lm[:, 0], lm[:, 1], lm[:, 2]
    assert lm.shape == (68, 3) and len(set(np.asarray(model.landmark_indices).tolist())) >= 60
    assert np.argmax(z) in (30, 31, 32, 33, 34, 35, 29)  # the nose tip region sticks out most
    assert np.argmin(y[:17]) in (7, 8, 9)  # chin at the bottom of the jaw line
    assert x[0] < -40 and x[16] > 40  # jaw from the subject's right (-x) to left
    assert (x[36:42] < 0).all() and (x[42:48] > 0).all()  # right eye at -x, left eye at +x
    assert y[17:27].min() > y[36:48].max()  # brows above the eyes
    assert y[36:48].min() > y[30] > y[48:68].max()  # eyes above the nose tip above the mouth
    assert y[51] > y[57]  # upper lip above the lower lip
    assert x[48] < x[54]  # mouth corners
    assert model.landmark_names[0] == "jaw_00" and model.landmark_names[67] == "inner_lip_7"


def test_albedo_reads_as_a_face(model):
    a = np.asarray(model.mean_albedo)
    assert a.min() >= 0 and a.max() <= 1
    lm = np.asarray(model.landmark_indices)
    skin = a[lm[[1, 2, 3, 14, 15]]].mean(0)
    v = np.asarray(model.mean_shape)
    lm_v = v[lm]
    on_lips = []
    for top, bottom in ((51, 62), (66, 57)):  # midway between the outer and inner lip contours
        target = 0.5 * (lm_v[top, :2] + lm_v[bottom, :2])
        d = ((v[:, :2] - target) ** 2).sum(1) - 1e3 * (v[:, 2] > 60)
        on_lips.append(np.argmin(d))
    lips = a[on_lips].mean(0)
    assert skin[0] > skin[1] > skin[2]  # warm skin
    assert lips[0] / lips[1] > skin[0] / skin[1]  # lips redder than skin
    (l0, l1), (r0, r1) = model.eye_ranges
    eye = a[l0:l1]
    assert eye.max() > 0.8 and eye.min() < 0.1  # white sclera and a dark pupil
    assert set(model.masks) == {"face", "skin", "eyes"}
    # PCA: variances sorted, components orthogonal with squared norm = variance
    for b, var in ((model.id_basis, model.id_variance), (model.albedo_basis, model.albedo_variance)):
        var = np.asarray(var)
        assert (np.diff(var) <= 1e-6 * var[0]).all()
        B = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
        G = B.T @ B
        np.testing.assert_allclose(np.diag(G), var, rtol=1e-3)
        assert np.abs(G - np.diag(np.diag(G))).max() < 1e-3 * var[0]


def test_expressions_do_what_they_say(model):
    v0 = np.asarray(model.mean_shape)
    lm = np.asarray(model.landmark_indices)

    def moved(name, amount=1.0):
        e = np.zeros(model.num_exp)
        e[EXPRESSION_NAMES.index(name)] = amount
        return np.asarray(M.shape(model, None, e))

    v = moved("jaw_open")
    assert v[lm[57], 1] < v0[lm[57], 1] - 8  # the lower lip drops
    assert v[lm[8], 1] < v0[lm[8], 1] - 3  # the chin too
    assert abs(v[lm[51], 1] - v0[lm[51], 1]) < 1.0  # the upper lip stays
    assert abs(v[lm[27], 1] - v0[lm[27], 1]) < 0.5  # nose bridge stays
    v = moved("smile")
    assert v[lm[48], 1] > v0[lm[48], 1] + 2 and v[lm[54], 1] > v0[lm[54], 1] + 2  # mouth corners up
    v = moved("brow_raise")
    assert (v[lm[17:27], 1] > v0[lm[17:27], 1] + 2).all()
    (l0, l1), (r0, r1) = model.eye_ranges
    v = moved("blink_left")
    eye_front_z = v0[l0:l1, 2].max()
    near_left = (np.abs(v0[:l0, 0] - v0[l0:l1, 0].mean()) < 3) & (np.abs(v0[:l0, 1] - v0[l0:l1, 1].mean()) < 2) & (v0[:l0, 2] > 0)
    assert (v0[:l0][near_left, 2] < eye_front_z).any()  # open: the eyeball shows through the lids
    assert (v[:l0][near_left, 2] > eye_front_z).all()  # closed: the lid covers it
    np.testing.assert_array_equal(moved("blink_left")[r0:r1], v0[r0:r1])
    v = moved("pucker")
    assert v[lm[62], 2] > v0[lm[62], 2] + 3


def test_works_with_jit_vmap_and_faceverse(model):
    ids = jnp.asarray(np.random.default_rng(0).normal(size=(3, model.num_id)), jnp.float32)
    vs = jax.jit(jax.vmap(M.shape, in_axes=(None, 0)))(model, ids)
    assert vs.shape == (3, model.num_vertices, 3)
    # decimetres and the FaceVerse camera: rotated upright, the face lands in the image
    m = synthetic_face_model(resolution=RES, n_id=10, n_exp=len(EXPRESSION_NAMES), n_albedo=6, n_population=30, scale=0.01)
    from jaxrender.morphable import faceverse as fv

    c = np.zeros(fv.num_coeffs(m), np.float32)
    c[-1] = 1
    n_all = m.num_id + m.num_exp + m.num_albedo
    c[n_all + 2] = np.pi
    out = fv.faceverse_forward(m, jnp.asarray(c))
    l2 = np.asarray(out["landmarks_2d"])
    assert (l2 > 0).all() and (l2 < 512).all()
    assert l2[8, 1] > l2[27, 1]  # chin below the nose bridge in the image
    assert l2[36, 0] < l2[45, 0]  # subject's right eye on the image's left


def test_bfm_roundtrip(model, tmp_path):
    M.save_bfm(model, tmp_path / "synthetic.h5")
    r = M.load_bfm(tmp_path / "synthetic.h5")
    for k in ("mean_shape", "id_basis", "exp_basis", "mean_albedo", "albedo_basis", "faces", "landmark_indices"):
        np.testing.assert_allclose(getattr(r, k), getattr(model, k), rtol=1e-4, atol=1e-4, err_msg=k)
    np.testing.assert_allclose(r.id_variance, model.id_variance, rtol=1e-4)
    assert r.eye_ranges == model.eye_ranges and r.landmark_names == model.landmark_names
    assert set(r.masks) == set(model.masks)
    np.testing.assert_allclose(r.uvs, model.uvs)
    np.testing.assert_array_equal(r.face_uvs, model.face_uvs)


def test_uvs_are_consistent(model):
    uv, fuv, f = np.asarray(model.uvs), np.asarray(model.face_uvs), np.asarray(model.faces)
    assert fuv.shape == f.shape and uv.min() >= 0 and uv.max() <= 1
    # each vertex has one UV, except on the seam at the back of the head (two)
    pairs = np.unique(np.stack([f.reshape(-1), fuv.reshape(-1)], 1), axis=0)
    per_vertex = np.bincount(pairs[:, 0], minlength=model.num_vertices)
    assert per_vertex.max() <= 2 and (per_vertex == 2).sum() < 0.05 * model.num_vertices
    # UV triangles of the head do not fold over: one orientation, as seen from outside
    (l0, _), _ = model.eye_ranges
    head = (f < l0).all(1)
    t = uv[fuv[head]]
    area = (t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1]) - (t[:, 2, 0] - t[:, 0, 0]) * (t[:, 1, 1] - t[:, 0, 1])
    nondeg = np.abs(area) > 1e-12
    assert (np.sign(area[nondeg]) == np.sign(area[nondeg][0])).all()
    # the face is at the centre of the texture
    nose = np.asarray(model.landmark_indices)[30]
    nose_uv = uv[fuv[np.nonzero(f == nose)]][0]
    assert abs(nose_uv[0] - 0.5) < 0.05


@pytest.mark.slow
def test_renders_as_a_face(model):
    """A small render with the library's rasterizer: skin in the middle, dark
    pupils at the eye landmarks, background around the head."""
    from jaxrender.camera import look_at, project
    from jaxrender.render import render_mesh

    S = 64
    cam = look_at(eye=(0.0, -20.0, 900.0), target=(0.0, -20.0, 0.0), fov_y_deg=25.0, width=S, height=S, znear=10.0, zfar=2000.0)
    mesh = M.to_mesh(model, model.mean_shape, model.mean_albedo)
    img = np.asarray(render_mesh(mesh, cam, shading="unlit", hard=True))
    assert img.shape == (S, S, 4)
    cover = img[..., 3] > 0.5
    assert 0.15 < cover.mean() < 0.7 and not cover[0, 0] and not cover[0, -1]
    px = np.asarray(project(cam, M.landmarks(model, model.mean_shape)))[:, :2]
    skin = img[int(px[29, 1] * 0 + px[1, 1]), int(0.5 * (px[1, 0] + px[31, 0]))][:3]  # a cheek
    assert skin[0] > skin[2] + 0.1  # warm skin, not background white
    pupil = img[int(px[36:42, 1].mean()), int(px[36:42, 0].mean())][:3]
    assert pupil.mean() < skin.mean() - 0.2

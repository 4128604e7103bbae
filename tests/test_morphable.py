"""MorphableModel evaluation, the FaceVerse forward pass and FLAME skinning,
checked against independent NumPy evaluations of the formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrender.morphable as M
from jaxrender.morphable import faceverse as fv
from jaxrender.morphable.flame import FlameModel, flame_forward

from .helpers import check_grad


def _random_model(rng, V=40, ki=5, ke=4, ka=3, L=6, eyes=True, dtype=np.float32):
    """A small random closed-ish mesh with two 'eyeball' vertex blocks at the end."""
    mean = rng.normal(size=(V, 3))
    faces = np.stack([rng.permutation(V)[:3] for _ in range(2 * V)]).astype(np.int32)
    eye_ranges = ((V - 8, V - 4), (V - 4, V)) if eyes else None
    return M.MorphableModel(
        mean.astype(dtype), (0.1 * rng.normal(size=(V, 3, ki))).astype(dtype), (0.1 * rng.normal(size=(V, 3, ke))).astype(dtype),
        rng.uniform(0.2, 0.8, size=(V, 3)).astype(dtype), (0.05 * rng.normal(size=(V, 3, ka))).astype(dtype), faces,
        rng.choice(V - 8, size=L, replace=False), eye_ranges=eye_ranges,
    )


def _np_normals(v, f):
    # FaceVerse's compute_norm: (v1 - v2) x (v2 - v3) summed over incident faces
    fn = np.cross(v[f[:, 0]] - v[f[:, 1]], v[f[:, 1]] - v[f[:, 2]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


# ----------------------------------------------------------------------------
# MorphableModel


def test_constructor_validates_and_names_fields(rng):
    m = _random_model(rng)
    V = m.num_vertices
    assert (m.num_id, m.num_exp, m.num_albedo, m.num_landmarks) == (5, 4, 3, 6)
    assert m.faces.dtype == jnp.int32 and m.landmark_indices.dtype == jnp.int32
    with pytest.raises(ValueError, match="id_basis"):
        M.MorphableModel(m.mean_shape, np.zeros((V, 2, 3)), None, None, None, m.faces)
    with pytest.raises(ValueError, match="mean_albedo"):
        M.MorphableModel(m.mean_shape, None, None, np.zeros((V + 1, 3)), None, m.faces)
    with pytest.raises(IndexError, match="landmark_indices"):
        M.MorphableModel(m.mean_shape, None, None, None, None, m.faces, [0, V])
    with pytest.raises(IndexError, match="faces"):
        M.MorphableModel(m.mean_shape, None, None, None, None, np.array([[0, 1, V]]))
    with pytest.raises(ValueError, match="eye_ranges"):
        M.MorphableModel(m.mean_shape, None, None, None, None, m.faces, eye_ranges=((0, 5), (5, V + 1)))
    with pytest.raises(ValueError, match="id_variance"):
        M.MorphableModel(m.mean_shape, m.id_basis, None, None, None, m.faces, id_variance=np.ones(2))
    # flat (3V, K) bases are accepted
    flat = M.MorphableModel(m.mean_shape, np.asarray(m.id_basis).reshape(3 * V, -1), None, None, None, m.faces)
    np.testing.assert_array_equal(flat.id_basis, m.id_basis)
    m16 = m.astype(jnp.float16)
    assert m16.id_basis.dtype == jnp.float16 and m16.faces.dtype == jnp.int32 and m16.eye_ranges == m.eye_ranges


def test_shape_albedo_landmarks_match_numpy(rng):
    m = _random_model(rng)
    a, e, t = rng.normal(size=5), rng.normal(size=4), rng.normal(size=3)
    v = np.asarray(m.mean_shape) + np.asarray(m.id_basis) @ a + np.asarray(m.exp_basis) @ e
    np.testing.assert_allclose(M.shape(m, a, e), v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(M.shape(m), m.mean_shape)
    # fewer coefficients use the first basis vectors
    np.testing.assert_allclose(M.shape(m, a[:2]), np.asarray(m.mean_shape) + np.asarray(m.id_basis)[..., :2] @ a[:2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="id_coeffs"):
        M.shape(m, np.zeros(6))
    alb = np.asarray(m.mean_albedo) + np.asarray(m.albedo_basis) @ t
    np.testing.assert_allclose(M.albedo(m, t), alb, rtol=1e-5, atol=1e-6)
    assert float(M.albedo(m, 100 * t, clip=True).max()) <= 1.0
    np.testing.assert_allclose(M.landmarks(m, v), v[np.asarray(m.landmark_indices)], rtol=1e-6)
    n = M.vertex_normals(m, jnp.asarray(v))
    used = np.unique(np.asarray(m.faces))
    np.testing.assert_allclose(np.asarray(n)[used], _np_normals(v, np.asarray(m.faces))[used], rtol=1e-4, atol=1e-4)
    mesh = M.to_mesh(m, v)
    assert mesh.vertices.shape == v.shape


def test_model_functions_jit_vmap(rng):
    m = _random_model(rng)
    ids, exps, texs = rng.normal(size=(4, 5)), rng.normal(size=(4, 4)), rng.normal(size=(4, 3))
    f = jax.jit(lambda m, a, e: M.landmarks(m, M.shape(m, a, e)))
    batched = jax.vmap(f, in_axes=(None, 0, 0))(m, ids, exps)
    for i in range(4):
        np.testing.assert_allclose(batched[i], f(m, ids[i], exps[i]), rtol=1e-5, atol=1e-6)
    alb = jax.vmap(jax.jit(M.albedo), in_axes=(None, 0))(m, texs)
    assert alb.shape == (4, m.num_vertices, 3)
    nrm = jax.vmap(M.vertex_normals, in_axes=(None, 0))(m, jax.vmap(M.shape, in_axes=(None, 0, 0))(m, ids, exps))
    assert nrm.shape == (4, m.num_vertices, 3) and np.isfinite(np.asarray(nrm)).all()


def test_model_functions_grad(rng, x64):
    m = _random_model(rng, dtype=np.float64)
    w = rng.normal(size=(m.num_vertices, 3))
    check_grad(jax.jit(lambda a: jnp.sum(w * M.shape(m, a, jnp.ones(4)))), rng.normal(size=5))
    check_grad(jax.jit(lambda t: jnp.sum(w * M.albedo(m, t))), rng.normal(size=3))
    check_grad(jax.jit(lambda e: jnp.sum(w[:6] * M.landmarks(m, M.vertex_normals(m, M.shape(m, None, e))))), 0.5 * rng.normal(size=4))


# ----------------------------------------------------------------------------
# FaceVerse forward pass, against the reference formulas in NumPy


def _rx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _np_faceverse(m, coeffs, focal=1315.0, size=512, dist=10.0):
    """FaceVerse v3's forward math, written out with row vectors as in the reference."""
    ki, ke, ka = m.num_id, m.num_exp, m.num_albedo
    n_all = ki + ke + ka
    c = np.asarray(coeffs, np.float64)
    idc, exc, txc = c[:ki], c[ki:ki + ke], c[ki + ke:n_all]
    ang, gam, trn = c[n_all:n_all + 3], c[n_all + 3:n_all + 30], c[n_all + 30:n_all + 33]
    eye, scl = c[n_all + 33:n_all + 37], (c[n_all + 37] if c.size == n_all + 38 else 1.0)
    idB = np.asarray(m.id_basis, np.float64).reshape(-1, ki)
    exB = np.asarray(m.exp_basis, np.float64).reshape(-1, ke)
    mean = np.asarray(m.mean_shape, np.float64).reshape(-1)
    vs = (idB @ idc + exB @ exc + mean).reshape(-1, 3)
    rot = (_rz(ang[2]) @ _ry(ang[1]) @ _rx(ang[0])).T  # applied as v @ rot
    id_only = (idB @ idc + mean).reshape(-1, 3)
    for k, (a, b) in enumerate(m.eye_ranges):
        e = id_only[a:b].copy()
        e[:, 2] += 0.005
        centre = e.mean(0, keepdims=True)
        emat = (_ry(eye[2 * k + 1]) @ _rx(eye[2 * k])).T
        vs[a:b] = (vs[a:b] - centre) @ emat + centre
    vs_t = (vs * abs(scl)) @ rot + trn
    tex = (np.asarray(m.albedo_basis, np.float64).reshape(-1, ka) @ txc + np.asarray(m.mean_albedo, np.float64).reshape(-1)).reshape(-1, 3)
    n = _np_normals(vs, np.asarray(m.faces)) @ rot
    g = gam.reshape(3, 9).copy()
    g[:, 0] += 0.8
    a0, a1, a2 = np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0)
    c0, c1, c2 = 1 / np.sqrt(4 * np.pi), np.sqrt(3.0) / np.sqrt(4 * np.pi), 3 * np.sqrt(5.0) / np.sqrt(12 * np.pi)
    d0 = 0.5 / np.sqrt(3.0)
    nx, ny, nz = n[:, 0], n[:, 1], n[:, 2]
    H = np.stack([a0 * c0 * np.ones_like(nx), -a1 * c1 * ny, a1 * c1 * nz, -a1 * c1 * nx, a2 * c2 * nx * ny,
                  -a2 * c2 * ny * nz, a2 * c2 * d0 * (3 * nz ** 2 - 1), -a2 * c2 * nx * nz, a2 * c2 * 0.5 * (nx ** 2 - ny ** 2)], 1)
    color = tex * (H @ g.T)
    lms = vs_t[np.asarray(m.landmark_indices)]
    cam = lms @ np.diag([-1.0, 1.0, -1.0]) + np.array([0, 0, dist])
    K = np.array([[focal, 0, size // 2], [0, focal, size // 2], [0, 0, 1.0]])
    proj = cam @ K.T
    return dict(vertices=vs_t, colors=color, albedo=tex, landmarks_2d=proj[:, :2] / proj[:, 2:], normals=n, vertices_model=vs)


def _random_coeffs(m, rng, with_scale=True):
    c = 0.3 * rng.normal(size=fv.num_coeffs(m, with_scale))
    n_all = m.num_id + m.num_exp + m.num_albedo
    c[n_all + 30:n_all + 33] = [0.1, -0.2, 0.5]  # keep the face in front of the camera
    if with_scale:
        c[-1] = 1.1
    return c


def test_split_merge_roundtrip(rng):
    m = _random_model(rng)
    D = fv.num_coeffs(m)
    assert D == 5 + 4 + 3 + 3 + 27 + 3 + 4 + 1
    c = rng.normal(size=D).astype(np.float32)
    p = fv.split_coeffs(m, c)
    assert [x.shape[-1] for x in p] == [5, 4, 3, 3, 27, 3, 4, 1]
    np.testing.assert_array_equal(p.gamma, c[15:42])
    np.testing.assert_array_equal(fv.merge_coeffs(*p), c)
    p2 = fv.split_coeffs(m, c[:-1])  # no scale -> 1
    assert float(p2.scale[0]) == 1.0
    np.testing.assert_array_equal(fv.merge_coeffs(*p2)[:-1], c[:-1])
    batch = rng.normal(size=(3, D)).astype(np.float32)
    np.testing.assert_array_equal(fv.merge_coeffs(*fv.split_coeffs(m, batch)), batch)
    with pytest.raises(ValueError, match="coeffs must have"):
        fv.split_coeffs(m, np.zeros(D + 1))
    z = fv.zero_coeffs(m)
    assert z.shape == (D,) and float(z[-1]) == 1.0 and float(jnp.abs(z[:-1]).sum()) == 0
    # jit / vmap
    rt = jax.jit(jax.vmap(lambda x: fv.merge_coeffs(*fv.split_coeffs(m, x))))(batch)
    np.testing.assert_array_equal(rt, batch)
    g = jax.grad(lambda x: jnp.sum(fv.split_coeffs(m, x).gamma ** 2))(jnp.asarray(c))
    np.testing.assert_allclose(g[15:42], 2 * c[15:42], rtol=1e-6)
    assert float(jnp.abs(g[:15]).sum() + jnp.abs(g[42:]).sum()) == 0


@pytest.mark.parametrize("with_scale", [True, False])
def test_faceverse_forward_matches_reference(rng, with_scale):
    m = _random_model(rng)
    c = _random_coeffs(m, rng, with_scale)
    out = fv.faceverse_forward(m, jnp.asarray(c, jnp.float32))
    ref = _np_faceverse(m, c)
    for k in ("vertices", "vertices_model", "albedo", "colors", "normals"):
        np.testing.assert_allclose(out[k], ref[k], rtol=2e-4, atol=2e-4, err_msg=k)
    np.testing.assert_allclose(out["landmarks_2d"], ref["landmarks_2d"], rtol=1e-4, atol=5e-2)
    np.testing.assert_allclose(out["landmarks_3d"], ref["vertices"][np.asarray(m.landmark_indices)], rtol=2e-4, atol=2e-4)


def test_faceverse_forward_custom_camera(rng):
    from jaxrender.camera import look_at, project

    m = _random_model(rng)
    c = _random_coeffs(m, rng)
    cam = look_at(eye=(1.0, 2.0, 12.0), target=(0.0, 0.0, 0.0), fov_y_deg=30.0, width=200, height=100)
    out = fv.faceverse_forward(m, c, camera=cam)
    np.testing.assert_allclose(out["landmarks_2d"], project(cam, out["landmarks_3d"])[:, :2], rtol=1e-6)
    assert out["camera"] is cam


def test_faceverse_eyes_rotate_only_eyeballs(rng):
    m = _random_model(rng)
    c = np.zeros(fv.num_coeffs(m))
    c[-1] = 1
    base = fv.faceverse_forward(m, c)["vertices_model"]
    c[-5:-1] = [0.3, -0.2, 0.1, 0.4]
    moved = fv.faceverse_forward(m, c)["vertices_model"]
    (l0, l1), (r0, r1) = m.eye_ranges
    np.testing.assert_allclose(moved[:l0], base[:l0])
    assert float(jnp.abs(moved[l0:r1] - base[l0:r1]).max()) > 1e-3
    # a rotation about the eye centre keeps distances to it
    centre = fv.eye_centers(m, jnp.zeros(m.num_id))[0]
    np.testing.assert_allclose(jnp.linalg.norm(moved[l0:l1] - centre, axis=1), jnp.linalg.norm(base[l0:l1] - centre, axis=1), rtol=1e-5)


def test_faceverse_forward_jit_vmap(rng):
    m = _random_model(rng)
    cs = np.stack([_random_coeffs(m, rng) for _ in range(3)]).astype(np.float32)
    f = jax.jit(fv.faceverse_forward)
    out = jax.vmap(f, in_axes=(None, 0))(m, cs)
    assert out["vertices"].shape == (3, m.num_vertices, 3) and out["landmarks_2d"].shape == (3, 6, 2)
    for i in range(3):
        ref = _np_faceverse(m, cs[i])
        np.testing.assert_allclose(out["colors"][i], ref["colors"], rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(out["landmarks_2d"][i], ref["landmarks_2d"], rtol=1e-4, atol=5e-2)


def test_faceverse_forward_grad(rng, x64):
    m = _random_model(rng, dtype=np.float64)
    c0 = _random_coeffs(m, rng)
    w1 = rng.normal(size=(6, 2))
    w2 = rng.normal(size=(m.num_vertices, 3))

    def loss(c):
        out = fv.faceverse_forward(m, c)
        return jnp.sum(w1 * out["landmarks_2d"]) * 1e-3 + jnp.sum(w2 * out["colors"])

    check_grad(jax.jit(loss), c0, rtol=1e-4)


# ----------------------------------------------------------------------------
# FLAME forward (linear blend skinning) against NumPy


def _rodrigues(w):
    t = np.linalg.norm(w)
    if t < 1e-12:
        return np.eye(3)
    k = w / t
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def _np_flame(d, shape, expr, pose, n_shape):
    v = d["v_template"] + d["shapedirs"][..., :len(shape)] @ shape + d["shapedirs"][..., n_shape:n_shape + len(expr)] @ expr
    J = d["J_regressor"] @ v
    Rs = [_rodrigues(p) for p in pose]
    feat = np.concatenate([(R - np.eye(3)).ravel() for R in Rs[1:]])
    vp = v + d["posedirs"] @ feat
    parents = d["kintree_table"][0]
    G = []
    for k in range(len(Rs)):
        T = np.eye(4)
        T[:3, :3] = Rs[k]
        T[:3, 3] = J[k] - (J[parents[k]] if k else 0)
        G.append(T if k == 0 else G[parents[k]] @ T)
    out = np.zeros_like(vp)
    for k, T in enumerate(G):
        A = T.copy()
        A[:3, 3] -= T[:3, :3] @ J[k]
        out += d["weights"][:, k:k + 1] * (vp @ A[:3, :3].T + A[:3, 3])
    return out


def _fake_flame_dict(rng, V=30, n_shape=6, n_exp=4):
    w = rng.uniform(size=(V, 5))
    return {
        "v_template": rng.normal(size=(V, 3)),
        "shapedirs": 0.1 * rng.normal(size=(V, 3, n_shape + n_exp)),
        "posedirs": 0.05 * rng.normal(size=(V, 3, 36)),
        "J_regressor": rng.uniform(size=(5, V)) / V,
        "weights": w / w.sum(1, keepdims=True),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "f": np.stack([rng.permutation(V)[:3] for _ in range(40)]).astype(np.uint32),
    }


def _flame_model(d, n_shape=6, dtype=np.float32):
    c = lambda k: jnp.asarray(np.asarray(d[k], dtype))  # noqa: E731
    return FlameModel(c("v_template"), jnp.asarray(d["shapedirs"][..., :n_shape].astype(dtype)),
                      jnp.asarray(d["shapedirs"][..., n_shape:].astype(dtype)), c("posedirs"), c("J_regressor"),
                      c("weights"), jnp.asarray(d["f"].astype(np.int32)), (-1, 0, 1, 1, 1))


def test_flame_forward_matches_numpy(rng):
    d = _fake_flame_dict(rng)
    m = _flame_model(d)
    s, e, p = rng.normal(size=6), rng.normal(size=4), 0.4 * rng.normal(size=(5, 3))
    np.testing.assert_allclose(flame_forward(m, s, e, p), _np_flame(d, s, e, p, 6), rtol=1e-4, atol=1e-4)
    # the rest pose is the shaped template; joints follow
    v0, j0 = flame_forward(m, s, e, return_joints=True)
    vs = d["v_template"] + d["shapedirs"][..., :6] @ s + d["shapedirs"][..., 6:] @ e
    np.testing.assert_allclose(v0, vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j0, d["J_regressor"] @ vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flame_forward(m, s, e, p, translation=[1.0, 2, 3]), _np_flame(d, s, e, p, 6) + [1, 2, 3],
                               rtol=1e-4, atol=1e-4)
    mm = M.flame_to_morphable(m)
    np.testing.assert_allclose(M.shape(mm, s, e), vs, rtol=1e-5, atol=1e-5)


def test_flame_forward_jit_vmap_grad(rng, x64):
    d = _fake_flame_dict(rng)
    m = _flame_model(d, dtype=np.float64)
    poses = 0.3 * rng.normal(size=(3, 5, 3))
    out = jax.vmap(jax.jit(flame_forward), in_axes=(None, None, None, 0))(m, jnp.ones(6), jnp.ones(4), poses)
    for i in range(3):
        np.testing.assert_allclose(out[i], _np_flame(d, np.ones(6), np.ones(4), poses[i], 6), rtol=1e-8, atol=1e-8)
    w = rng.normal(size=(30, 3))
    check_grad(jax.jit(lambda p: jnp.sum(w * flame_forward(m, jnp.ones(6), jnp.ones(4), p.reshape(5, 3)))), poses[0].reshape(-1))
    check_grad(jax.jit(lambda s: jnp.sum(w * flame_forward(m, s, None, poses[1]))), rng.normal(size=6))

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import check_grad
from jaxrender import mesh
from jaxrender.losses import (
    EdgeAdjacency,
    edge_length_loss,
    flatten_loss,
    flatten_loss_setup,
    huber,
    l1,
    landmark_loss,
    laplacian_smoothing,
    mse,
    normal_consistency,
    normal_consistency_setup,
    silhouette_iou_loss,
)


def _sphere(rng, level=1, jitter=0.05):
    m = mesh.icosphere(level)
    v = np.asarray(m.vertices, np.float64)
    v = v * (1 + jitter * rng.uniform(-1, 1, size=(len(v), 1))) + jitter * rng.normal(size=v.shape) * 0.3
    return v, np.asarray(m.faces)


# ---------------------------------------------------------------- NumPy references


def _np_neighbours(nv, f):
    nb = [set() for _ in range(nv)]
    for a, b, c in f:
        for i, j in ((a, b), (b, c), (c, a)):
            nb[i].add(j)
            nb[j].add(i)
    return nb


def _np_uniform(v, f):
    nb = _np_neighbours(len(v), f)
    d = np.zeros_like(v)
    for i in range(len(v)):
        if nb[i]:
            d[i] = v[list(nb[i])].mean(0) - v[i]
    return np.linalg.norm(d, axis=1)


def _np_cot(v, f):
    W = np.zeros((len(v), len(v)))
    for tri in f:
        for k in range(3):
            o, i, j = tri[k], tri[(k + 1) % 3], tri[(k + 2) % 3]
            a, b = v[i] - v[o], v[j] - v[o]
            cot = a @ b / np.linalg.norm(np.cross(a, b))
            W[i, j] += cot
            W[j, i] += cot
    s = W.sum(1)
    d = np.where(s[:, None] > 0, W @ v / np.where(s > 0, s, 1)[:, None] - v, 0.0)
    return np.linalg.norm(d, axis=1)


def _np_pairs(f):
    by_edge = {}
    for tri in f:
        for k in range(3):
            e = tuple(sorted((tri[k], tri[(k + 1) % 3])))
            by_edge.setdefault(e, []).append(tri[(k + 2) % 3])
    out = []
    for (a, b), ops in by_edge.items():
        for x, y in itertools.combinations(ops, 2):
            out.append((a, b, x, y))
    return out


def _np_normal_consistency(v, f):
    vals = []
    for a, b, x, y in _np_pairs(f):
        n0 = np.cross(v[b] - v[a], v[x] - v[a])
        n1 = -np.cross(v[b] - v[a], v[y] - v[a])
        vals.append(1 - n0 @ n1 / np.linalg.norm(n0) / np.linalg.norm(n1))
    return np.mean(vals)


def _np_flatten(v, f, eps=0.0):
    # SoftRas FlattenLoss (eps=1e-6 as in SoftRas), over every interior edge
    tot = 0.0
    for a0, a1, a2, a3 in _np_pairs(f):
        a = v[a1] - v[a0]
        cbs = []
        for o in (a2, a3):
            b = v[o] - v[a0]
            al2, bl2 = a @ a, b @ b
            al1, bl1 = np.sqrt(al2 + eps), np.sqrt(bl2 + eps)
            ab = a @ b
            cos = ab / (al1 * bl1 + eps)
            sin = np.sqrt(1 - cos**2 + eps)
            cbs.append((b - a * ab / (al2 + eps), bl1 * sin))
        cos = cbs[0][0] @ cbs[1][0] / (cbs[0][1] * cbs[1][1] + eps)
        tot += (cos + 1) ** 2
    return tot


# ---------------------------------------------------------------- image / value losses


def test_value_losses_match_numpy(rng):
    p = rng.normal(size=(6, 5, 3)).astype(np.float32).astype(np.float64)
    t = rng.normal(size=(6, 5, 3)).astype(np.float32).astype(np.float64)
    m = (rng.uniform(size=(6, 5, 1)) > 0.3).astype(float)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(mse(f32(p), f32(t)), np.mean((p - t) ** 2), rtol=1e-5)
    np.testing.assert_allclose(l1(f32(p), f32(t)), np.mean(np.abs(p - t)), rtol=1e-5)
    mm = np.broadcast_to(m, p.shape)
    np.testing.assert_allclose(mse(f32(p), f32(t), mask=f32(m)), np.sum(mm * (p - t) ** 2) / mm.sum(), rtol=1e-5)
    np.testing.assert_allclose(l1(f32(p), f32(t), reduction="sum"), np.sum(np.abs(p - t)), rtol=1e-5)
    s = 0.1
    hub = (np.sqrt(np.maximum(1 + (p - t) ** 2 / s**2, 1e-4)) - 1) * s
    np.testing.assert_allclose(huber(f32(p), f32(t)), hub.mean(), rtol=1e-5)
    np.testing.assert_allclose(huber(f32(p), f32(t), scaling=0.5, reduction="none"), (np.sqrt(1 + (p - t) ** 2 / 0.25) - 1) * 0.5, rtol=1e-5)
    # regimes: quadratic d^2 / (2 s) for small d, linear |d| - s for large d
    np.testing.assert_allclose(huber(jnp.array([1e-3]), jnp.zeros(1)), 1e-6 / (2 * s), rtol=1e-3)
    np.testing.assert_allclose(huber(jnp.array([100.0]), jnp.zeros(1)), 100.0 - s, rtol=1e-4)
    with pytest.raises(ValueError, match="reduction"):
        mse(p, t, reduction="max")
    with pytest.raises(ValueError, match="target"):
        l1(jnp.zeros((3, 2)), jnp.zeros((4, 2)))


def test_silhouette_iou(rng):
    a = np.zeros((8, 8))
    a[2:6, 2:6] = 1
    b = np.zeros((8, 8))
    b[4:8, 4:8] = 1
    np.testing.assert_allclose(silhouette_iou_loss(jnp.asarray(a), jnp.asarray(a)), 0.0, atol=1e-6)
    np.testing.assert_allclose(silhouette_iou_loss(jnp.asarray(a), jnp.asarray(b)), 1 - 4 / 28, rtol=1e-5)
    np.testing.assert_allclose(silhouette_iou_loss(jnp.zeros((4, 4)), jnp.zeros((4, 4))), 1.0)
    p = rng.uniform(size=(5, 7, 1))
    t = (rng.uniform(size=(5, 7, 1)) > 0.5).astype(float)
    ref = 1 - (p * t).sum() / ((p + t - p * t).sum() + 1e-6)
    np.testing.assert_allclose(silhouette_iou_loss(jnp.asarray(p, jnp.float32), jnp.asarray(t, jnp.float32)), ref, rtol=1e-5)


def test_landmark_loss(rng):
    p = rng.normal(size=(68, 2))
    t = rng.normal(size=(68, 2))
    w = np.ones(68)
    w[28:36] = 20
    np.testing.assert_allclose(landmark_loss(jnp.asarray(p), jnp.asarray(t)), np.mean(np.sum((p - t) ** 2, -1)), rtol=1e-5)
    np.testing.assert_allclose(landmark_loss(jnp.asarray(p), jnp.asarray(t), jnp.asarray(w)), np.sum(w * np.sum((p - t) ** 2, -1)) / 68, rtol=1e-5)
    with pytest.raises(ValueError, match="weights"):
        landmark_loss(jnp.asarray(p), jnp.asarray(t), jnp.ones(67))
    with pytest.raises(ValueError, match="target"):
        landmark_loss(jnp.zeros((5, 2)), jnp.zeros((5, 3)))


def test_value_losses_jit_vmap_grad(rng, x64):
    p = jnp.asarray(rng.normal(size=(3, 4, 3)))
    t = jnp.asarray(rng.normal(size=(3, 4, 3)))
    m = jnp.asarray(rng.uniform(size=(3, 4, 1)))
    sil = jnp.asarray(rng.uniform(0.1, 0.9, size=(4, 5)))
    silt = jnp.asarray((rng.uniform(size=(4, 5)) > 0.5).astype(float))
    lp, lt, lw = (jnp.asarray(rng.normal(size=(6, 2))), jnp.asarray(rng.normal(size=(6, 2))), jnp.asarray(rng.uniform(1, 3, 6)))

    def all_losses(p, sil, lp):
        return jnp.stack(
            [
                mse(p, t),
                mse(p, t, mask=m),
                l1(p, t, mask=m),
                huber(p, t),
                huber(p, t, scaling=0.7),
                silhouette_iou_loss(sil, silt),
                landmark_loss(lp, lt, lw),
            ]
        )

    ref = all_losses(p, sil, lp)
    np.testing.assert_allclose(jax.jit(all_losses)(p, sil, lp), ref, rtol=1e-12)
    vb = jax.jit(jax.vmap(all_losses))(jnp.stack([p, 2 * p]), jnp.stack([sil, sil**2]), jnp.stack([lp, -lp]))
    np.testing.assert_allclose(vb[0], ref, rtol=1e-12)
    np.testing.assert_allclose(vb[1], all_losses(2 * p, sil**2, -lp), rtol=1e-12)
    wv = jnp.asarray(rng.normal(size=7))
    sizes = (36, 20, 12)
    x0 = jnp.concatenate([p.ravel(), sil.ravel(), lp.ravel()])

    def packed(x):
        a, b, c = jnp.split(x, np.cumsum(sizes)[:-1])
        return jnp.sum(wv * all_losses(a.reshape(3, 4, 3), b.reshape(4, 5), c.reshape(6, 2)))

    check_grad(jax.jit(packed), x0)


# ---------------------------------------------------------------- mesh regularizers


def test_laplacian_smoothing_matches_numpy(rng):
    v, f = _sphere(rng)
    v2 = np.concatenate([v, [[5.0, 5.0, 5.0]]])  # plus an unused vertex
    L = mesh.uniform_laplacian(len(v), f)

    @jax.jit
    def run(x, x2):
        return (
            laplacian_smoothing(x, f),
            laplacian_smoothing(x, f, method="cot"),
            laplacian_smoothing(x, f, reduction="none"),
            laplacian_smoothing(x2, f),
            laplacian_smoothing(x, L),
        )

    uni, cot, per_vertex, with_unused, pre = run(jnp.asarray(v, jnp.float32), jnp.asarray(v2, jnp.float32))
    ref = _np_uniform(v, f)
    np.testing.assert_allclose(uni, ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(cot, _np_cot(v, f).mean(), rtol=1e-4)
    np.testing.assert_allclose(per_vertex, ref, rtol=1e-4, atol=1e-6)
    # the unused vertex counts in the mean with 0
    np.testing.assert_allclose(with_unused, ref.sum() / len(v2), rtol=1e-5)
    # the precomputed Laplacian gives the same
    np.testing.assert_allclose(pre, ref.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="method"):
        laplacian_smoothing(v, f, method="cotcurv")
    with pytest.raises(ValueError, match="reduction"):
        laplacian_smoothing(v, f, reduction="sum")


def test_laplacian_zero_on_planar_interior(rng):
    p = mesh.plane(4, 3)
    v = np.asarray(p.vertices, np.float64)
    interior = (np.abs(v[:, 0]) < 0.99) & (np.abs(v[:, 1]) < 0.99)
    assert interior.sum() == 6
    vj = v.copy()
    vj[interior, :2] += rng.uniform(-0.1, 0.1, size=(6, 2))

    @jax.jit
    def run(x, xj):
        return laplacian_smoothing(x, p.faces, reduction="none"), laplacian_smoothing(xj, p.faces, method="cot", reduction="none")

    u, c = (np.asarray(a) for a in run(jnp.asarray(v, jnp.float32), jnp.asarray(vj, jnp.float32)))
    np.testing.assert_allclose(u[interior], 0.0, atol=1e-6)
    assert np.all(u[~interior] > 0)
    # cotangent weights have linear precision: still zero after moving interior vertices in-plane
    np.testing.assert_allclose(c[interior], 0.0, atol=1e-5)


def test_edge_length_loss(rng):
    v, f = _sphere(rng)
    e = np.asarray(mesh.edges(f))
    ln = np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1)

    @jax.jit
    def run(x, t):
        return edge_length_loss(x, f), edge_length_loss(x, e, 0.5), edge_length_loss(x, jnp.asarray(e), t)

    a, b, c = run(jnp.asarray(v, jnp.float32), jnp.asarray(0.5, jnp.float32))
    np.testing.assert_allclose(a, np.mean(ln**2), rtol=1e-5)
    np.testing.assert_allclose(b, np.mean((ln - 0.5) ** 2), rtol=1e-5)
    np.testing.assert_allclose(c, np.mean((ln - 0.5) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="edges_or_faces"):
        edge_length_loss(v, np.zeros((4, 4), np.int32))
    with pytest.raises(TypeError, match="edges"):
        jax.jit(edge_length_loss)(jnp.zeros((3, 3)), jnp.array([[0, 1, 2]]))


def test_adjacency_and_normal_consistency(rng):
    v, f = _sphere(rng)
    adj = normal_consistency_setup(f)
    assert isinstance(adj, EdgeAdjacency)
    assert adj.v0.shape == (120,)  # closed icosphere(1): E = 3F/2 = 120 interior edges
    ref_pairs = {(a, b, frozenset((x, y))) for a, b, x, y in _np_pairs(f)}
    got = {(int(a), int(b), frozenset((int(x), int(y)))) for a, b, x, y in zip(adj.v0, adj.v1, adj.v2, adj.v3)}
    assert got == ref_pairs
    nc = jax.jit(normal_consistency)
    np.testing.assert_allclose(nc(jnp.asarray(v, jnp.float32), adj), _np_normal_consistency(v, f), rtol=1e-4)
    # flat plane -> 0; winding of one face flipped makes no difference
    p = mesh.plane(3, 3)
    pf = np.asarray(p.faces).copy()
    pf[0] = pf[0, ::-1]
    np.testing.assert_allclose(nc(p.vertices, normal_consistency_setup(p.faces)), 0.0, atol=1e-6)
    np.testing.assert_allclose(nc(p.vertices, normal_consistency_setup(pf)), 0.0, atol=1e-6)
    # a fully folded pair of triangles -> 2; a right-angle fold -> 1
    ff = normal_consistency_setup(np.array([[0, 1, 2], [1, 0, 3]]))
    fv = np.array([[0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, 1, 0]], np.float32)
    np.testing.assert_allclose(nc(fv, ff), 2.0, atol=1e-6)
    fv[3] = [0.5, 0, 1]
    np.testing.assert_allclose(nc(fv, ff), 1.0, atol=1e-6)
    # non-manifold edge shared by 3 faces gives 3 pairs; no shared edge gives 0
    nm = np.array([[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    assert normal_consistency_setup(nm).v0.shape == (3,)
    assert float(normal_consistency(jnp.zeros((3, 3)), np.array([[0, 1, 2]]))) == 0.0


def test_flatten_loss(rng):
    v, f = _sphere(rng)
    fl = jax.jit(flatten_loss)
    out = fl(jnp.asarray(v, jnp.float32), flatten_loss_setup(f))
    np.testing.assert_allclose(out, _np_flatten(v, f), rtol=1e-4)
    np.testing.assert_allclose(out, _np_flatten(v, f, eps=1e-6), rtol=1e-3)
    p = mesh.plane(4, 4)
    np.testing.assert_allclose(fl(p.vertices, flatten_loss_setup(p.faces)), 0.0, atol=1e-6)
    # right-angle fold: cos = 0 -> 1; a flat pair -> 0
    ff = np.array([[0, 1, 2], [1, 0, 3]])
    adj = flatten_loss_setup(ff)
    fv = np.array([[0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, 0, 1]], np.float32)
    np.testing.assert_allclose(fl(fv, adj), 1.0, atol=1e-6)
    fv[3] = [0.5, -1, 0]
    np.testing.assert_allclose(fl(fv, adj), 0.0, atol=1e-6)
    # degenerate: collapsed vertices stay finite, values and gradients
    val, g = jax.jit(jax.value_and_grad(lambda x: flatten_loss(x, adj) + normal_consistency(x, adj)))(jnp.zeros((4, 3)))
    assert np.isfinite(float(val)) and np.all(np.isfinite(g))
    g = jax.jit(jax.grad(lambda x: edge_length_loss(x, jnp.array([[0, 1], [1, 2]]), 1.0)))(jnp.zeros((3, 3)))
    assert np.all(np.isfinite(g))


def test_traced_faces_error():
    f = np.array([[0, 1, 2]])
    with pytest.raises(TypeError, match="setup"):
        jax.jit(flatten_loss)(jnp.zeros((3, 3)), jnp.asarray(f))
    with pytest.raises(TypeError, match="uniform_laplacian"):
        jax.jit(laplacian_smoothing)(jnp.zeros((3, 3)), jnp.asarray(f))


def test_mesh_losses_jit_vmap_grad(rng, x64):
    v, f = _sphere(rng, level=0, jitter=0.1)
    adj = flatten_loss_setup(f)
    L = mesh.uniform_laplacian(len(v), f)
    e = mesh.edges(f)

    def all_losses(x, adj, L, e):
        return jnp.stack(
            [
                laplacian_smoothing(x, L),
                laplacian_smoothing(x, f, method="cot", stop_weight_gradient=False),
                edge_length_loss(x, e),
                edge_length_loss(x, e, 0.9),
                normal_consistency(x, adj),
                flatten_loss(x, adj),
            ]
        )

    vj = jnp.asarray(v)
    jitted = jax.jit(all_losses)
    ref = jitted(vj, adj, L, e)
    np.testing.assert_allclose(
        np.asarray(ref)[[0, 2, 4, 5]],
        [_np_uniform(v, f).mean(), np.mean(np.sum((v[e[:, 0]] - v[e[:, 1]]) ** 2, -1)), _np_normal_consistency(v, f), _np_flatten(v, f)],
        rtol=1e-10,
    )
    np.testing.assert_allclose(ref[1], _np_cot(v, f).mean(), rtol=1e-10)
    vb = jax.jit(jax.vmap(all_losses, in_axes=(0, None, None, None)))(jnp.stack([vj, 1.5 * vj]), adj, L, e)
    np.testing.assert_allclose(vb[0], ref, rtol=1e-12)
    np.testing.assert_allclose(vb[1], jitted(1.5 * vj, adj, L, e), rtol=1e-12)
    w = jnp.asarray(rng.normal(size=6))
    check_grad(jax.jit(lambda x: jnp.sum(w * all_losses(x, adj, L, e))), vj)

    # PyTorch3D semantics: by default the cot weights are held constant
    @jax.jit
    def both_grads(x):
        Lc = jax.lax.stop_gradient(mesh.cotangent_laplacian(x, jnp.asarray(f)))
        wsum = -jnp.diag(Lc.todense())

        def fixed_weights(y):
            return jnp.mean(jnp.linalg.norm(mesh.laplacian_apply(Lc, y) / wsum[:, None], axis=1))

        return jax.grad(lambda y: laplacian_smoothing(y, f, method="cot"))(x), jax.grad(fixed_weights)(x)

    g, g_ref = both_grads(vj)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def test_silhouette_iou_soft_target_bias_is_as_documented():
    from jaxrender.losses import silhouette_iou_loss
    t = jnp.array([0.5, 1.0])
    at_target = float(silhouette_iou_loss(t, t))
    hard = float(silhouette_iou_loss(jnp.array([1.0, 1.0]), t))
    # inter = 0.25 + 1, union = 0.75 + 1 at the target; inter = 0.5 + 1, union = 1 + 1 at (1, 1)
    np.testing.assert_allclose([at_target, hard], [1 - 1.25 / 1.75, 1 - 1.5 / 2.0], atol=1e-5)
    assert hard < at_target

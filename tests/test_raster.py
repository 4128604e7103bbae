"""The rasterizer against a dense brute-force reference (every pixel x every face)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrender.blend import BlendParams, sigmoid_alpha_blend, softmax_rgb_blend, hard_rgb_blend
from jaxrender.raster import RasterSettings, interpolate, rasterize
from tests.helpers import check_grad, fast_jit

# Concrete calls share compiled executables (compile time dominates these tests).
rasterize_c = fast_jit(rasterize)


# --------------------------------------------------------------------------
# Independent dense reference, float64 NumPy, one pixel and one face at a time.
# --------------------------------------------------------------------------
def _seg_dist2(p, a, b):
    ab = b - a
    denom = ab @ ab
    t = 0.0 if denom == 0 else np.clip((p - a) @ ab / denom, 0.0, 1.0)
    q = a + t * ab
    return float((p - q) @ (p - q))


def reference_rasterize(sv, faces, H, W, K, blur, znear=1e-3, zfar=np.inf, perspective=True, clip=None, cull_back=False):
    sv = np.asarray(sv, np.float64)
    clip = blur > 0 if clip is None else clip
    ndc = 2.0 / min(H, W)
    face_idx = -np.ones((H, W, K), np.int64)
    bary = -np.ones((H, W, K, 3))
    depth = -np.ones((H, W, K))
    dist = -np.ones((H, W, K))
    valid = []
    truncated = 0
    for f, (a, b, c) in enumerate(faces):
        A, B, C = sv[a], sv[b], sv[c]
        M = np.array([[B[0] - A[0], C[0] - A[0]], [B[1] - A[1], C[1] - A[1]]])
        det = np.linalg.det(M)
        longest2 = max(np.sum((A[:2] - B[:2]) ** 2), np.sum((B[:2] - C[:2]) ** 2), np.sum((C[:2] - A[:2]) ** 2))
        ok = abs(det) > 1e-6 * longest2 and abs(det) > 1e-12 and np.all(np.isfinite(sv[[a, b, c]]))
        ok = ok and min(A[2], B[2], C[2]) >= znear and min(A[2], B[2], C[2]) <= zfar
        if cull_back:
            ok = ok and det < 0
        valid.append(ok)
    for i in range(H):
        for j in range(W):
            p = np.array([j + 0.5, i + 0.5])
            cands = []
            for f, (a, b, c) in enumerate(faces):
                if not valid[f]:
                    continue
                A, B, C = sv[a], sv[b], sv[c]
                M = np.array([[B[0] - A[0], C[0] - A[0]], [B[1] - A[1], C[1] - A[1]]])
                s, t = np.linalg.solve(M, p - A[:2])
                l = np.array([1 - s - t, s, t])
                inside = np.all(l >= 0)
                z = np.array([A[2], B[2], C[2]])
                if perspective:
                    wv = l / z
                    wv = wv * (z[0] * z[1] * z[2])
                    den = max(wv.sum(), 1e-8)
                    bb = wv / den
                else:
                    bb = l
                if clip:
                    bb = np.maximum(bb, 0)
                    bb = bb / max(bb.sum(), 1e-5)
                zz = bb @ z
                d2 = min(_seg_dist2(p, A[:2], B[:2]), _seg_dist2(p, B[:2], C[:2]), _seg_dist2(p, C[:2], A[:2])) * ndc**2
                sd = -d2 if inside else d2
                if (inside or sd < blur) and zz >= znear:
                    cands.append((zz, z.min(), f, bb, sd))
            cands.sort(key=lambda x: x[:3])  # depth; ties: nearest vertex depth, then face index
            truncated += len(cands) > K
            for k, (zz, _, f, bb, sd) in enumerate(cands[:K]):
                face_idx[i, j, k] = f
                bary[i, j, k] = bb
                depth[i, j, k] = zz
                dist[i, j, k] = sd
    reference_rasterize.truncated = truncated  # pixels reached by more than K faces
    return face_idx, bary, depth, dist, int(np.sum(~np.array(valid)))


def random_scene(seed, F=30, H=20, W=28):
    """Overlapping triangles, some partly off-screen, one zero-area, one behind the camera."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-4, -4], [W + 4, H + 4], (F, 2))
    offs = rng.normal(0, 5, (F, 3, 2))
    xy = centres[:, None] + offs
    z = rng.uniform(1.0, 4.0, (F, 3))
    sv = np.concatenate([xy, z[..., None]], -1).reshape(-1, 3)
    faces = np.arange(3 * F).reshape(F, 3)
    # zero-area face: collinear vertices
    sv[3 * 0 + 2, :2] = 0.5 * (sv[0, :2] + sv[1, :2])
    # face behind the camera / crossing the near plane
    sv[3 * 1, 2] = -0.5
    return sv.astype(np.float64), faces.astype(np.int32)


@pytest.mark.parametrize("seed,K,blur,persp,cull,F,block", [
    (0, 4, 0.0, True, False, 30, None),
    (1, 3, 2e-2, True, False, 30, None),
    (2, 5, 5e-2, False, False, 30, None),
    (3, 2, 1e-2, True, True, 30, None),
    # lists merged across many small candidate blocks (insertion path)
    (6, 6, 5e-2, True, False, 60, 3),
    # K above the insertion limit: the top_k merge path
    (7, 66, 5e-2, True, False, 80, None),
])
def test_matches_dense_reference(x64, seed, K, blur, persp, cull, F, block):
    H, W = 20, 28
    sv, faces = random_scene(seed, F=F, H=H, W=W)
    s = RasterSettings(image_size=(H, W), faces_per_pixel=K, blur_radius=blur, bin_size=8,
                       max_faces_per_bin=128, perspective_correct=persp, cull_backfaces=cull,
                       candidate_block=block)
    fr = jax.jit(rasterize, static_argnums=2)(jnp.asarray(sv), jnp.asarray(faces), s)
    ref_idx, ref_bary, ref_depth, ref_dist, ref_culled = reference_rasterize(
        sv, faces, H, W, K, blur, perspective=persp, cull_back=cull)
    assert int(fr.num_overflow) == 0
    np.testing.assert_array_equal(np.asarray(fr.face_idx), ref_idx)
    np.testing.assert_allclose(np.asarray(fr.bary), ref_bary, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fr.depth), ref_depth, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fr.dist), ref_dist, atol=1e-5)
    assert int(fr.num_culled) == ref_culled
    assert int(fr.num_truncated) == reference_rasterize.truncated
    assert (ref_idx >= 0).sum() > 50  # the scene really covers pixels


def test_float32_matches_reference():
    H, W = 20, 28
    sv, faces = random_scene(5, H=H, W=W)
    s = RasterSettings(image_size=(H, W), faces_per_pixel=3, blur_radius=1e-2, bin_size=8, max_faces_per_bin=64)
    fr = rasterize_c(jnp.asarray(sv, jnp.float32), jnp.asarray(faces), s)
    ref_idx, ref_bary, ref_depth, ref_dist, _ = reference_rasterize(sv, faces, H, W, 3, 1e-2)
    same = np.asarray(fr.face_idx) == ref_idx
    assert same.mean() > 0.999
    m = same.all(-1)
    for got, ref in ((fr.depth, ref_depth), (fr.dist, ref_dist)):
        np.testing.assert_allclose(np.asarray(got)[m], ref[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(fr.bary)[m], ref_bary[m], atol=1e-5)
    for a in (fr.bary, fr.depth, fr.dist):
        assert np.all(np.isfinite(np.asarray(a)))


def test_image_not_multiple_of_bin_and_default_bins(x64):
    H, W = 19, 23
    sv, faces = random_scene(7, H=H, W=W)
    s = RasterSettings(image_size=(H, W), faces_per_pixel=2, blur_radius=1e-2)
    fr = rasterize_c(jnp.asarray(sv), jnp.asarray(faces), s)
    ref_idx, *_ = reference_rasterize(sv, faces, H, W, 2, 1e-2)
    np.testing.assert_array_equal(np.asarray(fr.face_idx), ref_idx)


def test_overflow_reported_and_fixed_by_capacity(x64):
    H, W = 16, 16
    sv, faces = random_scene(11, F=40, H=H, W=W)
    small = RasterSettings(image_size=(H, W), faces_per_pixel=4, blur_radius=1e-2, bin_size=8, max_faces_per_bin=4)
    fr = rasterize_c(jnp.asarray(sv), jnp.asarray(faces), small)
    assert int(fr.num_overflow) > 0
    need = int(fr.max_bin_count)
    big = RasterSettings(image_size=(H, W), faces_per_pixel=4, blur_radius=1e-2, bin_size=8, max_faces_per_bin=need)
    fr2 = rasterize_c(jnp.asarray(sv), jnp.asarray(faces), big)
    assert int(fr2.num_overflow) == 0
    ref_idx, *_ = reference_rasterize(sv, faces, H, W, 4, 1e-2)
    np.testing.assert_array_equal(np.asarray(fr2.face_idx), ref_idx)
    assert not np.array_equal(np.asarray(fr.face_idx), np.asarray(fr2.face_idx))
    colors = jnp.ones((H, W, 4, 3))
    a1 = softmax_rgb_blend(colors, fr)[..., 3]
    a2 = softmax_rgb_blend(colors, fr2)[..., 3]
    assert float(jnp.abs(a1 - a2).max()) > 1e-3  # the image changes


def _reference_bins(tri, valid, bs, nby, nbx, r, order):
    """Per tile, the faces (in ``order``) whose bounding box grown by ``r`` px touches a pixel centre of it,
    and the pairs in generation order (face by face, row-major tiles) for the pair budget."""
    bins = [[] for _ in range(nby * nbx)]
    pairs = []
    for f in order:
        if not valid[f]:
            continue
        x0, x1 = tri[f, :, 0].min() - r, tri[f, :, 0].max() + r
        y0, y1 = tri[f, :, 1].min() - r, tri[f, :, 1].max() + r
        for ty in range(nby):
            for tx in range(nbx):
                cx0, cx1 = tx * bs + 0.5, tx * bs + bs - 0.5
                cy0, cy1 = ty * bs + 0.5, ty * bs + bs - 0.5
                if x1 >= cx0 and x0 <= cx1 and y1 >= cy0 and y0 <= cy1:
                    pairs.append((ty * nbx + tx, f))
    return pairs


@pytest.mark.parametrize("budget,capacity", [(None, None), (40, None), (None, 3), (40, 3)])
def test_binning_matches_brute_force(budget, capacity):
    """Each tile's candidate run against a per-face, per-tile bounding-box test, with the pair budget truncating."""
    from jaxrender.raster.rasterize import _bin_faces

    rng = np.random.default_rng(3)
    F, H, W, bs = 25, 20, 28, 8
    tri = np.concatenate([rng.uniform(-6, W + 6, (F, 3, 2)), rng.uniform(1, 4, (F, 3, 1))], -1).astype(np.float32)
    tri[:4, :, :2] = rng.uniform(2, 6, (4, 1, 2)) + rng.uniform(0, 1, (4, 3, 2))  # small faces inside one tile
    valid = rng.random(F) > 0.2
    s = RasterSettings(image_size=(H, W), faces_per_pixel=2, blur_radius=1e-2, bin_size=bs, max_tile_pairs=budget,
                       max_faces_per_bin=capacity)
    nby, nbx = -(-H // bs), -(-W // bs)
    face_s, starts, counts, overflow = (np.asarray(a) for a in _bin_faces(
        jnp.asarray(tri), jnp.asarray(valid), s, nby, nbx))
    r = s.blur_radius_pixels + 1e-3
    zmin = tri[..., 2].min(1)
    # pairs come face by face in nearest-vertex-depth order (face order if a tile can overflow)
    gen = np.argsort(zmin, kind="stable") if capacity is None else np.arange(F)
    pairs = _reference_bins(tri, valid, bs, nby, nbx, r, gen)
    kept = pairs if budget is None else pairs[:budget]
    assert int(overflow) == len(pairs) - len(kept)
    if budget is not None:
        assert int(overflow) > 0  # the budget really truncates
    for t in range(nby * nbx):
        want = [f for tt, f in kept if tt == t]
        if capacity is not None:  # the first `capacity` in face order, each part by depth
            key = lambda f: (want.index(f) >= capacity, zmin[f], f)
            want = sorted(want, key=key)
        got = face_s[starts[t]:starts[t] + counts[t]].tolist()
        assert got == want, t
    assert counts.sum() == len(kept)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("interpret", [False, True])
def test_equal_depth_ties_go_to_the_nearer_nearest_vertex(swap, interpret):
    """A pixel off a shared vertex clips to it on both faces: equal depths, the face reaching nearer wins."""
    v = [10.0, 10.0, 2.0]
    far = [[10.0, 10.0, 2.0], [20.0, 10.0, 5.0], [10.0, 20.0, 5.0]]  # nearest vertex depth 2
    near = [[10.0, 10.0, 2.0], [20.0, 12.0, 1.5], [12.0, 20.0, 1.5]]  # nearest vertex depth 1.5
    sv = np.array(near + far if swap else far + near, np.float32)
    assert sv[0].tolist() == v and sv[3].tolist() == v
    faces = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    s = RasterSettings(image_size=(24, 24), faces_per_pixel=2, blur_radius=0.05, bin_size=8,
                       clip_barycentrics=True, pallas_interpret=interpret, pallas_block=8)
    fr = rasterize(jnp.asarray(sv), faces, s)
    near_idx = 0 if swap else 1
    assert float(fr.depth[8, 8, 0]) == float(fr.depth[8, 8, 1]) == 2.0  # clipped to the shared vertex exactly
    assert fr.face_idx[8, 8].tolist() == [near_idx, 1 - near_idx]


def test_empty_and_offscreen():
    s = RasterSettings(image_size=(8, 8), faces_per_pixel=2)
    sv = jnp.array([[100.0, 100, 2], [110, 100, 2], [100, 110, 2]])
    fr = rasterize_c(sv, jnp.array([[0, 1, 2]], jnp.int32), s)
    assert np.all(np.asarray(fr.face_idx) == -1)
    fr = rasterize_c(sv, jnp.zeros((0, 3), jnp.int32), s)
    assert fr.face_idx.shape == (8, 8, 2)


def test_bad_input_errors():
    s = RasterSettings(image_size=8)
    with pytest.raises(ValueError, match="screen_verts"):
        rasterize(jnp.zeros((3, 2)), jnp.zeros((1, 3), jnp.int32), s)
    with pytest.raises(TypeError, match="faces"):
        rasterize(jnp.zeros((3, 3)), jnp.zeros((1, 3)), s)
    with pytest.raises(IndexError, match="faces"):
        rasterize(jnp.zeros((3, 3)), jnp.array([[0, 1, 5]], jnp.int32), s)
    with pytest.raises(ValueError, match="faces_per_pixel"):
        RasterSettings(faces_per_pixel=0)
    with pytest.raises(ValueError, match="near_rule"):
        RasterSettings(near_rule="clip-later")


def test_interpolate_reproduces_linear_function(x64):
    # A linear function of screen position interpolated with affine barycentrics is exact.
    H, W = 12, 12
    sv = jnp.array([[1.0, 1.0, 2.0], [11.0, 2.0, 2.0], [3.0, 11.0, 2.0]])
    faces = jnp.array([[0, 1, 2]], jnp.int32)
    s = RasterSettings(image_size=(H, W), faces_per_pixel=1, perspective_correct=False)
    fr = rasterize_c(sv, faces, s)
    attr = sv[:, :2] * 2.0 + 1.0
    out = interpolate(attr, faces, fr)[..., 0, :]
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    m = np.asarray(fr.face_idx[..., 0] >= 0)
    np.testing.assert_allclose(np.asarray(out)[m], (np.stack([xs, ys], -1) * 2 + 1)[m], atol=1e-9)
    assert np.all(np.asarray(out)[~m] == 0)


def test_perspective_correct_depth_is_exact_plane(x64):
    # Points of a 3D plane projected with a pinhole: interpolated depth equals the plane's depth along the ray.
    f, c = 20.0, 10.0
    P = np.array([[-1.0, -1.0, 3.0], [1.5, -0.5, 5.0], [-0.5, 1.2, 4.0]])
    sv = np.stack([f * P[:, 0] / P[:, 2] + c, f * P[:, 1] / P[:, 2] + c, P[:, 2]], -1)
    s = RasterSettings(image_size=(20, 20), faces_per_pixel=1)
    fr = rasterize_c(jnp.asarray(sv), jnp.array([[0, 1, 2]], jnp.int32), s)
    n = np.cross(P[1] - P[0], P[2] - P[0])
    ys, xs = np.mgrid[0:20, 0:20] + 0.5
    d = np.stack([(xs - c) / f, (ys - c) / f, np.ones_like(xs)], -1)
    zplane = (n @ P[0]) / (d @ n)
    m = np.asarray(fr.face_idx[..., 0] >= 0)
    assert m.sum() > 20
    np.testing.assert_allclose(np.asarray(fr.depth[..., 0])[m], zplane[m], rtol=1e-9)


def _soft_scene():
    sv, faces = random_scene(3, F=8, H=12, W=12)
    return sv, faces, RasterSettings(image_size=(12, 12), faces_per_pixel=3, blur_radius=5e-2, bin_size=8, max_faces_per_bin=16)


def test_grad_vertices_matches_fd(x64):
    sv, faces, s = _soft_scene()
    sv[:, 2] = np.abs(sv[:, 2]) + 1.0
    colors = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (sv.shape[0], 3)))
    w = jnp.asarray(np.random.default_rng(1).normal(size=(12, 12, 4)))
    fixed = rasterize_c(jnp.asarray(sv), jnp.asarray(faces), s).face_idx

    def loss(x):
        fr = rasterize(x.reshape(-1, 3), jnp.asarray(faces), s)
        c = interpolate(colors, jnp.asarray(faces), fr)
        img = softmax_rgb_blend(c, fr, BlendParams(sigma=1e-2, gamma=1e-1), znear=0.5, zfar=10.0)
        return jnp.sum(img * w)

    loss = jax.jit(loss)
    x0 = jnp.asarray(sv.reshape(-1))
    # the perturbations used by finite differences must not change which faces are kept
    sel = jax.jit(lambda x: rasterize(x.reshape(-1, 3), jnp.asarray(faces), s).face_idx)
    for i in range(0, x0.size, 7):
        assert np.array_equal(np.asarray(sel(x0.at[i].add(1e-6))), np.asarray(fixed))
    check_grad(loss, x0, eps=1e-6, rtol=1e-5)


def test_grad_colors_matches_fd(x64):
    sv, faces, s = _soft_scene()
    sv[:, 2] = np.abs(sv[:, 2]) + 1.0
    fr = rasterize_c(jnp.asarray(sv), jnp.asarray(faces), s)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(12, 12, 4)))

    def loss(c):
        col = interpolate(c.reshape(-1, 3), jnp.asarray(faces), fr)
        return jnp.sum(softmax_rgb_blend(col, fr, BlendParams(1e-2, 1e-1), 0.5, 10.0) * w)

    loss = jax.jit(loss)
    check_grad(loss, jnp.asarray(np.random.default_rng(2).uniform(size=sv.shape[0] * 3)))


def test_silhouette_gradient_nonzero_at_boundary(x64):
    sv = jnp.array([[4.0, 4.0, 2.0], [4.0, 12.0, 2.0], [12.0, 4.0, 2.0]])
    faces = jnp.array([[0, 1, 2]], jnp.int32)
    s = RasterSettings(image_size=(16, 16), faces_per_pixel=1, blur_radius=1e-2)

    def outside_alpha(v):
        fr = rasterize(v, faces, s)
        a = sigmoid_alpha_blend(fr, sigma=1e-2)
        return a[5, 11]  # pixel centre (11.5, 5.5), just outside the edge x + y = 16

    g = jax.grad(outside_alpha)(sv)
    assert float(outside_alpha(sv)) > 0
    assert float(jnp.abs(g[2, 0])) > 0 and float(jnp.abs(g[1, 1])) > 0  # moving the edge changes coverage

    s_hard = RasterSettings(image_size=(16, 16), faces_per_pixel=1, blur_radius=0.0)
    g_hard = jax.grad(lambda v: hard_rgb_blend(jnp.ones((16, 16, 1, 3)), rasterize(v, faces, s_hard))[..., 3].sum())(sv)
    assert float(jnp.abs(g_hard).sum()) == 0.0  # hard rasterization has no boundary gradient


def test_jit_vmap_over_vertices():
    sv, faces = random_scene(4, F=10, H=16, W=16)
    s = RasterSettings(image_size=(16, 16), faces_per_pixel=2, blur_radius=1e-2, bin_size=8, max_faces_per_bin=32)
    batch = jnp.stack([jnp.asarray(sv, jnp.float32), jnp.asarray(sv, jnp.float32) + jnp.array([1.0, 0.5, 0.0])])
    fb = jax.jit(jax.vmap(lambda v: rasterize(v, jnp.asarray(faces), s)))(batch)
    for b in range(2):
        f1 = rasterize_c(batch[b], jnp.asarray(faces), s)
        np.testing.assert_array_equal(np.asarray(fb.face_idx[b]), np.asarray(f1.face_idx))
        np.testing.assert_allclose(np.asarray(fb.dist[b]), np.asarray(f1.dist), atol=1e-6)
    assert fb.num_overflow.shape == (2,)


def test_gather_rows_drops_empty_rows_in_backward(x64):
    from jaxrender.raster import gather_rows
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(5, 2, 3)))
    idx = jnp.asarray([[0, -1, 4], [2, 2, -1]])
    w = jnp.asarray(rng.normal(size=(2, 3, 2, 3)))
    np.testing.assert_array_equal(np.asarray(gather_rows(table, idx)), np.asarray(table)[np.maximum(idx, 0)])
    f = lambda t: jnp.sum(jnp.where((idx >= 0)[..., None, None], gather_rows(t, idx), 0.0) * w)
    g = jax.grad(f)(table)
    ref = np.zeros((5, 2, 3))
    for (i, j), r in np.ndenumerate(np.asarray(idx)):
        if r >= 0:
            ref[r] += np.asarray(w)[i, j]
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-12)
    # rows of idx = -1 never reach row 0, even with a nonzero cotangent
    g_raw = jax.grad(lambda t: jnp.sum(gather_rows(t, idx) * w))(table)
    np.testing.assert_allclose(np.asarray(g_raw), ref, atol=1e-12)
    assert jax.jit(jax.vmap(gather_rows, in_axes=(None, 0)))(table, idx).shape == (2, 3, 2, 3)

"""The GPU selection kernel (Pallas/Triton) against the XLA reference path.

Marked ``gpu``: skipped without a GPU. The kernel logic itself is also
checked on the CPU in interpret mode (``test_pallas_interpret_matches_xla``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrender.blend import BlendParams, sigmoid_alpha_blend, softmax_rgb_blend
from jaxrender.raster import RasterSettings, interpolate, rasterize
from tests.test_raster import random_scene

CASES = [  # seed, K, blur, perspective, cull, bin, capacity
    (0, 4, 0.0, True, False, 8, None),
    (1, 3, 2e-2, True, False, 8, None),
    (2, 5, 5e-2, False, False, 8, None),
    (3, 2, 1e-2, True, True, 8, None),
    (4, 1, 0.0, True, False, 16, None),
    (5, 10, 2e-2, True, False, 8, 6),  # overflowing tiles
    (100, 3, 1e-2, True, False, 8, None),  # deep stacks: the kernel's early exit ends every tile
    (201, 3, 2e-2, True, False, 8, None),  # duplicated faces (exact depth ties), candidates in face order
    (202, 4, 0.0, True, False, 8, None),  # the same with candidates in depth order (early exit)
]


def _settings(K, blur, persp, cull, bs, cap, **kw):
    return RasterSettings(image_size=(20, 28), faces_per_pixel=K, blur_radius=blur, bin_size=bs,
                          perspective_correct=persp, cull_backfaces=cull, max_faces_per_bin=cap, **kw)


def _image(sv, faces, colors, s):
    fr = rasterize(sv, faces, s)
    img = softmax_rgb_blend(interpolate(colors, faces, fr), fr, BlendParams(1e-2, 1e-1), 0.5, 10.0)
    return jnp.concatenate([img, sigmoid_alpha_blend(fr, 1e-2)[..., None]], -1), fr


def stacked_scene(seed, F=40, H=20, W=28):
    """``F`` screen-filling triangles at shuffled, tilted depths: every pixel is reached by all of them."""
    rng = np.random.default_rng(seed)
    xy = np.array([[-30.0, -30.0], [3 * W + 30, -30.0], [-30.0, 3 * H + 30]])
    z = rng.permutation(np.linspace(1.0, 5.0, F))[:, None] + rng.uniform(0, 0.3, (F, 3))
    sv = np.concatenate([np.broadcast_to(xy, (F, 3, 2)), z[..., None]], -1).reshape(-1, 3)
    return sv, np.arange(3 * F, dtype=np.int32).reshape(F, 3)


def _scene(seed):
    if seed < 100:
        return random_scene(seed, H=20, W=28)
    if seed < 200:
        return stacked_scene(seed, H=20, W=28)
    # Copies of some faces at *lower* indices: equal depths, kept in face order.
    sv, faces = random_scene(seed - 200, H=20, W=28)
    return sv, np.concatenate([faces[-8:], faces[:4], faces])


def _compare(case, **backend_kw):
    seed, K, blur, persp, cull, bs, cap = case
    sv, faces = _scene(seed)
    sv = jnp.asarray(sv, jnp.float32)
    faces = jnp.asarray(faces)
    colors = jnp.asarray(np.random.default_rng(seed).uniform(size=(sv.shape[0], 3)), jnp.float32)
    ref_s = _settings(K, blur, persp, cull, bs, cap, backend="xla")
    new_s = _settings(K, blur, persp, cull, bs, cap, **backend_kw)
    (img_a, fa), (img_b, fb) = _image(sv, faces, colors, ref_s), _image(sv, faces, colors, new_s)
    np.testing.assert_array_equal(np.asarray(fa.face_idx), np.asarray(fb.face_idx))
    assert int(fa.num_overflow) == int(fb.num_overflow)
    assert int(fa.num_truncated) == int(fb.num_truncated)
    assert float(jnp.abs(img_a - img_b).max()) <= 1e-4
    return sv, faces, colors, ref_s, new_s


@pytest.mark.parametrize("case", [CASES[-2], CASES[-3]])
def test_pallas_interpret_matches_xla(case):
    _compare(case, pallas_interpret=True, pallas_block=8)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_xla_images_and_gradients(case):
    sv, faces, colors, ref_s, new_s = _compare(case, backend="pallas")
    if case[-1] is not None:
        assert int(rasterize(sv, faces, new_s).num_overflow) > 0
    w = jnp.asarray(np.random.default_rng(9).normal(size=(20, 28, 5)), jnp.float32)

    def loss(v, c, s):
        return jnp.sum(_image(v, faces, c, s)[0] * w)

    ga = jax.grad(loss, argnums=(0, 1))(sv, colors, ref_s)
    gb = jax.grad(loss, argnums=(0, 1))(sv, colors, new_s)
    for a, b in zip(ga, gb):
        rel = float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(a).max(), 1e-12))
        assert rel <= 1e-3


@pytest.mark.gpu
def test_auto_backend_picks_pallas_on_gpu():
    from jaxrender.raster.pallas_select import resolve_backend
    assert resolve_backend(None, 1) == "pallas"
    assert resolve_backend(None, 50) == "pallas"
    assert resolve_backend(None, 65) == "xla"  # beyond MAX_PALLAS_K the lists would spill registers
    assert resolve_backend("pallas", 100) == "pallas"


def _compare_skipping(monkeypatch, case, **backend_kw):
    """The kernel with the tile-uniform insertion skip on at every K (it is on from ``SKIP_MIN_K``)."""
    from jaxrender.raster import pallas_select

    monkeypatch.setattr(pallas_select, "SKIP_MIN_K", 1)
    _compare(case, **backend_kw)


@pytest.mark.parametrize("case", [pytest.param(CASES[5], marks=pytest.mark.slow),
                                  pytest.param(CASES[7], marks=pytest.mark.slow), CASES[8]])
def test_pallas_interpret_skip_matches_xla(monkeypatch, case):
    _compare_skipping(monkeypatch, case, pallas_interpret=True, pallas_block=8)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_pallas_skip_matches_xla(monkeypatch, case):
    _compare_skipping(monkeypatch, case, backend="pallas")


@pytest.mark.parametrize("k,g", [(50, 8), (10, 4), (4, 4), (16, 16), (7, 2)])
def test_merge_group_keeps_the_k_first(k, g):
    """The sorting-network merge against a sort of list + group by (depth, face), with ties and empty slots."""
    from jaxrender.raster.pallas_select import merge_group

    rng = np.random.default_rng(k * 100 + g)
    n = 300  # independent trials, one per lane
    depth = rng.integers(0, 12, (n, k + g)).astype(np.float32)  # few distinct values: many ties
    depth[rng.random((n, k + g)) < 0.15] = np.inf  # out of reach
    face = rng.permutation(np.arange(n * (k + g))).reshape(n, k + g) % 40
    lk, lf = depth[:, :k], face[:, :k]
    order = np.lexsort((lf, lk), axis=-1)
    lk, lf = np.take_along_axis(lk, order, -1), np.take_along_axis(lf, order, -1)
    empty = rng.random(n) < 0.3  # some lists not yet full: (inf, -1) tails
    lk[empty, k // 2:], lf[empty, k // 2:] = np.inf, -1
    gk, gf = depth[:, k:], face[:, k:]
    col = lambda a: [jnp.asarray(a[:, i]) for i in range(a.shape[1])]
    nk, nf = merge_group(col(lk), col(lf), col(gk), col(gf))
    got_k, got_f = np.stack(nk, -1), np.stack(nf, -1)
    allk, allf = np.concatenate([lk, gk], -1), np.concatenate([lf, gf], -1)
    order = np.lexsort((allf, allk), axis=-1)[:, :k]
    want_k, want_f = np.take_along_axis(allk, order, -1), np.take_along_axis(allf, order, -1)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_f[np.isfinite(want_k)], want_f[np.isfinite(want_k)])


@pytest.mark.parametrize("case,unroll,merge,skip", [pytest.param(CASES[5], 8, True, False, marks=pytest.mark.slow),
                                                     (CASES[7], 2, True, True), (CASES[8], 4, False, True)])
def test_pallas_interpret_unroll_merge_matches_xla(monkeypatch, case, unroll, merge, skip):
    """The kernel taking candidates ``unroll`` at a time, inserted one by one or merged by a sorting network."""
    from jaxrender.raster import pallas_select

    if skip:
        monkeypatch.setattr(pallas_select, "SKIP_MIN_K", 1)
    _compare(case, pallas_interpret=True, pallas_block=8, pallas_unroll=unroll, pallas_merge=merge)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c[1] >= 2])
@pytest.mark.parametrize("unroll,merge", [(2, True), (8, False)])
def test_pallas_unroll_merge_matches_xla(monkeypatch, case, unroll, merge):
    from jaxrender.raster import pallas_select

    monkeypatch.setattr(pallas_select, "SKIP_MIN_K", 1)  # the skips too
    _compare(case, backend="pallas", pallas_unroll=unroll, pallas_merge=merge)


def test_unroll_merge_settings_are_checked():
    for bad in (3, 0, 128):
        with pytest.raises(ValueError, match="pallas_unroll"):
            RasterSettings(image_size=8, faces_per_pixel=4, pallas_unroll=bad)
    with pytest.raises(ValueError, match="pallas_merge"):
        RasterSettings(image_size=8, faces_per_pixel=4, pallas_unroll=8, pallas_merge=True)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import check_grad
from jaxrender.texture import build_mipmaps, sample_texture, sample_texture_mip


def _np_bilinear(tex, uv, wrap):
    """Straightforward per-point reference of the documented convention."""
    ht, wt, _ = tex.shape
    out = np.zeros(uv.shape[:-1] + (tex.shape[2],))
    for idx in np.ndindex(uv.shape[:-1]):
        u, v = uv[idx]
        x = u * wt - 0.5
        y = (1 - v) * ht - 0.5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        acc = 0.0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                r, c = y0 + dy, x0 + dx
                if wrap == "repeat":
                    r, c = r % ht, c % wt
                else:
                    r, c = min(max(r, 0), ht - 1), min(max(c, 0), wt - 1)
                acc = acc + wy * wx * tex[r, c]
        out[idx] = acc
    return out


def _centres(ht, wt):
    r, c = np.meshgrid(np.arange(ht), np.arange(wt), indexing="ij")
    return np.stack([(c + 0.5) / wt, 1 - (r + 0.5) / ht], -1)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_exact_at_texel_centres(rng, mode):
    tex = rng.uniform(size=(5, 7, 3)).astype(np.float32)
    uv = _centres(5, 7)
    np.testing.assert_allclose(sample_texture(tex, jnp.asarray(uv, jnp.float32), mode=mode), tex, atol=1e-5)


def test_uv_orientation():
    # v up: uv (0, 0) region is the bottom-left texel = last row, first column
    tex = jnp.arange(6.0).reshape(2, 3, 1)
    assert float(sample_texture(tex, jnp.array([0.01, 0.01]), mode="nearest")[0]) == 3.0
    assert float(sample_texture(tex, jnp.array([0.99, 0.99]), mode="nearest")[0]) == 2.0
    assert float(sample_texture(tex, jnp.array([0.01, 0.99]), mode="nearest")[0]) == 0.0


@pytest.mark.parametrize("wrap", ["repeat", "clamp"])
def test_bilinear_matches_numpy(rng, wrap):
    tex = rng.uniform(size=(4, 6, 2))
    uv = rng.uniform(-0.6, 1.6, size=(5, 8, 2))
    out = sample_texture(jnp.asarray(tex, jnp.float32), jnp.asarray(uv, jnp.float32), wrap=wrap)
    assert out.shape == (5, 8, 2)
    np.testing.assert_allclose(out, _np_bilinear(tex, uv, wrap), atol=2e-5)


def test_borders_repeat_and_clamp():
    tex = jnp.arange(12.0).reshape(3, 4, 1)
    corner = jnp.array([0.0, 1.0])  # top-left corner of the image
    # repeat: average of the four corner texels 0, 3, 8, 11
    np.testing.assert_allclose(sample_texture(tex, corner, wrap="repeat"), [5.5])
    np.testing.assert_allclose(sample_texture(tex, corner, wrap="clamp"), [0.0], atol=1e-5)
    # beyond the border clamp holds the edge texel, repeat tiles
    np.testing.assert_allclose(sample_texture(tex, jnp.array([-3.0, 1.0 - 0.5 / 3]), wrap="clamp"), [0.0], atol=1e-5)
    np.testing.assert_allclose(sample_texture(tex, jnp.array([1.0 + 1.5 / 4, 1.0 - 0.5 / 3]), wrap="repeat"), [1.0], atol=1e-5)
    np.testing.assert_allclose(sample_texture(tex, jnp.array([1.0 + 1.5 / 4, -0.5 / 3]), mode="nearest", wrap="repeat"), [1.0])
    np.testing.assert_allclose(sample_texture(tex, jnp.array([5.0, -5.0]), mode="nearest", wrap="clamp"), [11.0])


def test_validation():
    tex = jnp.zeros((4, 4, 3))
    with pytest.raises(ValueError, match="mode"):
        sample_texture(tex, jnp.zeros((2, 2)), mode="cubic")
    with pytest.raises(ValueError, match="wrap"):
        sample_texture(tex, jnp.zeros((2, 2)), wrap="mirror")
    with pytest.raises(ValueError, match="texture"):
        sample_texture(jnp.zeros((4, 4)), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="uv"):
        sample_texture(tex, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="uv"):
        sample_texture(tex, jnp.zeros((2, 2), jnp.int32))


def test_mipmaps(rng):
    tex = rng.uniform(size=(8, 6, 3)).astype(np.float32)
    mips = build_mipmaps(tex)
    assert [m.shape[:2] for m in mips] == [(8, 6), (4, 3), (2, 2), (1, 1)]
    np.testing.assert_allclose(mips[1][0, 0], tex[:2, :2].mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(mips[-1][0, 0], np.asarray(mips[2]).mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(build_mipmaps(tex[:, :4])[-1][0, 0], tex[:, :4].mean(axis=(0, 1)), rtol=1e-5)
    assert len(build_mipmaps(tex, levels=2)) == 2
    uv = jnp.asarray(rng.uniform(size=(10, 2)), jnp.float32)
    smip = jax.jit(sample_texture_mip)
    samp = jax.jit(sample_texture)
    np.testing.assert_allclose(smip(mips, uv, 0.0), samp(tex, uv), atol=1e-6)
    np.testing.assert_allclose(smip(mips, uv, 1.0), samp(mips[1], uv), atol=1e-6)
    half = 0.5 * (samp(mips[1], uv) + samp(mips[2], uv))
    np.testing.assert_allclose(smip(mips, uv, 1.5), half, atol=1e-6)
    np.testing.assert_allclose(smip(mips, uv, 10.0), np.broadcast_to(mips[-1][0, 0], (10, 3)), atol=1e-6)
    # per-point levels
    lv = jnp.asarray(rng.uniform(0, 3, size=10), jnp.float32)
    per_point = smip(mips, uv, lv)
    np.testing.assert_allclose(per_point[3], smip(mips, uv[3:4], lv[3])[0], atol=1e-6)


def test_jit_vmap_grad(rng, x64):
    tex = jnp.asarray(rng.uniform(size=(4, 5, 3)))
    # keep UVs away from texel-centre lines (kinks of the bilinear filter, and of clamp)
    # and from texel edges (jumps of nearest): offsets from a centre in (0.1, 0.4) u (0.6, 0.9)
    cells = rng.integers(-5, 10, size=(6, 2))
    frac = rng.uniform(0.1, 0.4, size=(6, 2)) + 0.5 * rng.integers(0, 2, size=(6, 2))
    uv = jnp.asarray(np.stack([(cells[:, 0] + 0.5 + frac[:, 0]) / 5, 1 - (cells[:, 1] + 0.5 + frac[:, 1]) / 4], -1))
    combos = [(m, wr) for m in ("bilinear", "nearest") for wr in ("repeat", "clamp")]

    def everything(t, u, lv):
        mips = build_mipmaps(t, levels=2)
        outs = [sample_texture(t, u, mode=m, wrap=wr) for m, wr in combos]
        outs.append(sample_texture_mip(mips, u, lv))
        return jnp.stack(outs)

    f = jax.jit(everything)
    ref = f(tex, uv, 0.7)
    # eager reference of one combination (the jitted stack must agree)
    np.testing.assert_allclose(ref[0], sample_texture(tex, uv), rtol=1e-12)
    vb = jax.jit(jax.vmap(everything))(jnp.stack([tex, 2 * tex]), jnp.stack([uv, uv + 0.1]), jnp.array([0.7, 0.3]))
    np.testing.assert_allclose(vb[0], ref, rtol=1e-12)
    np.testing.assert_allclose(vb[1], f(2 * tex, uv + 0.1, 0.3), rtol=1e-12)
    w = jnp.asarray(rng.normal(size=(5, 6, 3)))
    x0 = jnp.concatenate([tex.ravel(), uv.ravel(), jnp.array([0.7])])

    def packed(x):
        return jnp.sum(w * f(x[:60].reshape(4, 5, 3), x[60:72].reshape(6, 2), x[72]))

    check_grad(jax.jit(packed), x0)

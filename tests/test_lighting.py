import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import check_grad
from jaxrender.lighting import (
    AmbientLight,
    DirectionalLight,
    Material,
    PointLight,
    phong_shading,
    safe_normalize,
    sh_basis,
    sh_shading,
    shade_sh,
)


def _unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _np_basis(n):
    """Independent evaluation: Lambert constants times the textbook real SH Y_lm."""
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    a0, a1, a2 = math.pi, 2 * math.pi / math.sqrt(3), 2 * math.pi / math.sqrt(8)
    y00 = 0.5 * math.sqrt(1 / math.pi) * np.ones_like(x)
    y1 = math.sqrt(3 / (4 * math.pi))
    y2 = 0.5 * math.sqrt(15 / math.pi)
    y20 = 0.25 * math.sqrt(5 / math.pi)
    y22 = 0.25 * math.sqrt(15 / math.pi)
    return np.stack(
        [
            a0 * y00,
            -a1 * y1 * y,
            a1 * y1 * z,
            -a1 * y1 * x,
            a2 * y2 * x * y,
            -a2 * y2 * y * z,
            a2 * y20 * (3 * z * z - 1),
            -a2 * y2 * x * z,
            a2 * y22 * (x * x - y * y),
        ],
        axis=-1,
    )


def test_sh_basis_matches_numpy(rng):
    n = _unit(rng, 50)
    np.testing.assert_allclose(np.asarray(sh_basis(jnp.asarray(n, jnp.float32))), _np_basis(n), rtol=1e-5, atol=1e-6)


def test_sh_basis_batch_shapes_and_normalize(rng):
    n = _unit(rng, 12).reshape(3, 4, 3)
    assert sh_basis(jnp.asarray(n)).shape == (3, 4, 9)
    np.testing.assert_allclose(sh_basis(jnp.asarray(3 * n), normalize=True), sh_basis(jnp.asarray(n)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="normals"):
        sh_basis(jnp.zeros((4, 2)))


def test_sh_orthogonality_on_sphere(x64):
    # Gauss-Legendre in cos(theta) x uniform phi integrates these polynomials exactly.
    ct, wt = np.polynomial.legendre.leggauss(12)
    nphi = 24
    phi = 2 * np.pi * np.arange(nphi) / nphi
    st = np.sqrt(1 - ct**2)
    n = np.stack(np.broadcast_arrays(st[:, None] * np.cos(phi), st[:, None] * np.sin(phi), ct[:, None] * np.ones_like(phi)), -1)
    w = (wt[:, None] * np.full(nphi, 2 * np.pi / nphi)).reshape(-1)
    H = np.asarray(sh_basis(jnp.asarray(n.reshape(-1, 3), jnp.float64)))
    gram = (H * w[:, None]).T @ H
    a = np.array([np.pi] + [2 * np.pi / np.sqrt(3)] * 3 + [2 * np.pi / np.sqrt(8)] * 5)
    np.testing.assert_allclose(gram, np.diag(a**2), atol=1e-9)


def test_sh_shading_constant_and_offset(rng):
    n = jnp.asarray(_unit(rng, 20), jnp.float32)
    coeffs = np.zeros((3, 9), np.float32)
    coeffs[:, 0] = [0.2, 0.5, 1.0]
    irr = sh_shading(n, coeffs)
    k = math.sqrt(math.pi) / 2  # a0 * c0
    np.testing.assert_allclose(irr, np.broadcast_to(k * coeffs[:, 0], (20, 3)), rtol=1e-6)
    # FaceVerse init: zero coefficients + 0.8 offset -> 0.8 * a0 c0 everywhere
    np.testing.assert_allclose(sh_shading(n, jnp.zeros(27), offset=0.8), np.full((20, 3), 0.8 * k), rtol=1e-6)


def test_sh_shading_layouts_agree(rng):
    n = jnp.asarray(_unit(rng, 10), jnp.float32)
    g = rng.normal(size=(3, 9)).astype(np.float32)
    a = sh_shading(n, g)
    np.testing.assert_allclose(sh_shading(n, g.T, layout="9x3"), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sh_shading(n, g.reshape(27)), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sh_shading(n, g.T.reshape(27), layout="9x3"), a, rtol=1e-5, atol=1e-6)
    ref = _np_basis(np.asarray(n, np.float64)) @ g.T
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        sh_shading(n, g, layout="27")
    with pytest.raises(ValueError, match="sh_coeffs"):
        sh_shading(n, g.T)


def test_shade_sh_matches_faceverse_formula(rng):
    # FaceVerse add_illumination: gamma.view(3, 9); gamma[:, 0] += 0.8; colour = albedo * (Y @ gamma.T)
    n = _unit(rng, 15)
    alb = rng.uniform(size=(15, 3))
    gamma = rng.normal(scale=0.2, size=27)
    g = gamma.reshape(3, 9).copy()
    g[:, 0] += 0.8
    ref = alb * (_np_basis(n) @ g.T)
    out = shade_sh(jnp.asarray(alb, jnp.float32), jnp.asarray(n, jnp.float32), jnp.asarray(gamma, jnp.float32), offset=0.8)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_sh_jit_vmap_grad(rng, x64):
    n = jnp.asarray(_unit(rng, 6))
    g = jnp.asarray(rng.normal(size=(4, 3, 9)))
    alb = jnp.asarray(rng.uniform(size=(6, 3)))

    def everything(nn, c, a):
        return (
            sh_basis(nn, normalize=True),
            sh_shading(nn, c, offset=0.8),
            sh_shading(nn, c.T, layout="9x3"),
            shade_sh(a, nn, c.reshape(27)),
        )

    f = jax.jit(everything)
    nb = jnp.stack([n, 1.3 * n, -n, n[::-1]])
    batched = jax.jit(jax.vmap(everything))(nb, g, jnp.stack([alb] * 4))
    for i in range(4):
        for got, want in zip(batched, f(nb[i], g[i], alb)):
            np.testing.assert_allclose(got[i], want, rtol=1e-12)
    # one packed gradient check through every function and argument
    w = [jnp.asarray(rng.normal(size=(6, k))) for k in (9, 3, 3, 3)]
    x0 = jnp.concatenate([(1.3 * n).ravel(), g[0].ravel(), alb.ravel()])

    def packed(x):
        outs = f(x[:18].reshape(6, 3), x[18:45].reshape(3, 9), x[45:].reshape(6, 3))
        return sum(jnp.sum(wi * o) for wi, o in zip(w, outs))

    check_grad(jax.jit(packed), x0)


# ---------------------------------------------------------------- Phong


def test_phong_light_above_plane():
    # plane z = 0 with normal +z, light straight above, eye straight above
    pts = jnp.array([[0.0, 0.0, 0.0]])
    nrm = jnp.array([[0.0, 0.0, 1.0]])
    alb = jnp.array([[0.5, 0.25, 1.0]])
    mat = Material(ambient=0.1, diffuse=0.7, specular=0.4, shininess=8.0)
    amb = AmbientLight((1.0, 0.5, 1.0))
    pl = PointLight((0.0, 0.0, 5.0), color=(1.0, 1.0, 1.0), specular_color=(0.5, 0.5, 0.5))
    out = phong_shading(pts, nrm, alb, [amb, pl], mat, eye=jnp.array([0.0, 0.0, 3.0]))
    # n.l = 1, r = n, r.v = 1
    ref = (0.1 * np.array([1.0, 0.5, 1.0]) + 0.7 * 1.0) * np.asarray(alb) + 0.4 * 0.5
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    # the same with a directional light pointing towards the light (+z) and Blinn
    dl = DirectionalLight((0.0, 0.0, 2.0), color=1.0, specular_color=0.5)
    out2 = phong_shading(pts, nrm, alb, (amb, dl), mat, eye=jnp.array([0.0, 0.0, 3.0]), blinn=True)
    np.testing.assert_allclose(out2, ref, rtol=1e-6)


def test_phong_oblique_closed_form():
    # light at 60 degrees from the normal, eye along the mirror direction -> r.v = 1
    th = np.pi / 3
    l = np.array([np.sin(th), 0.0, np.cos(th)])
    pts = jnp.zeros((1, 3))
    nrm = jnp.array([[0.0, 0.0, 1.0]])
    alb = jnp.ones((1, 3))
    mat = Material(ambient=0.0, diffuse=1.0, specular=1.0, shininess=4.0)
    dl = DirectionalLight(l, color=1.0, specular_color=1.0)
    eye = jnp.asarray(np.array([-np.sin(th), 0.0, np.cos(th)]) * 2)
    out = phong_shading(pts, nrm, alb, dl, mat, eye=eye)
    np.testing.assert_allclose(out, np.full((1, 3), np.cos(th) + 1.0), rtol=1e-5)
    # Blinn: h = normalize(l + v) = +z -> n.h = 1 as well
    np.testing.assert_allclose(phong_shading(pts, nrm, alb, dl, mat, eye=eye, blinn=True), np.full((1, 3), np.cos(th) + 1.0), rtol=1e-5)
    # eye straight above: r.v = cos(th); Blinn n.h = cos(th/2)
    eye2 = jnp.array([0.0, 0.0, 2.0])
    np.testing.assert_allclose(phong_shading(pts, nrm, alb, dl, mat, eye=eye2), np.full((1, 3), np.cos(th) + np.cos(th) ** 4), rtol=1e-5)
    np.testing.assert_allclose(
        phong_shading(pts, nrm, alb, dl, mat, eye=eye2, blinn=True), np.full((1, 3), np.cos(th) + np.cos(th / 2) ** 4), rtol=1e-5
    )
    # light behind the surface: nothing but ambient
    back = DirectionalLight(-l, color=1.0, specular_color=1.0)
    np.testing.assert_allclose(phong_shading(pts, nrm, alb, back, mat, eye=eye), np.zeros((1, 3)), atol=1e-7)


def test_phong_stacked_lights_equal_list(rng):
    pts = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    nrm = jnp.asarray(_unit(rng, 7), jnp.float32)
    alb = jnp.asarray(rng.uniform(size=(7, 3)), jnp.float32)
    pos = rng.normal(size=(3, 3)) * 4
    cols = rng.uniform(size=(3, 3))
    mat = Material(shininess=5.0)
    eye = jnp.array([0.0, 0.0, 6.0])
    shade = jax.jit(phong_shading)
    stacked = shade(pts, nrm, alb, PointLight(pos, cols, cols * 0.5), mat, eye)
    listed = shade(pts, nrm, alb, [PointLight(pos[i], cols[i], cols[i] * 0.5) for i in range(3)], mat, eye)
    np.testing.assert_allclose(stacked, listed, rtol=1e-5, atol=1e-6)
    d = _unit(rng, 2)
    s2 = shade(pts, nrm, alb, DirectionalLight(d, 0.7, 0.2), mat, eye)
    l2 = shade(pts, nrm, alb, [DirectionalLight(d[0], 0.7, 0.2), DirectionalLight(d[1], 0.7, 0.2)], mat, eye)
    np.testing.assert_allclose(s2, l2, rtol=1e-5, atol=1e-6)


def test_phong_matches_numpy_pytorch3d_formula(rng):
    pts = rng.normal(size=(9, 3))
    nrm = rng.normal(size=(9, 3))
    alb = rng.uniform(size=(9, 3))
    loc = np.array([1.0, 2.0, 3.0])
    eye = np.array([0.5, -1.0, 4.0])
    amb, dif, spc, sh = np.array([0.5, 0.4, 0.3]), np.array([0.3, 0.3, 0.2]), np.array([0.2, 0.1, 0.2]), 10.0

    def nz(v):
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)

    n = nz(nrm)
    l = nz(loc - pts)
    cos = (n * l).sum(-1)
    v = nz(eye - pts)
    r = -l + 2 * cos[:, None] * n
    alpha = np.maximum((v * r).sum(-1), 0) * (cos > 0)
    ref = (amb + dif * np.maximum(cos, 0)[:, None]) * alb + spc * alpha[:, None] ** sh
    out = phong_shading(
        jnp.asarray(pts, jnp.float32),
        jnp.asarray(nrm, jnp.float32),
        jnp.asarray(alb, jnp.float32),
        [AmbientLight(amb), PointLight(loc, dif, spc)],
        Material(shininess=sh),
        eye=jnp.asarray(eye, jnp.float32),
    )
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_phong_degenerate_inputs_finite():
    pts = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    nrm = jnp.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lights = [PointLight((0.0, 0.0, 0.0), 1.0, 1.0), DirectionalLight((0.0, 0.0, 0.0), 1.0, 1.0)]

    def f(p, n, e, s):
        return phong_shading(p, n, jnp.ones((2, 3)), lights, Material(shininess=s), eye=e).sum()

    val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(pts, nrm, jnp.zeros(3), 4.0)
    assert np.isfinite(val)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.isfinite(jax.grad(lambda v: safe_normalize(v).sum())(jnp.zeros(3))))


def test_phong_validation():
    with pytest.raises(ValueError, match="points"):
        phong_shading(jnp.zeros((3, 2)), jnp.zeros((3, 3)), jnp.zeros((3, 3)), AmbientLight())
    with pytest.raises(TypeError, match="lights"):
        phong_shading(jnp.zeros((3, 3)), jnp.zeros((3, 3)), jnp.zeros((3, 3)), "sun")
    with pytest.raises(ValueError, match="color"):
        AmbientLight((1.0, 1.0))
    with pytest.raises(ValueError, match="direction"):
        DirectionalLight((1.0, 0.0))


def test_phong_jit_vmap_grad(rng, x64):
    pts = jnp.asarray(rng.normal(size=(5, 3)))
    nrm = jnp.asarray(_unit(rng, 5) + np.array([0, 0, 2.0]))
    alb = jnp.asarray(rng.uniform(size=(5, 3)))
    eye = jnp.array([0.3, 0.2, 5.0])

    def shade(p, n, a, lpos, ldir, e, shin, blinn=False):
        lights = [AmbientLight(0.2), PointLight(lpos, 0.8, 0.6), DirectionalLight(ldir, 0.4, 0.3)]
        return phong_shading(p, n, a, lights, Material(0.9, 0.8, 0.7, shin), eye=e, blinn=blinn)

    lpos = jnp.array([0.5, -0.3, 4.0])
    ldir = jnp.array([0.2, 0.1, 1.0])
    jshade = jax.jit(shade, static_argnums=7)
    # vmap over a batch of light positions and point sets, against single calls
    lp = jnp.stack([lpos, lpos + 1.0])
    pb = jnp.stack([pts, pts * 0.5])
    vb = jax.jit(jax.vmap(lambda p, l: shade(p, nrm, alb, l, ldir, eye, 7.0)))(pb, lp)
    np.testing.assert_allclose(vb[1], jshade(pts * 0.5, nrm, alb, lpos + 1.0, ldir, eye, 7.0), rtol=1e-12)
    np.testing.assert_allclose(vb[0], jshade(pts, nrm, alb, lpos, ldir, eye, 7.0), rtol=1e-12)
    w = jnp.asarray(rng.normal(size=(5, 3)))
    w2 = jnp.asarray(rng.normal(size=(5, 3)))
    # all dot products stay away from the max(0, .) kinks at these inputs; pack every
    # differentiable input into one vector so that one check covers Phong and Blinn
    sizes = [15, 15, 15, 3, 3, 3, 1]
    x0 = jnp.concatenate([pts.ravel(), nrm.ravel(), alb.ravel(), lpos, ldir, eye, jnp.array([7.0])])

    def unpack(x):
        parts = jnp.split(x, np.cumsum(sizes)[:-1])
        return [parts[0].reshape(5, 3), parts[1].reshape(5, 3), parts[2].reshape(5, 3), parts[3], parts[4], parts[5], parts[6][0]]

    check_grad(jax.jit(lambda x: jnp.sum(w * shade(*unpack(x), False)) + jnp.sum(w2 * shade(*unpack(x), True))), x0)

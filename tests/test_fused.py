"""The fused shading + blending kernels (raster/fused.py) against the XLA render path.

Marked ``gpu``: compiled on a GPU (skipped without one). One case per blend
mode also runs on the CPU in Pallas' interpret mode, which executes the
kernels' arithmetic (not Triton's code generation).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrender as jr
from jaxrender.blend import BlendParams
from jaxrender.lighting import AmbientLight, DirectionalLight, Material, PointLight
from jaxrender.raster import fused

H, W = 20, 24


def _scene(seed, degenerate=False):
    """A jittered bumpy sphere seen off-axis; optionally with zero-area and duplicated faces."""
    m = jr.mesh.bumpy_sphere(10, 12)
    rng = np.random.default_rng(seed)
    v = np.asarray(m.vertices) + rng.normal(scale=0.03, size=m.vertices.shape)
    f = np.asarray(m.faces)
    if degenerate:
        f = np.concatenate([f, f[:5], np.stack([f[:5, 0], f[:5, 0], f[:5, 1]], -1)])  # duplicates and slivers
    c = rng.uniform(0.2, 1.0, size=v.shape)
    cam = jr.camera.look_at(eye=(0.4, 0.3, 2.6), target=(0, 0, 0), fov_y_deg=60.0, width=W, height=H,
                            znear=1.0, zfar=20.0)
    return jnp.asarray(v, jnp.float32), jnp.asarray(f, jnp.int32), jnp.asarray(c, jnp.float32), cam


def _settings(fast, K=4, blur=2e-3, **kw):
    base = dict(image_size=(H, W), faces_per_pixel=K, blur_radius=blur, bin_size=8, **kw)
    if fast == "interpret":
        return jr.RasterSettings(pallas_interpret=True, pallas_block=8, **base)
    if fast:
        return jr.RasterSettings(backend="pallas", **base)
    return jr.RasterSettings(backend="xla", **base)


def _render(mode, shading, v, f, c, cam, s, light_pos, blend_vec, material=None):
    mesh = jr.Mesh(v, f, vertex_colors=c)
    lights = (AmbientLight((0.4, 0.5, 0.45)), PointLight(position=light_pos, color=0.6, specular_color=0.3),
              DirectionalLight(direction=(0.2, 1.0, 0.5), color=(0.2, 0.1, 0.3), specular_color=0.1))
    sigma, gamma = blend_vec[0], blend_vec[1]
    if mode == "silhouette":
        return jr.render_silhouette(mesh, cam, s, sigma=sigma)[..., None]
    bp = BlendParams(sigma, gamma, blend_vec[2:5])
    return jr.render_mesh(mesh, cam, lights, s, shading=shading, material=material, blend=bp, hard=mode == "hard")


def _compare(fast, mode, shading="phong", K=4, blur=2e-3, seed=0, degenerate=False, grad=True, **kw):
    v, f, c, cam = _scene(seed, degenerate)
    light_pos = jnp.asarray([0.5, 1.0, 3.0], jnp.float32)
    blend_vec = jnp.asarray([2e-3, 2e-2, 0.9, 0.8, 0.7], jnp.float32)
    mat = Material(ambient=0.9, diffuse=(1.0, 0.8, 0.9), specular=0.7, shininess=20.0)
    ref_s, new_s = _settings(False, K, blur, **kw), _settings(fast, K, blur, **kw)
    args = (v, c, light_pos, blend_vec)

    def img(v_, c_, lp, bv, s):
        return _render(mode, shading, v_, f, c_, cam, s, lp, bv, mat)

    a, b = img(*args, ref_s), img(*args, new_s)
    assert a.shape == b.shape
    assert float(jnp.abs(a - b).max()) <= 1e-4
    if not grad:
        return
    w = jnp.asarray(np.random.default_rng(seed + 7).normal(size=a.shape), jnp.float32)
    argnums = (0, 1, 2, 3) if mode != "silhouette" else (0, 3)
    ga = jax.grad(lambda *x: jnp.sum(img(*x, ref_s) * w), argnums=argnums)(*args)
    gb = jax.grad(lambda *x: jnp.sum(img(*x, new_s) * w), argnums=argnums)(*args)
    for i, (x, y) in zip(argnums, zip(ga, gb)):
        scale = max(float(jnp.abs(x).max()), 1e-6)
        assert float(jnp.abs(x - y).max()) / scale <= 1e-3, (i, x, y)
    return a


@pytest.mark.slow  # ~140 s on 2 CPU cores; the silhouette/hard case below runs the same backward kernel by default
def test_fused_interpret_soft_phong_matches_xla():
    img = _compare("interpret", "soft", "phong")
    assert float(img[..., 3].max()) > 0.9  # the sphere is in view


def test_fused_interpret_silhouette_and_hard_match_xla():
    _compare("interpret", "silhouette", K=6)
    _compare("interpret", "hard", "unlit", K=1, blur=0.0)


@pytest.mark.parametrize("replicas", [1, 3])
def test_fused_interpret_gradient_table_copies_match_xla(monkeypatch, replicas):
    """Gradients are the same with one copy of the backward's table or a count that divides no tile."""
    monkeypatch.setattr(fused, "ATOMIC_REPLICAS", replicas)
    monkeypatch.setattr(fused, "COPIES_MIN_PIXELS_PER_FACE", 0)  # copies at any mesh size
    assert fused.gradient_table_copies(10 ** 6, (H, W)) == replicas
    _compare("interpret", "silhouette", K=3)


def test_gradient_table_copies_only_for_faces_large_on_screen():
    n = fused.COPIES_MIN_PIXELS_PER_FACE
    assert fused.gradient_table_copies(256 * 256 // n, (256, 256)) == fused.ATOMIC_REPLICAS
    assert fused.gradient_table_copies(256 * 256 // n + 1, (256, 256)) == 1
    assert fused.gradient_table_copies(105_800, (512, 512)) == 1  # the face scene: 2.5 pixels per face
    assert fused.gradient_table_copies(2_520, (256, 256)) == fused.ATOMIC_REPLICAS  # small_256: 26


def test_shade_matches_phong_shading():
    """The kernel's tuple Phong equals lighting.phong_shading (several lights and a material)."""
    from jaxrender.lighting import phong_shading

    rng = np.random.default_rng(3)
    p, n, alb = (jnp.asarray(rng.normal(size=(50, 3)), jnp.float32) for _ in range(3))
    eye = jnp.asarray([0.3, -0.2, 2.5], jnp.float32)
    lights = (AmbientLight(0.3), PointLight(position=(1.0, 2.0, 3.0), color=(0.5, 0.4, 0.3), specular_color=0.2),
              DirectionalLight(direction=[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], color=0.3, specular_color=0.5))
    mat = Material(ambient=0.8, diffuse=(1.0, 0.9, 0.8), specular=0.6, shininess=15.0)
    kinds, sp = fused.shading_params("phong", lights, mat, eye)
    assert kinds == (True, False, False)
    cfg = fused.Config("soft", "phong", kinds, True, 9, sp.shape[0], 7, (8, 8), 8, 1, 1, (), 4, False)
    got = jnp.stack(fused.shade(cfg, tuple(p.T) + tuple(n.T) + tuple(alb.T), tuple(sp), jnp.ones(50)), -1)
    np.testing.assert_allclose(got, phong_shading(p, n, alb, lights, mat, eye), rtol=1e-5, atol=1e-6)


def test_fused_settings_off_uses_xla_path():
    """``fused=False`` keeps the banded XLA path (no Pallas kernels, so it runs anywhere)."""
    v, f, c, cam = _scene(0)
    s = jr.RasterSettings(image_size=(H, W), faces_per_pixel=2, blur_radius=1e-3, bin_size=8, fused=False,
                          backend="xla")
    jaxpr = str(jax.make_jaxpr(lambda v_: jr.render_mesh(jr.Mesh(v_, f, vertex_colors=c), cam, None, s))(v))
    assert "pallas_call" not in jaxpr


GPU_CASES = [  # mode, shading, K, blur, extra settings
    ("soft", "phong", 4, 2e-3, {}),
    ("soft", "gouraud", 4, 2e-3, {}),
    ("soft", "unlit", 10, 5e-3, {}),
    ("soft", "phong", 3, 2e-3, {"perspective_correct": False}),
    ("soft", "phong", 4, 2e-3, {"cull_backfaces": True}),
    ("soft", "phong", 8, 5e-3, {"max_faces_per_bin": 6}),  # overflowing tiles
    ("hard", "unlit", 1, 0.0, {}),
    ("hard", "phong", 1, 0.0, {}),
    ("silhouette", None, 10, 5e-3, {}),
    ("silhouette", None, 50, 1e-2, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_fused_gpu_matches_xla(case):
    """Every case's mesh also holds duplicated and zero-area faces (each case compiles ~30 s of kernels)."""
    mode, shading, K, blur, kw = case
    _compare(True, mode, shading, K, blur, seed=K, degenerate=True, **kw)


@pytest.mark.gpu
def test_fused_gpu_vmap_and_jit():
    """Batched over meshes under jit: each element equals its own XLA render (images and gradients)."""
    v, f, c, cam = _scene(1)
    vs = jnp.stack([v, v * 0.9, v + 0.05])
    cs = jnp.stack([c, c[::-1], 1.0 - c])
    lights = (AmbientLight(0.5), PointLight(position=(0.0, 0.0, 3.0), color=0.3, specular_color=0.2))

    def loss(vb, cb, s):
        img = jax.vmap(lambda v_, c_: jr.render_mesh(jr.Mesh(v_, f, vertex_colors=c_), cam, lights, s))(vb, cb)
        return jnp.sum(img * jnp.arange(img.size, dtype=jnp.float32).reshape(img.shape) / img.size), img

    fast, ref = _settings(True, 5, 2e-3), _settings(False, 5, 2e-3)
    (la, ia), ga = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(vs, cs, ref)
    (lb, ib), gb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(vs, cs, fast)
    assert float(jnp.abs(ia - ib).max()) <= 1e-4
    for x, y in zip(ga, gb):
        assert float(jnp.abs(x - y).max() / jnp.abs(x).max()) <= 1e-3

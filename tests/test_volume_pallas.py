"""The fused ray-marching kernels (jaxrender/volume_pallas.py) against the XLA path of render_volume.

On the CPU the kernels run in Pallas' interpret mode, which executes their
arithmetic (not Triton's code generation); the tests marked ``gpu`` compile
them (skipped without a GPU). Outputs must match the XLA path to 1e-5 and
gradients to 1e-4 of their largest entry.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrender import camera as cam
from jaxrender import volume as V
from jaxrender import volume_pallas as VP

OUT_TOL = 1e-5
GRAD_TOL = 1e-4
# Interpreted kernels make large XLA programs; LLVM's optimizations only cost compile time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _grid(seed=0, shape=(8, 8, 8), C=3, dmax=0.3, voxel_size=3.0 / 8, center=(0.0, 0.0, 0.0)):
    rng = np.random.default_rng(seed)
    d = jnp.asarray(rng.uniform(0, dmax, size=shape), jnp.float32)
    f = jnp.asarray(rng.uniform(0, 1, size=shape + (C,)), jnp.float32) if C else None
    return V.VoxelGrid(d, f, voxel_size, jnp.asarray(center, jnp.float32))


def _camera(width=8, height=6, eye=(0.3, -0.2, 2.7)):
    return cam.look_at(jnp.array(eye), fov_y_deg=60.0, width=width, height=height)


def _options(backend, merge=True, block=16, interpret=True, clip=True):
    if backend == "xla":
        return dict(backend="xla")
    return dict(backend="pallas", interpret=interpret,
                pallas_options={"block_rays": block, "merge_corners": merge, "clip_to_box": clip})


def _weights(out, seed=1):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in sorted(out.items())}


def _run(grid, backend, *, rays=None, camera=None, merge=True, block=16, interpret=True, clip=True, **kw):
    """Outputs and the gradient of a random linear function of them w.r.t. densities and features."""
    opts = _options(backend, merge, block, interpret, clip)
    w = _weights(jax.eval_shape(lambda g: V.render_volume(g, camera, rays=rays, backend="xla", **kw), grid))

    def loss(d, f):
        g = V.VoxelGrid(d, f, grid.voxel_size, grid.center)
        out = V.render_volume(g, camera, rays=rays, **opts, **kw)
        return sum(jnp.sum(out[k] * w[k]) for k in w), out

    argnums = (0, 1) if grid.features is not None else (0,)
    copts = FAST_COMPILE if backend != "xla" and interpret else None
    grads, out = jax.jit(jax.grad(loss, argnums, has_aux=True), compiler_options=copts)(grid.densities, grid.features)
    return out, grads


def _compare(grid, *, merge=True, block=16, interpret=True, clip=True, **kw):
    a, ga = _run(grid, "xla", **kw)
    b, gb = _run(grid, "pallas", merge=merge, block=block, interpret=interpret, clip=clip, **kw)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        err = float(jnp.max(jnp.abs(a[k] - b[k])))
        assert err <= OUT_TOL, (k, err)
    for i, (x, y) in enumerate(zip(ga, gb)):
        scale = float(jnp.max(jnp.abs(x)))
        assert scale > 0, i
        err = float(jnp.max(jnp.abs(x - y))) / scale
        assert err <= GRAD_TOL, (i, err)
    return a, ga


# ---------------------------------------------------------------- interpret mode (CPU)


@pytest.mark.parametrize("mode", ["pytorch3d", "physical", "absorption"])
def test_modes_match_xla(mode):
    grid = _grid(dmax=3.0 if mode == "physical" else 0.3)
    if mode == "absorption":  # features are not sampled: only the densities have a gradient
        grid = V.VoxelGrid(grid.densities, None, grid.voxel_size, grid.center)
    _compare(grid, camera=_camera(), n_samples=16, near=0.5, far=5.0, mode=mode)


def test_direct_scatter_all_samples_match_xla():
    """Without merging the corners (every sample adds its 8 corners) and marching every sample."""
    _compare(_opaque_grid(3), rays=_boundary_rays(), merge=False, clip=False, n_samples=16, near=0.0, far=15.0)


@pytest.mark.parametrize("jitter", [False, True])
def test_block_range_covers_the_samples_inside(jitter):
    """The samples a program marches include every sample of its rays inside the open box."""
    rng = np.random.default_rng(11)
    S, n, dims = 40, 512, (7, 9, 12)  # padded table (D + 2, H + 2, W + 2): sizes (x, y, z) = (10, 7, 5)
    o = rng.uniform(-8, 14, size=(n, 3)).astype(np.float32)
    o[:40] = rng.uniform(0, 4, size=(40, 3))  # starting inside
    d = rng.normal(size=(n, 3)).astype(np.float32)
    d[40:80, rng.integers(0, 3, 40)] = 0.0  # parallel to a face
    d[80:100] = [1.0, 0.0, 0.0]
    o[80:100, 1] = rng.choice([-1.0, 7.0, 3.0, -1.0000001], 20)  # on the faces u_y = -1 and u_y = size
    near, far = 0.5, 20.0
    t, _ = V.ray_depths(S, near, far, key=jax.random.PRNGKey(0) if jitter else None, shape=(n,))
    cfg = VP.MarchConfig("pytorch3d", S, dims, 4, 1e-10, jitter, 1, 4, True, True, True)
    sizes = np.array([dims[2] - 2, dims[1] - 2, dims[0] - 2], np.float32)
    coords = o[:, None, :] + np.asarray(t)[..., None] * d[:, None, :]
    inside = np.all((coords > -1) & (coords < sizes), axis=-1)  # (n, S)
    prm = jnp.asarray([near, far], jnp.float32)
    block_range = jax.jit(lambda o_, d_: VP._block_range(cfg, prm, tuple(o_[:, None]), tuple(d_[:, None])))
    n_hit = n_skipped = 0
    for r in range(n):  # one ray per "block"
        k0, k1 = (int(k) for k in block_range(jnp.asarray(o[r]), jnp.asarray(d[r])))
        ks = np.nonzero(inside[r])[0]
        n_hit += len(ks) > 0
        n_skipped += S - max(k1 - k0 + 1, 0)
        if len(ks):
            assert k0 <= ks[0] and ks[-1] <= k1, (r, k0, k1, ks)
    assert n_hit > 100 and n_skipped > n * S // 2


def _boundary_rays():
    """Rays on voxel-centre lines (samples exactly on cell boundaries of the padded table, and on the
    open box's faces u = -1 and u = size), rays starting inside, rays that miss the grid."""
    # voxel_size 1, centre 0, 8^3: u = p + 3.5, so p = -4.5 is u = -1 and p = 4.5 is u = 8.
    o = [(-7.5, 0.5, -0.5), (-0.5, -7.5, 0.5), (1.5, 0.5, -7.5),  # along +x, +y, +z on centre lines
         (-7.5, -7.5, -0.5), (0.0, 0.2, 0.1), (0.5, 0.5, 0.5),  # diagonal; starting inside
         (-7.5, 4.5, 0.5), (-7.5, 6.0, 0.5), (7.5, 0.5, 0.5),  # grazing the face u_y = 8; missing; pointing away
         (-7.5, -0.5, -0.5)]
    d = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0), (1.0, -0.5, 0.25), (0.0, 0.0, -1.0),
         (1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.5, 0.0)]
    return V.Rays(jnp.asarray(o, jnp.float32), jnp.asarray(d, jnp.float32))


def _opaque_grid(seed):
    """Opacities of exactly 1 (transmittance 0 behind them) and just below 1, voxel size 1."""
    grid = _grid(seed=seed, voxel_size=1.0, dmax=0.5)
    d = grid.densities.at[3:5, 2:6, 2:6].set(1.0).at[6, :, :].set(0.9999)
    return V.VoxelGrid(d, grid.features, grid.voxel_size, grid.center)


def test_boundary_rays_opaque_voxels_match_xla():
    rays = _boundary_rays()
    t, _ = V.ray_depths(16, 0.0, 15.0)
    assert bool(jnp.all(t == jnp.round(t)))  # the premise: samples on integer voxel coordinates
    out, _ = _compare(_opaque_grid(4), rays=rays, n_samples=16, near=0.0, far=15.0)
    assert float(out["opacity"][7]) == 0.0 and float(out["opacity"][8]) == 0.0  # the misses


def test_jitter_chunks_background_match_xla():
    """Stratified depths drawn per chunk exactly as the XLA path draws them, and a background colour."""
    grid = _grid(seed=6, dmax=2.0)
    _compare(grid, camera=_camera(width=8, height=6), n_samples=16, near=0.5, far=5.0, mode="physical",
             key=jax.random.PRNGKey(3), chunk_size=20, background=jnp.asarray([0.2, 0.5, 0.9]))


def test_density_only_grid_and_eps_match_xla():
    """No features (opacity and depth only) and an eps that float32 does not round away."""
    grid = _grid(seed=7, C=0, dmax=0.6)
    _compare(grid, camera=_camera(), n_samples=16, near=0.5, far=5.0, eps=1e-3, block=32)


def test_ray_gradients_come_from_xla():
    """Gradients w.r.t. rays, near and voxel size (XLA) next to the grid's (kernel) match the XLA path."""
    grid = _grid(seed=8, C=2)
    rays = V.grid_rays(_camera(width=5, height=4))
    kw = dict(n_samples=12, far=5.0)

    def loss(backend, d, o, dirs, near, vs):
        g = V.VoxelGrid(d, grid.features, vs, grid.center)
        out = V.render_volume(g, rays=V.Rays(o, dirs), near=near, **kw, **_options(backend))
        return jnp.sum(out["rgb"] * jnp.asarray([0.7, -1.3])) + jnp.sum(out["opacity"]) + 0.1 * jnp.sum(out["depth"])

    args = (grid.densities, rays.origins, rays.directions, jnp.float32(0.5), grid.voxel_size)
    ga = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3, 4)))(*args)
    gb = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2, 3, 4)), compiler_options=FAST_COMPILE)(*args)
    for i, (x, y) in enumerate(zip(ga, gb)):
        scale = float(jnp.max(jnp.abs(x)))
        assert scale > 0, i
        assert float(jnp.max(jnp.abs(x - y))) / scale <= GRAD_TOL, i


def test_backend_selection():
    grid = _grid(seed=9)
    c = _camera(width=4, height=3)
    kw = dict(n_samples=8, near=0.5, far=5.0)
    if not VP.pallas_available():  # CPU: auto is the XLA path itself
        a = V.render_volume(grid, c, **kw, backend="xla")
        b = V.render_volume(grid, c, **kw)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    with pytest.raises(ValueError, match="return_weights"):
        V.render_volume(grid, c, **kw, return_weights=True, backend="pallas", interpret=True)
    out = V.render_volume(grid, c, **kw, return_weights=True, interpret=True)  # auto: falls back to XLA
    assert out["weights"].shape == (3, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        V.render_volume(grid, c, **kw, backend="triton")
    with pytest.raises(ValueError, match="unknown keys"):
        V.render_volume(grid, c, **kw, backend="pallas", interpret=True, pallas_options={"rays": 64})
    with pytest.raises(ValueError, match="power of two"):
        V.render_volume(grid, c, **kw, backend="pallas", interpret=True, pallas_options={"block_rays": 48})
    wide = V.VoxelGrid(grid.densities, jnp.zeros(grid.shape + (VP.MAX_CHANNELS,)), grid.voxel_size)
    with pytest.raises(ValueError, match="channels"):
        V.render_volume(wide, c, **kw, backend="pallas", interpret=True)


def test_float64_grid_needs_xla(x64):
    grid = _grid(seed=10)
    g64 = V.VoxelGrid(grid.densities.astype(jnp.float64), grid.features.astype(jnp.float64), 3.0 / 8)
    with pytest.raises(ValueError, match="float64"):
        V.render_volume(g64, _camera(4, 3), n_samples=8, backend="pallas", interpret=True)


# ---------------------------------------------------------------- compiled (GPU)


def _gpu_scene(seed, G=32, views=2, size=40):
    grid = _grid(seed=seed, shape=(G, G, G), dmax=0.2, voxel_size=3.0 / G)
    cams = [_camera(size, size, eye=(2.7 * np.sin(a), 0.4, 2.7 * np.cos(a))) for a in np.linspace(0, 2, views)]
    o, d = zip(*[cam.pixel_rays(c, normalize=False) for c in cams])
    o = jnp.stack([jnp.broadcast_to(oi, di.shape) for oi, di in zip(o, d)])
    rays = V.Rays(o, jnp.stack(d))
    return grid, rays


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["pytorch3d", "physical", "absorption"])
@pytest.mark.parametrize("merge", [True, False])
def test_gpu_matches_xla(mode, merge):
    grid, rays = _gpu_scene(0)
    if mode == "physical":
        grid = V.VoxelGrid(grid.densities * 10, grid.features, grid.voxel_size, grid.center)
    if mode == "absorption":
        grid = V.VoxelGrid(grid.densities, None, grid.voxel_size, grid.center)
    _compare(grid, rays=rays, n_samples=96, near=0.1, far=3.0, mode=mode, merge=merge, block=128,
             interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("block, warps", [(128, 4), (256, 8), (64, 2)])
def test_gpu_jitter_blocks_match_xla(block, warps):
    """Stratified depths, a ray count that is not a multiple of the block, other block sizes."""
    grid, rays = _gpu_scene(1, views=1, size=37)
    a, ga = _run(grid, "xla", rays=rays, n_samples=64, near=0.1, far=3.0, key=jax.random.PRNGKey(0))
    opts = dict(backend="pallas", pallas_options={"block_rays": block, "num_warps": warps})
    w = _weights(a)

    def loss(d, f):
        out = V.render_volume(V.VoxelGrid(d, f, grid.voxel_size, grid.center), rays=rays, n_samples=64, near=0.1,
                              far=3.0, key=jax.random.PRNGKey(0), **opts)
        return sum(jnp.sum(out[k] * w[k]) for k in w), out

    gb, b = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(grid.densities, grid.features)
    for k in a:
        assert float(jnp.max(jnp.abs(a[k] - b[k]))) <= OUT_TOL, k
    for x, y in zip(ga, gb):
        assert float(jnp.max(jnp.abs(x - y))) / float(jnp.max(jnp.abs(x))) <= GRAD_TOL


@pytest.mark.gpu
def test_gpu_benchmark_scene_gradients_match_xla():
    """The benchmark's set-up at a smaller size: sigmoid logits, Huber loss, auto backend (the kernels)."""
    from benchmarks.volume import huber, make_cameras

    G, S = 64, 48
    cams = make_cameras(2, S)
    origins, dirs = jax.vmap(lambda c: cam.pixel_rays(c, normalize=False))(cams)
    rays = V.Rays(jnp.broadcast_to(origins, dirs.shape), dirs)
    rng = np.random.default_rng(2)
    p = {"density": jnp.asarray(rng.normal(-2.0, 1.0, (G, G, G)), jnp.float32),
         "color": jnp.asarray(rng.normal(0.0, 1.0, (G, G, G, 3)), jnp.float32)}
    target = jnp.asarray(rng.uniform(size=(2, S, S, 3)), jnp.float32)

    def loss(p, backend):
        grid = V.VoxelGrid.from_activations(p["density"], p["color"], voxel_size=3.0 / G)
        out = V.render_volume(grid, rays=rays, n_samples=150, near=0.1, far=3.0, backend=backend)
        return huber(out["rgb"], target) + huber(out["opacity"], target[..., 0])

    ga = jax.jit(jax.grad(loss), static_argnums=1)(p, "xla")
    gb = jax.jit(jax.grad(loss), static_argnums=1)(p, None)
    for k in ga:
        assert float(jnp.max(jnp.abs(ga[k] - gb[k]))) / float(jnp.max(jnp.abs(ga[k]))) <= GRAD_TOL, k

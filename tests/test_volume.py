"""Tests for jaxrender.volume: sampling, compositing, rendering, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrender import camera as cam
from jaxrender import volume as V
from tests.helpers import check_grad


# ---------------------------------------------------------------- references


def trilinear_ref(g, p):
    """NumPy reference: zero padding, values at integer coordinates."""
    g = np.asarray(g, np.float64)
    squeeze = g.ndim == 3
    if squeeze:
        g = g[..., None]
    D, H, W, C = g.shape
    p = np.asarray(p, np.float64).reshape(-1, 3)
    out = np.zeros((len(p), C))
    for n, (x, y, z) in enumerate(p):
        x0, y0, z0 = (int(np.floor(c)) for c in (x, y, z))
        for k in (z0, z0 + 1):
            for j in (y0, y0 + 1):
                for i in (x0, x0 + 1):
                    if 0 <= i < W and 0 <= j < H and 0 <= k < D:
                        out[n] += (1 - abs(x - i)) * (1 - abs(y - j)) * (1 - abs(z - k)) * g[k, j, i]
    return out[:, 0] if squeeze else out


def composite_loop(dens, feats, depths, mode, deltas=None, eps=1e-10):
    """Brute-force front-to-back loop over the samples of one ray."""
    T, rgb, depth, ws = 1.0, np.zeros(feats.shape[-1]), 0.0, []
    T_abs = 1.0
    for i in range(len(dens)):
        a = dens[i] if mode == "pytorch3d" else 1 - np.exp(-dens[i] * deltas[i])
        w = a * T
        ws.append(w)
        rgb = rgb + w * feats[i]
        depth += w * depths[i]
        T = T * ((1 + eps - a) if mode == "pytorch3d" else (1 - a))
        T_abs *= 1 - a
    return rgb, 1 - T_abs, depth, np.array(ws)


def small_camera(width=8, height=6, eye=(0.3, -0.2, 2.7)):
    return cam.look_at(jnp.array(eye), fov_y_deg=60.0, width=width, height=height)


def random_grid(rng, shape=(6, 7, 8), C=3, voxel_size=3.0 / 8, center=(0.0, 0.0, 0.0), dtype=np.float32):
    d = rng.uniform(0, 0.2, size=shape).astype(dtype)
    f = rng.uniform(0, 1, size=shape + (C,)).astype(dtype)
    return V.VoxelGrid(jnp.asarray(d), jnp.asarray(f), voxel_size, jnp.asarray(center, dtype))


# ---------------------------------------------------------------- grid conventions


def test_world_voxel_convention(rng):
    grid = random_grid(rng, voxel_size=(0.5, 0.25, 0.125), center=(1.0, -2.0, 3.0))
    D, H, W = grid.shape
    c = np.asarray(grid.voxel_centers())
    assert c.shape == (D, H, W, 3)
    # voxel [k, j, i] has its centre at center + (i - (W-1)/2, j - (H-1)/2, k - (D-1)/2) * s
    k, j, i = 4, 1, 6
    want = np.array([1.0, -2.0, 3.0]) + (np.array([i, j, k]) - (np.array([W, H, D]) - 1) / 2) * [0.5, 0.25, 0.125]
    np.testing.assert_allclose(c[k, j, i], want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grid.world_to_voxel(c[k, j, i])), [i, j, k], atol=1e-5)
    # sampling at a voxel centre returns that voxel exactly
    d, f = grid.sample(jnp.asarray(c[k, j, i]))
    np.testing.assert_allclose(float(d), float(grid.densities[k, j, i]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f), np.asarray(grid.features[k, j, i]), rtol=1e-6)
    lo, hi = grid.bounds()
    np.testing.assert_allclose(np.asarray(lo), c[0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hi), c[-1, -1, -1], rtol=1e-6)


def test_create_and_from_activations():
    g = V.VoxelGrid.create((2, 3, 4), channels=3, voxel_size=0.1, density=0.5, feature=0.25)
    assert g.shape == (2, 3, 4) and g.channels == 3 and g.features.shape == (2, 3, 4, 3)
    g2 = V.VoxelGrid.from_activations(jnp.zeros((2, 3, 4, 1)), jnp.zeros((2, 3, 4, 3)), voxel_size=0.1)
    np.testing.assert_allclose(np.asarray(g2.densities), 0.5)
    g3 = V.VoxelGrid.from_activations(jnp.zeros((2, 3, 4)), None, density_activation="softplus")
    np.testing.assert_allclose(np.asarray(g3.densities), np.log(2), rtol=1e-6)
    assert g3.channels == 0 and g3.features is None


def test_validation_names_argument():
    with pytest.raises(ValueError, match="densities"):
        V.VoxelGrid(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="features"):
        V.VoxelGrid(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5, 3)))
    with pytest.raises(ValueError, match="voxel_size"):
        V.VoxelGrid(jnp.zeros((2, 3, 4)), None, voxel_size=-1.0)
    with pytest.raises(ValueError, match="voxel_size"):
        V.VoxelGrid(jnp.zeros((2, 3, 4)), None, voxel_size=jnp.ones(2))
    with pytest.raises(TypeError, match="densities"):
        V.VoxelGrid(jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="density_activation"):
        V.VoxelGrid.from_activations(jnp.zeros((2, 3, 4)), density_activation="tanhh")
    with pytest.raises(ValueError, match="coords"):
        V.trilinear_sample(jnp.zeros((2, 3, 4)), jnp.zeros((5, 2)))
    grid = V.VoxelGrid.create(4)
    camera = small_camera()
    with pytest.raises(ValueError, match="mode"):
        V.render_volume(grid, camera, mode="nerf")
    with pytest.raises(ValueError, match="near"):
        V.render_volume(grid, camera, near=2.0, far=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        V.render_volume(grid, camera, chunk_size=0)
    with pytest.raises(ValueError, match="n"):
        V.sample_rays(jax.random.PRNGKey(0), camera, 10_000)
    with pytest.raises(ValueError, match="deltas"):
        V.composite(jnp.ones((2, 4)), None, jnp.ones((2, 4)), mode="physical")


# ---------------------------------------------------------------- trilinear sampling


@pytest.mark.parametrize("channels", [None, 2])
def test_trilinear_matches_numpy(rng, channels):
    shape = (4, 5, 6) if channels is None else (4, 5, 6, channels)
    g = rng.normal(size=shape).astype(np.float32)
    # inside, on the border shell, and far outside
    pts = rng.uniform(-2.5, 8.0, size=(300, 3)).astype(np.float32)
    out = V.trilinear_sample(jnp.asarray(g), jnp.asarray(pts))
    assert out.shape == ((300,) if channels is None else (300, channels))
    np.testing.assert_allclose(np.asarray(out), trilinear_ref(g, pts), atol=2e-6)
    # batch shape is preserved
    out2 = V.trilinear_sample(jnp.asarray(g), jnp.asarray(pts).reshape(10, 30, 3))
    np.testing.assert_allclose(np.asarray(out2).reshape(out.shape), np.asarray(out), atol=1e-7)


def test_trilinear_exact_at_centres_and_zero_outside(rng):
    g = rng.uniform(0.5, 1.0, size=(3, 4, 5)).astype(np.float32)
    k, j, i = np.meshgrid(np.arange(3), np.arange(4), np.arange(5), indexing="ij")
    centres = np.stack([i, j, k], -1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(V.trilinear_sample(g, centres)), g)
    far = np.array([[-1.0, 1, 1], [5.0, 1, 1], [2, -1.0, 1], [2, 4.0, 1], [2, 1, -1.0], [2, 1, 3.0], [-50, 70, 1e6]], np.float32)
    np.testing.assert_array_equal(np.asarray(V.trilinear_sample(g, far)), 0.0)
    # half a voxel outside the last centre: half the border value (zero padding)
    np.testing.assert_allclose(float(V.trilinear_sample(g, np.array([4.5, 1, 1], np.float32))), 0.5 * g[1, 1, 4], rtol=1e-6)


def test_trilinear_grad_wrt_values_and_coords(x64, rng):
    g = rng.normal(size=(3, 4, 3, 2))
    pts = rng.uniform(-1.2, 4.0, size=(20, 3))
    w = rng.normal(size=(20, 2))
    check_grad(jax.jit(lambda v: jnp.sum(V.trilinear_sample(v, jnp.asarray(pts)) * w)), g)
    # avoid kinks (integer coordinates) for the coordinate derivative
    pts = np.floor(pts) + rng.uniform(0.1, 0.9, size=pts.shape)
    check_grad(jax.jit(lambda p: jnp.sum(V.trilinear_sample(jnp.asarray(g), p) * w)), pts, eps=1e-6)


# ---------------------------------------------------------------- compositing


@pytest.mark.parametrize("mode", ["pytorch3d", "physical"])
def test_composite_matches_loop(rng, mode):
    S, C = 17, 3
    dens = rng.uniform(0, 1, size=(5, S)) if mode == "pytorch3d" else rng.uniform(0, 6, size=(5, S))
    feats = rng.uniform(size=(5, S, C))
    depths = np.sort(rng.uniform(0.1, 3.0, size=(5, S)), -1)
    deltas = rng.uniform(0.01, 0.3, size=(5, S))
    out = V.composite(dens, feats, depths, mode=mode, deltas=deltas if mode == "physical" else None)
    for r in range(5):
        rgb, op, dep, ws = composite_loop(dens[r], feats[r], depths[r], mode, deltas[r])
        np.testing.assert_allclose(np.asarray(out["rgb"][r]), rgb, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(float(out["opacity"][r]), op, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(float(out["depth"][r]), dep, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["weights"][r]), ws, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["pytorch3d", "physical"])
def test_weights_and_opacity_in_unit_interval(rng, mode):
    dens = rng.uniform(0, 1, size=(50, 150)) if mode == "pytorch3d" else rng.exponential(20.0, size=(50, 150))
    dens[:5] = 1.0 if mode == "pytorch3d" else 1e4  # saturated samples
    dens[5:10] = 0.0
    out = V.composite(dens.astype(np.float32), None, np.ones((50, 150), np.float32), mode=mode, deltas=0.02)
    w, op = np.asarray(out["weights"]), np.asarray(out["opacity"])
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and np.all(w <= 1)
    assert np.all(op >= 0) and np.all(op <= 1)
    assert np.all(w.sum(-1) <= 1 + 1e-5)
    np.testing.assert_allclose(op[5:10], 0.0)


def test_absorption_only(rng):
    d = rng.uniform(size=(4, 9))
    np.testing.assert_allclose(np.asarray(V.absorption_only(d)), 1 - np.prod(1 - d, -1), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(V.absorption_only(d, mode="physical", deltas=0.1)), 1 - np.exp(-0.1 * d.sum(-1)), rtol=1e-6
    )


def test_ray_depths_strata():
    t, dt = V.ray_depths(150, 0.1, 3.0)
    np.testing.assert_allclose(np.asarray(t), np.linspace(0.1, 3.0, 150), rtol=1e-6)
    np.testing.assert_allclose(float(dt.sum()), 2.9, rtol=1e-5)
    tj, dtj = V.ray_depths(150, 0.1, 3.0, key=jax.random.PRNGKey(1), shape=(4,))
    assert tj.shape == (4, 150)
    mids = (t[1:] + t[:-1]) / 2
    lower = np.concatenate([[0.1], mids])
    upper = np.concatenate([mids, [3.0]])
    assert np.all(np.asarray(tj) >= lower - 1e-6) and np.all(np.asarray(tj) <= upper + 1e-6)
    assert not np.allclose(np.asarray(tj), np.asarray(t))
    np.testing.assert_allclose(np.asarray(dtj), np.broadcast_to(np.asarray(dt), (4, 150)))


# ---------------------------------------------------------------- rendering


def _big_constant_grid(value, channels=3):
    # centres span [-7, 7]^3: rays from near the origin stay inside for depths <= 3
    return V.VoxelGrid.create((8, 8, 8), channels=channels, voxel_size=2.0, density=value, feature=0.5)


@pytest.mark.parametrize("n_samples,stratified", [(8, False), (150, True)])
def test_physical_invariant_to_sample_count(n_samples, stratified):
    sigma = 0.7
    grid = _big_constant_grid(sigma)
    dirs = jnp.array([[0.0, 0.0, 1.0], [0.3, -0.2, 1.0], [-0.5, 0.4, 1.0]])
    rays = V.Rays(jnp.zeros((3, 3)), dirs)
    key = jax.random.PRNGKey(3) if stratified else None
    out = V.render_volume(grid, rays=rays, n_samples=n_samples, near=0.1, far=3.0, mode="physical", key=key)
    L = 2.9 * np.linalg.norm(np.asarray(dirs), axis=-1)
    np.testing.assert_allclose(np.asarray(out["opacity"]), 1 - np.exp(-sigma * L), rtol=1e-5)
    # colour of a constant medium: feature * opacity
    np.testing.assert_allclose(np.asarray(out["rgb"]), np.broadcast_to(0.5 * (1 - np.exp(-sigma * L))[:, None], (3, 3)), rtol=1e-5)
    # the pytorch3d mode is *not* invariant: its opacity is 1 - (1 - d)^S
    out_p = V.render_volume(grid.__class__(grid.densities * 0 + 0.01, grid.features, 2.0), rays=rays, n_samples=n_samples)
    np.testing.assert_allclose(np.asarray(out_p["opacity"]), 1 - 0.99**n_samples, rtol=1e-5)


@pytest.mark.parametrize("mode", ["pytorch3d", "physical", "absorption"])
def test_render_matches_manual_composition(rng, mode):
    grid = random_grid(rng, center=(0.1, 0.0, -0.2))
    if mode == "physical":
        grid = V.VoxelGrid(grid.densities * 20, grid.features, grid.voxel_size, grid.center)
    camera = small_camera()
    S, near, far = 32, 0.5, 4.0
    out = V.render_volume(grid, camera, n_samples=S, near=near, far=far, mode=mode, return_weights=True)
    o, d = cam.pixel_rays(camera, normalize=False)
    t, dt = V.ray_depths(S, near, far)
    pts = jnp.broadcast_to(o, d.shape)[..., None, :] + t[:, None] * d[..., None, :]
    dens, feats = grid.sample(pts)
    if mode == "absorption":
        assert set(out) == {"opacity"}
        np.testing.assert_allclose(np.asarray(out["opacity"]), np.asarray(V.absorption_only(dens)), rtol=1e-5, atol=1e-6)
        return
    deltas = dt * jnp.linalg.norm(d, axis=-1, keepdims=True)
    ref = V.composite(dens, feats, jnp.broadcast_to(t, dens.shape), mode=mode, deltas=deltas)
    assert out["rgb"].shape == (6, 8, 3) and out["opacity"].shape == (6, 8) and out["weights"].shape == (6, 8, S)
    for k in ("rgb", "opacity", "depth", "weights"):
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-4, atol=1e-6)
    assert float(out["opacity"].max()) > 0.05  # the grid is actually hit


def test_chunking_and_background(rng):
    grid = random_grid(rng)
    camera = small_camera()
    full = V.render_volume(grid, camera, n_samples=32)
    for cs in (20,):  # 3 chunks, the last one padded
        ch = V.render_volume(grid, camera, n_samples=32, chunk_size=cs)
        for k in full:
            np.testing.assert_allclose(np.asarray(ch[k]), np.asarray(full[k]), rtol=1e-5, atol=1e-7)
    bg = jnp.array([0.2, 0.4, 1.0])
    out = V.render_volume(grid, camera, n_samples=32, background=bg)
    np.testing.assert_allclose(
        np.asarray(out["rgb"]), np.asarray(full["rgb"] + (1 - full["opacity"])[..., None] * bg), rtol=1e-6
    )
    # stratified sampling: different keys differ, same key reproduces, chunking keeps it finite
    k = jax.random.PRNGKey(0)
    a = V.render_volume(grid, camera, n_samples=32, key=k, chunk_size=20)
    b = V.render_volume(grid, camera, n_samples=32, key=k, chunk_size=20)
    c = V.render_volume(grid, camera, n_samples=32, key=jax.random.PRNGKey(1), chunk_size=20)
    np.testing.assert_array_equal(np.asarray(a["rgb"]), np.asarray(b["rgb"]))
    assert not np.allclose(np.asarray(a["rgb"]), np.asarray(c["rgb"]))
    np.testing.assert_allclose(np.asarray(a["rgb"]), np.asarray(full["rgb"]), atol=0.05)


def test_single_voxel_projects_to_its_pixel():
    """World ↔ grid ↔ camera conventions agree: one opaque voxel appears where `project` puts its centre."""
    D, H, W = 9, 9, 9
    dens = np.zeros((D, H, W), np.float32)
    k, j, i = 2, 6, 5
    dens[k, j, i] = 1.0
    grid = V.VoxelGrid(jnp.asarray(dens), jnp.ones((D, H, W, 3)), voxel_size=0.25)
    camera = small_camera(width=32, height=32, eye=(0.4, 0.6, 2.7))
    out = V.render_volume(grid, camera, n_samples=300, near=1.0, far=4.5)
    centre = grid.voxel_centers()[k, j, i]
    xy = np.asarray(cam.project(camera, centre[None]))[0, :2]
    op = np.asarray(out["opacity"])
    rows, cols = np.mgrid[:32, :32] + 0.5
    centroid = np.array([(op * cols).sum(), (op * rows).sum()]) / op.sum()
    assert op.max() > 0.5
    np.testing.assert_allclose(centroid, xy, atol=0.3)


def test_sample_rays_matches_grid_rays(rng):
    grid = random_grid(rng)
    camera = small_camera()
    rays, pix = V.sample_rays(jax.random.PRNGKey(0), camera, 20)
    assert rays.shape == (20,) and pix.shape == (20, 2) and pix.dtype == jnp.int32
    assert len({tuple(p) for p in np.asarray(pix)}) == 20
    full_rays = V.grid_rays(camera)
    np.testing.assert_allclose(
        np.asarray(rays.directions), np.asarray(full_rays.directions[pix[:, 0], pix[:, 1]]), rtol=1e-6, atol=1e-7
    )
    sub = V.render_volume(grid, rays=rays, n_samples=32)
    full = V.render_volume(grid, camera, n_samples=32)
    np.testing.assert_allclose(np.asarray(sub["rgb"]), np.asarray(full["rgb"][pix[:, 0], pix[:, 1]]), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- transformations and gradients


def test_jit_vmap_grad(rng):
    grid = random_grid(rng)
    eyes = jnp.array([[0.0, 0.0, 2.7], [2.7, 0.3, 0.0]])

    def render(g, eye):
        return V.render_volume(g, cam.look_at(eye, width=8, height=6), n_samples=24, chunk_size=20)["rgb"]

    batched = jax.jit(jax.vmap(render, in_axes=(None, 0)))(grid, eyes)
    assert batched.shape == (2, 6, 8, 3)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(render(grid, eyes[1])), rtol=1e-5, atol=1e-7)

    def loss(g):
        return jnp.sum(jax.vmap(render, in_axes=(None, 0))(g, eyes) ** 2)

    gr = jax.jit(jax.grad(loss))(grid)
    assert gr.densities.shape == grid.densities.shape and gr.features.shape == grid.features.shape
    assert np.all(np.isfinite(np.asarray(gr.densities))) and np.abs(np.asarray(gr.densities)).max() > 0
    # gradient w.r.t. the camera position also flows (through the rays)
    ge = jax.grad(lambda e: jnp.sum(render(grid, e)))(eyes[0])
    assert np.all(np.isfinite(np.asarray(ge))) and np.abs(np.asarray(ge)).max() > 0


@pytest.mark.parametrize("mode,chunk_size", [("pytorch3d", None), ("physical", 5)])
def test_render_grad_matches_finite_differences(x64, rng, mode, chunk_size):
    shape = (3, 3, 4)
    n = int(np.prod(shape))
    dens0 = rng.uniform(0.1, 0.6, size=shape)
    feats0 = rng.uniform(size=shape + (2,))
    camera = cam.look_at(jnp.array([0.2, 0.1, 2.0]), fov_y_deg=40.0, width=4, height=3)
    wts = rng.normal(size=(3, 4, 2))
    wop = rng.normal(size=(3, 4))
    key = jax.random.PRNGKey(2)

    @jax.jit
    def loss(x):  # densities and features packed into one vector
        dens, feats = x[:n].reshape(shape), x[n:].reshape(shape + (2,))
        grid = V.VoxelGrid(dens * (4.0 if mode == "physical" else 1.0), feats, voxel_size=0.4, center=jnp.array([0.0, 0.05, 0.1]))
        out = V.render_volume(grid, camera, n_samples=12, near=1.0, far=3.0, mode=mode, key=key, chunk_size=chunk_size)
        return jnp.sum(out["rgb"] * wts) + jnp.sum(out["opacity"] * wop) + 0.1 * jnp.sum(out["depth"])

    # (the float64 finite differences only agree if the whole render runs in float64)
    check_grad(loss, np.concatenate([dens0.ravel(), feats0.ravel()]), rtol=1e-5)

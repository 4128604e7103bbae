"""Tests for jaxrender.camera.

Every converter is checked by projecting random points with the source
convention's own formula, written here independently in NumPy, and comparing
with ``camera.project``.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxrender import camera as C
from tests.helpers import check_grad, check_jit_vmap_grad, fast_jit




# Compiled versions for the value tests: eager JAX compiles every primitive
# separately on first use, which dominates the run time of small tests.
project = fast_jit(C.project)
unproject = fast_jit(C.unproject)
_pixel_rays = {n: fast_jit(lambda cam, xy, n=n: C.pixel_rays(cam, xy, normalize=n)) for n in (False, True)}


def pixel_rays(cam, xy=None, normalize=False):
    return _pixel_rays[normalize](cam, xy)


def random_points(rng, n=20, center=(0.0, 0.0, 0.0), spread=1.0):
    return np.asarray(center) + spread * rng.uniform(-1, 1, size=(n, 3))


def np_project(K, R, t, X):
    pc = X @ R.T + t
    uv = (pc[:, :2] / pc[:, 2:]) @ K[:2, :2].T + K[:2, 2]
    return np.c_[uv, pc[:, 2]]


# ----------------------------------------------------------------------------
# Basic projection
# ----------------------------------------------------------------------------


def test_from_fov_closed_form_and_project(rng):
    cam = C.from_fov(50.0, 64, 48)
    f = 24 / np.tan(np.deg2rad(25.0))
    np.testing.assert_allclose([float(cam.fx), float(cam.fy), float(cam.cx), float(cam.cy)], [f, f, 32, 24], rtol=1e-6)
    assert cam.width == 64 and cam.height == 48 and not cam.orthographic
    R = Rotation.from_rotvec([0.1, -0.2, 0.3]).as_matrix()
    t = np.array([0.1, 0.2, 4.0])
    cam = C.from_fov(50.0, 64, 48, R=R, t=t)
    X = random_points(rng)
    K = np.array([[f, 0, 32], [0, f, 24], [0, 0, 1]])
    np.testing.assert_allclose(np.asarray(project(cam, X)), np_project(K, R, t, X), rtol=1e-5, atol=1e-4)
    # the fov spans the image height: a point at the top edge of the frustum maps to y = 0
    edge = np.array([[0.0, -np.tan(np.deg2rad(25.0)) * 3.0, 3.0]])
    np.testing.assert_allclose(np.asarray(project(C.from_fov(50.0, 64, 48), edge))[0], [32, 0, 3], atol=1e-4)
    np.testing.assert_allclose(np.asarray(C.intrinsic_matrix(cam)), K, rtol=1e-6)


def test_from_intrinsics(rng):
    K = np.array([[500.0, 0, 320.5], [0, 510.0, 240.5], [0, 0, 1]])
    R = Rotation.from_rotvec([0.3, 0.2, -0.1]).as_matrix()
    t = np.array([0.0, 0.1, 6.0])
    cam = C.from_intrinsics(K, R, t, width=640, height=480)
    X = random_points(rng)
    np.testing.assert_allclose(np.asarray(project(cam, X)), np_project(K, R, t, X), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(C.camera_center(cam)), -R.T @ t, atol=1e-5)
    np.testing.assert_allclose(np.asarray(C.world_to_camera(cam, X)), X @ R.T + t, atol=1e-5)


def test_orthographic_and_weak_perspective(rng):
    cam = C.orthographic_camera(64, 32, view_height=4.0, t=[0.0, 0.0, 5.0])
    X = random_points(rng)
    out = np.asarray(project(cam, X))
    np.testing.assert_allclose(out[:, 0], 8.0 * X[:, 0] + 32, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[:, 1], 8.0 * X[:, 1] + 16, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[:, 2], X[:, 2] + 5, rtol=1e-5)
    # weak perspective: x = W/2 + min(W,H)/2 * s * (X + tx)
    s, tr = 0.8, np.array([0.1, -0.2])
    R = Rotation.from_rotvec([0.0, 0.3, 0.0]).as_matrix()
    cam = C.weak_perspective(s, tr, 64, 32, R=R)
    Xr = X @ R.T
    out = np.asarray(project(cam, X))
    np.testing.assert_allclose(out[:, 0], 32 + 16 * s * (Xr[:, 0] + tr[0]), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[:, 1], 16 + 16 * s * (Xr[:, 1] + tr[1]), rtol=1e-5, atol=1e-4)
    assert cam.orthographic


@pytest.mark.parametrize("ortho", [False, True])
def test_project_unproject_round_trip(rng, ortho):
    if ortho:
        cam = C.orthographic_camera(40, 30, view_height=3.0, R=Rotation.from_rotvec([0.2, 0.4, 0]).as_matrix(), t=[0, 0, 4.0])
    else:
        cam = C.look_at(np.array([1.0, 2.0, 4.0]), np.zeros(3), fov_y_deg=45.0, width=40, height=30)
    X = random_points(rng)
    p = project(cam, X)
    np.testing.assert_allclose(np.asarray(unproject(cam, p[:, :2], p[:, 2])), X, atol=1e-4)
    xy = rng.uniform(0, 30, size=(10, 2))
    d = rng.uniform(1, 5, size=10)
    back = np.asarray(project(cam, unproject(cam, xy, d)))
    np.testing.assert_allclose(back, np.c_[xy, d], atol=1e-4)


@pytest.mark.parametrize("ortho", [False, True])
def test_pixel_rays_pass_through_pixels(rng, ortho):
    if ortho:
        cam = C.orthographic_camera(12, 8, view_height=3.0, R=Rotation.from_rotvec([0.2, 0.4, 0]).as_matrix(), t=[0, 0, 4.0])
    else:
        cam = C.look_at(np.array([1.0, 2.0, 4.0]), np.zeros(3), fov_y_deg=45.0, width=12, height=8)
    o, d = pixel_rays(cam)
    assert o.shape == d.shape == (8, 12, 3)
    centres = np.asarray(C.pixel_centers(12, 8))
    assert centres.shape == (8, 12, 2)
    np.testing.assert_allclose(centres[2, 5], [5.5, 2.5])
    np.testing.assert_allclose(np.asarray(pixel_rays(cam, jnp.asarray(centres))[1]), np.asarray(d), atol=1e-6)
    depth = 3.0
    p = np.asarray(project(cam, (o + depth * d).reshape(-1, 3))).reshape(8, 12, 3)
    jj, ii = np.meshgrid(np.arange(12), np.arange(8))
    np.testing.assert_allclose(p[..., 0], jj + 0.5, atol=1e-4)  # column j -> x = j + 0.5
    np.testing.assert_allclose(p[..., 1], ii + 0.5, atol=1e-4)  # row i -> y = i + 0.5 (row 0 at the top)
    np.testing.assert_allclose(p[..., 2], depth, atol=1e-4)  # ray parameter = view depth
    if not ortho:
        np.testing.assert_allclose(np.asarray(o[3, 5]), [1.0, 2.0, 4.0], atol=1e-5)
    # arbitrary xy, normalized directions
    xy = rng.uniform(0, 8, size=(5, 2))
    o, d = pixel_rays(cam, xy, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(d), axis=-1), 1.0, atol=1e-6)
    p = np.asarray(project(cam, o + 2.5 * d))
    np.testing.assert_allclose(p[:, :2], xy, atol=1e-4)
    # camera-frame direction of the unnormalized ray is ((x-cx)/fx, (y-cy)/fy, 1)
    _, d = pixel_rays(cam, xy)
    dc = np.asarray(d) @ np.asarray(cam.R).T
    if not ortho:
        np.testing.assert_allclose(dc, np.c_[(xy[:, 0] - float(cam.cx)) / float(cam.fx), (xy[:, 1] - float(cam.cy)) / float(cam.fy), np.ones(5)], atol=1e-6)
    else:
        np.testing.assert_allclose(dc, np.tile([0.0, 0.0, 1.0], (5, 1)), atol=1e-6)


def test_look_at_orientation():
    cam = C.look_at(np.array([0.0, 0.0, 5.0]), np.zeros(3), up=(0.0, 1.0, 0.0), fov_y_deg=60.0, width=64, height=64)
    p = np.asarray(project(cam, np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])))
    np.testing.assert_allclose(p[0], [32, 32, 5], atol=1e-4)  # target at the image centre
    assert p[1, 1] < 32  # world up appears up (smaller pixel y)
    assert p[2, 0] > 32  # world +x appears to the right when looking down -z
    np.testing.assert_allclose(np.asarray(C.camera_center(cam)), [0, 0, 5], atol=1e-5)
    # any eye: the target is at the centre and up stays up
    eye = np.array([3.0, 1.0, -2.0]); target = np.array([0.5, 0.2, 0.1])
    cam = C.look_at(eye, target, width=50, height=40)
    p = np.asarray(project(cam, np.array([target, target + [0, 0.5, 0]])))
    np.testing.assert_allclose(p[0, :2], [25, 20], atol=1e-4)
    np.testing.assert_allclose(p[1, 0], 25, atol=1e-4)
    assert p[1, 1] < 20


def test_points_behind_and_on_camera_plane_are_finite():
    cam = C.from_fov(60.0, 16, 16)
    X = jnp.array([[0.1, 0.2, 0.0], [0.1, 0.2, -1.0], [0.0, 0.0, 0.0]])
    p = project(cam, X)
    assert np.all(np.isfinite(np.asarray(p)))
    np.testing.assert_allclose(np.asarray(p[:, 2]), [0.0, -1.0, 0.0])
    g = jax.jit(jax.grad(lambda x: C.project(cam, x)[:, :2].sum()))(X)
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------
# Converters, each against the source convention's own formula
# ----------------------------------------------------------------------------


def gl_look_at(eye, center, up):
    f = center - eye; f = f / np.linalg.norm(f)
    s = np.cross(f, up); s = s / np.linalg.norm(s)
    u = np.cross(s, f)
    M = np.eye(4)
    M[0, :3], M[1, :3], M[2, :3] = s, u, -f
    M[:3, 3] = -M[:3, :3] @ eye
    return M


def gl_frustum(l, r, b, t, n, f):
    return np.array([
        [2 * n / (r - l), 0, (r + l) / (r - l), 0],
        [0, 2 * n / (t - b), (t + b) / (t - b), 0],
        [0, 0, -(f + n) / (f - n), -2 * f * n / (f - n)],
        [0, 0, -1, 0],
    ])


def gl_perspective(fovy_deg, aspect, n, f):
    top = n * np.tan(np.deg2rad(fovy_deg) / 2)
    return gl_frustum(-top * aspect, top * aspect, -top, top, n, f)


def gl_ortho(l, r, b, t, n, f):
    return np.array([
        [2 / (r - l), 0, 0, -(r + l) / (r - l)],
        [0, 2 / (t - b), 0, -(t + b) / (t - b)],
        [0, 0, -2 / (f - n), -(f + n) / (f - n)],
        [0, 0, 0, 1],
    ])


def gl_pixels(view, proj, X, W, H):
    clip = (proj @ view @ np.c_[X, np.ones(len(X))].T).T
    ndc = clip[:, :3] / clip[:, 3:]
    eye_z = (view @ np.c_[X, np.ones(len(X))].T).T[:, 2]
    return np.c_[(ndc[:, 0] + 1) / 2 * W, (1 - ndc[:, 1]) / 2 * H, -eye_z]


@pytest.mark.parametrize("kind", ["perspective", "frustum", "ortho"])
def test_from_opengl(rng, kind):
    W, H = 80, 60
    view = gl_look_at(np.array([1.0, 1.5, 4.0]), np.array([0.1, 0.0, -0.2]), np.array([0.0, 1.0, 0.0]))
    proj = {
        "perspective": gl_perspective(45.0, W / H, 0.5, 20.0),
        "frustum": gl_frustum(-0.3, 0.2, -0.1, 0.25, 0.5, 20.0),
        "ortho": gl_ortho(-2.0, 1.5, -1.0, 1.6, 0.5, 20.0),
    }[kind]
    cam = C.from_opengl(view, proj, W, H)
    assert cam.orthographic == (kind == "ortho")
    X = random_points(rng)
    np.testing.assert_allclose(np.asarray(project(cam, X)), gl_pixels(view, proj, X, W, H), rtol=1e-5, atol=2e-4)
    np.testing.assert_allclose([float(cam.znear), float(cam.zfar)], [0.5, 20.0], rtol=1e-5)


def p3d_look_at_view_transform(dist, elev_deg, azim_deg):
    """PyTorch3D's look_at_view_transform (at the origin, up +y), in NumPy."""
    e, a = np.deg2rad(elev_deg), np.deg2rad(azim_deg)
    cam = dist * np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
    z = -cam / np.linalg.norm(cam)
    x = np.cross([0.0, 1.0, 0.0], z); x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z], axis=1)  # columns are the camera axes
    T = -R.T @ cam
    return R, T


def p3d_pixels(R, T, X, H, W, *, fov=None, aspect=1.0, focal=None, pp=(0.0, 0.0), in_ndc=True, ortho=False):
    """PyTorch3D's documented projection: row vectors, NDC +X left / +Y up, shorter side in [-1, 1]."""
    V = X @ R + T
    s = min(H, W) / 2.0
    if fov is not None:
        th = np.tan(np.deg2rad(fov) / 2)
        n, f = 1.0, 100.0
        max_y = th * n; max_x = max_y * aspect
        P = np.zeros((4, 4))
        P[0, 0] = 2 * n / (2 * max_x); P[1, 1] = 2 * n / (2 * max_y)
        P[3, 2] = 1.0; P[2, 2] = f / (f - n); P[2, 3] = -f * n / (f - n)
        clip = (P @ np.c_[V, np.ones(len(V))].T).T
        ndc = clip[:, :2] / clip[:, 3:]
    else:
        fxy = np.broadcast_to(np.asarray(focal, float), (2,))
        p = np.asarray(pp, float)
        if not in_ndc:  # PyTorch3D's screen -> NDC conversion of the intrinsics
            fxy = fxy / s
            p = -(p - np.array([W / 2.0, H / 2.0])) / s
        ndc = V[:, :2] * fxy + p if ortho else V[:, :2] / V[:, 2:] * fxy + p
    return np.c_[W / 2.0 - s * ndc[:, 0], H / 2.0 - s * ndc[:, 1], V[:, 2]]


@pytest.mark.parametrize(
    "size,kw",
    [
        ((64, 64), dict(fov=60.0)),
        ((48, 80), dict(fov=40.0)),
        ((80, 48), dict(fov=40.0, aspect=1.3)),
        ((64, 96), dict(focal=(2.1, 2.3), pp=(0.1, -0.05), in_ndc=True)),
        ((96, 64), dict(focal=300.0, pp=(30.0, 50.0), in_ndc=False)),
        ((64, 96), dict(focal=0.4, pp=(0.1, 0.2), in_ndc=True, ortho=True)),
    ],
)
def test_from_pytorch3d(rng, size, kw):
    H, W = size
    R, T = p3d_look_at_view_transform(5.0, 20.0, 30.0)
    X = random_points(rng)
    ref = p3d_pixels(R, T, X, H, W, **kw)
    args = dict(kw)
    if "aspect" in args:
        args["aspect_ratio"] = args.pop("aspect")
    if "focal" in args:
        args["focal_length"] = args.pop("focal")
        args["principal_point"] = args.pop("pp")
    if "ortho" in args:
        args["orthographic"] = args.pop("ortho")
    cam = C.from_pytorch3d(R, T, (H, W), **args)
    np.testing.assert_allclose(np.asarray(project(cam, X)), ref, rtol=1e-5, atol=2e-4)
    # the camera sits where PyTorch3D puts it
    np.testing.assert_allclose(np.asarray(C.camera_center(cam)), -R @ T, atol=1e-5)


def faceverse_project_vs(vs, focal=1315.0, img_size=512, cam_dist=10.0):
    """FaceVerse ModelRenderer.project_vs (seed 000) for one example, in NumPy."""
    reverse_xz = np.diag([-1.0, 1.0, -1.0])
    camera_pos = np.array([0.0, 0.0, cam_dist])
    p_mat = np.array([[focal, 0.0, img_size // 2], [0.0, focal, img_size // 2], [0.0, 0.0, 1.0]])
    v = vs @ reverse_xz + camera_pos
    aug = v @ p_mat.T
    return aug[:, :2] / aug[:, 2:]


def test_from_faceverse(rng):
    X = random_points(rng, spread=1.0)
    cam = C.from_faceverse()
    assert (cam.width, cam.height) == (512, 512)
    p = np.asarray(project(cam, X))
    np.testing.assert_allclose(p[:, :2], faceverse_project_vs(X), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(p[:, 2], 10.0 - X[:, 2], rtol=1e-6)
    cam = C.from_faceverse(focal=1015.0, width=256, height=256, distance=8.0)
    np.testing.assert_allclose(np.asarray(project(cam, X))[:, :2], faceverse_project_vs(X, 1015.0, 256, 8.0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(C.camera_center(cam)), [0, 0, 8.0], atol=1e-6)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_errors():
    cam = C.from_fov(60.0, 16, 16)
    with pytest.raises(ValueError, match="points"):
        C.project(cam, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="xy"):
        C.unproject(cam, jnp.zeros((4, 3)), jnp.zeros(4))
    with pytest.raises(ValueError, match="depth"):
        C.unproject(cam, jnp.zeros((4, 2)), jnp.zeros(3))
    with pytest.raises(ValueError, match="xy"):
        C.pixel_rays(cam, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="K"):
        C.from_intrinsics(jnp.eye(4), width=8, height=8)
    with pytest.raises(ValueError, match="skew"):
        C.from_intrinsics(jnp.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]), width=8, height=8)
    with pytest.raises(ValueError, match="width"):
        C.from_intrinsics(jnp.eye(3), height=8)
    with pytest.raises(ValueError, match="R"):
        C.from_fov(60.0, 16, 16, R=jnp.eye(4))
    with pytest.raises(ValueError, match="t"):
        C.from_fov(60.0, 16, 16, t=jnp.zeros(2))
    with pytest.raises(ValueError, match="width"):
        C.from_fov(60.0, 0, 16)
    with pytest.raises(ValueError, match="height"):
        C.from_fov(60.0, 16, 16.5)
    with pytest.raises(ValueError, match="fov_y_deg"):
        C.from_fov(180.0, 16, 16)
    with pytest.raises(ValueError, match="zfar"):
        C.from_fov(60.0, 16, 16, znear=2.0, zfar=1.0)
    with pytest.raises(ValueError, match="eye"):
        C.look_at(jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(ValueError, match="translation"):
        C.weak_perspective(1.0, jnp.zeros(3), 16, 16)
    with pytest.raises(ValueError, match="proj"):
        C.from_opengl(jnp.eye(4), jnp.eye(3), 16, 16)
    with pytest.raises(ValueError, match="proj"):
        C.from_opengl(jnp.eye(4), jnp.zeros((4, 4)), 16, 16)
    with pytest.raises(ValueError, match="fov"):
        C.from_pytorch3d(jnp.eye(3), jnp.zeros(3), 16)
    with pytest.raises(ValueError, match="fov"):
        C.from_pytorch3d(jnp.eye(3), jnp.zeros(3), 16, fov=60.0, focal_length=1.0)
    with pytest.raises(ValueError, match="image_size"):
        C.from_pytorch3d(jnp.eye(3), jnp.zeros(3), (1, 2, 3), fov=60.0)
    with pytest.raises(ValueError, match="T"):
        C.from_pytorch3d(jnp.eye(3), jnp.zeros(4), 16, fov=60.0)


# ----------------------------------------------------------------------------
# Pytree behaviour, jit / vmap / grad
# ----------------------------------------------------------------------------


def test_camera_is_a_pytree_with_static_size():
    cam = C.from_fov(60.0, 16, 12)
    leaves = jax.tree_util.tree_leaves(cam)
    assert len(leaves) == 8  # R, t, fx, fy, cx, cy, znear, zfar
    traces = []

    @jax.jit
    def f(c, x):
        traces.append(1)
        return C.project(c, x)

    x = jnp.ones((3, 3))
    f(cam, x)
    f(eqx.tree_at(lambda c: c.fx, cam, cam.fx * 2), x)
    assert len(traces) == 1  # changing arrays does not re-trace
    f(C.from_fov(60.0, 16, 14), x)
    assert len(traces) == 2  # changing the static size does
    assert C.from_fov(60.0, 16, 16).R.dtype == jnp.float32


_X = np.array([[0.3, -0.2, 0.5], [-0.4, 0.1, -0.3], [0.2, 0.4, 0.1]])
_XY = np.array([[3.2, 5.1], [10.0, 2.5]])
_GLV = gl_look_at(np.array([1.0, 1.5, 4.0]), np.zeros(3), np.array([0.0, 1.0, 0.0]))
_R3, _T3 = p3d_look_at_view_transform(5.0, 20.0, 30.0)


def _cat(*arrays):
    return jnp.concatenate([jnp.ravel(a) for a in arrays])


def _uses(cam):
    """Everything a camera feeds: projection, unprojection, rays, centre."""
    o, d = C.pixel_rays(cam, jnp.asarray(_XY))
    o2, d2 = C.pixel_rays(cam, normalize=True)
    return _cat(
        C.project(cam, jnp.asarray(_X)),
        C.unproject(cam, jnp.asarray(_XY), jnp.array([2.0, 3.0])),
        o, d, o2[::3, ::3], d2[::3, ::3],
        C.camera_center(cam),
        C.world_to_camera(cam, jnp.asarray(_X)),
        C.intrinsic_matrix(cam),
    )


# name -> (function of one parameter vector, example)
CASES = {
    "look_at": (lambda p: _uses(C.look_at(p[:3], p[3:6], fov_y_deg=p[6], width=8, height=6)), np.array([1.0, 2.0, 4.0, 0.1, 0.0, 0.2, 50.0])),
    "from_intrinsics": (
        lambda p: _uses(C.from_intrinsics(jnp.array([[p[0], 0, p[1]], [0, p[2], p[3]], [0, 0, 1.0]]), jnp.asarray(_R3), p[4:7], width=8, height=6)),
        np.array([9.0, 4.2, 8.5, 3.1, 0.1, -0.2, 5.0]),
    ),
    "orthographic_camera": (lambda p: _uses(C.orthographic_camera(8, 6, p[0], R=jnp.asarray(_R3), t=p[1:4])), np.array([3.0, 0.1, 0.2, 5.0])),
    "weak_perspective": (lambda p: _uses(C.weak_perspective(p[0], p[1:3], 8, 6, R=jnp.asarray(_R3))), np.array([0.7, 0.1, -0.2])),
    "from_opengl": (
        lambda p: _uses(C.from_opengl(jnp.asarray(_GLV), jnp.asarray(gl_frustum(-0.3, 0.2, -0.1, 0.25, 0.5, 20.0)) * p, 8, 6, orthographic=False)),
        np.ones((4, 4)),
    ),
    "from_pytorch3d_fov": (lambda p: _uses(C.from_pytorch3d(jnp.asarray(_R3), p[:3], (6, 8), fov=p[3])), np.array([0.1, -0.2, 5.0, 50.0])),
    "from_pytorch3d_ndc": (
        lambda p: _uses(C.from_pytorch3d(jnp.asarray(_R3), p[:3], (6, 8), focal_length=p[3:5], principal_point=p[5:7])),
        np.array([0.1, -0.2, 5.0, 1.5, 1.7, 0.1, -0.1]),
    ),
    "from_faceverse": (lambda p: _uses(C.from_faceverse(p[0], 8, 6, p[1])), np.array([9.0, 10.0])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_vmap_grad(name, x64):
    f, x0 = CASES[name]
    check_jit_vmap_grad(f, jnp.asarray(x0, jnp.float64))


def test_grad_wrt_points_and_vmap_over_points(x64):
    cam = C.look_at(jnp.array([1.0, 2.0, 4.0]), jnp.zeros(3), width=8, height=6)
    check_jit_vmap_grad(lambda X: _cat(C.project(cam, X), C.unproject(cam, X[:, :2] * 5, X[:, 2] + 3)), jnp.asarray(_X))
    # vmap over a leading batch of point sets equals the batched call
    Xb = jnp.stack([jnp.asarray(_X), jnp.asarray(_X) * 2])
    np.testing.assert_allclose(np.asarray(fast_jit(jax.vmap(lambda X: C.project(cam, X)))(Xb)), np.asarray(project(cam, Xb)), atol=1e-12)



"""The high-level renderers: jit / vmap / grad, closed-form shading cases,
depth and normal maps, the hard limit, and float64 gradient checks against
central finite differences for every kind of parameter (vertex positions,
vertex colours, a UV texture, camera, lights, SH coefficients).

Scenes are tiny (16x16 to 20x24 pixels, an icosphere of level 1 = 80 faces).
Nearly all the time of this file is XLA compilation, so the tests share a few
jit-compiled functions, and those that run only a handful of times are
compiled with ``xla_backend_optimization_level=0`` (about half the compile
time; the finite-difference losses, evaluated hundreds of times, keep the
default optimisation). Nothing is run eagerly: an eager rasterization costs
more than a compilation.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrender import camera as camera_lib
from jaxrender import mesh as mesh_lib
from jaxrender import render as R
from jaxrender.blend import BlendParams, hard_rgb_blend, softmax_rgb_blend
from jaxrender.lighting import AmbientLight, DirectionalLight, PointLight, sh_basis
from jaxrender.raster import Fragments, RasterSettings
from jaxrender.transforms import axis_angle_to_matrix
from tests.conftest import _x64
from tests.helpers import check_grad

EPS = 1e-6  # finite-difference step (tests.helpers.check_grad's default)
SIGMA = 1e-3
GAMMA = 1e-2
OPT0 = {"xla_backend_optimization_level": 0}


# --------------------------------------------------------------------------
# Scene builders. Called inside the tests so that under float64 every array
# is float64.
# --------------------------------------------------------------------------
def sphere_mesh(level=1, colors=True):
    m = mesh_lib.icosphere(level)
    v = m.vertices
    c = None
    if colors:
        # A smooth, non-constant colour field so colour gradients are not trivial.
        c = 0.5 + 0.4 * jnp.stack([v[:, 0], v[:, 1] * v[:, 2], jnp.sin(2.0 * v[:, 2])], -1)
    return mesh_lib.Mesh(v, m.faces, vertex_colors=c)


def textured_sphere(tex_size=4, seed=0):
    """Icosphere with per-corner UVs (``face_uvs`` distinct from ``faces``) and a random texture."""
    m = mesh_lib.icosphere(1)
    v = np.asarray(m.vertices, np.float64)
    f = np.asarray(m.faces)
    corners = v[f].reshape(-1, 3)  # (F*3, 3)
    uvs = np.stack([0.5 + 0.45 * corners[:, 0], 0.5 + 0.45 * corners[:, 1]], -1)
    face_uvs = np.arange(3 * len(f), dtype=np.int32).reshape(-1, 3)
    tex = np.random.default_rng(seed).uniform(0.1, 0.9, (tex_size, tex_size, 3))
    return mesh_lib.Mesh(m.vertices, m.faces, uvs=jnp.asarray(uvs), face_uvs=face_uvs, texture=jnp.asarray(tex))


def camera(width=16, height=16, eye=(0.6, -0.5, -3.2), fov=50.0):
    return camera_lib.look_at(jnp.asarray(eye), (0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), fov_y_deg=fov,
                              width=width, height=height, znear=0.5, zfar=10.0)


def lights(ambient=(0.3, 0.25, 0.2), point=(1.5, -2.0, -3.0), point_color=(0.6, 0.7, 0.5),
           specular=(0.3, 0.2, 0.25), direction=(0.0, 0.0, -1.0), dir_color=0.0, dir_specular=0.0):
    """Always the same pytree structure (ambient, directional, point), so jit caches are shared."""
    return (AmbientLight(ambient), DirectionalLight(direction=direction, color=dir_color, specular_color=dir_specular),
            PointLight(position=point, color=point_color, specular_color=specular))


def soft_settings(cam, k=4, sigma=SIGMA, blur=None):
    blur = float(np.log(1.0 / 1e-4 - 1.0) * sigma) if blur is None else blur
    return RasterSettings(image_size=(cam.height, cam.width), faces_per_pixel=k, blur_radius=blur)


def hard_settings(cam):
    return RasterSettings(image_size=(cam.height, cam.width))


def blend_params(sigma=SIGMA, gamma=GAMMA, background=(0.2, 0.3, 0.4)):
    return BlendParams(jnp.asarray(sigma), jnp.asarray(gamma), jnp.asarray(background))


def weights(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape))


# Shared compiled renderers (settings are all-static pytrees, shading / hard are static).
@functools.partial(jax.jit, static_argnames=("shading", "hard"), compiler_options=OPT0)
def render(mesh, cam, lt, settings, blend, shading="phong", hard=False, sh_offset=0.0):
    return R.render_mesh(mesh, cam, lt, settings, shading=shading, blend=blend, hard=hard, sh_offset=sh_offset)


@functools.partial(jax.jit, compiler_options=OPT0)
def fragments(mesh, cam, settings):
    return R.rasterize_mesh(mesh, cam, settings)


# --------------------------------------------------------------------------
# jit / vmap / grad of every render_* function
# --------------------------------------------------------------------------
def render_all(mesh, cam, settings):
    """Every high-level renderer at once (one compilation instead of four)."""
    return (R.render_mesh(mesh, cam, lights(), settings, blend=blend_params()),
            R.render_silhouette(mesh, cam, settings, sigma=SIGMA),
            R.render_depth(mesh, cam, settings, blend=blend_params()),
            R.render_normals(mesh, cam, settings))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def test_jit_vmap_over_cameras_and_grad():
    mesh = sphere_mesh()
    eyes = jnp.asarray([[0.6, -0.5, -3.2], [-2.0, 0.3, 2.5], [0.0, -3.0, 0.4]])
    cams = [camera(20, 24, e) for e in eyes]  # non-square on purpose (H=24, W=20)
    s = soft_settings(cams[0])
    single = jax.jit(render_all, compiler_options=OPT0)
    refs = [[np.asarray(o) for o in single(mesh, c, s)] for c in cams]
    shapes = [(24, 20, 4), (24, 20), (24, 20), (24, 20, 4)]
    for ref in refs:
        assert [r.shape for r in ref] == shapes
        assert all(np.isfinite(r).all() for r in ref)
    # A batch of Camera pytrees built two ways: vmap over the constructor, and stacking.
    batch_vmapped = jax.vmap(lambda e: camera(20, 24, e))(eyes)
    batch_stacked = _stack(cams)
    assert batch_vmapped.R.shape == batch_stacked.R.shape == (3, 3, 3)
    batched = jax.jit(jax.vmap(render_all, in_axes=(None, 0, None)), compiler_options=OPT0)
    for batch in (batch_vmapped, batch_stacked):
        out = batched(mesh, batch, s)
        for j in range(len(shapes)):
            want = np.stack([refs[i][j] for i in range(3)])
            np.testing.assert_allclose(out[j], want, atol=1e-4, err_msg=f"output {j}")
    # Different views really differ (the batch is not one camera broadcast).
    assert np.abs(refs[0][0] - refs[1][0]).max() > 0.1

    ws = [weights(sh, seed=3 + i) for i, sh in enumerate(shapes)]

    def loss(v):
        outs = render_all(mesh_lib.Mesh(v, mesh.faces, mesh.vertex_colors), cams[0], s)
        return [jnp.sum(w * o) for w, o in zip(ws, outs)]

    jac = jax.jit(jax.jacrev(loss), compiler_options=OPT0)(mesh.vertices)
    for name, g in zip(("mesh", "silhouette", "depth", "normals"), jac):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_vmap_over_meshes_sharing_topology():
    base = sphere_mesh()
    cam = camera(20, 24)
    s = soft_settings(cam)
    scales = jnp.asarray([0.8, 1.0, 1.2])
    shift = jnp.asarray([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, -0.1, 0.2]])
    verts = base.vertices[None] * scales[:, None, None] + shift[:, None]
    cols = jnp.stack([base.vertex_colors, base.vertex_colors[:, ::-1], 1.0 - base.vertex_colors])
    bp, lt = blend_params(), lights()

    out = jax.jit(jax.vmap(lambda v, c: R.render_mesh(mesh_lib.Mesh(v, base.faces, vertex_colors=c), cam, lt, s,
                                                      blend=bp)), compiler_options=OPT0)(verts, cols)
    ref = np.stack([np.asarray(render(mesh_lib.Mesh(verts[i], base.faces, cols[i]), cam, lt, s, bp))
                    for i in range(3)])
    np.testing.assert_allclose(out, ref, atol=1e-4)
    cov = ref[..., 3].mean(axis=(1, 2))
    assert cov[0] < cov[1] < cov[2]  # the larger sphere covers more pixels


# --------------------------------------------------------------------------
# Gradients vs central finite differences (float64)
#
# One loss over a packed parameter vector renders, through a camera built
# from (t, axis-angle, fx, fy): (1) render_mesh of the vertex-coloured sphere,
# Phong-shaded and soft; (2) on one shared rasterization of the same sphere,
# the soft blend of its Gouraud + flat shading and (3) of a UV-textured copy
# with SH shading. Each parameter group is then checked on its own with
# tests.helpers.check_grad; jax.grad of the shared jitted loss compiles once
# for all groups.
# --------------------------------------------------------------------------
GROUPS = ("vertices", "vertex_colors", "texture", "camera", "lights", "sh")
GEOMETRY_GROUPS = ("vertices", "camera")  # the only ones that can move the face selection


@pytest.fixture(scope="module")
def grad_problem():
    with _x64():
        mesh = sphere_mesh()
        tmesh = textured_sphere()
        cam0 = camera()
        s = soft_settings(cam0)
        bp = blend_params()
        assert mesh.vertices.dtype == bp.sigma.dtype == jnp.float64
        sh0 = jnp.asarray(np.random.default_rng(2).normal(0.0, 0.3, (3, 9))).at[:, 0].add(0.8)
        parts = {
            "vertices": mesh.vertices,
            "vertex_colors": mesh.vertex_colors,
            "texture": tmesh.texture,
            # t, an axis-angle rotation applied on top of the look-at rotation, fx, fy
            "camera": jnp.concatenate([cam0.t, jnp.asarray([0.03, -0.02, 0.05]), jnp.stack([cam0.fx, cam0.fy * 1.05])]),
            # point-light position and colour, ambient colour
            "lights": jnp.asarray([1.5, -2.0, -3.0, 0.6, 0.7, 0.5, 0.3, 0.25, 0.2]),
            "sh": sh0,
        }
        shapes = {k: v.shape for k, v in parts.items()}
        sizes = [int(np.prod(shapes[k])) for k in GROUPS]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        slices = {k: slice(int(offsets[i]), int(offsets[i + 1])) for i, k in enumerate(GROUPS)}
        x0 = jnp.concatenate([parts[k].reshape(-1) for k in GROUPS])
        w1, w2, w3 = (weights((16, 16, 4), i) for i in (5, 6, 7))

        def unpack(x):
            return {k: x[slices[k]].reshape(shapes[k]) for k in GROUPS}

        def make_camera(p):
            Rm = axis_angle_to_matrix(p[3:6]) @ cam0.R
            return camera_lib.Camera(Rm, p[:3], p[6], p[7], cam0.cx, cam0.cy, cam0.znear, cam0.zfar,
                                     width=cam0.width, height=cam0.height)

        def loss(x):
            p = unpack(x)
            cam = make_camera(p["camera"])
            lp = p["lights"]
            lt = lights(ambient=lp[6:9], point=lp[0:3], point_color=lp[3:6])
            m1 = mesh_lib.Mesh(p["vertices"], mesh.faces, vertex_colors=p["vertex_colors"])
            m2 = mesh_lib.Mesh(p["vertices"], mesh.faces, uvs=tmesh.uvs, face_uvs=tmesh.face_uvs, texture=p["texture"])
            img1 = R.render_mesh(m1, cam, lt, s, shading="phong", blend=bp)
            fr = R.rasterize_mesh(m1, cam, s)
            col2 = (R.shade_fragments(m1, fr, cam, lt, shading="gouraud")
                    + 0.5 * R.shade_fragments(m1, fr, cam, lt, shading="flat"))
            img2 = softmax_rgb_blend(col2, fr, bp, cam.znear, cam.zfar)
            img3 = softmax_rgb_blend(R.shade_fragments(m2, fr, cam, p["sh"], shading="sh"), fr, bp, cam.znear, cam.zfar)
            return jnp.sum(w1 * img1) + jnp.sum(w2 * img2) + jnp.sum(w3 * img3)

        def select(x):
            p = unpack(x)
            return R.rasterize_mesh(mesh_lib.Mesh(p["vertices"], mesh.faces), make_camera(p["camera"]), s).face_idx

        loss = jax.jit(loss)  # default optimisation: the forward runs ~700 times
    return dict(loss=loss, select=select, x0=x0, slices=slices)


def test_fd_perturbations_keep_face_selection(x64, grad_problem):
    """Finite differences only see the smooth part of the render if no +-eps step flips the
    integer visibility decision; check that none does (colours, texture, lights and SH do
    not enter the selection at all)."""
    x0, sel = grad_problem["x0"], grad_problem["select"]
    idx = np.concatenate([np.arange(grad_problem["slices"][k].start, grad_problem["slices"][k].stop)
                          for k in GEOMETRY_GROUPS])
    delta = jnp.zeros((len(idx), x0.size), x0.dtype).at[np.arange(len(idx)), idx].set(EPS)
    xs = jnp.concatenate([x0[None], x0[None] + delta, x0[None] - delta])
    out = np.asarray(jax.jit(jax.vmap(sel))(xs))
    base, pert = out[0], out[1:]
    assert (base >= 0).mean() > 0.2
    changed = np.any(pert != base[None], axis=(1, 2, 3))
    assert not changed.any(), f"face selection changes for {np.count_nonzero(changed)} perturbations"


@pytest.mark.parametrize("group", GROUPS)
def test_grad_matches_finite_differences(x64, grad_problem, group):
    loss, x0 = grad_problem["loss"], grad_problem["x0"]
    sl = grad_problem["slices"][group]

    def f(xg):
        return loss(x0.at[sl].set(xg))

    # jax.grad of the shared jitted loss compiles once; the other groups reuse it.
    g = np.asarray(jax.grad(f)(x0[sl]))
    # The group's gradient is non-trivial: most entries are non-zero.
    min_nonzero = {"texture": 0.5, "vertices": 0.5}.get(group, 1.0)
    assert np.count_nonzero(g) >= min_nonzero * g.size, group
    check_grad(f, x0[sl], eps=EPS, rtol=1e-5)


# --------------------------------------------------------------------------
# Closed-form shading cases
# --------------------------------------------------------------------------
TRI_COLORS = ((0.8, 0.5, 0.3), (0.2, 0.9, 0.4), (0.6, 0.1, 0.7))


def facing_triangle(colors=((0.8, 0.5, 0.3),) * 3, z=2.0):
    """A triangle at depth ``z`` facing a camera at the origin looking down +z (R=I, t=0)."""
    v = jnp.asarray([[-1.2, -1.0, z], [1.2, -1.0, z], [0.0, 1.2, z]])
    f = jnp.asarray([[0, 2, 1]], jnp.int32)
    n = np.asarray(mesh_lib.face_normals(v, f))[0]
    np.testing.assert_allclose(n, [0.0, 0.0, -1.0], atol=1e-6)  # towards the camera
    return mesh_lib.Mesh(v, f, vertex_colors=jnp.asarray(colors, jnp.float32))


def origin_camera(size=16):
    return camera_lib.from_fov(60.0, size, size, znear=0.1, zfar=10.0)


@functools.partial(jax.jit, compiler_options=OPT0)
def _hard_triangle_all(mesh, cam, lt, sh, blend, sh_offset):
    """Every shading at once: one compilation serves all the closed-form tests."""
    s = hard_settings(cam)
    return {shading: R.render_mesh(mesh, cam, sh if shading == "sh" else lt, s, shading=shading, blend=blend,
                                   hard=True, sh_offset=sh_offset)
            for shading in R.SHADINGS}


def hard_triangle(shading, lt, colors=((0.8, 0.5, 0.3),) * 3, background=(0.2, 0.3, 0.4), sh_offset=0.0):
    """Hard render of the facing triangle with ``lt`` (lights, or SH coefficients for "sh")."""
    sh, lt = (lt, lights()) if shading == "sh" else (jnp.zeros((3, 9)), lt)
    imgs = _hard_triangle_all(facing_triangle(colors), origin_camera(), lt, jnp.asarray(sh, jnp.float32),
                              blend_params(background=background), jnp.asarray(sh_offset, jnp.float32))
    img = np.asarray(imgs[shading])
    inside = img[..., 3] > 0.5
    assert 0.2 < inside.mean() < 0.8
    return img, inside


def test_all_shadings_finite_and_sensible():
    mesh = sphere_mesh()
    cam = camera(20, 24)
    s = soft_settings(cam)
    sh = jnp.zeros((3, 9)).at[:, 0].set(0.8).at[:, 2].set(-0.3)
    bp = blend_params()

    @functools.partial(jax.jit, compiler_options=OPT0)
    def every_shading(mesh, cam):
        return {sh_: R.render_mesh(mesh, cam, sh if sh_ == "sh" else lights(), s, shading=sh_, blend=bp)
                for sh_ in R.SHADINGS}

    imgs = {k: np.asarray(v) for k, v in every_shading(mesh, cam).items()}
    assert set(imgs) == {"phong", "gouraud", "flat", "sh", "unlit"}
    for name, img in imgs.items():
        assert img.shape == (24, 20, 4), name
        assert np.isfinite(img).all(), name
        assert img.min() >= -1e-6 and img[..., :3].max() < 2.0, name
        assert 0.2 < img[..., 3].mean() < 0.9, name
        np.testing.assert_array_equal(img[..., 3], imgs["unlit"][..., 3])  # shading never changes alpha
    core = imgs["unlit"][..., 3] > 0.999
    # Lit pixels differ from the albedo; the three Phong-family models are close but not equal.
    for name in ("phong", "gouraud", "flat", "sh"):
        assert np.abs(imgs[name][core] - imgs["unlit"][core]).max() > 0.05, name
    assert 0 < np.abs(imgs["phong"][core] - imgs["gouraud"][core]).mean() < 0.1
    assert 0 < np.abs(imgs["phong"][core] - imgs["flat"][core]).mean() < 0.1


def test_unlit_constant_colour_inside():
    c = np.array([0.8, 0.5, 0.3])
    hard, inside = hard_triangle("unlit", lights(), colors=(c,) * 3, background=(0.0, 0.0, 1.0))
    np.testing.assert_allclose(hard[inside][:, :3], np.broadcast_to(c, (inside.sum(), 3)), atol=1e-6)
    np.testing.assert_allclose(hard[~inside][:, :3], np.broadcast_to([0.0, 0.0, 1.0], ((~inside).sum(), 3)))
    # The soft blend with sharp sigma / gamma gives the same colour away from the edges,
    # and a mix of the face's and the background's colours at the edges.
    cam = origin_camera()
    soft = np.asarray(render(facing_triangle((c,) * 3), cam, lights(), soft_settings(cam, k=2, sigma=1e-5),
                             blend_params(1e-5, 1e-4, (0.0, 0.0, 1.0)), shading="unlit"))
    core = soft[..., 3] > 1 - 1e-6
    assert core.sum() > 10
    np.testing.assert_allclose(soft[core][:, :3], np.broadcast_to(c, (core.sum(), 3)), atol=1e-4)
    edge = (soft[..., 3] > 1e-3) & ~core
    assert np.all(soft[edge][:, 2] >= c[2] - 1e-5) and np.all(soft[edge][:, 0] <= c[0] + 1e-5)


def test_head_on_triangle_phong_flat_gouraud_agree():
    albedo = np.array([0.8, 0.5, 0.3])
    cols = (albedo,) * 3
    ka, kd = np.array([0.2, 0.3, 0.1]), np.array([0.7, 0.6, 0.5])
    # Directional light from the camera side, no point light: every model gives (ka + kd) * albedo.
    lt = lights(ambient=ka, direction=(0.0, 0.0, -1.0), dir_color=kd, point_color=0.0, specular=0.0)
    want = (ka + kd) * albedo
    for shading in ("phong", "flat", "gouraud"):
        img, inside = hard_triangle(shading, lt, cols)
        np.testing.assert_allclose(img[inside][:, :3], np.broadcast_to(want, (inside.sum(), 3)), atol=1e-5,
                                   err_msg=shading)
    # A light at 60 degrees from the normal halves the diffuse term.
    lt60 = lights(ambient=ka, direction=(0.0, np.sin(np.pi / 3), -np.cos(np.pi / 3)), dir_color=kd,
                  point_color=0.0, specular=0.0)
    img, inside = hard_triangle("flat", lt60, cols)
    np.testing.assert_allclose(img[inside][:, :3], np.broadcast_to((ka + 0.5 * kd) * albedo, (inside.sum(), 3)),
                               atol=1e-5)
    # A light behind the surface leaves only the ambient term (no diffuse, no specular).
    ltb = lights(ambient=ka, direction=(0.0, 0.0, 1.0), dir_color=kd, dir_specular=1.0, point_color=0.0, specular=0.0)
    img, inside = hard_triangle("phong", ltb, cols)
    np.testing.assert_allclose(img[inside][:, :3], np.broadcast_to(ka * albedo, (inside.sum(), 3)), atol=1e-5)
    # With a point light and a specular highlight Phong and flat still agree exactly
    # (one normal everywhere), and the highlight is brighter than diffuse + ambient.
    lp = lights(ambient=ka, point=(0.3, -0.2, 0.0), point_color=kd, specular=(0.5, 0.5, 0.5))
    p, inside = hard_triangle("phong", lp, cols)
    f, _ = hard_triangle("flat", lp, cols)
    np.testing.assert_allclose(p, f, atol=1e-5)
    assert p[inside][:, 0].max() > want[0] + 0.1


def test_sh_closed_forms():
    h0 = float(sh_basis(jnp.asarray([0.0, 0.0, 1.0]))[0])
    np.testing.assert_allclose(h0, np.sqrt(np.pi) / 2, rtol=1e-6)  # pi / sqrt(4 pi)
    albedo, inside = hard_triangle("unlit", lights(), TRI_COLORS)
    assert np.ptp(albedo[inside][:, 0]) > 0.2  # the albedo varies over the face
    # DC only: albedo x H0 x c.
    dc = np.array([0.9, 0.7, 0.5])
    img, _ = hard_triangle("sh", jnp.zeros((3, 9)).at[:, 0].set(dc), TRI_COLORS)
    np.testing.assert_allclose(img[inside][:, :3], albedo[inside][:, :3] * h0 * dc, atol=1e-5)
    # sh_offset adds to the DC band of every channel (FaceVerse / Deep3D use 0.8).
    img, _ = hard_triangle("sh", jnp.zeros((3, 9)), TRI_COLORS, sh_offset=0.8)
    np.testing.assert_allclose(img[inside][:, :3], albedo[inside][:, :3] * h0 * 0.8, atol=1e-5)
    # One band-1 (n_z) coefficient: irradiance H2(n) * c = -(2 pi / sqrt 3)(sqrt 3 / sqrt(4 pi)) * c for n = -z.
    c = np.array([0.5, 1.0, 1.5])
    img, _ = hard_triangle("sh", jnp.zeros((3, 9)).at[:, 2].set(c), TRI_COLORS)
    k = -np.sqrt(np.pi)
    np.testing.assert_allclose(float(sh_basis(jnp.asarray([0.0, 0.0, -1.0]))[2]), k, rtol=1e-6)
    np.testing.assert_allclose(img[inside][:, :3], albedo[inside][:, :3] * k * c, atol=1e-5)


# --------------------------------------------------------------------------
# Depth and normal maps
# --------------------------------------------------------------------------
@functools.partial(jax.jit, compiler_options=OPT0)
def depth_and_normals(mesh, cam):
    return (R.render_depth(mesh, cam, background=-1.0), R.render_normals(mesh, cam),
            R.render_normals(mesh, cam, space="camera"))


def test_depth_and_normals_of_camera_facing_plane():
    plane = mesh_lib.plane(2, 2, size=2.0)  # z = 0, normal +z
    mesh = mesh_lib.Mesh(plane.vertices, plane.faces)
    cam = camera_lib.look_at(jnp.asarray([0.0, 0.0, 3.0]), (0.0, 0.0, 0.0), fov_y_deg=60.0, width=20, height=16,
                             znear=0.1, zfar=10.0)
    depth, nw, nc = (np.asarray(a) for a in depth_and_normals(mesh, cam))
    hit = depth > 0
    assert 0.2 < hit.mean() < 0.9
    np.testing.assert_allclose(depth[hit], 3.0, rtol=1e-5)
    assert np.all(depth[~hit] == -1.0)
    np.testing.assert_array_equal(nw[..., 3] > 0.5, hit)
    np.testing.assert_allclose(nw[hit][:, :3], np.broadcast_to([0.0, 0.0, 1.0], (hit.sum(), 3)), atol=1e-6)
    assert np.all(nw[~hit] == 0.0)
    # In the OpenCV camera frame a surface facing the camera has normal -z.
    np.testing.assert_allclose(nc[hit][:, :3], np.broadcast_to([0.0, 0.0, -1.0], (hit.sum(), 3)), atol=1e-6)


def test_depth_of_tilted_plane_is_exact():
    """View depth along each pixel ray equals the ray-plane intersection (perspective-correct)."""
    plane = mesh_lib.plane(2, 2, size=2.0)
    ang = 0.5
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    v = np.asarray(plane.vertices) @ rot.T + np.array([0.0, 0.0, 3.0])
    mesh = mesh_lib.Mesh(jnp.asarray(v, jnp.float32), plane.faces)
    cam = camera_lib.from_fov(50.0, 20, 16, znear=0.1, zfar=10.0)
    depth, nw, _ = (np.asarray(a) for a in depth_and_normals(mesh, cam))
    hit = depth > 0
    assert hit.mean() > 0.2
    n = rot @ np.array([0.0, 0.0, 1.0])
    ys, xs = np.nonzero(hit)
    f = float(cam.fx)
    d = np.stack([(xs + 0.5 - 10.0) / f, (ys + 0.5 - 8.0) / f, np.ones(len(xs))], -1)
    z = (n @ np.array([0.0, 0.0, 3.0])) / (d @ n)
    np.testing.assert_allclose(depth[hit], z, rtol=1e-5)
    np.testing.assert_allclose(nw[hit][:, :3], np.broadcast_to(n, (hit.sum(), 3)), atol=1e-5)


# --------------------------------------------------------------------------
# Hard limits
# --------------------------------------------------------------------------
def test_hard_render_is_hard_blend_of_single_fragment():
    mesh = sphere_mesh()
    cam = camera(20, 24)
    lt = lights()
    hs = hard_settings(cam)  # blur 0, K = 1
    bg = (0.1, 0.2, 0.3)

    @functools.partial(jax.jit, compiler_options=OPT0)
    def renders(mesh, cam):
        hard = R.render_mesh(mesh, cam, lt, hs, hard=True, blend=blend_params(background=bg))
        soft = R.render_mesh(mesh, cam, lt, hs, blend=blend_params(1e-9, 1e-9, bg))
        fr = R.rasterize_mesh(mesh, cam, hs)
        return hard, soft, hard_rgb_blend(R.shade_fragments(mesh, fr, cam, lt), fr, bg), fr

    hard, soft, manual, fr = renders(mesh, cam)
    hard, soft = np.asarray(hard), np.asarray(soft)
    assert fr.face_idx.shape == (24, 20, 1)
    np.testing.assert_allclose(hard, manual, atol=1e-6)
    np.testing.assert_array_equal(hard[..., 3], np.asarray(fr.face_idx[..., 0] >= 0))
    assert 0.2 < hard[..., 3].mean() < 0.9
    # The soft blend of the same single fragment with sharp sigma and gamma tends to it
    # wherever the pixel centre is not within a hair of an edge.
    dist = np.asarray(fr.dist[..., 0])
    ok = (np.asarray(fr.face_idx[..., 0]) < 0) | (dist < -1e-6)
    assert ok.mean() > 0.95
    np.testing.assert_allclose(soft[ok], hard[ok], atol=1e-5)


def test_soft_silhouette_tends_to_hard_mask():
    mesh = sphere_mesh(colors=False)
    cam = camera(20, 24)
    hard = np.asarray(fragments(mesh, cam, hard_settings(cam)).face_idx[..., 0] >= 0).astype(np.float32)
    # K = 8: with a blur radius of ~1.4 px on this coarse sphere, 4 faces within reach can all
    # be nearer than the face that covers a rim pixel (PyTorch3D's K-nearest semantics).
    settings = soft_settings(cam, k=8, blur=0.02)
    sil = jax.jit(lambda m, s: R.render_silhouette(m, cam, settings, sigma=s), compiler_options=OPT0)
    errs = [float(np.abs(np.asarray(sil(mesh, s)) - hard).mean()) for s in (1e-2, 1e-3, 1e-4, 1e-6, 1e-8)]
    assert all(a > b for a, b in zip(errs[:3], errs[1:4])), errs
    assert errs[0] > 0.05  # visibly soft at sigma = 1e-2
    np.testing.assert_allclose(np.asarray(sil(mesh, 1e-8)), hard, atol=1e-3)


def test_boundary_errors():
    mesh = sphere_mesh()
    cam = camera(2, 2)
    with pytest.raises(ValueError, match="image_size"):
        R.rasterize_mesh(mesh, cam, RasterSettings(image_size=(2, 3)))
    empty = Fragments(face_idx=-jnp.ones((2, 2, 1), jnp.int32), bary=-jnp.ones((2, 2, 1, 3)),
                      depth=-jnp.ones((2, 2, 1)), dist=-jnp.ones((2, 2, 1)), num_overflow=jnp.zeros((), jnp.int32),
                      max_bin_count=jnp.zeros((), jnp.int32), num_culled=jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match="shading"):
        R.shade_fragments(mesh, empty, cam, shading="toon")
    with pytest.raises(ValueError, match="SH"):
        R.shade_fragments(mesh, empty, cam, shading="sh")

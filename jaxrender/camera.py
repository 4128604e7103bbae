"""Cameras: intrinsics + extrinsics, projection, rays and converters.

Conventions (see ``docs/conventions.md``):

* **Camera frame** is OpenCV's: x right, y down, z forward (points in front of
  the camera have positive view depth ``z_cam``). World -> camera is
  ``X_cam = R @ X_world + t``.
* **Pixel frame**: continuous coordinates, x to the right, y down, origin at
  the top-left *corner* of the image; the centre of pixel (row i, col j) is
  ``(x, y) = (j + 0.5, i + 0.5)``. Intrinsics ``fx, fy, cx, cy`` are in pixels.
* Perspective projection: ``x = fx * Xc / Zc + cx``, ``y = fy * Yc / Zc + cy``.
  Orthographic: ``x = fx * Xc + cx``, ``y = fy * Yc + cy`` (``fx`` in pixels
  per world unit).

A :class:`Camera` describes one camera; batch cameras with ``jax.vmap``
(constructors and functions are written per example).

Converters map other conventions onto this one exactly (each is tested by
projecting points with the source convention's own formula):
:func:`from_opengl`, :func:`from_pytorch3d`, :func:`from_faceverse`.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxrender._checks import as_float as _as_float, check_shape, is_concrete
from jaxrender.transforms import _mm, look_at_rotation  # _mm: true float32 (not TF32) on GPUs

__all__ = [
    "Camera",
    "from_intrinsics",
    "from_fov",
    "look_at",
    "orthographic_camera",
    "weak_perspective",
    "from_opengl",
    "from_pytorch3d",
    "from_faceverse",
    "intrinsic_matrix",
    "world_to_camera",
    "project",
    "unproject",
    "pixel_rays",
    "camera_center",
    "pixel_centers",
]

# Smallest |z_cam| used as a divisor in perspective projection; keeps points on
# the camera plane finite (they are outside [znear, zfar] and get culled).
_MIN_DEPTH = 1e-8


def _scalar(x, name):
    x = _as_float(x)
    if x.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
    return x


def _check_size(width, height):
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
            raise ValueError(f"{name} must be a positive int (static image size), got {v!r}")
    return int(width), int(height)


class Camera(eqx.Module):
    """A pinhole (or orthographic) camera; a pytree.

    Attributes:
      R: ``(3, 3)`` world -> camera rotation (OpenCV camera frame).
      t: ``(3,)`` world -> camera translation, ``X_cam = R @ X_world + t``.
      fx, fy: scalar focal lengths in pixels (orthographic: pixels per world
        unit).
      cx, cy: scalar principal point in pixels (pixel-centre convention: the
        image centre is ``(width / 2, height / 2)``).
      znear, zfar: scalar clipping depths, in view-depth (``z_cam``) units.
      width, height: static image size in pixels.
      orthographic: static; ``True`` for an orthographic projection.

    Changing any array field does not re-trace jit-compiled functions; changing
    ``width``, ``height`` or ``orthographic`` does. Build cameras with the
    constructors below, which validate their inputs; the raw constructor
    ``Camera(R, t, fx, fy, cx, cy, znear, zfar, width, height)`` only converts
    integers to floats.
    """

    R: jax.Array
    t: jax.Array
    fx: jax.Array
    fy: jax.Array
    cx: jax.Array
    cy: jax.Array
    znear: jax.Array
    zfar: jax.Array
    width: int = eqx.field(static=True)
    height: int = eqx.field(static=True)
    orthographic: bool = eqx.field(static=True, default=False)

    def __init__(self, R, t, fx, fy, cx, cy, znear, zfar, width, height, orthographic=False):
        self.R = _as_float(R)
        self.t = _as_float(t)
        self.fx = _as_float(fx)
        self.fy = _as_float(fy)
        self.cx = _as_float(cx)
        self.cy = _as_float(cy)
        self.znear = _as_float(znear)
        self.zfar = _as_float(zfar)
        self.width, self.height = _check_size(width, height)
        self.orthographic = bool(orthographic)


def _make(R, t, fx, fy, cx, cy, znear, zfar, width, height, orthographic=False):
    width, height = _check_size(width, height)
    R = _as_float(jnp.eye(3) if R is None else R)
    t = _as_float(jnp.zeros(3) if t is None else t)
    check_shape(R, "R", (3, 3))
    check_shape(t, "t", (3,))
    vals = {}
    for name, v in (("fx", fx), ("fy", fy), ("cx", cx), ("cy", cy), ("znear", znear), ("zfar", zfar)):
        vals[name] = _scalar(v, name)
    dtype = jnp.result_type(R, t, *vals.values())
    R, t = R.astype(dtype), t.astype(dtype)
    vals = {k: v.astype(dtype) for k, v in vals.items()}
    if is_concrete(vals["znear"]) and is_concrete(vals["zfar"]):
        if not float(vals["zfar"]) > float(vals["znear"]):
            raise ValueError(f"zfar must be greater than znear, got znear={float(vals['znear'])}, zfar={float(vals['zfar'])}")
    return Camera(R, t, width=width, height=height, orthographic=orthographic, **vals)


# ----------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------


def from_intrinsics(K, R=None, t=None, width=None, height=None, znear=0.1, zfar=100.0, orthographic=False):
    """Camera from an OpenCV intrinsic matrix and extrinsics.

    Args:
      K: ``(3, 3)`` intrinsics ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in
        pixels (skew must be zero). OpenCV's ``cv2.projectPoints`` puts pixel
        centres at integer coordinates; if your ``cx, cy`` come from such a
        pipeline, add 0.5 to both to match this library's pixel-centre
        convention.
      R: ``(3, 3)`` world -> camera rotation (default identity).
      t: ``(3,)`` translation, ``X_cam = R @ X_world + t`` (default zero).
      width, height: image size in pixels (required).
      znear, zfar: clipping depths.
      orthographic: treat ``fx, fy`` as pixels per world unit.

    Returns:
      A :class:`Camera`.
    """
    K = _as_float(K)
    check_shape(K, "K", (3, 3))
    if width is None or height is None:
        raise ValueError("width and height must be given (image size in pixels)")
    if is_concrete(K) and abs(float(K[0, 1])) > 1e-9 * max(1.0, abs(float(K[0, 0]))):
        raise ValueError(f"K must have zero skew K[0, 1], got {float(K[0, 1])}")
    return _make(R, t, K[0, 0], K[1, 1], K[0, 2], K[1, 2], znear, zfar, width, height, orthographic)


def from_fov(fov_y_deg, width, height, R=None, t=None, znear=0.1, zfar=100.0):
    """Perspective camera from a vertical field of view.

    ``fx = fy = (height / 2) / tan(fov_y / 2)``, ``cx = width / 2``,
    ``cy = height / 2`` (square pixels, centred principal point).

    Args:
      fov_y_deg: vertical field of view in **degrees** (top edge to bottom
        edge of the image).
      width, height: image size in pixels.
      R: ``(3, 3)`` world -> camera rotation (default identity: the camera
        looks down world +z with world +y pointing *down* in the image).
      t: ``(3,)`` translation (default zero).
      znear, zfar: clipping depths.

    Returns:
      A :class:`Camera`.
    """
    width, height = _check_size(width, height)
    fov = _scalar(fov_y_deg, "fov_y_deg")
    if is_concrete(fov) and not 0.0 < float(fov) < 180.0:
        raise ValueError(f"fov_y_deg must be in (0, 180) degrees, got {float(fov)}")
    f = (height / 2.0) / jnp.tan(jnp.deg2rad(fov) / 2.0)
    return _make(R, t, f, f, width / 2.0, height / 2.0, znear, zfar, width, height)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), fov_y_deg=60.0, width=256, height=256, znear=0.1, zfar=100.0):
    """Perspective camera at ``eye`` looking at ``target``.

    The world direction ``up`` appears upwards in the image (towards smaller
    pixel y); ``target`` projects to the image centre. See
    :func:`jaxrender.transforms.look_at_rotation`.

    Args:
      eye: ``(3,)`` camera position in world coordinates.
      target: ``(3,)`` point looked at.
      up: ``(3,)`` world up direction.
      fov_y_deg: vertical field of view in degrees.
      width, height: image size in pixels.
      znear, zfar: clipping depths.

    Returns:
      A :class:`Camera`.
    """
    eye = _as_float(eye)
    check_shape(eye, "eye", (3,))
    check_shape(_as_float(target), "target", (3,))
    check_shape(_as_float(up), "up", (3,))
    R = look_at_rotation(eye, target, up)
    t = -_mm(R, eye)
    return from_fov(fov_y_deg, width, height, R=R, t=t, znear=znear, zfar=zfar)


def orthographic_camera(width, height, view_height=2.0, R=None, t=None, znear=0.1, zfar=100.0):
    """Orthographic camera showing ``view_height`` world units vertically.

    ``fx = fy = height / view_height`` (pixels per world unit), principal point
    at the image centre: ``x = fx * Xc + width / 2``, ``y = fy * Yc + height / 2``.

    Args:
      width, height: image size in pixels.
      view_height: world extent covered by the image height.
      R: ``(3, 3)`` world -> camera rotation (default identity).
      t: ``(3,)`` translation (default zero). Only ``t[2]`` does not move the
        image; it sets the view depth used for clipping and z-ordering.
      znear, zfar: clipping depths (``z_cam``).

    Returns:
      A :class:`Camera` with ``orthographic=True``.
    """
    width, height = _check_size(width, height)
    s = height / _scalar(view_height, "view_height")
    return _make(R, t, s, s, width / 2.0, height / 2.0, znear, zfar, width, height, orthographic=True)


def weak_perspective(scale, translation, width, height, R=None, depth=10.0, znear=0.1, zfar=100.0):
    """Weak-perspective (scaled orthographic) camera, HMR/SPIN style.

    Normalized image coordinates are ``u = scale * (Xc + tx)``,
    ``v = scale * (Yc + ty)`` with ``(Xc, Yc)`` the rotated point in the OpenCV
    camera frame (y down), and ``[-1, 1]`` spanning the *shorter* image side.
    In pixels: ``x = width / 2 + (min(W, H) / 2) * u`` (same for y).

    Args:
      scale: scalar ``s``.
      translation: ``(2,)`` ``(tx, ty)`` in world units, added before scaling.
      width, height: image size in pixels.
      R: ``(3, 3)`` world -> camera rotation (default identity).
      depth: view depth added to every point (``t[2]``); it changes only the
        clipping / z-ordering, never the image position.
      znear, zfar: clipping depths.

    Returns:
      A :class:`Camera` with ``orthographic=True``.
    """
    width, height = _check_size(width, height)
    s = _scalar(scale, "scale")
    tr = _as_float(translation)
    check_shape(tr, "translation", (2,))
    d = _scalar(depth, "depth").astype(tr.dtype)
    t = jnp.concatenate([tr, d[None]])
    f = s * (min(width, height) / 2.0)
    return _make(R, t, f, f, width / 2.0, height / 2.0, znear, zfar, width, height, orthographic=True)


# ----------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------

# OpenGL eye frame (x right, y up, -z forward) -> OpenCV camera frame.
_GL_TO_CV = np.diag([1.0, -1.0, -1.0])
# PyTorch3D view frame (x left, y up, z forward) -> OpenCV camera frame.
_P3D_TO_CV = np.diag([-1.0, -1.0, 1.0])


def from_opengl(view, proj, width, height, orthographic=None):
    """Camera from OpenGL view and projection matrices.

    OpenGL conventions: ``view`` maps world to eye coordinates (x right, y up,
    camera looking down -z), ``clip = proj @ view @ [X, 1]``,
    ``ndc = clip[:3] / clip[3]`` in ``[-1, 1]``, and the viewport maps
    ``ndc_x = -1`` to the left image edge and ``ndc_y = +1`` to the **top**
    edge: ``pixel = ((ndc_x + 1) / 2 * W, (1 - ndc_y) / 2 * H)``. The result
    projects every point to the same pixel, with view depth ``z_cam = -z_eye``.

    Supports ``glFrustum``/``gluPerspective``-style matrices (including
    off-centre frusta) and ``glOrtho``-style matrices. ``znear`` and ``zfar``
    are recovered from the third row of ``proj``.

    Args:
      view: ``(4, 4)`` world -> eye matrix (column-vector convention, last row
        ``[0, 0, 0, 1]``, rotation part orthonormal).
      proj: ``(4, 4)`` projection matrix (column-vector convention).
      width, height: viewport size in pixels.
      orthographic: ``None`` detects it from ``proj`` (needs a concrete
        array; pass a bool under ``jit``).

    Returns:
      A :class:`Camera`.
    """
    width, height = _check_size(width, height)
    view, proj = _as_float(view), _as_float(proj)
    check_shape(view, "view", (4, 4))
    check_shape(proj, "proj", (4, 4))
    if orthographic is None:
        if not is_concrete(proj):
            raise ValueError("orthographic must be given (True/False) when proj is traced")
        p = np.asarray(proj)
        if abs(p[3, 3]) > 0.5 and abs(p[3, 2]) < 1e-12:
            orthographic = True
        elif abs(p[3, 3]) < 1e-12 and p[3, 2] < 0:
            orthographic = False
        else:
            raise ValueError(f"proj must be an OpenGL perspective (last row [0, 0, -1, 0]) or orthographic (last row [0, 0, 0, 1]) matrix, got last row {p[3].tolist()}")
    flip = jnp.asarray(_GL_TO_CV, view.dtype)
    R = _mm(flip, view[:3, :3])
    t = _mm(flip, view[:3, 3])
    if orthographic:
        fx = proj[0, 0] * width / 2.0
        fy = proj[1, 1] * height / 2.0
        cx = (1.0 + proj[0, 3]) * width / 2.0
        cy = (1.0 - proj[1, 3]) * height / 2.0
        znear = (proj[2, 3] + 1.0) / proj[2, 2]
        zfar = (proj[2, 3] - 1.0) / proj[2, 2]
    else:
        fx = proj[0, 0] * width / 2.0
        fy = proj[1, 1] * height / 2.0
        cx = (1.0 - proj[0, 2]) * width / 2.0
        cy = (1.0 + proj[1, 2]) * height / 2.0
        znear = proj[2, 3] / (proj[2, 2] - 1.0)
        zfar = proj[2, 3] / (proj[2, 2] + 1.0)
    return _make(R, t, fx, fy, cx, cy, znear, zfar, width, height, orthographic=bool(orthographic))


def from_pytorch3d(
    R,
    T,
    image_size,
    *,
    fov=None,
    degrees=True,
    aspect_ratio=1.0,
    focal_length=None,
    principal_point=(0.0, 0.0),
    in_ndc=True,
    orthographic=False,
    znear=None,
    zfar=None,
):
    """Camera from a PyTorch3D camera (one camera; ``vmap`` for a batch).

    PyTorch3D uses row vectors, ``X_view = X_world @ R + T``, and a view frame
    with +X **left**, +Y up, +Z forward; here that becomes
    ``R_cv = diag(-1, -1, 1) @ R.T`` and ``t_cv = diag(-1, -1, 1) @ T``.
    Its NDC has +X left, +Y up, the shorter image side spanning ``[-1, 1]``
    and pixel edges at the NDC bounds (align_corners=False), so
    ``pixel_x = W / 2 - s * ndc_x``, ``pixel_y = H / 2 - s * ndc_y`` with
    ``s = min(H, W) / 2``.

    Exactly one of two camera models:

    * ``FoVPerspectiveCameras``: pass ``fov`` (degrees unless
      ``degrees=False``) and optionally ``aspect_ratio``;
      ``ndc = (X / (Z tan(fov/2) aspect), Y / (Z tan(fov/2)))``.
    * ``PerspectiveCameras`` (or ``OrthographicCameras`` with
      ``orthographic=True``): pass ``focal_length`` (scalar or ``(fx, fy)``)
      and ``principal_point`` ``(px, py)``. With ``in_ndc=True`` they are in
      NDC units, ``ndc = f * X / Z + p``; with ``in_ndc=False`` in pixels
      (screen space), as PyTorch3D converts them:
      ``f_ndc = f / s``, ``p_ndc = -(p - (W / 2, H / 2)) / s``.

    Args:
      R: ``(3, 3)`` PyTorch3D rotation (row-vector convention).
      T: ``(3,)`` PyTorch3D translation.
      image_size: ``(H, W)`` in pixels (PyTorch3D's order), or one int.
      fov: field of view of FoVPerspectiveCameras.
      degrees: whether ``fov`` is in degrees.
      aspect_ratio: FoVPerspectiveCameras' pixel aspect ratio.
      focal_length: PerspectiveCameras' focal length.
      principal_point: PerspectiveCameras' principal point.
      in_ndc: whether ``focal_length`` / ``principal_point`` are in NDC units.
      orthographic: ``OrthographicCameras`` (``ndc = f * X + p``).
      znear, zfar: clipping depths (default: PyTorch3D's 1 and 100 for
        FoVPerspectiveCameras, else 0.1 and 100).

    Returns:
      A :class:`Camera`.
    """
    if isinstance(image_size, (int, np.integer)):
        height = width = int(image_size)
    else:
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
        height, width = (int(v) for v in image_size)
    width, height = _check_size(width, height)
    R, T = _as_float(R), _as_float(T)
    check_shape(R, "R", (3, 3))
    check_shape(T, "T", (3,))
    flip = jnp.asarray(_P3D_TO_CV, R.dtype)
    R_cv = _mm(flip, R.T)
    t_cv = _mm(flip, T)
    s = min(width, height) / 2.0
    if (fov is None) == (focal_length is None):
        raise ValueError("give exactly one of fov (FoVPerspectiveCameras) or focal_length (PerspectiveCameras)")
    if fov is not None:
        if orthographic:
            raise ValueError("fov is for FoVPerspectiveCameras; orthographic cameras take focal_length")
        fov = _scalar(fov, "fov")
        half = jnp.deg2rad(fov) / 2.0 if degrees else fov / 2.0
        tan_half = jnp.tan(half)
        fy = s / tan_half
        fx = fy / _scalar(aspect_ratio, "aspect_ratio")
        cx, cy = width / 2.0, height / 2.0
        znear = 1.0 if znear is None else znear
        zfar = 100.0 if zfar is None else zfar
    else:
        f = _as_float(focal_length)
        if f.ndim == 0:
            f = jnp.stack([f, f])
        check_shape(f, "focal_length", (2,))
        p = _as_float(principal_point)
        check_shape(p, "principal_point", (2,))
        if in_ndc:
            fx, fy = s * f[0], s * f[1]
            cx, cy = width / 2.0 - s * p[0], height / 2.0 - s * p[1]
        else:
            fx, fy = f[0], f[1]
            cx, cy = p[0], p[1]
        znear = 0.1 if znear is None else znear
        zfar = 100.0 if zfar is None else zfar
    return _make(R_cv, t_cv, fx, fy, cx, cy, znear, zfar, width, height, orthographic=orthographic)


def from_faceverse(focal=1315.0, width=512, height=512, distance=10.0, znear=0.1, zfar=100.0):
    """The FaceVerse / Deep3DFaceRecon camera.

    FaceVerse's ``ModelRenderer.project_vs`` maps model vertices ``v`` (row
    vectors) to ``v_cam = v @ diag(-1, 1, -1) + (0, 0, distance)`` — a camera at
    ``(0, 0, distance)`` looking back at the origin with x and z reversed — and
    then ``pixel = (focal * x / z + cx, focal * y / z + cy)`` with
    ``cx = width // 2``, ``cy = height // 2``. This camera reproduces those pixels
    exactly: ``R = diag(-1, 1, -1)``, ``t = (0, 0, distance)``.

    Note that FaceVerse treats integer pixel coordinates as pixel centres (its
    PyTorch3D renderer uses ``(size - 1) / 2`` as the centre) while this library
    puts centres at ``+0.5``; the difference is half a pixel, and landmarks from
    :func:`project` compare directly with FaceVerse's ``lms_proj``.

    Args:
      focal: focal length in pixels (FaceVerse: 1315 for 512 x 512 images).
      width, height: image size in pixels.
      distance: camera distance from the origin along +z (FaceVerse: 10).
      znear, zfar: clipping depths.

    Returns:
      A :class:`Camera`.
    """
    width, height = _check_size(width, height)
    f = _scalar(focal, "focal")
    d = _scalar(distance, "distance")
    R = jnp.diag(jnp.array([-1.0, 1.0, -1.0], f.dtype))
    t = jnp.stack([jnp.zeros_like(d), jnp.zeros_like(d), d]).astype(f.dtype)
    return _make(R, t, f, f, float(width // 2), float(height // 2), znear, zfar, width, height)


# ----------------------------------------------------------------------------
# Projection and rays
# ----------------------------------------------------------------------------


def intrinsic_matrix(camera: Camera):
    """The OpenCV intrinsic matrix of a camera.

    Args:
      camera: a :class:`Camera`.

    Returns:
      ``(3, 3)`` ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels (pixel
      centres at +0.5).
    """
    z = jnp.zeros_like(camera.fx)
    o = jnp.ones_like(camera.fx)
    return jnp.stack(
        [jnp.stack([camera.fx, z, camera.cx]), jnp.stack([z, camera.fy, camera.cy]), jnp.stack([z, z, o])]
    )


def world_to_camera(camera: Camera, points):
    """World points to the OpenCV camera frame, ``X_cam = R @ X_world + t``.

    Args:
      camera: a :class:`Camera`.
      points: ``(..., 3)`` world points.

    Returns:
      ``(..., 3)`` camera-frame points (x right, y down, z = view depth).
    """
    points = _as_float(points)
    check_shape(points, "points", (3,), batch_ok=True)
    return _mm(points, camera.R.T) + camera.t


def project(camera: Camera, points):
    """Project world points to pixel coordinates and view depth.

    Perspective: ``x = fx * Xc / Zc + cx``, ``y = fy * Yc / Zc + cy``;
    orthographic: ``x = fx * Xc + cx``, ``y = fy * Yc + cy``; the third output
    is the view depth ``Zc`` in both cases. Points on or behind the camera
    plane get finite (meaningless) pixel coordinates — ``|Zc|`` is clamped to
    at least 1e-8 in the division — and their true depth, so callers can cull
    them by ``depth < znear``.

    Args:
      camera: a :class:`Camera`.
      points: ``(N, 3)`` (or any ``(..., 3)``) world points.

    Returns:
      ``(..., 3)``: pixel x, pixel y (pixel-centre convention, y down), view
      depth ``z_cam``.
    """
    pc = world_to_camera(camera, points)
    X, Y, Z = pc[..., 0], pc[..., 1], pc[..., 2]
    if camera.orthographic:
        u, v = X, Y
    else:
        Zs = jnp.where(Z >= 0, jnp.maximum(Z, _MIN_DEPTH), jnp.minimum(Z, -_MIN_DEPTH))
        u, v = X / Zs, Y / Zs
    return jnp.stack([camera.fx * u + camera.cx, camera.fy * v + camera.cy, Z], axis=-1)


def unproject(camera: Camera, xy, depth):
    """Lift pixels with view depths back to world points (inverse of :func:`project`).

    Args:
      camera: a :class:`Camera`.
      xy: ``(N, 2)`` (or ``(..., 2)``) pixel coordinates.
      depth: ``(N,)`` (or ``(...)``) view depths ``z_cam`` (not distances along
        the ray).

    Returns:
      ``(..., 3)`` world points ``X`` with ``project(camera, X) == (xy, depth)``.
    """
    xy = _as_float(xy)
    depth = _as_float(depth)
    check_shape(xy, "xy", (2,), batch_ok=True)
    if depth.shape != xy.shape[:-1]:
        raise ValueError(f"depth must have shape {tuple(xy.shape[:-1])} (xy.shape[:-1]), got {tuple(depth.shape)}")
    a = (xy[..., 0] - camera.cx) / camera.fx
    b = (xy[..., 1] - camera.cy) / camera.fy
    if not camera.orthographic:
        a, b = a * depth, b * depth
    pc = jnp.stack([a, b, depth], axis=-1)
    return _mm(pc - camera.t, camera.R)


def pixel_centers(width: int, height: int, dtype=None):
    """Coordinates of every pixel centre.

    Args:
      width, height: static image size in pixels.
      dtype: float dtype (default: JAX's default float).

    Returns:
      ``(H, W, 2)`` array whose entry ``[i, j]`` is ``(x, y) = (j + 0.5, i + 0.5)``.
    """
    dtype = dtype or jnp.result_type(float)
    xs = jnp.arange(width, dtype=dtype) + 0.5
    ys = jnp.arange(height, dtype=dtype) + 0.5
    gx, gy = jnp.meshgrid(xs, ys, indexing="xy")
    return jnp.stack([gx, gy], axis=-1)


def pixel_rays(camera: Camera, xy=None, normalize=False):
    """World-space rays through pixels.

    Perspective: every ray starts at the camera centre and its camera-frame
    direction is ``((x - cx) / fx, (y - cy) / fy, 1)`` rotated to the world, so
    with ``normalize=False`` the ray parameter equals the view depth
    (``origin + d * direction`` has ``z_cam = d``; PyTorch3D's ray-sampler
    depths). Orthographic: origins lie on the camera plane ``z_cam = 0`` under
    each pixel and all directions are the viewing axis.

    Args:
      camera: a :class:`Camera`.
      xy: ``(..., 2)`` pixel coordinates, or ``None`` for every pixel centre
        ``(j + 0.5, i + 0.5)``, giving ``(H, W, 3)`` outputs.
      normalize: return unit-length directions.

    Returns:
      ``(origins, directions)``, each ``(..., 3)`` (``(H, W, 3)`` for
      ``xy=None``) in world coordinates.
    """
    if xy is None:
        xy = pixel_centers(camera.width, camera.height, camera.R.dtype)
    xy = _as_float(xy)
    check_shape(xy, "xy", (2,), batch_ok=True)
    a = (xy[..., 0] - camera.cx) / camera.fx
    b = (xy[..., 1] - camera.cy) / camera.fy
    one = jnp.ones_like(a)
    if camera.orthographic:
        zero = jnp.zeros_like(a)
        origins = _mm(jnp.stack([a, b, zero], axis=-1) - camera.t, camera.R)
        dirs = jnp.broadcast_to(camera.R[2], origins.shape)
    else:
        dirs = _mm(jnp.stack([a, b, one], axis=-1), camera.R)
        origins = jnp.broadcast_to(camera_center(camera), dirs.shape)
    if normalize:
        dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
    return origins, dirs


def camera_center(camera: Camera):
    """World position of the camera centre (the eye).

    For an orthographic camera this is the point of the camera plane
    ``z_cam = 0`` on the optical axis.

    Args:
      camera: a :class:`Camera`.

    Returns:
      ``(3,)`` world point ``-R.T @ t``.
    """
    return -_mm(camera.R.T, camera.t)

"""A FaceVerse-compatible forward pass (coefficients -> posed, lit face).

This reproduces the math of FaceVerse v3's PyTorch model (``FaceVerseModel_v3``)
for any :class:`~jaxrender.morphable.MorphableModel`:

**Coefficient layout** (one flat vector, in this order)::

    identity (Ki) | expression (Ke) | albedo (Ka) | Euler angles (3) | SH lighting (27)
    | translation (3) | eye rotation (4) | scale (1)

``D = Ki + Ke + Ka + 38``. A vector of length ``D - 1`` (no scale) is also
accepted and means ``scale = 1``. (The reference ``split_coeffs`` has a branch
for a 36-long tail that would read only 3 eye values; we do not reproduce that
slip.) The eye block is ``(left pitch, left yaw, right pitch, right yaw)`` in
radians, "left" being the eyeball at ``model.eye_ranges[0]``.

**Forward pass** (row-vector form as in the reference; ``R = Rz Ry Rx`` from
:func:`jaxrender.transforms.euler_to_matrix` with ``order="xyz"``)::

    v      = mean + id_basis @ id + exp_basis @ exp                       (V, 3)
    c_eye  = mean over the eyeball's vertices of (mean + id_basis @ id) + (0, 0, 0.005)
    v_eye  = (v_eye - c_eye) @ (Ry(yaw) Rx(pitch)).T + c_eye             (each eyeball)
    n      = vertex_normals(v) @ R.T
    v_w    = |scale| * v @ R.T + translation
    albedo = mean_albedo + albedo_basis @ tex
    colour = albedo * E(n),   E = SH irradiance of gamma.view(3, 9) with 0.8 added to band 0
    lms_2d = FaceVerse projection of v_w[landmark_indices]:
             x' = -x, y' = y, z' = distance - z;  (f x'/z' + c, f y'/z' + c),  c = size // 2

The projection is :func:`jaxrender.camera.from_faceverse` followed by
:func:`jaxrender.camera.project`, so the returned camera renders the returned
vertices consistently. Note the reference frames: with the FaceVerse v3
loader (:func:`~jaxrender.morphable.loaders.load_faceverse`) models are in the
frame this camera expects; a model in the BFM frame (y up, z towards the
viewer, like the built-in synthetic face) appears rotated by 180 degrees in
this camera's image — rotate it with the Euler angles (``angles = (0, 0, pi)``
turns it upright) or render it with your own camera.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxrender.morphable.model import MorphableModel, albedo as _albedo, shape as _shape

__all__ = [
    "FaceVerseCoeffs",
    "coeff_sizes",
    "num_coeffs",
    "split_coeffs",
    "merge_coeffs",
    "zero_coeffs",
    "rotation_matrix",
    "eye_rotation_matrix",
    "eye_centers",
    "faceverse_shape",
    "faceverse_forward",
    "SH_OFFSET",
    "EYE_CENTER_OFFSET",
]

SH_OFFSET = 0.8  # added to the band-0 lighting coefficient of each channel
EYE_CENTER_OFFSET = 0.005  # z offset of the eyeball rotation centre (model units)


class FaceVerseCoeffs(NamedTuple):
    """The blocks of a FaceVerse coefficient vector (see the module docstring)."""

    id: jnp.ndarray  # (Ki,)
    exp: jnp.ndarray  # (Ke,)
    tex: jnp.ndarray  # (Ka,)
    angles: jnp.ndarray  # (3,) Euler x, y, z (radians)
    gamma: jnp.ndarray  # (27,) SH lighting, (3 channels, 9 bands) row-major
    translation: jnp.ndarray  # (3,)
    eye: jnp.ndarray  # (4,) left pitch, left yaw, right pitch, right yaw
    scale: jnp.ndarray  # (1,)


def coeff_sizes(model: MorphableModel) -> dict:
    """Sizes of the coefficient blocks, in layout order."""
    return dict(id=model.num_id, exp=model.num_exp, tex=model.num_albedo, angles=3, gamma=27, translation=3, eye=4, scale=1)


def num_coeffs(model: MorphableModel, with_scale: bool = True) -> int:
    """Length ``D`` of the coefficient vector (``D - 1`` without the scale)."""
    return sum(coeff_sizes(model).values()) - (0 if with_scale else 1)


def split_coeffs(model: MorphableModel, coeffs) -> FaceVerseCoeffs:
    """Split ``(..., D)`` (or ``(..., D - 1)``, scale = 1) coefficients into blocks."""
    coeffs = jnp.asarray(coeffs)
    D = num_coeffs(model)
    n = coeffs.shape[-1]
    if n not in (D, D - 1):
        raise ValueError(
            f"coeffs must have {D} entries (or {D - 1} without scale) for this model "
            f"(id {model.num_id} + exp {model.num_exp} + tex {model.num_albedo} + 38), got {n}"
        )
    out, i = {}, 0
    for name, k in coeff_sizes(model).items():
        if name == "scale" and n == D - 1:
            out[name] = jnp.ones(coeffs.shape[:-1] + (1,), coeffs.dtype)
        else:
            out[name] = coeffs[..., i : i + k]
        i += k
    return FaceVerseCoeffs(**out)


def merge_coeffs(id, exp, tex, angles, gamma, translation, eye, scale=None):
    """Concatenate blocks into one ``(..., D)`` vector (``scale=None`` -> 1).

    ``merge_coeffs(*split_coeffs(model, c))`` returns ``c`` (with a scale of 1
    appended when ``c`` had none).
    """
    parts = [jnp.asarray(x) for x in (id, exp, tex, angles, gamma, translation, eye)]
    if scale is None:
        scale = jnp.ones(parts[0].shape[:-1] + (1,), parts[0].dtype)
    scale = jnp.asarray(scale)
    if scale.ndim == 0:
        scale = scale[None]
    dtype = jnp.result_type(*parts, scale)
    return jnp.concatenate([p.astype(dtype) for p in parts + [scale]], axis=-1)


def zero_coeffs(model: MorphableModel, dtype=jnp.float32):
    """The neutral coefficient vector: all zeros and ``scale = 1``."""
    return jnp.zeros((num_coeffs(model),), dtype).at[-1].set(1.0)


def rotation_matrix(angles):
    """``R = Rz @ Ry @ Rx`` (column-vector form) from FaceVerse's Euler angles."""
    from jaxrender.transforms import euler_to_matrix

    return euler_to_matrix(angles, order="xyz")


def eye_rotation_matrix(eye):
    """``Ry(eye[1]) @ Rx(eye[0])`` (column-vector form) for one eyeball;
    ``eye = (pitch, yaw)`` in radians."""
    eye = jnp.asarray(eye)
    return rotation_matrix(jnp.concatenate([eye, jnp.zeros_like(eye[..., :1])], axis=-1))


def eye_centers(model: MorphableModel, id_coeffs, offset: float = EYE_CENTER_OFFSET):
    """``(2, 3)`` rotation centres of the left and right eyeballs: the mean of
    the eyeball's identity-only vertices, moved by ``offset`` along z."""
    if model.eye_ranges is None:
        raise ValueError("model.eye_ranges is None: this model has no eyeball vertex ranges")
    v = _shape(model, id_coeffs, None)
    cs = [jnp.mean(v[a:b], axis=0) for a, b in model.eye_ranges]
    return jnp.stack(cs) + jnp.array([0.0, 0.0, offset], v.dtype)


def faceverse_shape(model: MorphableModel, id_coeffs, exp_coeffs, eye=None, eye_center_offset: float = EYE_CENTER_OFFSET):
    """Model-frame vertices ``(V, 3)`` with the eyeballs rotated by ``eye`` ``(4,)``.

    Without ``model.eye_ranges`` (or with ``eye=None``) this is
    :func:`jaxrender.morphable.shape`.
    """
    v = _shape(model, id_coeffs, exp_coeffs)
    if eye is None or model.eye_ranges is None:
        return v
    eye = jnp.asarray(eye)
    centres = eye_centers(model, id_coeffs, eye_center_offset)
    for k, (a, b) in enumerate(model.eye_ranges):
        R = eye_rotation_matrix(eye[2 * k : 2 * k + 2]).astype(v.dtype)
        c = centres[k]
        v = v.at[a:b].set((v[a:b] - c) @ R.T + c)
    return v


def faceverse_forward(model: MorphableModel, coeffs, *, focal: float = 1315.0, image_size: int = 512,
                      camera_distance: float = 10.0, eye_center_offset: float = EYE_CENTER_OFFSET, camera=None):
    """FaceVerse's forward pass for one coefficient vector (batch with ``jax.vmap``).

    Args:
      model: a :class:`~jaxrender.morphable.MorphableModel` (FaceVerse's own via
        :func:`~jaxrender.morphable.loaders.load_faceverse`, or any other).
      coeffs: ``(D,)`` or ``(D - 1,)`` coefficients, see :func:`split_coeffs`.
      focal: focal length in pixels (FaceVerse: 1315 at 512 x 512).
      image_size: square image size in pixels; the principal point is
        ``image_size // 2``.
      camera_distance: the camera sits at ``z = camera_distance`` (10).
      eye_center_offset: z offset of the eyeball rotation centres (0.005).
      camera: a :class:`jaxrender.camera.Camera` to project the landmarks
        with instead of FaceVerse's (``focal``, ``image_size`` and
        ``camera_distance`` are then ignored); it is returned as ``camera``.

    Returns:
      dict with
        ``vertices`` ``(V, 3)`` posed vertices (``|s| v R^T + t``),
        ``vertices_model`` ``(V, 3)`` before the rigid transform,
        ``normals`` ``(V, 3)`` rotated unit normals,
        ``albedo`` ``(V, 3)`` (FaceVerse's ``face_texture``; in ``[0, 1]`` here
        where FaceVerse's own files give 0..255),
        ``colors`` ``(V, 3)`` SH-lit colours ``albedo * E(normals)``,
        ``landmarks_3d`` ``(L, 3)`` posed landmarks,
        ``landmarks_2d`` ``(L, 2)`` their FaceVerse projection (pixels),
        ``rotation`` ``(3, 3)`` and ``camera`` (:func:`jaxrender.camera.from_faceverse`).
    """
    from jaxrender.camera import from_faceverse, project
    from jaxrender.lighting import sh_shading
    from jaxrender.mesh import vertex_normals

    p = split_coeffs(model, coeffs)
    R = rotation_matrix(p.angles)
    v = faceverse_shape(model, p.id, p.exp, p.eye, eye_center_offset)
    R = R.astype(v.dtype)
    n = vertex_normals(v, model.faces) @ R.T
    v_w = jnp.abs(p.scale).astype(v.dtype) * v @ R.T + p.translation.astype(v.dtype)
    alb = _albedo(model, p.tex)
    colors = alb * sh_shading(n, p.gamma.astype(v.dtype), layout="3x9", offset=SH_OFFSET)
    if camera is None:
        camera = from_faceverse(focal=focal, width=image_size, height=image_size, distance=camera_distance)
    lms = jnp.take(v_w, model.landmark_indices, axis=0)
    lms_2d = project(camera, lms)[:, :2]
    return dict(vertices=v_w, vertices_model=v, normals=n, albedo=alb, colors=colors, landmarks_3d=lms,
                landmarks_2d=lms_2d, rotation=R, camera=camera)

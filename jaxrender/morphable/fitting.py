"""Fitting a morphable face to images: single images, batches and video.

Three thin users of :func:`jaxrender.fit.fit`:

* :func:`fit_face` — one image. A **landmark stage** (pose, identity and
  expression from 2-D landmarks; nothing is rendered) followed by a
  **photometric stage** (albedo and order-2 SH lighting are added and the
  rendered face is compared with the image inside the face region).
* :func:`fit_faces_batched` — many images at once: the per-image loss is
  ``jax.vmap``-ed and summed, so one compiled program serves the whole batch.
  The images do not interact (Adam is element-wise), so the result equals
  per-image fits up to floating-point rounding.
* :func:`track_face` — a video: identity and albedo shared by all frames
  (estimated on a few key frames), per-frame expression, pose and lighting,
  a temporal smoothness term, and every frame started from the key-frame
  fits interpolated in time.

The face is posed and lit with FaceVerse's forward pass
(:func:`jaxrender.morphable.faceverse_forward`): ``v_world = v R^T + t`` with
``R = euler_to_matrix(angles, "xyz")``, per-vertex colour ``albedo * E(n)``
with the 27 SH coefficients and 0.8 added to band 0. It is projected with any
:class:`jaxrender.camera.Camera` (default: :func:`default_camera`).

Parameters (a dict; coefficients are in units of standard deviations since
the bases are pre-scaled): ``id``, ``exp``, ``tex``, ``angles`` (radians),
``translation`` (in units of the face size ``data["unit"]`` — the RMS
distance of the mean landmarks from their centroid — so one learning rate
suits millimetres and metres alike) and ``gamma`` (27 SH coefficients).

Default loss weights are Deep3DFaceRecon's (Deng et al. 2019, "Accurate 3D
Face Reconstruction with Weakly-Supervised Learning"); FaceVerse's fitting
uses the same terms. See :data:`DEFAULT_WEIGHTS` and ``docs/faces.md``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrender import camera as camera_lib
from jaxrender.blend import BlendParams
from jaxrender.fit import FitResult, clamp, fit, param_groups
from jaxrender.morphable.faceverse import faceverse_forward, merge_coeffs
from jaxrender.morphable.model import MorphableModel, to_mesh
from jaxrender.raster import RasterSettings
from jaxrender.render import render_mesh
from jaxrender.transforms import matrix_to_euler

__all__ = [
    "DEFAULT_WEIGHTS",
    "DEFAULT_LR",
    "FaceFit",
    "TrackResult",
    "fit_face",
    "fit_faces_batched",
    "track_face",
    "default_camera",
    "init_params",
    "face_forward",
    "render_face",
    "face_loss",
    "landmark_weights",
]

#: Loss weights (Deep3DFaceRecon's defaults). ``landmark``: ``w_lm = 1.6e-3``
#: on the weighted mean squared landmark distance in pixels of a 224-px image
#: (landmarks are rescaled to 224 px, so the weight carries over to any
#: resolution); ``photo``: ``w_color = 1.92`` on the mean per-pixel L2 colour
#: distance inside the face region; ``id``, ``exp``, ``tex``: ``w_reg * w_id``,
#: ``w_reg * w_exp``, ``w_reg * w_tex`` with ``w_reg = 3e-4``, ``w_id = 1``,
#: ``w_exp = 0.8``, ``w_tex = 1.7e-2`` on the sums of squared coefficients;
#: ``gamma``: ``w_gamma = 10`` on the variance of the SH coefficients across
#: colour channels (a prior towards monochrome light); ``smooth`` (tracking
#: only): mean squared difference of consecutive frames' expression, pose and
#: lighting.
DEFAULT_WEIGHTS = dict(landmark=1.6e-3, photo=1.92, id=3e-4, exp=3e-4 * 0.8, tex=3e-4 * 1.7e-2, gamma=10.0, smooth=1.0)

#: Adam learning rates per parameter group.
DEFAULT_LR = dict(angles=1e-2, translation=1e-2, id=5e-2, exp=5e-2, tex=2e-2, gamma=1e-2)

_GROUPS = ("id", "exp", "tex", "angles", "translation", "gamma")
_LM_REFERENCE_SIZE = 224.0


def landmark_weights(num_landmarks: int = 68, dtype=jnp.float32):
    """Deep3DFaceRecon's landmark weights: 20 on the nose (0-based 28-35) and
    the inner mouth (the last 8 points), 1 elsewhere; all ones unless 68."""
    w = np.ones((num_landmarks,), np.float32)
    if num_landmarks == 68:
        w[28:36] = 20.0
        w[-8:] = 20.0
    return jnp.asarray(w, dtype)


def default_camera(model: MorphableModel, image_size=256, fov_y_deg: float = 12.0, fill: float = 0.8):
    """A camera on the model's +z axis looking at its centre, y up.

    The distance is such that the mean shape's height covers ``fill`` of the
    image (``fov_y_deg`` 12° is a portrait lens). Works for the BFM frame (y
    up, face towards +z), e.g. the synthetic face.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    v = np.asarray(model.mean_shape)
    lo, hi = v.min(0), v.max(0)
    centre = 0.5 * (lo + hi)
    half = 0.5 * (hi[1] - lo[1]) / fill
    dist = half / np.tan(np.deg2rad(fov_y_deg) / 2.0) + hi[2]
    eye = (float(centre[0]), float(centre[1]), float(centre[2] + dist))
    return camera_lib.look_at(eye, (float(centre[0]), float(centre[1]), float(centre[2])), (0.0, 1.0, 0.0),
                              fov_y_deg=fov_y_deg, width=w, height=h, znear=0.05 * dist, zfar=4.0 * dist)


def _unit(model: MorphableModel):
    lm = np.asarray(model.mean_shape)[np.asarray(model.landmark_indices)]
    return float(np.sqrt(np.mean(np.sum((lm - lm.mean(0)) ** 2, -1))))


def init_params(model: MorphableModel, camera, landmarks=None, dtype=jnp.float32):
    """Neutral coefficients and a pose facing ``camera``.

    The rotation turns the model's +z (its face) towards the camera with the
    model's +y up in the image. With ``landmarks`` ``(L, 2)`` the translation
    puts the mean landmarks' centroid on the target's centroid at the depth
    where their spreads match; otherwise the face is put where the camera
    looks, at the distance of the world origin. Traceable (vmap over images).
    """
    lm_mean = jnp.take(model.mean_shape, model.landmark_indices, axis=0)
    unit = jnp.sqrt(jnp.mean(jnp.sum((lm_mean - jnp.mean(lm_mean, 0)) ** 2, -1)))  # = _unit(model), traceable
    Rc = camera.R.astype(dtype)
    R0 = Rc.T @ jnp.diag(jnp.array([1.0, -1.0, -1.0], dtype))  # model axes -> world, facing the camera
    angles = matrix_to_euler(R0, "xyz")
    lm3 = jnp.take(model.mean_shape, model.landmark_indices, axis=0).astype(dtype)
    c3 = jnp.mean(lm3, 0)
    if landmarks is not None:
        lm2 = jnp.asarray(landmarks, dtype)
        c2 = jnp.mean(lm2, 0)
        spread = jnp.sqrt(jnp.mean(jnp.sum((lm2 - c2) ** 2, -1)))
        # Projected spread of a frontal face at depth d: f * unit_xy / d.
        unit_xy = jnp.sqrt(jnp.mean(jnp.sum((lm3[:, :2] - c3[:2]) ** 2, -1)))
        f = 0.5 * (camera.fx + camera.fy)
        d = f * unit_xy / jnp.maximum(spread, 1e-6)
        pc = jnp.stack([(c2[0] - camera.cx) / camera.fx * d, (c2[1] - camera.cy) / camera.fy * d, d])
    else:
        d = jnp.linalg.norm(camera.t)
        pc = jnp.stack([jnp.zeros((), dtype), jnp.zeros((), dtype), d.astype(dtype)])
    centre_world = Rc.T @ (pc - camera.t.astype(dtype))
    t = centre_world - R0 @ c3
    z = lambda n: jnp.zeros((n,), dtype)  # noqa: E731
    return dict(id=z(model.num_id), exp=z(model.num_exp), tex=z(model.num_albedo), angles=angles.astype(dtype),
                translation=(t / unit).astype(dtype), gamma=z(27))


def face_forward(model: MorphableModel, params, camera, unit=None):
    """:func:`faceverse_forward` of the fitting parameters (``translation`` in
    units of ``unit``, default the model's face size)."""
    if unit is None:
        lm = jnp.take(model.mean_shape, model.landmark_indices, axis=0)
        unit = jnp.sqrt(jnp.mean(jnp.sum((lm - jnp.mean(lm, 0)) ** 2, -1)))  # = _unit(model), traceable
    p = params
    eye = jnp.zeros((4,), p["id"].dtype)
    coeffs = merge_coeffs(p["id"], p["exp"], p["tex"], p["angles"], p["gamma"], p["translation"] * unit, eye)
    out = faceverse_forward(model, coeffs, camera=camera)
    out["coeffs"] = coeffs
    return out


def _face_mask(model: MorphableModel, dtype):
    if model.masks is not None and "face" in model.masks:
        return model.masks["face"].astype(dtype)
    return jnp.ones((model.num_vertices,), dtype)


def render_face(model: MorphableModel, out, camera, settings: RasterSettings, hard: bool = True,
                sigma: float = 1e-4, gamma: float = 1e-4):
    """Render the SH-lit face of :func:`face_forward`'s ``out``.

    Returns ``(H, W, 5)``: RGB (zero background), the interpolated ``face``
    mask of the model and the alpha.
    """
    dt = out["vertices"].dtype
    colors = jnp.concatenate([out["colors"], _face_mask(model, dt)[:, None]], -1)
    mesh = to_mesh(model, out["vertices"], colors)
    blend = BlendParams(sigma=sigma, gamma=gamma, background=jnp.zeros((4,), dt))
    return render_mesh(mesh, camera, None, settings, shading="unlit", hard=hard, blend=blend)


def _reg(p, w, keys=("id", "exp", "tex")):
    return sum(w[k] * jnp.sum(p[k] ** 2) for k in keys)


def _gamma_loss(g):
    g = g.reshape(3, 9)
    return jnp.mean((g - jnp.mean(g, 0, keepdims=True)) ** 2)


def face_loss(model: MorphableModel, params, data, weights, settings: Optional[RasterSettings], hard: bool = True,
              sigma: float = 1e-4, regularize=("id", "exp", "tex")):
    """The loss of one image and its terms (a dict).

    ``data``: ``camera``, ``unit`` (face size), optional ``landmarks`` ``(L, 2)``
    with ``lm_weights`` ``(L,)``, and for the photometric term (used when
    ``settings`` is given) ``image`` ``(H, W, 3)`` and ``mask`` ``(H, W)``.
    """
    w = weights
    cam = data["camera"]
    out = face_forward(model, params, cam, data["unit"])
    terms = {}
    loss = jnp.zeros((), out["vertices"].dtype)
    if data.get("landmarks") is not None:
        s = _LM_REFERENCE_SIZE / max(cam.width, cam.height)
        d2 = jnp.sum((out["landmarks_2d"] - data["landmarks"]) ** 2, -1)
        lm = jnp.sum(data["lm_weights"] * d2) / d2.shape[0] * s * s
        terms["landmark"] = lm
        loss = loss + w["landmark"] * lm
    if settings is not None:
        img = render_face(model, out, cam, settings, hard=hard, sigma=sigma)
        wpix = img[..., 3] * img[..., 4] * data["mask"]
        diff = img[..., :3] - data["image"]
        dist = jnp.sqrt(jnp.sum(diff * diff, -1) + 1e-8)
        photo = jnp.sum(wpix * dist) / jnp.maximum(jax.lax.stop_gradient(jnp.sum(wpix)), 1.0)
        terms["photo"] = photo
        g = _gamma_loss(params["gamma"])
        terms["gamma"] = g
        loss = loss + w["photo"] * photo + w["gamma"] * g
    if regularize:
        r = _reg(params, w, regularize)
        terms["reg"] = r
        loss = loss + r
    return loss, terms


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class FaceFit:
    """What :func:`fit_face` / :func:`fit_faces_batched` return (batched: every
    array has a leading image axis).

    Attributes:
      params: dict ``id, exp, tex, angles, translation, gamma`` (translation
        in units of ``unit``).
      coeffs: the same as one FaceVerse coefficient vector
        (:func:`jaxrender.morphable.split_coeffs`; translation in model units,
        eye rotation 0, scale 1).
      vertices: ``(V, 3)`` posed vertices (world frame of ``camera``).
      vertices_model: ``(V, 3)`` identity + expression, before the pose.
      landmarks_2d: ``(L, 2)`` projected landmarks (pixels).
      image: ``(H, W, 5)`` final render (:func:`render_face`: RGB, face mask, alpha).
      camera: the camera.
      unit: the translation unit (face size in model units).
      stages: ``{"landmark": FitResult, "photo": FitResult}`` (those that ran).
    """

    params: dict
    coeffs: Any
    vertices: Any
    vertices_model: Any
    landmarks_2d: Any
    image: Any
    camera: Any
    unit: float
    stages: dict


@dataclasses.dataclass
class TrackResult:
    """What :func:`track_face` returns; per-frame arrays have a leading frame axis.

    Attributes:
      params: dict with shared ``id``, ``tex`` ``(K,)`` and per-frame ``exp``,
        ``angles``, ``translation``, ``gamma`` ``(T, ...)``.
      vertices, vertices_model: ``(T, V, 3)``.
      landmarks_2d: ``(T, L, 2)``.
      keyframes: indices of the frames the identity was fitted on.
      stages: the :class:`FitResult` of every fit run, by name.
    """

    params: dict
    vertices: Any
    vertices_model: Any
    landmarks_2d: Any
    keyframes: Any
    stages: dict


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _weights(weights):
    w = dict(DEFAULT_WEIGHTS)
    if weights:
        unknown = set(weights) - set(w)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(w)}")
        w.update(weights)
    return w


def _lrs(lr):
    out = dict(DEFAULT_LR)
    if lr is None:
        return out
    if isinstance(lr, (int, float)):
        return {k: float(lr) * v / DEFAULT_LR["id"] for k, v in out.items()}
    unknown = set(lr) - set(out)
    if unknown:
        raise ValueError(f"unknown learning-rate groups {sorted(unknown)}; known: {sorted(out)}")
    out.update(lr)
    return out


def _optimizer(lrs, frozen=(), steps: int = 0, final_lr: Optional[float] = None):
    """Adam per group; groups in ``frozen`` keep their values (``set_to_zero``).

    With ``final_lr`` (a fraction) each rate falls along a cosine to
    ``final_lr`` times itself over ``steps`` steps, so the last steps do not
    jitter by a constant-rate Adam step.

    The same arguments give the same object, so repeated fits reuse
    :func:`jaxrender.fit.fit`'s compiled step (it knows optimizers by identity).
    """
    args = (tuple(lrs[k] for k in _GROUPS), tuple(frozen), int(steps), final_lr)
    try:
        return _cached_optimizer(*args)
    except TypeError:  # an unhashable rate (e.g. a jax array): a new optimizer, compiled anew
        return _cached_optimizer.__wrapped__(*args)


@functools.lru_cache(maxsize=64, typed=True)
def _cached_optimizer(rates, frozen, steps, final_lr):
    def rate(lr):
        return lr if final_lr is None or steps <= 0 else optax.cosine_decay_schedule(lr, steps, alpha=final_lr)

    opts = {k: (optax.set_to_zero() if k in frozen else optax.adam(rate(lr))) for k, lr in zip(_GROUPS, rates)}
    opts["frozen"] = optax.set_to_zero()

    def labels(p):
        return {k: jax.tree_util.tree_map(lambda _: (k if k in _GROUPS else "frozen"), v) for k, v in p.items()}

    return param_groups(opts, labels)


def _constraint(bound):
    return None if bound is None else _cached_constraint(float(bound))


@functools.lru_cache(maxsize=16)
def _cached_constraint(bound):
    # One object per bound, for the same reason as _optimizer.
    return clamp(-bound, bound, where=lambda p: (p["id"], p["exp"], p["tex"]))


def _settings(image_size, soft: bool, faces_per_pixel: int, blur_radius):
    if not soft:
        return RasterSettings(image_size=image_size, faces_per_pixel=1, blur_radius=0.0)
    return RasterSettings(image_size=image_size, faces_per_pixel=faces_per_pixel, blur_radius=float(blur_radius))


def _check_image(image, camera, name="image"):
    image = jnp.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"{name} must be (H, W, 3) RGB in [0, 1], got shape {tuple(image.shape)}")
    if (image.shape[0], image.shape[1]) != (camera.height, camera.width):
        raise ValueError(f"{name} is {image.shape[0]}x{image.shape[1]} but the camera is {camera.height}x{camera.width}")
    if jnp.issubdtype(image.dtype, jnp.integer):
        image = image.astype(jnp.float32) / 255.0
    return image[..., :3]


def _steps(steps):
    if isinstance(steps, int):
        return steps, steps
    a, b = steps
    return int(a), int(b)


# ----------------------------------------------------------------------------
# Losses handed to fit
# ----------------------------------------------------------------------------
# Modules rather than closures: jaxrender.fit.fit traces their arrays (the
# model, the previous window's last frame) as arguments and compares the other
# fields by value, so later fits of same-sized images, batches and windows
# reuse its compiled step instead of compiling again.


class _BatchedLoss(eqx.Module):
    """:func:`fit_faces_batched`'s loss: :func:`face_loss` of every image
    (``jax.vmap`` over ``in_axes`` of the data), summed; aux: the mean terms."""

    model: MorphableModel
    weights: dict
    settings: Optional[RasterSettings]
    hard: bool
    sigma: float
    in_axes: dict

    def __call__(self, p, d):
        def one(pp, dd):
            return face_loss(self.model, pp, dd, self.weights, self.settings, hard=self.hard, sigma=self.sigma)

        loss, terms = jax.vmap(one, in_axes=(0, self.in_axes))(p, d)
        return jnp.sum(loss), {k: jnp.mean(v) for k, v in terms.items()}


_TRACK_AXES = dict(camera=None, image=0, mask=0, landmarks=0, lm_weights=None, unit=None)


class _TrackLoss(eqx.Module):
    """:func:`track_face`'s loss of a set of frames: mean per-frame
    :func:`face_loss` (shared ``id``/``tex``), their regulariser and, with
    ``smooth``, the temporal term linking the first frame to ``prev``."""

    model: MorphableModel
    weights: dict
    settings: Optional[RasterSettings]
    hard: bool
    prev: Optional[dict]
    smooth: bool

    def __call__(self, params, d):
        w = self.weights
        per = {k: params[k] for k in _PER_FRAME}
        shared = {"id": params["id"], "tex": params["tex"]}

        def one(pf, dd):
            return face_loss(self.model, {**pf, **shared}, dd, w, self.settings, hard=self.hard, sigma=1e-6,
                             regularize=("exp",))

        loss, terms = jax.vmap(one, in_axes=(0, _TRACK_AXES))(per, d)
        total = jnp.mean(loss) + _reg(shared, w, ("id", "tex"))
        if not self.smooth:  # key frames are far apart in time
            return total, {k: jnp.mean(v) for k, v in terms.items()}
        prev = self.prev
        sm = sum(_smooth(params[k], None if prev is None else prev[k]) for k in _PER_FRAME)
        total = total + w["smooth"] * sm
        return total, {**{k: jnp.mean(v) for k, v in terms.items()}, "smooth": sm}


# ----------------------------------------------------------------------------
# Single image and batches
# ----------------------------------------------------------------------------


# Compiled once per model structure / image size and reused by later calls
# (equinox.filter_jit: arrays are traced, the rest is static).
@eqx.filter_jit
def _final_batched(model, params, camera, cam_axes, unit, image_size):
    settings = RasterSettings(image_size=image_size)

    def final(p, c):
        out = face_forward(model, p, c, unit)
        return out, render_face(model, out, c, settings, hard=True)

    return jax.vmap(final, in_axes=(0, cam_axes))(params, camera)


@eqx.filter_jit
def _init_batched(model, camera, landmarks, cam_axes):
    return jax.vmap(lambda c, l: init_params(model, c, l, landmarks.dtype), in_axes=(cam_axes, 0))(camera, landmarks)


def fit_faces_batched(model: MorphableModel, images, landmarks=None, masks=None, *, camera=None,
                      steps=(300, 200), weights: Optional[Mapping] = None, lr=None, soft: bool = False,
                      faces_per_pixel: int = 8, blur_radius: float = 1e-5, sigma: float = 1e-6,
                      coeff_bound: Optional[float] = 4.0, init=None, steps_per_call: int = 50,
                      progress=False, callback=None) -> FaceFit:
    """Fit a face to each of ``B`` images at once (one compiled program per stage).

    Args and stages as :func:`fit_face`, with a leading batch axis on
    ``images`` ``(B, H, W, 3)``, ``landmarks`` ``(B, L, 2)``, ``masks``
    ``(B, H, W)`` and ``init`` (a params dict of ``(B, ...)`` arrays);
    ``camera`` is one camera shared by all images, or a camera with a leading
    ``(B,)`` axis on its arrays.

    The summed loss separates over images and Adam is element-wise, so each
    image's fit is the one :func:`fit_face` would give (up to rounding).

    Returns:
      A :class:`FaceFit` whose arrays have a leading ``(B,)`` axis (the
      ``stages`` hold one :class:`FitResult` for the batch; its loss is the sum).
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, 3), got shape {tuple(images.shape)}")
    B = images.shape[0]
    if camera is None:
        camera = default_camera(model, (images.shape[1], images.shape[2]))
    cam_batched = camera.R.ndim == 3
    cam_axes = 0 if cam_batched else None
    cam0 = jax.tree_util.tree_map(lambda x: x[0], camera) if cam_batched else camera
    images = jax.vmap(lambda im: _check_image(im, cam0))(images)
    if masks is None:
        masks = jnp.ones(images.shape[:3], images.dtype)
    masks = jnp.asarray(masks, images.dtype)
    if landmarks is not None:
        landmarks = jnp.asarray(landmarks, images.dtype)
        if landmarks.shape != (B, model.num_landmarks, 2):
            raise ValueError(f"landmarks must be (B, {model.num_landmarks}, 2) pixels, got {tuple(landmarks.shape)}")
    w = _weights(weights)
    lrs = _lrs(lr)
    s_lm, s_ph = _steps(steps)
    unit = _unit(model)
    if init is None:
        if landmarks is not None:
            init = _init_batched(model, camera, landmarks, cam_axes)
        else:
            one = init_params(model, cam0, None, images.dtype)
            init = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (B,) + x.shape), one)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, images.dtype), dict(init))
    data = dict(camera=camera, image=images, mask=masks, landmarks=landmarks,
                lm_weights=landmark_weights(model.num_landmarks, images.dtype), unit=unit)
    in_axes = dict(camera=cam_axes, image=0, mask=0, landmarks=0 if landmarks is not None else None,
                   lm_weights=None, unit=None)
    settings = _settings((images.shape[1], images.shape[2]), soft, faces_per_pixel, blur_radius)
    cons = _constraint(coeff_bound)
    stages = {}

    def make_loss(st):
        return _BatchedLoss(model, w, st, not soft, sigma, in_axes)

    if landmarks is not None and s_lm > 0:
        r = fit(make_loss(None), params, data, _optimizer(lrs, frozen=("tex", "gamma")), s_lm, constraints=cons,
                steps_per_call=steps_per_call, progress=progress, callback=callback, has_aux=True)
        stages["landmark"] = r
        params = r.params
    if s_ph > 0:
        r = fit(make_loss(settings), params, data, _optimizer(lrs), s_ph, constraints=cons,
                steps_per_call=steps_per_call, progress=progress, callback=callback, has_aux=True)
        stages["photo"] = r
        params = r.params

    out, img = _final_batched(model, params, camera, cam_axes, unit, settings.image_size)
    return FaceFit(params=params, coeffs=out["coeffs"], vertices=out["vertices"], vertices_model=out["vertices_model"],
                   landmarks_2d=out["landmarks_2d"], image=img, camera=camera, unit=unit, stages=stages)


def fit_face(model: MorphableModel, image, landmarks=None, mask=None, *, camera=None, steps=(300, 200),
             weights: Optional[Mapping] = None, lr=None, soft: bool = False, faces_per_pixel: int = 8,
             blur_radius: float = 1e-5, sigma: float = 1e-6, coeff_bound: Optional[float] = 4.0, init=None,
             steps_per_call: int = 50, progress=False, callback=None) -> FaceFit:
    """Fit the morphable ``model`` to one image.

    Stage 1 (**landmarks**, skipped without ``landmarks``): pose, identity and
    expression minimise ``w_landmark * L_lm + L_reg`` — nothing is rendered,
    so it is fast. Stage 2 (**photometric**): albedo and SH lighting join and
    the loss adds ``w_photo * L_photo + w_gamma * L_gamma`` (the landmark term
    stays when landmarks are given). ``L_photo`` is the mean per-pixel L2
    colour distance over the pixels covered by the model's ``face`` mask,
    weighted by ``mask``. Coefficients are regularised by
    ``w_id |id|^2 + w_exp |exp|^2 + w_tex |tex|^2`` (units of σ) and clamped
    to ``±coeff_bound`` after every step.

    Args:
      model: a :class:`MorphableModel` (68 iBUG landmarks for the default
        landmark weights).
      image: ``(H, W, 3)`` RGB in ``[0, 1]`` (uint8 is scaled).
      landmarks: ``(L, 2)`` pixel positions of the model's landmarks (pixel
        centres at ``+0.5``), or ``None``.
      mask: ``(H, W)`` weight of each pixel in the photometric term (e.g. a
        skin mask); ``None``: all ones.
      camera: a :class:`jaxrender.camera.Camera` of the image's size
        (default :func:`default_camera`). The face is posed in its world frame.
      steps: ``(landmark_steps, photo_steps)`` (an int: both).
      weights: overrides of :data:`DEFAULT_WEIGHTS`.
      lr: overrides of :data:`DEFAULT_LR` (a dict per group), or one float
        scaling all of them (relative to the identity rate).
      soft: photometric stage with the soft rasterizer (``faces_per_pixel``,
        ``blur_radius``, coverage ``sigma``); default hard (one face per
        pixel — cheaper, no gradient through the silhouette, which the
        landmarks constrain).
      coeff_bound: clamp of the coefficients in σ (``None``: none).
      init: initial params (default :func:`init_params`, from the landmarks).
      steps_per_call, progress, callback: passed to :func:`jaxrender.fit.fit`
        (``callback(step, params, loss)`` gets this image's params dict; it
        runs between compiled calls, every ``steps_per_call`` steps).

    Returns:
      A :class:`FaceFit`.
    """
    image = jnp.asarray(image)
    if camera is None:
        camera = default_camera(model, (image.shape[0], image.shape[1]))
    image = _check_image(image, camera)
    expand = lambda x: None if x is None else jnp.asarray(x)[None]  # noqa: E731
    init_b = None if init is None else jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], dict(init))
    first = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)  # noqa: E731
    cb = None if callback is None else (lambda step, p, loss: callback(step, first(p), loss))
    r = fit_faces_batched(model, image[None], expand(landmarks), expand(mask), camera=camera, steps=steps,
                          weights=weights, lr=lr, soft=soft, faces_per_pixel=faces_per_pixel,
                          blur_radius=blur_radius, sigma=sigma, coeff_bound=coeff_bound, init=init_b,
                          steps_per_call=steps_per_call, progress=progress, callback=cb)
    return FaceFit(params=first(r.params), coeffs=r.coeffs[0], vertices=r.vertices[0],
                   vertices_model=r.vertices_model[0], landmarks_2d=r.landmarks_2d[0], image=r.image[0],
                   camera=camera, unit=r.unit, stages=r.stages)


# ----------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------

_PER_FRAME = ("exp", "angles", "translation", "gamma")


def _smooth(seq, prev=None):
    """Mean squared difference of consecutive rows (and of the first row to ``prev``)."""
    if prev is not None:
        seq = jnp.concatenate([prev[None], seq], 0)
    if seq.shape[0] < 2:
        return jnp.zeros((), seq.dtype)
    return jnp.mean(jnp.sum((seq[1:] - seq[:-1]) ** 2, -1))


def _interpolate_keyframes(pk, keys, idx):
    """Per-frame parameters at frames ``idx``, linear in time between the
    fitted key frames ``keys`` around each (held constant outside them);
    angles along the shorter way round."""
    keys = np.asarray(keys)
    if len(keys) == 1:
        j0 = j1 = np.zeros(len(idx), int)
        a = np.zeros(len(idx))
    else:
        j0 = np.clip(np.searchsorted(keys, idx, side="right") - 1, 0, len(keys) - 2)
        j1 = j0 + 1
        a = np.clip((idx - keys[j0]) / (keys[j1] - keys[j0]), 0.0, 1.0)
    out = {}
    for k in _PER_FRAME:
        w = jnp.asarray(a, pk[k].dtype).reshape((-1,) + (1,) * (pk[k].ndim - 1))
        step = pk[k][j1] - pk[k][j0]
        if k == "angles":
            step = jnp.mod(step + jnp.pi, 2 * jnp.pi) - jnp.pi
        out[k] = pk[k][j0] + w * step
    return out


def track_face(model: MorphableModel, frames, landmarks_per_frame, masks=None, *, camera=None,
               steps=(200, 100), keyframe_steps=None, num_keyframes: int = 8, window: Optional[int] = None,
               weights: Optional[Mapping] = None, lr=None, soft: bool = False, coeff_bound: Optional[float] = 4.0,
               photometric: bool = True, warm_start: str = "keyframes", final_lr: Optional[float] = 0.1,
               steps_per_call: int = 50, progress=False) -> TrackResult:
    """Track a face through a video.

    1. **Identity**: a joint fit (landmark, then photometric stage as in
       :func:`fit_face`) on ``num_keyframes`` evenly spaced frames with one
       shared ``id`` and ``tex`` and per-frame ``exp``, pose and light.
    2. **Tracking**: identity and albedo frozen; frames are fitted in windows
       of ``window`` frames (default: all at once), with
       ``w_smooth * mean |x_{t+1} - x_t|^2`` on expression, angles,
       translation (face units) and SH coefficients, linking a window's first
       frame to the previous window's last. Each frame's expression, pose and
       light start (``warm_start="keyframes"``) from the key-frame fits
       interpolated linearly in time, or (``"previous"``) from the last frame
       fitted before it (the first window from the nearest key frame).

    Every stage's learning rates fall along a cosine to ``final_lr`` times
    their value (``None``: constant), so a stage ends converged instead of
    jittering by one Adam step.

    Args:
      frames: ``(T, H, W, 3)`` images.
      landmarks_per_frame: ``(T, L, 2)`` pixel landmarks.
      masks: optional ``(T, H, W)`` pixel weights.
      camera: one camera for all frames (default :func:`default_camera`).
      steps: ``(landmark_steps, photo_steps)`` per tracking window.
      keyframe_steps: the same for the identity fit (default ``steps``).
      photometric: ``False`` fits landmarks only (no rendering).
      warm_start: ``"keyframes"`` or ``"previous"`` (see above).
      final_lr: last learning rate of each stage as a fraction of the first.
      Others as in :func:`fit_face`.

    Returns:
      A :class:`TrackResult`.
    """
    if warm_start not in ("keyframes", "previous"):
        raise ValueError(f"warm_start must be 'keyframes' or 'previous', got {warm_start!r}")
    frames = jnp.asarray(frames)
    T = frames.shape[0]
    if camera is None:
        camera = default_camera(model, (frames.shape[1], frames.shape[2]))
    frames = jax.vmap(lambda im: _check_image(im, camera))(frames)
    lms = jnp.asarray(landmarks_per_frame, frames.dtype)
    if lms.shape != (T, model.num_landmarks, 2):
        raise ValueError(f"landmarks_per_frame must be ({T}, {model.num_landmarks}, 2), got {tuple(lms.shape)}")
    masks = jnp.ones(frames.shape[:3], frames.dtype) if masks is None else jnp.asarray(masks, frames.dtype)
    w = _weights(weights)
    lrs = _lrs(lr)
    s_lm, s_ph = _steps(steps)
    k_lm, k_ph = _steps(keyframe_steps if keyframe_steps is not None else steps)
    if not photometric:
        s_ph = k_ph = 0
    unit = _unit(model)
    settings = _settings((frames.shape[1], frames.shape[2]), soft, 8, 1e-5)
    cons = _constraint(coeff_bound)
    lm_w = landmark_weights(model.num_landmarks, frames.dtype)
    stages = {}

    def make_loss(st, prev, smooth=True):
        return _TrackLoss(model, w, st, not soft, prev, smooth)

    def data_for(idx):
        return dict(camera=camera, image=frames[idx], mask=masks[idx], landmarks=lms[idx], lm_weights=lm_w, unit=unit)

    def run(params, idx, frozen, prev, name, smooth=True):
        d = data_for(idx)
        n_lm, n_ph = s_lm_cur
        if n_lm > 0:
            r = fit(make_loss(None, prev, smooth), params, d,
                    _optimizer(lrs, frozen + ("tex", "gamma"), n_lm, final_lr), n_lm,
                    constraints=cons, steps_per_call=steps_per_call, progress=progress, has_aux=True)
            stages[name + "/landmark"] = r
            params = r.params
        if n_ph > 0:
            r = fit(make_loss(settings, prev, smooth), params, d, _optimizer(lrs, frozen, n_ph, final_lr), n_ph,
                    constraints=cons, steps_per_call=steps_per_call, progress=progress, has_aux=True)
            stages[name + "/photo"] = r
            params = r.params
        return params

    # 1. identity on key frames
    nk = max(1, min(int(num_keyframes), T))
    keys = np.unique(np.round(np.linspace(0, T - 1, nk)).astype(int))
    init_k = _init_batched(model, camera, lms[keys], None)
    pk = {k: init_k[k] for k in _PER_FRAME}
    pk["id"] = init_k["id"][0]
    pk["tex"] = init_k["tex"][0]
    s_lm_cur = (k_lm, k_ph)
    pk = run(pk, jnp.asarray(keys), (), None, "keyframes", smooth=False)
    shared = {"id": pk["id"], "tex": pk["tex"]}

    # 2. windows, warm-started
    W = T if window is None else max(1, int(window))
    s_lm_cur = (s_lm, s_ph)
    out_per = {k: [] for k in _PER_FRAME}
    prev = None
    for start in range(0, T, W):
        idx = np.arange(start, min(T, start + W))
        if warm_start == "keyframes":
            p0 = _interpolate_keyframes(pk, keys, idx)
        elif prev is None:
            # nearest key frame's fit for every frame of the first window
            near = np.array([int(np.argmin(np.abs(keys - i))) for i in idx])
            p0 = {k: pk[k][near] for k in _PER_FRAME}
            # pose from that frame's own landmarks is a better start for the translation
            own = _init_batched(model, camera, lms[idx], None)
            p0["translation"] = jnp.where(jnp.abs(idx - keys[near])[:, None] == 0, p0["translation"],
                                          own["translation"])
        else:
            p0 = {k: jnp.broadcast_to(prev[k], (len(idx),) + prev[k].shape) for k in _PER_FRAME}
        params = {**p0, **shared}
        params = run(params, jnp.asarray(idx), ("id", "tex"), prev, f"frames {idx[0]}-{idx[-1]}")
        for k in _PER_FRAME:
            out_per[k].append(params[k])
        prev = {k: params[k][-1] for k in _PER_FRAME}
    final = {k: jnp.concatenate(v, 0) for k, v in out_per.items()}
    final.update(shared)

    def fwd(pf):
        return face_forward(model, {**pf, **shared}, camera, unit)

    out = jax.jit(jax.vmap(fwd))({k: final[k] for k in _PER_FRAME})
    return TrackResult(params=final, vertices=out["vertices"], vertices_model=out["vertices_model"],
                       landmarks_2d=out["landmarks_2d"], keyframes=keys, stages=stages)

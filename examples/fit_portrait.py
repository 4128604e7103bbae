"""redner's portrait experiment with jaxrender: a morphable face fitted to a photo by rendering.

As in redner's Basel-Face-Model tutorial (there, fitted to the Mona Lisa),
but with the built-in synthetic face model and scikit-image's astronaut
portrait (a 112-px square around the face): the shape and albedo
coefficients, the camera position and look-at point, an ambient light colour
and the colour of a directional light (shining from the viewer's side) are
fitted photometrically. Two Adam optimizers with different learning rates —
one for the face and the lights (0.02), a much slower one for the camera
(2e-4, in units of the initial camera distance) — are combined with
:func:`jaxrender.fit.param_groups`; both decay with a cosine schedule (so
Adam does not drift back up late in the fit), and the lights are clamped to
be non-negative after every step. Coefficient penalties as redner's,
``w mean(shape^2) + 1e-3 mean(albedo^2)``, but with ``w = 3e-3`` rather
than 1e-4 (see ``SHAPE_PRIOR``).

Departures from redner, because the astronaut is not the Mona Lisa (a bright
background and hair fill most of the picture, and the face model explains
neither):

* **Landmarks initialise the pose.** A landmark-only stage (nothing is
  rendered) fits the camera and the shape coefficients so that the model's 68
  landmarks project onto the hand-placed ones of
  ``examples/astronaut_landmarks.py``. Without it the face starts centred and
  the photometric fit does not find the real face. The same landmark term
  (mean squared distance in image widths) stays in the photometric loss with
  weight 1, so the features cannot slide off the photo's while the shape
  changes.
* **The photometric loss sees the face region only**: the mean squared error
  between the render (linear RGB, black background) and the photo
  (linearised, ``x^2.2``) over the pixels inside the landmarks' outline (jaw
  line and brows). Every pixel of that region must be covered and explained
  by the face; hair, background and neck are left out.

Reports (all PSNRs on linear RGB, peak 1):

* ``psnr_face``: over the face region (what the loss sees);
  ``psnr_face_start`` at the start of the photometric stage (after the
  landmark stage); ``psnr_face_init`` before any fitting; ``psnr_face_flat``
  the best single colour (the region's mean) as a baseline;
* ``psnr``: over the whole image, with the model's face region (its ``face``
  vertex mask) composited over the photo — elsewhere it is the photo itself,
  so this is the face error diluted by the rest of the picture;
  ``psnr_start`` the same at the start of the photometric stage;
* ``landmark_err_px`` (``_start``: after the landmark stage): mean distance
  of the projected model landmarks from the hand-placed ones, in pixels.

Saves ``portrait.png`` (photo | mean face at the start | after the landmark
stage | final fit over the photo | final render | 3x error inside the face
region) and ``portrait_fit.gif`` (the fit over the photo | the photo).

    python examples/fit_portrait.py [--quick]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import astronaut_landmarks  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxrender.morphable as M  # noqa: E402
from jaxrender import camera as camera_lib  # noqa: E402
from jaxrender.blend import BlendParams  # noqa: E402
from jaxrender.data.synthetic_face import synthetic_face_model  # noqa: E402
from jaxrender.fit import clamp, fit, param_groups  # noqa: E402
from jaxrender.lighting import AmbientLight, DirectionalLight  # noqa: E402
from jaxrender.losses import landmark_loss  # noqa: E402
from jaxrender.raster import RasterSettings  # noqa: E402
from jaxrender.render import render_mesh  # noqa: E402

FOV = 45.0  # redner's camera
CROP = (76, 168, 112)  # (row, col, side) of the square of the 512² photo around the face
# redner's weight is 1e-4; with it the shape coefficients carve creases that imitate the smile's shading (16.9 dB on
# the face region at 128², but the face looks wrong), 30x keeps the shape plausible
SHAPE_PRIOR = 3e-3


def face_region(lm, size):
    """Pixels whose centre lies inside the landmarks' outline: jaw 0-16, then the brows 26 -> 17."""
    from skimage.draw import polygon

    outline = np.concatenate([lm[0:17], lm[26:16:-1]])
    mask = np.zeros((size, size), np.float32)
    rr, cc = polygon(outline[:, 1] - 0.5, outline[:, 0] - 0.5, (size, size))
    mask[rr, cc] = 1.0
    return mask


def psnr(a, b, mask=None):
    d = (np.asarray(a) - np.asarray(b)) ** 2
    mse = float(d.mean()) if mask is None else float(d[np.asarray(mask) > 0.5].mean())
    return 10.0 * np.log10(1.0 / max(mse, 1e-12))


def main():
    args = C.parse_args("fit_portrait", __doc__.splitlines()[0])
    quick = args.quick
    size = args.size or (64 if quick else 128)
    res = 32 if quick else 40
    lm_steps = 100 if quick else 200
    steps = args.steps or (100 if quick else 300)
    model = synthetic_face_model(resolution=res)
    photo, lm_px = astronaut_landmarks.load(size, CROP)
    target = jnp.asarray(photo ** 2.2)  # sRGB -> (approximately) linear, as pyredner.imread does
    lm_px = jnp.asarray(lm_px)
    mask = jnp.asarray(face_region(np.asarray(lm_px), size))
    lm = np.asarray(model.mean_shape)[np.asarray(model.landmark_indices)]
    centre = lm.mean(0)
    # start with the mean face's landmarks spanning about 90% of the image width
    half_width = 0.5 * (lm[:, 0].max() - lm[:, 0].min())
    dist = float(half_width / 0.9 / np.tan(np.deg2rad(FOV / 2)) + lm[:, 2].max() - centre[2])
    # the camera is optimised in units of `dist` so one learning rate fits any model scale
    params = dict(
        shape=jnp.zeros(model.num_id), albedo=jnp.zeros(model.num_albedo),
        cam_pos=jnp.asarray([centre[0], centre[1], centre[2] + dist], jnp.float32) / dist,
        cam_look_at=jnp.asarray(centre, jnp.float32) / dist,
        ambient=jnp.ones(3) * 0.5, dir_light=jnp.ones(3) * 0.5,
    )
    sigma = 1e-5
    settings = RasterSettings(image_size=size, faces_per_pixel=4, blur_radius=C.blur_radius(sigma))
    blend = BlendParams(sigma=sigma, gamma=1e-4, background=jnp.zeros(3))

    def camera_of(p):
        return camera_lib.look_at(p["cam_pos"] * dist, p["cam_look_at"] * dist, (0.0, 1.0, 0.0), fov_y_deg=FOV,
                                  width=size, height=size, znear=0.05 * dist, zfar=4.0 * dist)

    def render(p):
        """``(H, W, 3)``: the lit face over black (the soft blend mixes the background in at the edges)."""
        v = M.shape(model, p["shape"])
        rgb = M.albedo(model, p["albedo"])
        # redner's DirectionalLight (0, 0, -1) travels towards -z: it comes from the viewer's side (+z)
        lights = (AmbientLight(p["ambient"]), DirectionalLight((0.0, 0.0, 1.0), p["dir_light"]))
        img = render_mesh(M.to_mesh(model, v, rgb), camera_of(p), lights, settings, shading="phong", blend=blend)
        # not `rgb * alpha`: SoftRas's alpha dips to 0.75 on pixels near a shared edge even inside the mesh
        return img[..., :3]

    face_colors = jnp.repeat(model.masks["face"][:, None], 3, 1)

    def face_pixels(p):
        """``(H, W)`` hard mask of the model's face region (for the pictures)."""
        mesh = M.to_mesh(model, M.shape(model, p["shape"]), face_colors)
        img = render_mesh(mesh, camera_of(p), None, C.hard_settings(size), shading="unlit", hard=True)
        return img[..., 0] * img[..., 3]

    def landmarks_2d(p):
        return camera_lib.project(camera_of(p), M.landmarks(model, M.shape(model, p["shape"])))[:, :2]

    def prior(p):
        return SHAPE_PRIOR * jnp.mean(p["shape"] ** 2) + 1e-3 * jnp.mean(p["albedo"] ** 2)

    def landmark_term(p, data):
        err = landmark_loss(landmarks_2d(p) / size, data["landmarks"] / size)  # in image widths, squared
        return err, jnp.sqrt(err) * size

    def landmark_loss_fn(p, data):
        err, rms_px = landmark_term(p, data)
        return err + prior(p), {"landmark_rms_px": rms_px}

    def photo_loss_fn(p, data):
        img = render(p)  # over black: an uncovered pixel of the face region is an error
        mse = jnp.sum(data["mask"][..., None] * (img - data["image"]) ** 2) / (3.0 * jnp.sum(data["mask"]))
        err, rms_px = landmark_term(p, data)  # keeps the features near the landmarks while the shape changes
        return mse + err + prior(p), {"mse": mse, "landmark_rms_px": rms_px}

    groups = {"shape": "face", "albedo": "face", "ambient": "face", "dir_light": "face",
              "cam_pos": "camera", "cam_look_at": "camera"}

    def optimizer(face_lr, camera_lr, n):
        return param_groups({"face": optax.adam(optax.cosine_decay_schedule(face_lr, n, alpha=0.05)),
                             "camera": optax.adam(optax.cosine_decay_schedule(camera_lr, n, alpha=0.05))}, groups)

    data = dict(image=target, mask=mask, landmarks=lm_px)
    cons = clamp(0.0, None, where=lambda p: (p["ambient"], p["dir_light"]))
    snap = lambda p: jax.tree_util.tree_map(np.asarray, p)  # noqa: E731
    snaps = [snap(params)]
    progress = False if quick else "print"
    t0 = time.perf_counter()
    # 1. landmarks -> camera and shape (albedo and lights get no gradient here)
    r_lm = fit(landmark_loss_fn, params, data, optimizer(0.05, 0.01, lm_steps), lm_steps, steps_per_call=25,
               has_aux=True, progress=progress, callback=lambda step, p, loss: snaps.append(snap(p)))
    n_lm = len(snaps)
    # 2. photometric: everything, the camera with a slower optimizer
    r = fit(photo_loss_fn, r_lm.params, data, optimizer(0.02, 2e-4, steps), steps, constraints=cons, steps_per_call=10,
            has_aux=True, progress=progress,
            callback=lambda step, p, loss: snaps.append(snap(p)))
    fit_s = time.perf_counter() - t0

    # RGB and the model's face region as a 4th channel: `C.composite` puts the fitted face over the photo
    rj = jax.jit(lambda p: jnp.concatenate([render(p), face_pixels(p)[..., None]], -1))
    frames = [np.asarray(rj(p)) for p in snaps]
    final = frames[-1]
    tgt = np.asarray(target)
    m = np.asarray(mask)
    over_black = lambda f: f[..., :3]  # noqa: E731
    over_photo = lambda f: C.composite(f, tgt)  # noqa: E731
    disp = lambda x: np.clip(x, 0, 1) ** (1 / 2.2)  # noqa: E731
    lm2 = jax.jit(landmarks_2d)
    lm_err = lambda p: float(np.mean(np.linalg.norm(np.asarray(lm2(p)) - np.asarray(lm_px), axis=1)))  # noqa: E731
    start = frames[n_lm - 1]  # the photometric stage's start
    metrics = dict(
        psnr=psnr(over_photo(final), tgt), psnr_start=psnr(over_photo(start), tgt),
        psnr_face=psnr(over_black(final), tgt, m), psnr_face_start=psnr(over_black(start), tgt, m),
        psnr_face_init=psnr(over_black(frames[0]), tgt, m),
        psnr_face_flat=psnr(tgt[m > 0.5].mean(0), tgt[m > 0.5]),  # the best single colour
        landmark_err_px=lm_err(r.params), landmark_err_px_start=lm_err(r_lm.params),
    )
    scale = max(1, 192 // size)
    C.save_gif(os.path.join(args.out, "portrait_fit.gif"),
               [np.concatenate([disp(over_photo(f)), disp(tgt)], 1) for f in frames], fps=10, scale=scale)
    err = np.abs(disp(over_black(final)) - disp(tgt)) * 3 * m[..., None]
    C.contact_sheet(os.path.join(args.out, "portrait.png"),
                    [disp(tgt), disp(over_photo(frames[0])), disp(over_photo(start)), disp(over_photo(final)),
                     disp(over_black(final)), err], scale=scale)
    print(f"portrait: {lm_steps} landmark + {steps} photometric steps in {fit_s:.1f} s; face-region PSNR "
          f"{metrics['psnr_face_init']:.2f} (init) -> {metrics['psnr_face_start']:.2f} (after landmarks) -> "
          f"{metrics['psnr_face']:.2f} dB; whole image {metrics['psnr_start']:.2f} -> {metrics['psnr']:.2f} dB; "
          f"landmark error {metrics['landmark_err_px']:.2f} px", file=sys.stderr)
    C.finish(args, {**metrics, "steps": steps, "landmark_steps": lm_steps, "image_size": size,
                    "fit_seconds": round(fit_s, 1), "final_loss": r.final_loss})


if __name__ == "__main__":
    main()

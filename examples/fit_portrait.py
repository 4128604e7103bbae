"""redner's portrait experiment with jaxrender: a morphable face fitted to a photo by rendering alone.

As in redner's Basel-Face-Model tutorial (there, fitted to the Mona Lisa),
but with the built-in synthetic face model and scikit-image's astronaut
portrait: the shape and albedo coefficients, the camera position and look-at
point, an ambient light colour and the intensity of a directional light
(shining from the viewer's side) are fitted by minimising the mean squared
error between the soft-rasterised render and the photo (both linear RGB,
background black) plus redner's coefficient penalties
``1e-4 mean(shape^2) + 1e-3 mean(albedo^2)``. Two Adam optimizers with
different learning rates — one for the face and the lights, a faster one for
the camera (in units of the initial camera distance) — are combined with
:func:`jaxrender.fit.param_groups`; the lights are clamped to be
non-negative after every step. No landmarks are used.

Reports the PSNR over the whole image (what the loss sees: hair and
background included, which the face model cannot explain) and over the
pixels the fitted face covers. Saves the fit as a GIF.

    python examples/fit_portrait.py [--quick]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

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
from jaxrender.raster import RasterSettings  # noqa: E402
from jaxrender.render import render_mesh  # noqa: E402

FOV = 45.0  # redner's camera


def target_image(size):
    from skimage import data
    from skimage.transform import resize

    img = data.astronaut()[76:188, 168:280].astype(np.float32) / 255.0  # a 112-px square around the face
    img = resize(img, (size, size), anti_aliasing=True).astype(np.float32)
    return img ** 2.2  # sRGB -> (approximately) linear, as pyredner.imread does


def main():
    args = C.parse_args("fit_portrait", __doc__.splitlines()[0])
    quick = args.quick
    size = 64 if quick else 128
    res = 32 if quick else 40
    steps = args.steps or (80 if quick else 300)
    model = synthetic_face_model(resolution=res)
    target = jnp.asarray(target_image(size))
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
        v = M.shape(model, p["shape"])
        rgb = M.albedo(model, p["albedo"])
        cam = camera_of(p)
        # redner's DirectionalLight (0, 0, -1) travels towards -z: it comes from the viewer's side (+z)
        lights = (AmbientLight(p["ambient"]), DirectionalLight((0.0, 0.0, 1.0), p["dir_light"]))
        img = render_mesh(M.to_mesh(model, v, rgb), cam, lights, settings, shading="phong", blend=blend)
        return img[..., :3]  # the soft blend already mixes in the (black) background

    def loss_fn(p, tgt):
        img = render(p)
        mse = jnp.mean((img - tgt) ** 2)
        return mse + 1e-4 * jnp.mean(p["shape"] ** 2) + 1e-3 * jnp.mean(p["albedo"] ** 2), {"mse": mse}

    opt = param_groups(
        {"face": optax.adam(0.02), "camera": optax.adam(1e-3)},
        {"shape": "face", "albedo": "face", "ambient": "face", "dir_light": "face",
         "cam_pos": "camera", "cam_look_at": "camera"},
    )
    cons = clamp(0.0, None, where=lambda p: (p["ambient"], p["dir_light"]))
    snaps = [jax.tree_util.tree_map(np.asarray, params)]
    t0 = time.perf_counter()
    r = fit(loss_fn, params, target, opt, steps, constraints=cons, steps_per_call=10, has_aux=True,
            progress=False if quick else "print",
            callback=lambda step, p, loss: snaps.append(jax.tree_util.tree_map(np.asarray, p)))
    fit_s = time.perf_counter() - t0
    rj = jax.jit(render)
    frames = [np.asarray(rj(p)) for p in snaps]
    final = np.asarray(rj(r.params))
    tgt = np.asarray(target)
    disp = lambda x: np.clip(x, 0, 1) ** (1 / 2.2)  # noqa: E731
    C.save_gif(os.path.join(args.out, "portrait_fit.gif"), [np.concatenate([disp(f), disp(tgt)], 1) for f in frames],
               fps=10)
    C.contact_sheet(os.path.join(args.out, "portrait.png"), [disp(frames[0]), disp(final), disp(tgt),
                                                              np.abs(disp(final) - disp(tgt)) * 3])
    mse = float(np.mean((final - tgt) ** 2))
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    face = np.asarray(jax.jit(lambda p: render_mesh(
        M.to_mesh(model, M.shape(model, p["shape"])), camera_of(p), None, RasterSettings(image_size=size))[..., 3])(
        r.params)) > 0.5
    psnr_face = 10 * np.log10(1.0 / max(float(np.mean((final[face] - tgt[face]) ** 2)), 1e-12))
    print(f"portrait: {steps} steps in {fit_s:.1f} s; PSNR {psnr:.2f} dB (whole image, linear), "
          f"{psnr_face:.2f} dB on the face; start PSNR {10 * np.log10(1 / np.mean((frames[0] - tgt) ** 2)):.2f} dB",
          file=sys.stderr)
    C.finish(args, {"psnr": psnr, "psnr_face": psnr_face, "steps": steps, "image_size": size,
                    "fit_seconds": round(fit_s, 1), "final_loss": r.final_loss})


if __name__ == "__main__":
    main()

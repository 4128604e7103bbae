"""Deform the Utah teapot until its silhouette is a rounded square (Neural Mesh
Renderer, example 2).

One camera sees the teapot from the side. Every vertex gets a free 3D offset;
the loss is ``1 - soft IoU`` between the soft silhouette and a target mask (a
superellipse "squircle", like NMR's square-ish reference), plus a Laplacian
penalty on the offsets (neighbouring vertices move together) and a small
SoftRas flatten term. The soft silhouette's sigma shrinks during the fit
(coarse to fine) through ``data_fn``; the blur radius stays fixed so the
program is compiled once.

Outputs in ``--out``: ``optimization.gif`` (target in grey, current silhouette
in blue), ``result.png`` (target | final hard silhouette | the deformed teapot
shaded from a 3/4 view), ``keyframes.png``. Last stdout line: ``{"iou": ...}``
(hard silhouette vs target mask).
"""
from __future__ import annotations

import numpy as np

import _common as C  # noqa: I001  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import optax

from jaxrender import camera as cam_lib
from jaxrender import losses, mesh as mesh_lib
from jaxrender.fit import fit
from jaxrender.render import render_silhouette


def squircle_mask(size: int, half: float = 0.8, power: float = 4.0, center=(0.0, 0.04)) -> np.ndarray:
    """Binary ``(size, size)`` mask of ``|x|^p + |y|^p <= half^p`` in [-1, 1]^2 image coordinates."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x, y = np.meshgrid(c, c, indexing="xy")
    x, y = x - center[0], y - center[1]
    return ((np.abs(x) ** power + np.abs(y) ** power) <= half ** power).astype(np.float32)


def main():
    args = C.parse_args("fit_silhouette", __doc__.splitlines()[0])
    size = args.size or (64 if args.quick else 128)
    steps = args.steps or (150 if args.quick else 600)
    teapot = mesh_lib.teapot(4 if args.quick else 6)
    faces = teapot.faces
    v0 = teapot.vertices
    camera = cam_lib.look_at(jnp.array([0.0, 0.9, 3.4]), fov_y_deg=40.0, width=size, height=size)
    target = jnp.asarray(squircle_mask(size))

    sigma_hi, sigma_lo = 3e-4 * (128 / size) ** 2, 2e-5 * (128 / size) ** 2
    settings = C.settings_for([(teapot, camera)], size, faces_per_pixel=8, blur=C.blur_radius(sigma_hi), margin=2.0)
    hard = C.hard_settings(size, settings)
    C.check_overflow(teapot, camera, settings, "initial teapot")

    L = mesh_lib.uniform_laplacian(teapot.num_vertices, np.asarray(faces))
    adj = losses.flatten_loss_setup(np.asarray(faces))
    w_lap, w_flat = 0.15, 2e-5

    def mesh_of(disp):
        return mesh_lib.Mesh(v0 + disp, faces)

    def loss_fn(disp, data):
        sil = render_silhouette(mesh_of(disp), camera, settings, sigma=data["sigma"])
        iou_l = losses.silhouette_iou_loss(sil, target)
        lap = losses.laplacian_smoothing(disp, L)
        flat = losses.flatten_loss(v0 + disp, adj)
        return iou_l + w_lap * lap + w_flat * flat, {"iou_loss": iou_l, "lap": lap, "flat": flat}

    def sigma_schedule(key, step):
        # geometric decay over the first 70% of the steps, then constant
        f = jnp.clip(step / (0.7 * steps), 0.0, 1.0)
        return {"sigma": sigma_hi * (sigma_lo / sigma_hi) ** f}

    render_sil = jax.jit(lambda d: render_silhouette(mesh_of(d), camera, settings, sigma=sigma_lo))
    frames = []

    def overlay(sil):
        base = 1.0 - 0.35 * np.asarray(target)[..., None] * np.ones(3)
        s = np.asarray(sil)[..., None]
        return base * (1 - 0.7 * s) + 0.7 * s * np.array([0.15, 0.35, 0.95])

    def callback(step, disp, loss):
        frames.append(overlay(render_sil(disp)))

    frames.append(overlay(render_sil(jnp.zeros_like(v0))))
    opt = optax.adam(optax.cosine_decay_schedule(0.02, steps, alpha=0.05))
    res = fit(loss_fn, jnp.zeros_like(v0), None, opt, steps, data_fn=sigma_schedule, has_aux=True,
              steps_per_call=10 if args.quick else 20, callback=callback, progress="print" if args.quick else True)
    disp = res.params
    final = mesh_of(disp)
    C.check_overflow(final, camera, settings, "deformed teapot")

    mask = C.hard_mask(final, camera, hard)
    score = C.iou(mask, target)

    # the deformed teapot in 3D, from a 3/4 view and from the fitting camera
    side = cam_lib.look_at(jnp.array([2.6, 1.6, 2.2]), fov_y_deg=40.0, width=size, height=size)
    shade_set = C.hard_settings(size)
    before3d = C.shaded(teapot, side, shade_set)
    after3d = C.shaded(final, side, shade_set)
    front = C.shaded(final, camera, shade_set)
    C.save_gif(f"{args.out}/optimization.gif", frames, fps=10)
    C.contact_sheet(f"{args.out}/result.png", [np.asarray(target), mask, front, before3d, after3d])
    keys = [frames[i] for i in np.linspace(0, len(frames) - 1, 6).round().astype(int)]
    C.contact_sheet(f"{args.out}/keyframes.png", keys)
    C.finish(args, {"iou": score, "steps": int(res.steps_run), "image_size": size, "faces": int(teapot.num_faces),
                    "final_loss": float(res.history["loss"][-1]), "fit_seconds": round(res.wall_time, 1)})


if __name__ == "__main__":
    main()

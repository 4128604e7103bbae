"""Render the Utah teapot: a turntable (hard and soft side by side) and a
sigma/gamma sweep of the soft rasterizer.

This is the first example of the Neural Mesh Renderer tutorials ("draw the
teapot from every side") plus the blur demo of SoftRas: the soft rasterizer
spreads every face over its neighbourhood with a sigmoid of width ``sigma``
(squared NDC distance) and mixes the faces along a pixel with a softmax over
depth of temperature ``gamma``. Small values give the hard (z-buffer) image;
large ones make silhouettes blurry and surfaces translucent. Both renders are
differentiable; only the soft one has gradients at silhouettes.

Outputs (in ``--out``, default ``out/render_teapot/``):

* ``turntable.gif``: the Phong-shaded, vertex-coloured teapot seen from a
  camera circling it; left hard, right soft.
* ``sweep.gif``: one view with sigma growing from 1e-5 to 1e-3 and gamma
  from 1e-4 to 1e-2 (``sigma = gamma / 10`` as in the SoftRas demo), the
  colour composited over the background with the soft alpha.
* ``turntable_first.png``, ``sweep_strip.png``: still frames.

Two things to know when reading the soft pictures:

* Every face is kept at a pixel only among the ``K`` faces *nearest in depth*
  within reach, so ``K`` must grow with sigma (:func:`faces_per_pixel`); the
  script prints the fraction of covered pixels whose covering face was kept.
* The faint lattice inside the soft teapot is part of the SoftRas formula, not
  a crack: at an edge shared by two faces each covers the pixel with
  probability 1/2, so the alpha there is ``1 - (1/2)(1/2) = 3/4``.

The last line printed is JSON: ``{"frames": n, "coverage": c, "outputs":
[...]}`` with ``coverage`` the mean alpha of the hard renders (the fraction of
covered pixels).

Run ``python examples/render_teapot.py --quick`` for a small version (< 60 s
on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrender import camera as camera_lib
from jaxrender import io
from jaxrender import mesh as mesh_lib
from jaxrender import render
from jaxrender.blend import BlendParams
from jaxrender.lighting import AmbientLight, Material, PointLight
from jaxrender.raster import RasterSettings

BACKGROUND = (1.0, 1.0, 1.0)


def teapot_mesh(resolution: int) -> mesh_lib.Mesh:
    """The teapot, vertex-coloured: a warm glaze shading from darker at the foot to lighter
    at the top, and a pale lid."""
    tp = mesh_lib.teapot(resolution)
    v = np.asarray(tp.vertices)
    y = v[:, 1]  # about [-0.49, 0.49]
    t = np.clip((y + 0.49) / 0.98, 0.0, 1.0)[:, None]
    colors = np.array([0.70, 0.28, 0.12]) * (1 - t) + np.array([0.95, 0.62, 0.30]) * t
    lid = np.clip((y - 0.36) / 0.04, 0.0, 1.0)[:, None]
    colors = colors * (1 - lid) + np.array([0.95, 0.85, 0.60]) * lid
    return mesh_lib.Mesh(tp.vertices, tp.faces, vertex_colors=jnp.asarray(colors, jnp.float32))


def orbit_camera(azimuth_deg, elevation_deg, distance, size):
    """Camera on a sphere round the origin, y up; azimuth 0 looks at the teapot's side (spout right)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = distance * jnp.asarray([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    return camera_lib.look_at(eye, (0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), fov_y_deg=36.0, width=size, height=size,
                              znear=0.5, zfar=10.0)


def camera_lights(cam):
    """Lights that travel with the camera, as on a real turntable: a key light above and to
    the left of the camera, plus ambient."""
    R = cam.R
    eye = camera_lib.camera_center(cam)
    key = eye + R.T @ jnp.asarray([-1.5, -2.0, 0.5])  # camera frame: x right, y down
    return (AmbientLight(0.35), PointLight(position=key, color=0.7, specular_color=0.35))


def soft_settings(size, sigma, faces_per_pixel, eps=1e-2):
    """SoftRas settings: a face reaches the pixels where its coverage sigmoid exceeds ``eps``.

    The rasterizer keeps the ``K = faces_per_pixel`` faces *nearest in depth* among those
    within reach (PyTorch3D's rule). On a curved surface the neighbours of the face that
    covers a pixel are often nearer than it, so K must grow with the reach, or the covering
    face is dropped and the soft image gets see-through speckles along the edges of the
    mesh. :func:`faces_per_pixel` picks K; :func:`covering_kept` measures it.
    """
    return RasterSettings(image_size=size, faces_per_pixel=faces_per_pixel,
                          blur_radius=float(math.log(1.0 / eps - 1.0) * sigma))


def faces_per_pixel(sigma, size):
    """K large enough for this teapot (measured with :func:`covering_kept`): grows with the
    reach of a face in pixels, ``sqrt(blur_radius) * size / 2``."""
    reach_px = math.sqrt(math.log(99.0) * sigma) * size / 2.0
    return int(min(256, 2 ** math.ceil(math.log2(max(16.0, 7.0 * (1.0 + reach_px) ** 2)))))


def covering_kept(fragments, hard_alpha):
    """Fraction of the pixels covered in the hard render whose kept soft fragments include a
    face that contains the pixel centre (1.0 means K was large enough everywhere)."""
    inside = jnp.any((fragments.dist < 0) & (fragments.face_idx >= 0), axis=-1)
    covered = hard_alpha > 0.5
    return jnp.sum(inside & covered) / jnp.maximum(jnp.sum(covered), 1)


def composite(rgba, background=BACKGROUND):
    """Colour over the background with the soft alpha: ``alpha * rgb + (1 - alpha) * bg``."""
    rgba = np.asarray(rgba)
    a = rgba[..., 3:4]
    return np.clip(a * rgba[..., :3] + (1.0 - a) * np.asarray(background), 0.0, 1.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/render_teapot/", help="output folder")
    p.add_argument("--quick", action="store_true", help="small and fast (< 60 s on a 2-core CPU)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 128, quick 64)")
    p.add_argument("--frames", type=int, default=None, help="turntable frames (default 36, quick 12)")
    args = p.parse_args(argv)
    size = args.size or (64 if args.quick else 128)
    n_frames = args.frames or (12 if args.quick else 36)
    resolution = 4 if args.quick else 6
    # log10(gamma) from -4 to -2 with sigma = gamma / 10, as in the SoftRas demo.
    sweep_pows = np.linspace(-4.0, -2.0, 5 if args.quick else 9)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    mesh = teapot_mesh(resolution)
    print(f"teapot: {mesh.num_vertices} vertices, {mesh.num_faces} faces; {size}x{size} px; "
          f"devices {jax.devices()}")
    material = Material(shininess=32.0)

    # Turntable: the hard render (one face per pixel, no blur) next to a soft one whose
    # sigma makes the silhouette fade over about two pixels.
    hard_settings = RasterSettings(image_size=size)
    sigma_tt = 2.0 * (2.0 / size) ** 2
    soft_tt = soft_settings(size, sigma_tt, faces_per_pixel(sigma_tt, size))
    blend_tt = BlendParams(sigma_tt, 1e-3, BACKGROUND)
    print(f"soft turntable: sigma={sigma_tt:.1e} gamma=1e-3 K={soft_tt.faces_per_pixel}")

    @jax.jit
    def turntable_frame(cam):
        lights = camera_lights(cam)
        hard = render.render_mesh(mesh, cam, lights, hard_settings, material=material, hard=True, blend=blend_tt)
        soft = render.render_mesh(mesh, cam, lights, soft_tt, material=material, blend=blend_tt)
        fr = render.rasterize_mesh(mesh, cam, soft_tt)
        return hard, soft, fr.num_overflow, covering_kept(fr, hard[..., 3])

    frames, coverage, kept = [], [], []
    for i, az in enumerate(np.linspace(0.0, 360.0, n_frames, endpoint=False)):
        hard, soft, overflow, ok = turntable_frame(orbit_camera(az, 25.0, 3.6, size))
        if int(overflow):
            raise RuntimeError(f"binning overflow ({int(overflow)}): raise max_faces_per_bin")
        coverage.append(float(jnp.mean(hard[..., 3])))
        kept.append(float(ok))
        frames.append(np.concatenate([composite(hard), composite(soft)], axis=1))
        if i == 0:
            print(f"  first frame (compile + render) after {time.time() - t0:.1f} s")
    tt_gif = os.path.join(args.out, "turntable.gif")
    io.write_gif(tt_gif, frames, fps=12)
    tt_png = os.path.join(args.out, "turntable_first.png")
    io.write_image(tt_png, frames[0])
    print(f"turntable: {n_frames} frames after {time.time() - t0:.1f} s, mean coverage {np.mean(coverage):.3f}, "
          f"covering face kept at >= {100 * min(kept):.2f}% of covered pixels")

    # sigma / gamma sweep: one view, increasingly soft. The blur radius follows sigma (it is
    # static, so every step compiles once) and K grows with it.
    cam = orbit_camera(40.0, 25.0, 3.6, size)
    lights = camera_lights(cam)
    hard_alpha = turntable_frame(cam)[0][..., 3]
    sweep = []
    for pw in sweep_pows:
        gamma = float(10.0 ** pw)
        sigma = gamma / 10.0
        settings = soft_settings(size, sigma, faces_per_pixel(sigma, size))

        @jax.jit
        def soft_frame(cam, blend, settings=settings):
            img = render.render_mesh(mesh, cam, lights, settings, material=material, blend=blend)
            fr = render.rasterize_mesh(mesh, cam, settings)
            return img, fr.num_overflow, covering_kept(fr, hard_alpha)

        img, overflow, ok = soft_frame(cam, BlendParams(sigma, gamma, BACKGROUND))
        if int(overflow):
            raise RuntimeError(f"binning overflow ({int(overflow)}) at sigma={sigma:g}: raise max_faces_per_bin")
        sweep.append(composite(img))
        print(f"  sigma={sigma:.1e} gamma={gamma:.1e} K={settings.faces_per_pixel}: mean alpha "
              f"{float(jnp.mean(img[..., 3])):.3f}, covering face kept at {100 * float(ok):.2f}% of covered pixels")
    sweep_gif = os.path.join(args.out, "sweep.gif")
    io.write_gif(sweep_gif, sweep + sweep[-2:0:-1], fps=4)  # forth and back: the loop has no jump
    strip_png = os.path.join(args.out, "sweep_strip.png")
    io.write_image(strip_png, np.concatenate(sweep, axis=1))
    print(f"done in {time.time() - t0:.1f} s")

    outputs = [tt_gif, tt_png, sweep_gif, strip_png]
    print(json.dumps({"frames": n_frames, "coverage": round(float(np.mean(coverage)), 4), "outputs": outputs}))


if __name__ == "__main__":
    main()

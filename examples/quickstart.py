"""jaxrender quickstart: render a teapot and a face to PNG.

    pip install -e ".[examples]"
    python examples/quickstart.py            # writes out/quickstart/*.png

What it shows, in a few lines each:

1. The Utah teapot with per-vertex colours, Phong-shaded by a point light,
   seen through a look-at camera (hard rasterization: one face per pixel).
2. The mean face of the built-in synthetic morphable model
   (:func:`jaxrender.data.synthetic_face.synthetic_face_model`, no download),
   lit by 27 spherical-harmonics coefficients as in face-reconstruction work.
3. The face's normal map and the teapot's depth map.

Every ``render_*`` call is a pure function of arrays, so the same calls work
under ``jax.jit``, ``jax.vmap`` (many cameras or meshes at once) and
``jax.grad`` (fitting shape, colour, camera and lights to images).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxrender as jr
from jaxrender.data.synthetic_face import synthetic_face_model


def render_teapot(size):
    tp = jr.mesh.teapot(resolution=8)  # y up, spout towards +x, about [-1, 1] wide
    y = tp.vertices[:, 1:2]
    colors = jnp.where(y > 0.36, jnp.asarray([0.95, 0.85, 0.6]),
                       jnp.asarray([0.7, 0.28, 0.12]) + (y + 0.5) * jnp.asarray([0.25, 0.34, 0.18]))
    teapot = jr.Mesh(tp.vertices, tp.faces, vertex_colors=colors)
    # OpenCV-style camera: x right, y down, z forward; look_at keeps world +y up in the image.
    cam = jr.look_at(eye=(1.2, 1.3, 3.0), target=(0.0, -0.05, 0.0), up=(0.0, 1.0, 0.0), fov_y_deg=36.0,
                     width=size, height=size)
    lights = (jr.AmbientLight(0.35), jr.PointLight(position=(-1.5, 3.0, 3.5), color=0.7, specular_color=0.35))
    shaded = jax.jit(lambda m, c: jr.render_mesh(m, c, lights, shading="phong", hard=True))(teapot, cam)
    # View depth (camera z) of the nearest face, 0 where empty.
    depth = jax.jit(lambda m, c: jr.render_depth(m, c))(teapot, cam)
    return shaded, depth


def render_face(size):
    model = synthetic_face_model(resolution=64)  # millimetres; x to the subject's left, y up, z to the viewer
    face = jr.Mesh(model.mean_shape, model.faces, vertex_colors=model.mean_albedo)
    cam = jr.look_at(eye=(0.0, 10.0, 700.0), target=(0.0, -5.0, 0.0), up=(0.0, 1.0, 0.0), fov_y_deg=26.0,
                     width=size, height=size, znear=100.0, zfar=2000.0)
    # 27 SH coefficients, (3 colour channels, 9 bands): constant light plus light from above
    # (band 1 multiplies -n_y), from the front (band 2, +n_z) and from the viewer's left (band 3, -n_x).
    sh = jnp.zeros((3, 9)).at[:, 0].set(0.72).at[:, 1].set(-0.12).at[:, 2].set(0.16).at[:, 3].set(0.08)
    shaded = jax.jit(lambda m, c: jr.render_mesh(m, c, sh, shading="sh", hard=True))(face, cam)
    normals = jax.jit(lambda m, c: jr.render_normals(m, c))(face, cam)
    return shaded, normals


def on_white(rgba):
    rgba = np.asarray(rgba)
    a = rgba[..., 3:4]
    return np.clip(a * rgba[..., :3] + (1.0 - a), 0.0, 1.0)


def depth_to_gray(depth):
    """Near = dark, far = light, background white."""
    d = np.asarray(depth)
    hit = d > 0
    lo, hi = d[hit].min(), d[hit].max()
    return np.where(hit, 0.15 + 0.7 * (d - lo) / max(hi - lo, 1e-6), 1.0)


def main(argv=None):
    p = argparse.ArgumentParser(description="Render a teapot and a face to PNG.")
    p.add_argument("--out", default="out/quickstart", help="output folder")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    teapot, depth = render_teapot(args.size)
    face, normals = render_face(args.size)

    normal_rgb = on_white(jnp.concatenate([0.5 * normals[..., :3] + 0.5, normals[..., 3:]], -1))
    images = {
        "teapot.png": on_white(teapot),
        "teapot_depth.png": depth_to_gray(depth),
        "face.png": on_white(face),
        "face_normals.png": normal_rgb,
    }
    images["quickstart.png"] = np.concatenate(
        [images["teapot.png"], images["face.png"], images["face_normals.png"],
         np.repeat(images["teapot_depth.png"][..., None], 3, axis=-1)], axis=1)
    paths = []
    for name, img in images.items():
        path = os.path.join(args.out, name)
        jr.io.write_image(path, img)
        paths.append(path)
    coverage = float(np.mean(np.asarray(teapot[..., 3])))
    print(f"rendered on {jax.devices()[0].platform} in {time.time() - t0:.1f} s "
          f"(teapot covers {100 * coverage:.0f}% of its image)")
    print("wrote:\n  " + "\n  ".join(paths))


if __name__ == "__main__":
    main()

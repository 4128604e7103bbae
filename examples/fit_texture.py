"""Fit the colours of the Utah teapot to pictures of it (Neural Mesh Renderer,
example 3), and check them on views that were not used for fitting.

The ground truth is a procedural colour pattern stored per vertex (the
"texture": a ``(V, 3)`` array interpolated over the faces); the reference
pictures are Phong-shaded renders from 24 random views, and 8 more views are
held out. The fit starts from grey and minimises the mean squared error of a
random batch of views per step, with the colours clamped to ``[0, 1]`` after
every step.

The geometry is known and fixed, so visibility never changes: every view is
rasterized once, before the fit, and the loss only re-runs the later stages
(``shade_fragments`` + ``hard_rgb_blend``) on the stored fragments -- an
example of calling the pipeline stages directly instead of ``render_mesh``.

Outputs in ``--out``: ``optimization.gif`` (a held-out view: target | fit),
``result.png`` (four held-out views: target, fit, 4x error),
``keyframes.png``. Last stdout line: ``{"psnr_heldout": ...}`` (PSNR over the
teapot's pixels in the held-out views, colours in [0, 1]).
"""
from __future__ import annotations

import sys
import warnings

import numpy as np

import _common as C  # noqa: I001  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import optax

from jaxrender import camera as cam_lib
from jaxrender import losses, mesh as mesh_lib
from jaxrender.blend import hard_rgb_blend
from jaxrender.fit import clamp, fit
from jaxrender.lighting import AmbientLight, DirectionalLight
from jaxrender.render import shade_fragments


def pattern(v: np.ndarray) -> np.ndarray:
    """A colourful procedural pattern of 3D position (stripes and blobs), in [0.05, 0.95]."""
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    r = 0.5 + 0.45 * np.sin(6.0 * x + 2.0 * np.sin(4.0 * y))
    g = 0.5 + 0.45 * np.cos(7.0 * y + 3.0 * z)
    b = 0.5 + 0.45 * np.sin(5.0 * z - 4.0 * x * y)
    return np.stack([r, g, b], -1).astype(np.float32)


def random_cameras(rng, n, size, distance=3.2):
    cams = []
    for _ in range(n):
        az, el = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(-15, 60))
        eye = distance * np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
        cams.append(cam_lib.look_at(jnp.asarray(eye, jnp.float32), fov_y_deg=40.0, width=size, height=size))
    return cams


def main():
    args = C.parse_args("fit_texture", __doc__.splitlines()[0])
    size = args.size or (48 if args.quick else 96)
    steps = args.steps or (80 if args.quick else 400)
    n_train, n_test, batch = (12, 4, 2) if args.quick else (24, 8, 4)
    rng = np.random.default_rng(args.seed)

    geo = mesh_lib.teapot(4 if args.quick else 6)
    truth = pattern(np.asarray(geo.vertices))
    lights = (AmbientLight(0.55), DirectionalLight(direction=(0.4, 1.0, 0.6), color=0.45))
    cams = random_cameras(rng, n_train + n_test, size)
    settings = C.settings_for([(geo, c) for c in cams[:4]], size, faces_per_pixel=1, margin=1.5)
    # Rasterize every view once (the geometry does not change).
    frags = [C.rasterize_mesh(geo, c, settings) for c in cams]
    overflow = sum(int(f.num_overflow) for f in frags)
    if overflow:
        warnings.warn(f"{overflow} (face, tile) pairs overflowed; raise max_faces_per_bin", RuntimeWarning)
    else:
        print(f"[check] all {len(frags)} views: num_overflow = 0", file=sys.stderr)
    white = jnp.ones(3)

    def render(colors, fr, cam):
        m = mesh_lib.Mesh(geo.vertices, geo.faces, vertex_colors=colors)
        rgb = shade_fragments(m, fr, cam, lights, shading="phong")
        return hard_rgb_blend(rgb, fr, white)[..., :3]

    render_j = jax.jit(render)
    targets = np.stack([np.asarray(render_j(jnp.asarray(truth), f, c)) for f, c in zip(frags, cams)])
    masks = np.stack([np.asarray(f.face_idx[..., 0] >= 0) for f in frags])
    train = {"frags": C.stack_trees(frags[:n_train]), "cams": C.stack_trees(cams[:n_train]),
             "targets": jnp.asarray(targets[:n_train])}

    def data_fn(key, step, data):
        idx = jax.random.choice(key, n_train, (batch,), replace=False)
        return jax.tree_util.tree_map(lambda x: x[idx] if isinstance(x, jax.Array) and x.ndim > 0 else x, data)

    def loss_fn(colors, d):
        imgs = jax.vmap(render, in_axes=(None, 0, 0))(colors, d["frags"], d["cams"])
        return losses.mse(imgs, d["targets"])

    show = n_train  # first held-out view for the animation
    frames = []

    def callback(step, colors, loss):
        frames.append(C.side_by_side(targets[show], np.asarray(render_j(colors, frags[show], cams[show]))))

    init = jnp.full_like(jnp.asarray(truth), 0.5)
    callback(0, init, None)
    res = fit(loss_fn, init, train, optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.1)), steps,
              data_fn=data_fn, constraints=clamp(0.0, 1.0), steps_per_call=10 if args.quick else 20,
              callback=callback, progress="print" if args.quick else True)
    colors = res.params

    test = range(n_train, n_train + n_test)
    preds = np.stack([np.asarray(render_j(colors, frags[i], cams[i])) for i in test])
    err = ((preds - targets[n_train:]) ** 2)[masks[n_train:]]
    psnr = float(10 * np.log10(1.0 / max(err.mean(), 1e-12)))
    train_preds = np.stack([np.asarray(render_j(colors, frags[i], cams[i])) for i in range(n_train)])
    psnr_train = float(10 * np.log10(1.0 / max(((train_preds - targets[:n_train]) ** 2)[masks[:n_train]].mean(), 1e-12)))
    seen = float(np.mean(np.abs(np.asarray(colors) - 0.5).sum(-1) > 1e-3))

    C.save_gif(f"{args.out}/optimization.gif", frames, fps=8)
    sheet = []
    for k in range(min(4, n_test)):
        t, p = targets[n_train + k], preds[k]
        sheet += [t, p, np.clip(1.0 - 4.0 * np.abs(p - t).mean(-1), 0, 1)]
    C.contact_sheet(f"{args.out}/result.png", sheet, cols=6)
    keys = [frames[i] for i in np.linspace(0, len(frames) - 1, 5).round().astype(int)]
    C.contact_sheet(f"{args.out}/keyframes.png", keys, cols=len(keys))
    C.finish(args, {"psnr_heldout": psnr, "psnr_train": psnr_train, "vertices_fitted_frac": seen,
                    "train_views": n_train, "heldout_views": n_test, "steps": int(res.steps_run), "image_size": size,
                    "fit_seconds": round(res.wall_time, 1)})


if __name__ == "__main__":
    main()

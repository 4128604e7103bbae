"""Small helpers shared by the example scripts (not part of the library).

Argument parsing, output folder, compositing, GIF / contact-sheet saving,
rasterizer capacity, hard-mask IoU and the final JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np

# Make `python examples/foo.py` work from a checkout without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxrender import io as jio  # noqa: E402
from jaxrender.raster import RasterSettings  # noqa: E402
from jaxrender import render as _render  # noqa: E402

# Eager (un-jitted) rasterization dispatches hundreds of small ops; compiled
# versions of the render functions for everything outside `fit`.
rasterize_mesh = eqx.filter_jit(_render.rasterize_mesh)
render_mesh = eqx.filter_jit(_render.render_mesh)
render_silhouette = eqx.filter_jit(_render.render_silhouette)


def parse_args(name: str, description: str, add_arguments=None) -> argparse.Namespace:
    """``--quick``, ``--out`` (default ``out/<name>``), ``--seed``, plus the script's own."""
    p = argparse.ArgumentParser(prog=f"{name}.py", description=description, conflict_handler="resolve")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (CI / smoke test, < 60 s on 2 CPU cores)")
    p.add_argument("--out", default=os.path.join("out", name), help="output folder (default: out/%(prog)s without .py)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--steps", type=int, default=None, help="override the number of optimisation steps")
    p.add_argument("--size", type=int, default=None, help="override the image size in pixels (square)")
    if add_arguments is not None:
        add_arguments(p)  # may redefine a common option (conflict_handler="resolve")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    args.t0 = time.perf_counter()
    return args


def blur_radius(sigma: float, eps: float = 1e-4) -> float:
    """SoftRas / PyTorch3D reach of a face: coverage below ``eps`` is dropped."""
    return float(math.log(1.0 / eps - 1.0) * sigma)


def settings_for(meshes_and_cameras, image_size, faces_per_pixel=1, blur=0.0, margin=1.5, bin_size=8, **kw) -> RasterSettings:
    """Rasterizer settings whose tile capacity fits the given scenes with a margin.

    The per-pixel cost grows with ``max_faces_per_bin``, so rather than a huge
    fixed capacity we measure ``max_bin_count`` on representative
    (mesh, camera) pairs and keep ``margin`` times that (the mesh may move
    while it is fitted; :func:`check_overflow` warns if it ever overflows).
    """
    probe = RasterSettings(image_size=image_size, faces_per_pixel=faces_per_pixel, blur_radius=blur,
                           bin_size=bin_size, max_faces_per_bin=None, **kw)
    need = 1
    for mesh, cam in meshes_and_cameras:
        fr = rasterize_mesh(mesh, cam, RasterSettings(
            image_size=image_size, faces_per_pixel=faces_per_pixel, blur_radius=blur, bin_size=bin_size,
            max_faces_per_bin=mesh.num_faces, **kw))
        need = max(need, int(fr.max_bin_count))
    cap = int(math.ceil(need * margin / 32.0) * 32)
    return RasterSettings(image_size=probe.image_size, faces_per_pixel=faces_per_pixel, blur_radius=blur,
                          bin_size=bin_size, max_faces_per_bin=cap, **kw)


def check_overflow(mesh, camera, settings, what="") -> int:
    """Rasterize once and warn when a tile dropped faces; returns ``num_overflow``."""
    fr = rasterize_mesh(mesh, camera, settings)
    n = int(fr.num_overflow)
    if n:
        warnings.warn(f"{what}: {n} (face, tile) pairs overflowed max_faces_per_bin={settings.max_faces_per_bin} "
                      f"(max_bin_count={int(fr.max_bin_count)}); raise the capacity", RuntimeWarning)
    else:
        print(f"[check] {what}: num_overflow = 0 (max_bin_count {int(fr.max_bin_count)} <= "
              f"{settings.max_faces_per_bin})", file=sys.stderr)
    return n


def hard_settings(image_size, like: RasterSettings | None = None, **kw) -> RasterSettings:
    """One face per pixel, no blur (exact masks for evaluation)."""
    cap = like.max_faces_per_bin if like is not None else None
    bs = like.bin_size if like is not None else 8
    return RasterSettings(image_size=image_size, faces_per_pixel=1, blur_radius=0.0, bin_size=bs,
                          max_faces_per_bin=cap, **kw)


def hard_mask(mesh, camera, settings) -> np.ndarray:
    """Exact binary silhouette: pixels whose centre lies inside some face."""
    fr = rasterize_mesh(mesh, camera, settings)
    return np.asarray(fr.face_idx[..., 0] >= 0, np.float32)


def shaded(mesh, camera, settings, lights=None, **kw) -> np.ndarray:
    """Hard-rasterized Phong picture composited on white, for display."""
    return composite(render_mesh(mesh, camera, lights, settings, hard=True, **kw))


def iou(a, b) -> float:
    """IoU of two binary masks (thresholded at 0.5)."""
    a = np.asarray(a) > 0.5
    b = np.asarray(b) > 0.5
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def composite(rgba, background=1.0):
    """``rgb * alpha + background * (1 - alpha)``: the soft RGB blend spreads
    colour over the whole blur radius, the alpha says how much is really there."""
    rgba = np.asarray(rgba)
    return np.clip(rgba[..., :3] * rgba[..., 3:4] + background * (1.0 - rgba[..., 3:4]), 0.0, 1.0)


def to_rgb(img):
    """Grey ``(H, W)`` or ``(H, W, 1|3|4)`` float image -> ``(H, W, 3)`` in ``[0, 1]``."""
    img = np.asarray(img, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
    if img.shape[-1] == 4:
        img = composite(img)
    return np.clip(img, 0.0, 1.0)


def side_by_side(*images, gap=2):
    """Concatenate images horizontally with a white gap."""
    ims = [to_rgb(i) for i in images]
    h = max(i.shape[0] for i in ims)
    out = []
    for k, i in enumerate(ims):
        if i.shape[0] < h:
            i = np.concatenate([i, np.ones((h - i.shape[0],) + i.shape[1:], i.dtype)])
        out.append(i)
        if k < len(ims) - 1:
            out.append(np.ones((h, gap, 3), np.float32))
    return np.concatenate(out, axis=1)


def upscale(img, scale: int = 1):
    """Nearest-neighbour enlargement (tiny renders stay readable in pictures)."""
    img = to_rgb(img)
    return img if scale == 1 else np.repeat(np.repeat(img, scale, 0), scale, 1)


def contact_sheet(path, images, cols=None, gap=2, scale: int = 1):
    """Save a grid of images as one PNG (for looking at key frames); ``scale`` enlarges each."""
    ims = [upscale(i, scale) for i in images]
    cols = cols or len(ims)
    rows = [side_by_side(*ims[r:r + cols], gap=gap) for r in range(0, len(ims), cols)]
    w = max(r.shape[1] for r in rows)
    rows = [np.concatenate([r, np.ones((r.shape[0], w - r.shape[1], 3), np.float32)], 1) for r in rows]
    sep = np.ones((gap, w, 3), np.float32)
    sheet = rows[0]
    for r in rows[1:]:
        sheet = np.concatenate([sheet, sep, r], 0)
    jio.write_image(path, sheet)
    return sheet


def save_gif(path, frames, fps=10.0, scale: int = 1):
    jio.write_gif(path, [upscale(f, scale) for f in frames], fps=fps)


def tree_index(tree, i):
    """``tree[i]`` on every array leaf (pick one camera out of a stacked batch)."""
    return jax.tree_util.tree_map(lambda x: x[i] if isinstance(x, jax.Array) and x.ndim > 0 else x, tree)


def stack_trees(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def finish(args, metrics: dict):
    """Print the metrics as the last line of stdout (one JSON object)."""
    metrics = dict(metrics)
    metrics.setdefault("mode", "quick" if args.quick else "full")
    metrics.setdefault("seconds", round(time.perf_counter() - args.t0, 1))
    clean = {k: (round(float(v), 5) if isinstance(v, (float, np.floating, jax.Array)) else v) for k, v in metrics.items()}
    sys.stdout.flush()
    print(json.dumps(clean), flush=True)
    return clean

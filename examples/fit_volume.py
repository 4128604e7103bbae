"""Fit a voxel volume to multi-view images (PyTorch3D's volume tutorial, on our own data).

Data: a Utah teapot with smooth vertex-colour bands, rendered by jaxrender's
mesh rasterizer (hard visibility, Lambertian shading: ambient + one
directional light fixed in the world, no specular, so the colours do not
change with the view and a view-independent volume can explain them), black
background. 40 training views at elevation 0 on a circle of radius 2.7
around the +y axis (60° vertical field of view), plus 8 held-out views at
angles half-way between training views, never used for fitting.

Model (tutorial settings): a 128³ grid of density and colour logits with
sigmoid activations (density logits start at -4, colour logits at 0), voxel
size 3/128, 150 samples per ray between depths 0.1 and 3.0, PyTorch3D's
emission–absorption compositing (density used as per-sample opacity),
pseudo-Huber loss on colour plus silhouette, Adam at 0.1 with a 10× drop at
75 %, 300 steps of 10 random views, run by ``jaxrender.fit``.

``--best``: the same compositing, with stratified sample depths, random rays
drawn from all 40 views (as many rays per step as 10 views), coarse-to-fine
(64³ for the first 40 % of the steps, then trilinearly upsampled to 128³), a
small total-variation prior, and the tutorial's learning-rate drop in the
fine stage; 1000 steps. (Physical compositing, ``mode="physical"``, fitted
worse in our CPU-scale trials; see docs/volumes.md.)

``--quick``: 64³ grid, 64² images, 96 samples, few steps (CPU smoke test).

Outputs in ``--out``: ``rotating_volume.gif`` (the fitted volume turning
around y, beside the mesh it was fitted to), ``frame.png`` (one GIF frame),
``heldout.png`` (held-out targets over predictions), ``training_views.png``.
Last stdout line: ``{"steps": ..., "psnr_heldout": ..., "psnr_heldout_masked": ...}``
(PSNR of RGB over the whole held-out images, and over the pixels inside the
target silhouettes).
"""
from __future__ import annotations

import math

import numpy as np

import _common as C  # noqa: I001  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import optax

from jaxrender import camera as cam_lib
from jaxrender import mesh as mesh_lib
from jaxrender import volume as V
from jaxrender.blend import BlendParams
from jaxrender.fit import fit
from jaxrender.lighting import AmbientLight, DirectionalLight
from jaxrender.losses import huber

DISTANCE, FOV, NEAR, FAR, EXTENT = 2.7, 60.0, 0.1, 3.0, 3.0


# ----------------------------------------------------------------------------- data


def coloured_teapot(resolution: int):
    """The teapot with smooth colour bands (a procedural 'texture' in vertex colours)."""
    m = mesh_lib.teapot(resolution)
    v = np.asarray(m.vertices)
    phase = np.array([0.0, 2.1, 4.2])
    col = 0.5 + 0.4 * np.sin(4.0 * v[:, 1:2] + 2.5 * v[:, 0:1] + phase) * np.cos(3.0 * v[:, 2:3] - phase / 2)
    return mesh_lib.Mesh(m.vertices, m.faces, vertex_colors=jnp.asarray(np.clip(col, 0.05, 0.95), jnp.float32))


def ring_cameras(angles, size):
    """Cameras at elevation 0 on a circle of radius DISTANCE around +y, looking at the origin."""
    cams = [
        cam_lib.look_at(jnp.array([DISTANCE * math.sin(a), 0.0, DISTANCE * math.cos(a)], jnp.float32),
                        fov_y_deg=FOV, width=size, height=size, znear=0.1, zfar=10.0)
        for a in angles
    ]
    return C.stack_trees(cams)


def render_targets(mesh, cameras, n, size):
    """RGB (black background) and binary silhouettes of the mesh from each camera."""
    lights = (AmbientLight(0.45), DirectionalLight(direction=(0.4, 0.8, 0.6), color=0.65, specular_color=0.0))
    cam0 = C.tree_index(cameras, 0)
    settings = C.settings_for([(mesh, C.tree_index(cameras, i)) for i in range(0, n, max(1, n // 4))], size,
                              faces_per_pixel=1, blur=0.0, margin=2.0)
    C.check_overflow(mesh, cam0, settings, "teapot")
    black = BlendParams(background=(0.0, 0.0, 0.0))
    rgb, sil = [], []
    for i in range(n):
        c = C.tree_index(cameras, i)
        img = C.render_mesh(mesh, c, lights, settings, shading="phong", hard=True, blend=black)
        rgb.append(np.asarray(img[..., :3]))
        sil.append(np.asarray(img[..., 3]))
    return jnp.asarray(np.stack(rgb)), jnp.asarray(np.stack(sil))


# ----------------------------------------------------------------------------- model


def make_grid(params, cfg):
    return V.VoxelGrid.from_activations(
        params["density"], params["color"], voxel_size=EXTENT / params["density"].shape[0],
        density_activation=cfg["density_activation"], feature_activation="sigmoid")


def camera_rays(cameras):
    o, d = jax.vmap(lambda c: cam_lib.pixel_rays(c, normalize=False))(cameras)
    return V.Rays(jnp.broadcast_to(o, d.shape), d)


def tv_loss(x):
    """Mean squared difference of neighbouring voxels (total-variation prior)."""
    return sum(jnp.mean((jnp.take(x, jnp.arange(1, x.shape[a]), axis=a) - jnp.take(x, jnp.arange(x.shape[a] - 1), axis=a)) ** 2)
               for a in range(3))


def render_views(params, cameras, cfg, chunk):
    """Render full images from stacked cameras (no gradient), one camera at a time."""
    @jax.jit
    def one(p, c):
        out = V.render_volume(make_grid(p, cfg), c, n_samples=cfg["samples"], near=NEAR, far=FAR,
                              mode=cfg["mode"], chunk_size=chunk)
        return out["rgb"], out["opacity"]

    n = cameras.R.shape[0]
    res = [one(params, C.tree_index(cameras, i)) for i in range(n)]
    return np.stack([np.asarray(r[0]) for r in res]), np.stack([np.asarray(r[1]) for r in res])


def psnr(pred, target, mask=None):
    err = (np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2
    if mask is not None:
        m = np.asarray(mask, bool)
        err = err[m]
    return float(10 * np.log10(1.0 / max(err.mean(), 1e-12)))


def upsample(params, size):
    """Trilinear upsampling of the logits to a finer grid (same world extent, centres aligned)."""
    def up(x):
        shape = (size, size, size) + x.shape[3:]
        return jax.image.resize(x, shape, "linear")
    return {k: up(v) for k, v in params.items()}


# ----------------------------------------------------------------------------- fitting


def fit_stage(params, data, cfg, steps, lr_fn, key, chunk, progress):
    """One fitting stage at a fixed grid size, driven by jaxrender.fit."""
    n_views, H, W = data["images"].shape[:3]

    def data_fn(k, step, d):
        if cfg["random_rays"]:
            k1, k2 = jax.random.split(k)
            idx = jax.random.randint(k1, (cfg["batch_rays"],), 0, n_views * H * W)
            rays = V.Rays(d["origins"].reshape(-1, 3)[idx], d["dirs"].reshape(-1, 3)[idx])
            return {"rays": rays, "rgb": d["images"].reshape(-1, 3)[idx], "sil": d["sils"].reshape(-1)[idx],
                    "key": k2}
        k1, k2 = jax.random.split(k)
        idx = jax.random.permutation(k1, n_views)[: cfg["batch_views"]]
        rays = V.Rays(d["origins"][idx], d["dirs"][idx])
        return {"rays": rays, "rgb": d["images"][idx], "sil": d["sils"][idx], "key": k2}

    def loss_fn(p, b):
        grid = make_grid(p, cfg)
        out = V.render_volume(grid, rays=b["rays"], n_samples=cfg["samples"], near=NEAR, far=FAR, mode=cfg["mode"],
                              key=b["key"] if cfg["stratified"] else None, chunk_size=chunk)
        loss = huber(out["rgb"], b["rgb"]) + huber(out["opacity"], b["sil"])
        if cfg["tv"]:
            loss = loss + cfg["tv"] * (tv_loss(grid.densities / cfg["density_scale"]) + tv_loss(grid.features))
        return loss

    opt = optax.adam(lr_fn)
    res = fit(loss_fn, params, data=data, optimizer=opt, steps=steps, data_fn=data_fn, key=key,
              steps_per_call=min(50, max(1, steps)), progress=progress, track_best=False)
    return res.params, res.history["loss"]


def main():
    def extra(p):
        p.add_argument("--best", action="store_true", help="best settings found (physical mode, coarse-to-fine, TV, ...)")
        p.add_argument("--grid", type=int, default=None, help="grid size (default 128, 64 with --quick)")
        p.add_argument("--size", type=int, default=None, help="image size (default 128, 64 with --quick)")
        p.add_argument("--samples", type=int, default=None, help="samples per ray (default 150, 96 with --quick)")
        p.add_argument("--chunk", type=int, default=None, help="rays per lax.map chunk (memory knob)")
        p.add_argument("--frames", type=int, default=None, help="frames of the rotating GIF")

    args = C.parse_args("fit_volume", __doc__.splitlines()[0], extra)
    quick = args.quick
    size = args.size or (64 if quick else 128)
    G = args.grid or (64 if quick else 128)
    n_train, n_held = 40, 8
    if args.best:
        steps = args.steps or (200 if quick else 1000)
        cfg = dict(mode="pytorch3d", density_activation="sigmoid", density_scale=1.0, density_init=-4.0,
                   stratified=True, random_rays=True, tv=1e-4,
                   samples=96 if quick else 150, batch_views=None, batch_rays=(8192 if quick else 10 * 128 * 128))
    else:
        steps = args.steps or (60 if quick else 300)
        cfg = dict(mode="pytorch3d", density_activation="sigmoid", density_scale=1.0, density_init=-4.0,
                   stratified=False, random_rays=False, tv=0.0, samples=96 if quick else 150,
                   batch_views=2 if quick else 10, batch_rays=None)
    if args.samples:
        cfg["samples"] = args.samples
    cfg["batch_rays"] = cfg["batch_rays"] and min(cfg["batch_rays"], n_train * size * size)
    chunk = args.chunk
    progress = "print"

    # ---- data: training and held-out views kept apart
    mesh = coloured_teapot(4 if quick else 8)
    train_angles = [2 * math.pi * i / n_train for i in range(n_train)]
    held_angles = [2 * math.pi * (5 * i + 2.5) / n_train for i in range(n_held)]
    cams_train = ring_cameras(train_angles, size)
    cams_held = ring_cameras(held_angles, size)
    images, sils = render_targets(mesh, cams_train, n_train, size)
    held_rgb, held_sil = render_targets(mesh, cams_held, n_held, size)
    rays = camera_rays(cams_train)
    data = {"origins": rays.origins, "dirs": rays.directions, "images": images, "sils": sils}
    C.contact_sheet(f"{args.out}/training_views.png", [np.asarray(images[i]) for i in range(0, n_train, 5)], cols=8)

    # ---- fit
    key = jax.random.PRNGKey(args.seed)
    if args.best:
        G0 = max(G // 2, 16)
        n0 = int(round(0.4 * steps))
        params = {"density": jnp.full((G0,) * 3, cfg["density_init"], jnp.float32),
                  "color": jnp.zeros((G0,) * 3 + (3,), jnp.float32)}
        params, h0 = fit_stage(params, data, cfg, n0, 0.1, key, chunk, progress)
        params = upsample(params, G)
        lr1 = optax.piecewise_constant_schedule(0.1, {int(round(0.75 * (steps - n0))): 0.1})
        params, h1 = fit_stage(params, data, cfg, steps - n0, lr1, jax.random.fold_in(key, 1), chunk, progress)
        history = np.concatenate([h0, h1])
    else:
        params = {"density": jnp.full((G,) * 3, cfg["density_init"], jnp.float32),
                  "color": jnp.zeros((G,) * 3 + (3,), jnp.float32)}
        lr = optax.piecewise_constant_schedule(0.1, {int(round(0.75 * steps)): 0.1})
        params, history = fit_stage(params, data, cfg, steps, lr, key, chunk, progress)

    # ---- evaluate on the held-out views
    eval_chunk = chunk or 4096
    pred_rgb, pred_sil = render_views(params, cams_held, cfg, eval_chunk)
    p_all = psnr(np.clip(pred_rgb, 0, 1), held_rgb)
    p_mask = psnr(np.clip(pred_rgb, 0, 1), held_rgb, np.broadcast_to(np.asarray(held_sil)[..., None] > 0.5, pred_rgb.shape))
    iou = float(np.mean([C.iou(pred_sil[i], held_sil[i]) for i in range(n_held)]))
    C.contact_sheet(f"{args.out}/heldout.png", [np.asarray(x) for x in held_rgb] + list(np.clip(pred_rgb, 0, 1)), cols=n_held)

    # ---- rotating GIF: volume beside the mesh it was fitted to
    n_frames = args.frames or (12 if quick else 36)
    rot_angles = [2 * math.pi * i / n_frames for i in range(n_frames)]
    cams_rot = ring_cameras(rot_angles, size)
    rot_rgb, _ = render_views(params, cams_rot, cfg, eval_chunk)
    mesh_rgb, _ = render_targets(mesh, cams_rot, n_frames, size)
    frames = [C.side_by_side(np.asarray(mesh_rgb[i]), np.clip(rot_rgb[i], 0, 1)) for i in range(n_frames)]
    C.save_gif(f"{args.out}/rotating_volume.gif", frames, fps=10)
    from jaxrender import io as jio
    jio.write_image(f"{args.out}/frame.png", frames[n_frames // 8])

    C.finish(args, {"steps": int(len(history)), "psnr_heldout": p_all, "psnr_heldout_masked": p_mask,
                    "iou_heldout": iou, "final_loss": float(history[-1]), "grid": G, "image": size,
                    "settings": "best" if args.best else "tutorial"})


if __name__ == "__main__":
    main()

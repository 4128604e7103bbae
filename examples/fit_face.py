"""Fit the synthetic morphable face to images: synthetic recovery, or a real portrait.

Synthetic recovery (default): for each seed a target face is drawn from the
built-in synthetic model — identity and albedo coefficients uniform in
[-2σ, 2σ], expression blendshapes uniform in [0, 1] (σ = 1), Euler angles
uniform in [-30°, 30°], a random mostly-white SH light — and rendered; the
fit starts from the mean face, is given the exact 2-D landmarks, and runs
:func:`jaxrender.morphable.fitting.fit_faces_batched` (all seeds in one
compiled program; each seed's fit is independent). Reported:

* ``vertex_err_pct``: median over the face-mask vertices of the distance
  between fitted and true model-frame vertices (identity + expression), in %
  of the face width (distance between landmarks 0 and 16), median over seeds;
* ``vertex_err_pct_aligned``: the same after a similarity (Umeyama)
  alignment of the fitted face to the true one;
* ``psnr``: on the pixels of the target's face region;
* ``landmark_err_px``: mean reprojection error of the 68 landmarks.

``--image astronaut`` fits scikit-image's astronaut portrait with the
hand-placed landmarks of ``examples/astronaut_landmarks.py`` and saves an
overlay PNG and a GIF of the fit.

    python examples/fit_face.py [--quick] [--image astronaut]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (sets sys.path for jaxrender)
import astronaut_landmarks  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxrender.morphable as M  # noqa: E402
from jaxrender.data.synthetic_face import synthetic_face_model  # noqa: E402
from jaxrender.morphable import fitting as F  # noqa: E402
from jaxrender.raster import RasterSettings  # noqa: E402


def umeyama(src, dst):
    """Similarity (s, R, t) minimising |s R src + t - dst|^2 (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / xs.var(0).sum()
    t = mu_d - s * R @ mu_s
    return s, R, t


def psnr(a, b, mask):
    m = mask > 0.5
    mse = float(np.mean((a[m] - b[m]) ** 2)) if m.any() else 0.0
    return 10.0 * np.log10(1.0 / max(mse, 1e-12))


def random_targets(model, camera, n, seed, rng_scale=1.0):
    rng = np.random.default_rng(seed)
    ps = []
    for _ in range(n):
        p = F.init_params(model, camera)
        base = rng.uniform(-0.25, 0.25, 9) * np.array([0.5] + [1.0] * 8)
        gamma = np.tile(base, 3) + rng.uniform(-0.03, 0.03, 27)
        ps.append(dict(
            id=jnp.asarray(rng.uniform(-2, 2, model.num_id), jnp.float32),
            exp=jnp.asarray(rng.uniform(0, 1, model.num_exp), jnp.float32),
            tex=jnp.asarray(rng.uniform(-2, 2, model.num_albedo), jnp.float32),
            angles=p["angles"] + jnp.asarray(np.deg2rad(rng.uniform(-30, 30, 3)) * rng_scale, jnp.float32),
            translation=p["translation"] + jnp.asarray(rng.uniform(-0.15, 0.15, 3), jnp.float32),
            gamma=jnp.asarray(gamma, jnp.float32),
        ))
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *ps)


def render_targets(model, camera, params, size):
    st = RasterSettings(image_size=size)

    def one(p):
        out = F.face_forward(model, p, camera)
        return F.render_face(model, out, camera, st), out["landmarks_2d"], out["vertices_model"]

    return jax.jit(jax.vmap(one))(params)


def face_width(model, v):
    lm = np.asarray(v)[np.asarray(model.landmark_indices)]
    return float(np.linalg.norm(lm[0] - lm[16]))


def synthetic(args):
    quick = args.quick
    n = 3 if quick else 10
    size = 96 if quick else 256
    res = 32 if quick else 48
    steps = (150, 60) if quick else (400, 200)
    if args.steps is not None:
        steps = (args.steps, args.steps)
    model = synthetic_face_model(resolution=res)
    cam = F.default_camera(model, size)
    tp = random_targets(model, cam, n, args.seed)
    timg, tlm, tv = render_targets(model, cam, tp, size)
    timg = np.asarray(timg)
    images = timg[..., :3] + (1 - timg[..., 4:5]) * 0.5  # grey background
    t0 = time.perf_counter()
    res_fit = F.fit_faces_batched(model, images, tlm, camera=cam, steps=steps,
                                  weights=dict(id=args.reg, exp=args.reg, tex=args.reg * 0.1),
                                  progress="print" if not quick else False)
    fit_s = time.perf_counter() - t0
    fimg = np.asarray(res_fit.image)
    mask_v = np.asarray(model.masks["face"]) > 0.5
    errs, errs_al, psnrs, lerrs = [], [], [], []
    for i in range(n):
        vt = np.asarray(tv[i])[mask_v]
        vf = np.asarray(res_fit.vertices_model[i])[mask_v]
        wdt = face_width(model, tv[i])
        errs.append(100 * np.median(np.linalg.norm(vf - vt, axis=1)) / wdt)
        s, R, t = umeyama(vf, vt)
        errs_al.append(100 * np.median(np.linalg.norm(s * vf @ R.T + t - vt, axis=1)) / wdt)
        fm = timg[i, ..., 4] * timg[i, ..., 3]
        psnrs.append(psnr(fimg[i, ..., :3], timg[i, ..., :3], fm))
        lerrs.append(float(np.mean(np.linalg.norm(np.asarray(res_fit.landmarks_2d[i]) - np.asarray(tlm[i]), axis=1))))
        print(f"seed {i}: vertex err {errs[-1]:.2f}% aligned {errs_al[-1]:.2f}%  psnr {psnrs[-1]:.1f} dB  "
              f"landmarks {lerrs[-1]:.3f} px", file=sys.stderr)
    sheet = []
    for i in range(min(n, 5)):
        fit_rgb = fimg[i, ..., :3] + (1 - fimg[i, ..., 4:5]) * 0.5
        sheet += [images[i], fit_rgb, np.abs(fit_rgb - images[i]) * 4]
    C.contact_sheet(os.path.join(args.out, "synthetic_fits.png"), sheet, cols=3)
    print(f"fit of {n} images: {fit_s:.1f} s (both stages, compilation included)", file=sys.stderr)
    return C.finish(args, {"seeds": n, "vertex_err_pct": float(np.median(errs)),
                           "vertex_err_pct_aligned": float(np.median(errs_al)), "psnr": float(np.median(psnrs)),
                           "landmark_err_px": float(np.median(lerrs)), "fit_seconds": round(fit_s, 1),
                           "image_size": size, "vertices": model.num_vertices, "steps": list(steps)})


def draw_points(img, pts, color, r=1):
    img = img.copy()
    H, W = img.shape[:2]
    for x, y in pts:
        i, j = int(y), int(x)
        img[max(0, i - r):min(H, i + r + 1), max(0, j - r):min(W, j + r + 1)] = color
    return img


def astronaut(args):
    quick = args.quick
    size = 128 if quick else 256
    res = 32 if quick else 64
    steps = (150, 60) if quick else (400, 300)
    if args.steps is not None:
        steps = (args.steps, args.steps)
    model = synthetic_face_model(resolution=res)
    img, lm = astronaut_landmarks.load(size)
    cam = F.default_camera(model, size)
    snaps = []
    t0 = time.perf_counter()
    r = F.fit_face(model, img, lm, camera=cam, steps=steps, steps_per_call=10,
                   callback=lambda step, p, loss: snaps.append(jax.tree_util.tree_map(np.asarray, p)))
    fit_s = time.perf_counter() - t0
    st = RasterSettings(image_size=size)
    render = jax.jit(jax.vmap(lambda p: F.render_face(model, F.face_forward(model, p, cam), cam, st)))
    frames = np.asarray(render(jax.tree_util.tree_map(lambda *x: jnp.stack(x), *snaps)))

    def over(rgba, alpha=1.0):
        a = (rgba[..., 4:5] > 0.5) * alpha  # the face region only
        return img * (1 - a) + np.clip(rgba[..., :3], 0, 1) * a

    final = np.asarray(r.image)
    ov = over(final)
    ov = draw_points(ov, lm, (0.0, 1.0, 0.0))
    ov = draw_points(ov, np.asarray(r.landmarks_2d), (1.0, 0.0, 0.0))
    # a close-up of the face region (the landmarks' box, grown by 60%)
    lo, hi = lm.min(0), lm.max(0)
    c, half = 0.5 * (lo + hi), 0.8 * float((hi - lo).max())
    r0, r1 = int(max(0, c[1] - half)), int(min(size, c[1] + half))
    c0, c1 = int(max(0, c[0] - half)), int(min(size, c[0] + half))
    crop = lambda x: x[r0:r1, c0:c1]  # noqa: E731
    C.contact_sheet(os.path.join(args.out, "astronaut_overlay.png"),
                    [img, ov, crop(img), crop(ov), crop(over(final, 0.5)), crop(over(final))], cols=6)
    C.save_gif(os.path.join(args.out, "astronaut_fit.gif"), [over(f) for f in frames], fps=10)
    m = (final[..., 4] > 0.5) & (final[..., 3] > 0.5)
    p = psnr(final[..., :3], img, m.astype(np.float32))
    lerr = float(np.mean(np.linalg.norm(np.asarray(r.landmarks_2d) - lm, axis=1)))
    print(f"astronaut: fit {fit_s:.1f} s, face-region PSNR {p:.2f} dB, landmark error {lerr:.2f} px", file=sys.stderr)
    return C.finish(args, {"image": "astronaut", "psnr": p, "landmark_err_px": lerr, "fit_seconds": round(fit_s, 1),
                           "image_size": size})


def main():
    def extra(p):
        p.add_argument("--image", default=None, choices=[None, "astronaut"], help="fit a real portrait")
        p.add_argument("--reg", type=float, default=3e-5,
                       help="weight of the coefficient prior (Deep3DFaceRecon's w_reg*w_id is 3e-4; the targets are "
                            "uniform in ±2σ, not Gaussian, so a weaker prior is used here)")

    args = C.parse_args("fit_face", __doc__.splitlines()[0], extra)
    if args.image == "astronaut":
        return astronaut(args)
    return synthetic(args)


if __name__ == "__main__":
    main()

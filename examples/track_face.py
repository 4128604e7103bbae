"""Track a face through a synthetic video with known per-frame parameters.

A 60-frame video of one synthetic identity (random identity and albedo in
[-2σ, 2σ]) is rendered with smooth trajectories: the head turns (yaw ±25°),
nods (pitch ±10°) and rolls (±5°), drifts sideways, the jaw opens and closes,
a smile comes and goes, the eyes blink, and the light slowly turns. The
tracker (:func:`jaxrender.morphable.fitting.track_face`) is given the frames
and the exact 2-D landmarks: identity and albedo are fitted on 8 key frames,
then the frames in windows of 20, each frame started from the key-frame fits
interpolated in time, with a (weak) temporal smoothness term.

Reported: ``mean_vertex_err_pct`` — per frame, the mean distance over the
face-mask vertices between the tracked and the true model-frame vertices
(identity + expression), in % of the face width (landmarks 0-16), averaged
over the frames, with no alignment; ``mean_vertex_err_pct_video_aligned`` —
the same after ONE similarity transform for the whole video (its scale is
``video_similarity_scale``: a head that much bigger and that much further
away projects to almost the same pictures, so one view cannot fix it);
``mean_vertex_err_pct_aligned`` — after a similarity per frame; and the
landmark error.

    python examples/track_face.py [--quick]
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

from jaxrender.data.synthetic_face import EXPRESSION_NAMES, synthetic_face_model  # noqa: E402
from jaxrender.morphable import fitting as F  # noqa: E402
from jaxrender.raster import RasterSettings  # noqa: E402

from fit_face import face_width, umeyama  # noqa: E402


def trajectories(model, camera, T, seed):
    rng = np.random.default_rng(seed)
    base = F.init_params(model, camera)
    s = np.linspace(0.0, 1.0, T)
    two_pi = 2 * np.pi
    ang = np.stack([np.deg2rad(10) * np.sin(two_pi * 2 * s + 0.3),
                    np.deg2rad(25) * np.sin(two_pi * s),
                    np.deg2rad(5) * np.sin(two_pi * s + 1.0)], -1)
    exp = np.zeros((T, model.num_exp))
    names = list(EXPRESSION_NAMES[:model.num_exp])

    def put(name, v):
        if name in names:
            exp[:, names.index(name)] = v

    put("jaw_open", 0.5 * (1 - np.cos(two_pi * 2 * s)) * 0.8)
    put("smile", np.clip(np.sin(two_pi * s + 0.5), 0, None) * 0.9)
    blink = np.exp(-((s - 0.35) / 0.03) ** 2) + np.exp(-((s - 0.8) / 0.03) ** 2)
    put("blink_left", blink)
    put("blink_right", blink)
    put("brow_raise", 0.5 * np.clip(np.sin(two_pi * 1.5 * s), 0, None))
    g = np.zeros((T, 27))
    light = np.stack([0.2 * np.sin(two_pi * s), 0.15 + 0.0 * s, 0.2 * np.cos(two_pi * s)], -1)
    for c in range(3):
        g[:, 9 * c + 1:9 * c + 4] = light
    tr = np.asarray(base["translation"])[None] + np.stack([0.15 * np.sin(two_pi * s), 0.05 * np.cos(two_pi * s),
                                                            0.1 * np.sin(two_pi * 0.5 * s)], -1)
    return dict(
        id=jnp.asarray(rng.uniform(-2, 2, model.num_id), jnp.float32),
        tex=jnp.asarray(rng.uniform(-2, 2, model.num_albedo), jnp.float32),
        exp=jnp.asarray(exp, jnp.float32),
        angles=jnp.asarray(np.asarray(base["angles"])[None] + ang, jnp.float32),
        translation=jnp.asarray(tr, jnp.float32),
        gamma=jnp.asarray(g, jnp.float32),
    )


def main():
    args = C.parse_args("track_face", __doc__.splitlines()[0])
    quick = args.quick
    T = 12 if quick else 60
    size = 64 if quick else 128
    res = 24 if quick else 48
    # identity and albedo from landmarks + photometric on the key frames; the windows
    # track from landmarks only (a photometric stage per window is much slower on a CPU).
    # The landmarks are exact, so the smoothness term is weak (0.01; default 1); the
    # expression prior (3e-4) keeps constant expression offsets from standing in for
    # identity on the key frames.
    key_steps = (150, 30) if quick else (300, 100)
    steps = (60, 0) if quick else (200, 0)
    window = 6 if quick else 20
    model = synthetic_face_model(resolution=res)
    cam = F.default_camera(model, size)
    truth = trajectories(model, cam, T, args.seed)
    st = RasterSettings(image_size=size)
    per = ("exp", "angles", "translation", "gamma")

    def one(pf):
        p = {**pf, "id": truth["id"], "tex": truth["tex"]}
        out = F.face_forward(model, p, cam)
        return F.render_face(model, out, cam, st), out["landmarks_2d"], out["vertices_model"]

    img, lms, verts = jax.jit(jax.vmap(one))({k: truth[k] for k in per})
    img = np.asarray(img)
    frames = img[..., :3] + (1 - img[..., 4:5]) * 0.5
    t0 = time.perf_counter()
    r = F.track_face(model, frames, lms, camera=cam, steps=steps, keyframe_steps=key_steps, num_keyframes=8,
                     window=window, weights=dict(id=3e-5, exp=3e-4, tex=3e-6, smooth=0.01),
                     progress=False if quick else "print")
    fit_s = time.perf_counter() - t0
    mask_v = np.asarray(model.masks["face"]) > 0.5
    verts = np.asarray(verts)
    width = face_width(model, verts[0])
    vt, vf = verts[:, mask_v], np.asarray(r.vertices_model)[:, mask_v]

    def err_pct(a, b):  # per frame: mean vertex distance in % of the face width
        return 100 * np.linalg.norm(a - b, axis=-1).mean(-1) / width

    errs = err_pct(vf, vt)
    # one similarity for the whole video (a head s times bigger, s times further away)
    s_vid, R, tt = umeyama(vf.reshape(-1, 3), vt.reshape(-1, 3))
    errs_vid = err_pct(s_vid * vf @ R.T + tt, vt)
    errs_al = []
    for t in range(T):  # one similarity per frame
        s, R, tt = umeyama(vf[t], vt[t])
        errs_al.append(err_pct(s * vf[t] @ R.T + tt, vt[t]))
    lerr = float(np.linalg.norm(np.asarray(r.landmarks_2d) - np.asarray(lms), axis=-1).mean())
    fit_img = np.asarray(jax.jit(jax.vmap(lambda pf: F.render_face(
        model, F.face_forward(model, {**pf, "id": r.params["id"], "tex": r.params["tex"]}, cam), cam, st)))(
        {k: r.params[k] for k in per}))
    fit_rgb = fit_img[..., :3] + (1 - fit_img[..., 4:5]) * 0.5
    C.save_gif(os.path.join(args.out, "track.gif"), [np.concatenate([a, b], 1) for a, b in zip(frames, fit_rgb)],
               fps=15)
    pick = np.linspace(0, T - 1, 6).astype(int)
    C.contact_sheet(os.path.join(args.out, "track_frames.png"), [frames[i] for i in pick] + [fit_rgb[i] for i in pick],
                    cols=6)
    print(f"tracked {T} frames in {fit_s:.1f} s; per-frame vertex error max {max(errs):.2f}%", file=sys.stderr)
    C.finish(args, {"frames": T, "mean_vertex_err_pct": float(np.mean(errs)),
                    "mean_vertex_err_pct_video_aligned": float(np.mean(errs_vid)),
                    "mean_vertex_err_pct_aligned": float(np.mean(errs_al)), "video_similarity_scale": float(s_vid),
                    "landmark_err_px": lerr,
                    "fit_seconds": round(fit_s, 1), "image_size": size, "vertices": model.num_vertices})


if __name__ == "__main__":
    main()

"""Sharded batch face fitting: throughput on 1, 2 and 4 devices of one host.

Scene: the synthetic face model (``synthetic_face_model(resolution=96)``,
~19k vertices, 40 identity / 10 expression / 20 albedo components), one
image per face at 256² rendered from random coefficients, pose and SH
lighting with the default camera (:func:`jaxrender.morphable.fitting.default_camera`),
and the 68 landmarks. Workload: the photometric stage of face fitting — per
image, render the face (hard rasterization, one face per pixel), the
Deep3DFaceRecon loss (landmarks + photometric + coefficient priors + SH
prior), its gradient and a per-image Adam step (the optimizer state is per
image) — run by :func:`jaxrender.distributed.fit_batched` with the batch
axis sharded over the first ``n`` devices (``jax.devices()[:n]`` sub-meshes,
all in one process).

Weak scaling: each device holds ``--faces-per-device`` faces, so the global
batch is ``n * faces_per_device`` (several values: one block of rows each;
the efficiency is relative to 1 device at the same faces per device). Timed: the steady-state compiled chunks
(``--steps-per-call`` steps per call, the first chunk, which compiles, is
timed separately). Throughput = faces fitted per second at ``--steps`` steps
per face = ``batch / (steps * time_per_step)``; scaling efficiency =
``throughput(n) / (n * throughput(1))``. Peak memory: the allocator's peak
bytes in use per device so far (GPU only; cumulative over the rows).

Usage::

    # GPU (one host with 4 GPUs measures 1, 2 and 4):
    python benchmarks/sharded_fit.py --devices 1,2,4 --faces-per-device 8,32 --out results/sharded_fit_gpu.json
    # CPU smoke run on 8 fake devices (sets XLA_FLAGS itself before importing JAX):
    python benchmarks/sharded_fit.py --small --devices 1,2,4 --out /tmp/sharded_fit_cpu.json

Prints a Markdown table and writes a JSON record.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if "--small" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must happen before JAX is imported: 8 fake CPU devices for the smoke run.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxrender.data.synthetic_face import synthetic_face_model  # noqa: E402
from jaxrender.distributed import _face_unit, batch_mesh, face_fit_loss, fit_batched  # noqa: E402
from jaxrender.morphable import fitting as F  # noqa: E402
from jaxrender.raster import RasterSettings  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4", help="comma-separated device counts (sub-meshes of jax.devices())")
    p.add_argument("--faces-per-device", default="8", help="comma-separated; one table block per value")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resolution", type=int, default=96, help="synthetic face resolution (96: ~19k vertices)")
    p.add_argument("--steps", type=int, default=200, help="steps per face the throughput refers to")
    p.add_argument("--steps-per-call", type=int, default=10)
    p.add_argument("--timed-calls", type=int, default=5, help="compiled calls timed after the first (compiling) one")
    p.add_argument("--method", default="shard_map", choices=("shard_map", "jit"))
    p.add_argument("--small", action="store_true", help="tiny CPU run: 32² images, resolution 24, 2 faces per device")
    p.add_argument("--out", default=None, help="JSON output path")
    a = p.parse_args(argv)
    if a.small:
        a.image_size, a.resolution = 32, 24
        if a.faces_per_device == "8":  # the default
            a.faces_per_device = "2"
        a.steps_per_call, a.timed_calls, a.steps = 3, 2, 20
    a.devices = [int(x) for x in a.devices.split(",") if x]
    a.faces_per_device = [int(x) for x in str(a.faces_per_device).split(",") if x]
    return a


def make_targets(model, camera, n, settings, seed=0):
    """``n`` random faces rendered at the camera's size: images (n, H, W, 3) and landmarks (n, 68, 2)."""
    base = F.init_params(model, camera, None)
    unit = _face_unit(model)

    def one(key):
        k = jax.random.split(key, 6)
        p = dict(base)
        p["id"] = 0.7 * jax.random.normal(k[0], base["id"].shape)
        p["exp"] = 0.3 * jax.random.normal(k[1], base["exp"].shape)
        p["tex"] = 0.7 * jax.random.normal(k[2], base["tex"].shape)
        p["angles"] = base["angles"] + jax.random.uniform(k[3], (3,), minval=-0.2, maxval=0.2)
        p["translation"] = base["translation"] + 0.05 * jax.random.normal(k[4], (3,))
        p["gamma"] = 0.1 * jax.random.normal(k[5], (27,))
        out = F.face_forward(model, p, camera, unit)
        img = F.render_face(model, out, camera, settings, hard=True)
        return img[..., :3], out["landmarks_2d"]

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed), n))


def device_memory():
    """Peak bytes in use per device (GPU; None where the backend does not report it)."""
    out = []
    for d in jax.devices():
        try:
            s = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - backends without memory stats
            s = {}
        out.append(s.get("peak_bytes_in_use"))
    return out


def run(args, on_row=None):
    all_devices = jax.devices()
    counts = [n for n in args.devices if n <= len(all_devices)]
    skipped = [n for n in args.devices if n > len(all_devices)]
    t = time.perf_counter()
    model = synthetic_face_model(resolution=args.resolution)
    camera = F.default_camera(model, args.image_size)
    settings = RasterSettings(image_size=(args.image_size, args.image_size), faces_per_pixel=1, blur_radius=0.0)
    n_max = max(counts) * max(args.faces_per_device)
    images, landmarks = make_targets(model, camera, n_max, settings)
    images, landmarks = np.asarray(images), np.asarray(landmarks)
    init_all = jax.jit(jax.vmap(lambda l: F.init_params(model, camera, l)))(jnp.asarray(landmarks))
    init_all = jax.tree_util.tree_map(np.asarray, init_all)
    setup_s = time.perf_counter() - t

    w = {k: jnp.asarray(v, jnp.float32) for k, v in F.DEFAULT_WEIGHTS.items()}
    unit = _face_unit(model)
    shared = dict(model=model, camera=camera, weights=w, lm_weights=F.landmark_weights(model.num_landmarks),
                  unit=jnp.asarray(unit, jnp.float32))

    def loss(p, d, sh):
        return face_fit_loss(p, d, sh, settings=settings, hard=True)

    def record(rows):
        return dict(
            benchmark="sharded_fit", rows=rows, skipped_device_counts=skipped,
            config=dict(image_size=args.image_size, resolution=args.resolution, vertices=int(model.num_vertices),
                        faces=int(model.num_faces), steps=args.steps, steps_per_call=args.steps_per_call,
                        timed_calls=args.timed_calls, method=args.method, small=args.small, setup_s=setup_s),
            device=str(all_devices[0].device_kind), platform=all_devices[0].platform, n_available=len(all_devices),
            peak_bytes_per_device=device_memory(), jax=jax.__version__, host=platform.node(), python=platform.python_version(),
        )

    rows = []
    for fpd, n in [(f, n) for f in args.faces_per_device for n in counts]:
        B = n * fpd
        params = jax.tree_util.tree_map(lambda x: x[:B], init_all)
        data = {"image": images[:B], "mask": np.ones(images.shape[:3], np.float32)[:B], "landmarks": landmarks[:B]}
        stamps = []

        def cb(step, p, losses):
            stamps.append((step, time.perf_counter()))

        total = args.steps_per_call * (1 + args.timed_calls)
        t0 = time.perf_counter()
        r = fit_batched(loss, params, data, optax.adam(1e-2), total, mesh=batch_mesh(all_devices[:n]), shared=shared,
                        steps_per_call=args.steps_per_call, has_aux=True, callback=cb, method=args.method)
        wall = time.perf_counter() - t0
        first_call_s = stamps[0][1] - t0
        (s0, ta), (s1, tb) = stamps[0], stamps[-1]
        step_s = (tb - ta) / (s1 - s0)
        fl = r.final_loss
        rows.append(dict(
            devices=n, batch=B, faces_per_device=fpd,
            step_ms=1e3 * step_s, faces_per_s=B / (args.steps * step_s),
            steps_per_s_per_face=1.0 / step_s, first_call_s=first_call_s, wall_s=wall,
            final_loss_mean=float(np.nanmean(fl)), finite=bool(np.isfinite(fl).all()),
            peak_bytes_so_far=device_memory()[:n],
        ))
        for row in rows:
            ref = [r for r in rows if r["faces_per_device"] == row["faces_per_device"]][0]
            row["scaling_efficiency"] = row["faces_per_s"] / (row["devices"] * ref["faces_per_s"] / ref["devices"])
        if on_row is not None:
            on_row(record(rows))

    return record(rows)


def table(res):
    c = res["config"]
    lines = [
        f"Sharded face fitting ({res['device']} x{res['n_available']} available, {c['image_size']}² images, "
        f"{c['vertices']} vertices, {c['steps']} steps per face, method {c['method']})",
        "",
        "| faces/device | devices | batch | step (ms) | faces/s | scaling efficiency | first call (s) | peak GiB/device |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        pk = [b for b in r["peak_bytes_so_far"] if b]
        pk = f"{max(pk) / 2**30:.2f}" if pk else "n/a"
        lines.append(f"| {r['faces_per_device']} | {r['devices']} | {r['batch']} | {r['step_ms']:.1f} | "
                     f"{r['faces_per_s']:.2f} | {100 * r['scaling_efficiency']:.0f}% | {r['first_call_s']:.1f} | {pk} |")
    if res["skipped_device_counts"]:
        lines.append(f"\n(skipped: {res['skipped_device_counts']} devices; only {res['n_available']} available)")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)

    def write(res):  # after every row, so a run cut short keeps what it measured
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(res, f, indent=2)
            os.replace(args.out + ".tmp", args.out)
        r = res["rows"][-1]
        print(f"# {r['faces_per_device']} faces/device x {r['devices']} devices: {r['faces_per_s']:.2f} faces/s, "
              f"step {r['step_ms']:.1f} ms, first call {r['first_call_s']:.1f} s", flush=True)

    res = run(args, on_row=write)
    print(table(res))
    if args.out:
        print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()

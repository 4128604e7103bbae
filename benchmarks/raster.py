"""Rasterizer benchmarks on the scenes of BENCHMARKS.md.

Scenes: the bumpy UV sphere (small_256_b1, small_256_b32, face_512_b1,
face_512_b8), camera 2.7 units out on +z looking at the origin, vertical FoV
60 degrees. Workloads: soft RGB K=10 (Phong, vertex colours, point light at
(0, 0, 3)), soft silhouette K=50, hard K=1. Each timed as forward and as
forward + backward of ``sum(image * w)`` w.r.t. vertex positions and colours.

    python benchmarks/raster.py                      # CPU: small scenes
    python benchmarks/raster.py --scenes all --out results.json   # GPU

Prints one Markdown row per scene x workload and writes JSON with the device,
JAX version, date, median ms, peak memory and compile time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jaxrender as jr  # noqa: E402
from jaxrender.blend import BlendParams  # noqa: E402
from jaxrender.lighting import AmbientLight, PointLight  # noqa: E402
from jaxrender.raster import select_faces  # noqa: E402

SCENES = {
    "small_256_b1": (36, 36, 256, 1),
    "small_256_b32": (36, 36, 256, 32),
    "face_512_b1": (231, 230, 512, 1),
    "face_512_b8": (231, 230, 512, 8),
}
SIGMA = 1e-4
BLUR = math.log(1.0 / 1e-4 - 1.0) * SIGMA


def scene(name):
    n_lat, n_lon, size, batch = SCENES[name]
    m = jr.mesh.bumpy_sphere(n_lat, n_lon)
    verts = []
    for b in range(batch):
        a = 0.3 * b
        R = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        verts.append(np.asarray(m.vertices) @ R.T)
    verts = jnp.asarray(np.stack(verts), jnp.float32)
    colors = jnp.broadcast_to(jnp.asarray(m.vertex_colors, jnp.float32), verts.shape)
    cam = jr.camera.look_at(eye=(0.0, 0.0, 2.7), target=(0.0, 0.0, 0.0), fov_y_deg=60.0, width=size, height=size,
                            znear=1.0, zfar=100.0)
    return verts, colors, jnp.asarray(m.faces), cam, size


def workload(kind, size, capacity, bin_size, backend=None, **extra):
    lights = (AmbientLight(0.5), PointLight(position=(0.0, 0.0, 3.0), color=0.3, specular_color=0.2))
    if kind == "soft_rgb_k10":
        s = jr.RasterSettings(image_size=size, faces_per_pixel=10, blur_radius=BLUR,
                              max_faces_per_bin=capacity, bin_size=bin_size, backend=backend, **extra)
    elif kind == "soft_sil_k50":
        s = jr.RasterSettings(image_size=size, faces_per_pixel=50, blur_radius=BLUR,
                              max_faces_per_bin=capacity, bin_size=bin_size, backend=backend, **extra)
    elif kind.startswith("select_k"):
        k = int(kind[len("select_k"):])
        s = jr.RasterSettings(image_size=size, faces_per_pixel=k, blur_radius=BLUR if k > 1 else 0.0,
                              max_faces_per_bin=capacity, bin_size=bin_size, backend=backend, **extra)
    elif kind == "hard_k1":
        s = jr.RasterSettings(image_size=size, faces_per_pixel=1, blur_radius=0.0,
                              max_faces_per_bin=capacity, bin_size=bin_size, backend=backend, **extra)
    else:
        raise ValueError(kind)

    def render_one(v, c, faces, cam):
        mesh = jr.Mesh(vertices=v, faces=faces, vertex_colors=c)
        if kind == "soft_rgb_k10":
            img, fr = jr.render_mesh(mesh, cam, lights, s, shading="phong", blend=BlendParams(SIGMA, SIGMA),
                                     return_fragments=True)
            return img, fr.num_overflow, fr.max_bin_count
        if kind == "hard_k1":
            img, fr = jr.render_mesh(mesh, cam, lights, s, shading="unlit", hard=True, return_fragments=True)
            return img, fr.num_overflow, fr.max_bin_count
        if kind.startswith("select_k"):  # the selection pass alone (no shading, no blending)
            fr = select_faces(jr.project(cam, v), faces, s, znear=cam.znear, zfar=cam.zfar)
            return (fr[0] >= 0).astype(v.dtype)[..., :1], fr[1], fr[2]
        img, fr = jr.render_silhouette(mesh, cam, s, sigma=SIGMA, return_fragments=True)
        return img[..., None], fr.num_overflow, fr.max_bin_count

    return s, render_one


def peak_memory_bytes():
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    except Exception:  # noqa: BLE001 - CPU backends have no memory_stats
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def time_fn(fn, args, repeats):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return (statistics.median(times) if times else float("nan")), compile_s, out


def run(scene_name, kind, repeats, capacity, bin_size, backend=None, fwd_bwd_only=False, **extra):
    verts, colors, faces, cam, size = scene(scene_name)
    s, render_one = workload(kind, size, capacity, bin_size, backend, **extra)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(verts.shape[0], size, size, 4 if kind in ("soft_rgb_k10", "hard_k1") else 1)),
                    jnp.float32)

    def forward(v, c):
        return jax.vmap(render_one, in_axes=(0, 0, None, None))(v, c, faces, cam)

    def loss(v, c):
        img, _, _ = forward(v, c)
        return jnp.sum(img * w)

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    if fwd_bwd_only:  # memory runs: one forward + backward, nothing else held
        b_ms, b_compile, _ = time_fn(fwd_bwd, (verts, colors), repeats)
        f_ms = f_compile = float("nan")
        img, overflow, maxcount = jnp.zeros((1, 1, 1, 1)), jnp.zeros(()), jnp.zeros(())
    else:
        f_ms, f_compile, (img, overflow, maxcount) = time_fn(fwd, (verts, colors), repeats)
        b_ms, b_compile, _ = time_fn(fwd_bwd, (verts, colors), repeats)
    peak, peak_kind = peak_memory_bytes()
    return {
        "scene": scene_name, "workload": kind, "backend": backend or "auto",
        "fwd_ms": f_ms, "fwd_bwd_ms": b_ms,
        "compile_fwd_s": f_compile, "compile_fwd_bwd_s": b_compile,
        "peak_bytes": peak, "peak_kind": peak_kind,
        "overflow": int(jnp.max(overflow)), "max_bin_count": int(jnp.max(maxcount)),
        "capacity": s.resolved_max_faces_per_bin(int(faces.shape[0])), "bin_size": s.resolved_bin_size,
        "coverage": float(jnp.mean(img[..., -1] > 0)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", default="small", help="'small', 'all' or comma-separated scene names")
    p.add_argument("--workloads", default="soft_rgb_k10,soft_sil_k50,hard_k1")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--capacity", type=int, default=None, help="max_faces_per_bin (default: library default)")
    p.add_argument("--bin-size", type=int, default=None)
    p.add_argument("--out", default=None, help="write JSON results here")
    p.add_argument("--fwd-bwd-only", action="store_true", help="time only forward+backward (memory runs)")
    p.add_argument("--backend", default=None, choices=["xla", "pallas", "auto"], help="selection-pass backend")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra RasterSettings field, e.g. --set pallas_num_warps=8 (repeatable)")
    a = p.parse_args(argv)
    extra = {}
    for kv in a.set:
        field, value = kv.split("=", 1)
        extra[field] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    if a.scenes == "small":
        scenes = ["small_256_b1", "small_256_b32"]
    elif a.scenes == "all":
        scenes = list(SCENES)
    else:
        scenes = a.scenes.split(",")
    dev = jax.devices()[0]
    meta = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "host": platform.node()}
    print(f"# {meta['device']} ({meta['platform']}), JAX {meta['jax']}, {meta['date']}")
    print("| scene | workload | backend | fwd ms | fwd+bwd ms | peak | compile fwd+bwd s | overflow | max bin count |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for sc in scenes:
        for wl in a.workloads.split(","):
            r = run(sc, wl, a.repeats, a.capacity, a.bin_size, a.backend, a.fwd_bwd_only, **extra)
            r.update(settings=extra)
            r.update(meta)
            rows.append(r)
            print(f"| {sc} | {wl} | {r['backend']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['peak_bytes'] / 2**20:.0f} MiB "
                  f"({r['peak_kind']}) | {r['compile_fwd_bwd_s']:.1f} | {r['overflow']} | {r['max_bin_count']} |",
                  flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

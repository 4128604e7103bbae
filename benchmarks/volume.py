"""Voxel-volume fitting step benchmark (BENCHMARKS.md, "Voxel volume step").

Scene: a 128³ grid of 1 density + 3 colour channels stored as logits with
sigmoid activations (density logits -4, colour logits 0, as PyTorch3D's
tutorial), 10 cameras 2.7 units from the origin around the +y axis looking at
the origin (60° vertical field of view), 128² images, 150 samples per ray
between depths 0.1 and 3.0, voxel size 3/128, emission–absorption
compositing (PyTorch3D's EmissionAbsorptionRaymarcher), pseudo-Huber loss on
colour and silhouette, and one Adam(0.1) step. Timed: the whole jit-compiled
step (ray generation, rendering, loss, backward, Adam update).

Usage::

    python benchmarks/volume.py --out results/volume_gpu.json          # GPU, full scene
    python benchmarks/volume.py --small --out /tmp/volume_cpu.json     # quick CPU run
    python benchmarks/volume.py --backend xla --out results/volume_gpu_xla.json   # the XLA reference path

``--backend`` picks render_volume's path: ``auto`` (default: the fused
kernels of jaxrender/volume_pallas.py on a GPU, XLA elsewhere), ``pallas``
or ``xla``; ``--block-rays``, ``--num-warps``, ``--no-merge-corners`` and
``--no-clip-to-box`` tune the kernels.

Prints one Markdown table row and writes a JSON record.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax

from jaxrender import camera as cam
from jaxrender import volume as V

try:
    from jaxrender.losses import huber
except ImportError:  # pragma: no cover - the losses module predates this script in the repo

    def huber(pred, target, scaling=0.1):
        q = (pred - target) ** 2 / scaling**2
        return jnp.mean(scaling * q / (jnp.sqrt(1 + q) + 1))


def make_cameras(n_views, size, distance=2.7, fov=60.0):
    """``n_views`` cameras on a circle of radius ``distance`` around +y, stacked into one pytree."""
    cams = []
    for b in range(n_views):
        a = 2 * math.pi * b / n_views
        eye = jnp.array([distance * math.sin(a), 0.0, distance * math.cos(a)], jnp.float32)
        cams.append(cam.look_at(eye, fov_y_deg=fov, width=size, height=size))
    return jax.tree.map(lambda *x: jnp.stack(x), *cams)


def backend_kwargs(args):
    """render_volume's backend arguments from the command line."""
    if args.backend == "xla":
        return {"backend": "xla"}
    opts = {}
    if args.block_rays:
        opts["block_rays"] = args.block_rays
    if args.num_warps:
        opts["num_warps"] = args.num_warps
    if args.no_merge_corners:
        opts["merge_corners"] = False
    if args.no_clip_to_box:
        opts["clip_to_box"] = False
    return {"backend": None if args.backend == "auto" else args.backend, "pallas_options": opts or None}


def resolved_backend(args):
    """Which path render_volume takes for this scene ("pallas" or "xla")."""
    from jaxrender import volume_pallas as VP

    if args.backend == "xla":
        return "xla"
    C = 4
    table = (args.grid + 2) ** 3 * C
    reason = VP.unsupported_reason(mode=args.mode, dtype=jnp.float32, channels=C, table_size=table,
                                   return_weights=False)
    return VP.resolve_backend(None if args.backend == "auto" else args.backend, reason)


def build(args):
    G, S, N = args.grid, args.image, args.views
    key = jax.random.PRNGKey(0)
    params = {
        "density": jnp.full((G, G, G), -4.0, jnp.float32),
        "color": jnp.zeros((G, G, G, 3), jnp.float32),
    }
    k1, k2 = jax.random.split(key)
    target_rgb = jax.random.uniform(k1, (N, S, S, 3))
    target_sil = (jax.random.uniform(k2, (N, S, S)) > 0.5).astype(jnp.float32)
    cameras = make_cameras(N, S)
    voxel_size = args.extent / G
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)

    def loss_fn(p):
        grid = V.VoxelGrid.from_activations(p["density"], p["color"], voxel_size=voxel_size)
        origins, dirs = jax.vmap(lambda c: cam.pixel_rays(c, normalize=False))(cameras)
        rays = V.Rays(jnp.broadcast_to(origins, dirs.shape), dirs)
        out = V.render_volume(
            grid,
            rays=rays,
            n_samples=args.samples,
            near=args.near,
            far=args.far,
            mode=args.mode,
            chunk_size=args.chunk_size,
            save_samples=not args.no_save_samples,
            **backend_kwargs(args),
        )
        return huber(out["rgb"], target_rgb) + huber(out["opacity"], target_sil)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    return step, params, opt_state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="quick CPU scene: 64³ grid, 2 views of 64², 150 samples")
    ap.add_argument("--grid", type=int, default=None, help="grid size (default 128, 64 with --small)")
    ap.add_argument("--image", type=int, default=None, help="image size (default 128, 64 with --small)")
    ap.add_argument("--views", type=int, default=None, help="cameras per step (default 10, 2 with --small)")
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--near", type=float, default=0.1)
    ap.add_argument("--far", type=float, default=3.0)
    ap.add_argument("--extent", type=float, default=3.0, help="grid extent: voxel size = extent / grid")
    ap.add_argument("--mode", default="pytorch3d", choices=["pytorch3d", "physical"])
    ap.add_argument("--chunk-size", type=int, default=None, help="rays per lax.map chunk (default: all rays at once)")
    ap.add_argument("--no-save-samples", action="store_true", help="re-gather samples in the backward pass (XLA path)")
    ap.add_argument("--backend", default="auto", choices=["auto", "pallas", "xla"],
                    help="render_volume backend: auto (fused kernels on GPUs), pallas, xla")
    ap.add_argument("--block-rays", type=int, default=None, help="kernel: rays per program (power of two, default 128)")
    ap.add_argument("--num-warps", type=int, default=None, help="kernel: Triton warps per program (default 4)")
    ap.add_argument("--no-merge-corners", action="store_true",
                    help="kernel: add every sample's 8 corners (no merging of the corners consecutive samples share)")
    ap.add_argument("--no-clip-to-box", action="store_true", help="kernel: march every sample, also outside the grid")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--runs", type=int, default=None, help="timed runs (default 30 on GPU, 5 on CPU)")
    ap.add_argument("--out", default=None, help="write the JSON record here")
    args = ap.parse_args(argv)
    args.grid = args.grid or (64 if args.small else 128)
    args.image = args.image or (64 if args.small else 128)
    args.views = args.views or (2 if args.small else 10)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    args.runs = args.runs or (30 if on_gpu else 5)

    step, params, opt_state = build(args)

    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state).compile()
    compile_s = time.perf_counter() - t0
    mem = None
    try:
        ma = compiled.memory_analysis()
        mem = {k: int(getattr(ma, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")}
    except Exception:  # not every backend reports it
        pass

    t0 = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times) * 1e3

    if on_gpu:
        stats = dev.memory_stats() or {}
        peak = int(stats.get("peak_bytes_in_use", 0))
        peak_kind = "device peak_bytes_in_use"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_kind = "process max RSS"

    scene = f"voxel_{args.grid}^3_{args.views}x{args.image}^2_S{args.samples}"
    rec = {
        "benchmark": "volume_step",
        "scene": scene,
        "grid": args.grid,
        "views": args.views,
        "image": args.image,
        "samples": args.samples,
        "mode": args.mode,
        "chunk_size": args.chunk_size,
        "save_samples": not args.no_save_samples,
        "backend": args.backend,
        "resolved_backend": resolved_backend(args),
        "pallas_options": backend_kwargs(args).get("pallas_options"),
        "ms_median": med,
        "ms_min": min(times) * 1e3,
        "ms_all": [t * 1e3 for t in times],
        "runs": args.runs,
        "compile_s": compile_s,
        "first_call_s": first_s,
        "peak_bytes": peak,
        "peak_kind": peak_kind,
        "compiled_memory": mem,
        "loss": float(loss),
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    print(f"| scene | backend | device | ms/step (median of {args.runs}) | compile s | peak memory |")
    print("|---|---|---|---|---|---|")
    print(f"| {scene} | {rec['resolved_backend']} | {dev.device_kind} | {med:.2f} | {compile_s:.1f} | "
          f"{peak / 2**20:.0f} MiB ({peak_kind}) |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    print(json.dumps({k: rec[k] for k in ("scene", "resolved_backend", "device", "jax", "ms_median", "compile_s",
                                          "peak_bytes")}))
    return rec


if __name__ == "__main__":
    main()

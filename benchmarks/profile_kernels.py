"""Where does the GPU time go? Per-kernel device times of one benchmark workload.

Runs a workload of ``raster.py`` or ``volume.py`` a few times under
``jax.profiler`` (with a Perfetto trace), then sums the device-side events by
kernel name and prints the top ones as a Markdown table (ms per call, share
of the device time, number of launches per call).

    python benchmarks/profile_kernels.py raster face_512_b8 soft_rgb_k10 [--backend pallas] [--fwd]
    python benchmarks/profile_kernels.py volume

The kernel names are XLA's fusion names (``loop_scatter_fusion``, ...) or a
Pallas kernel's ``name=`` (``jaxrender_select``); ``--hlo`` also prints the
HLO op each of the top fusions came from, when the trace records it.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def device_kernel_times(fn, args, runs=5):
    """``{kernel name: (total µs, launches, one event's args)}`` over ``runs`` calls of ``fn(*args)``."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(runs):
            jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError(f"no Perfetto trace written under {d}: {glob.glob(os.path.join(d, '**'), recursive=True)}")
        with gzip.open(paths[0], "rt") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n or "device" in n.lower()}
    device_pids -= {pid for pid, n in names.items() if "host" in n.lower() or "CPU" in n}
    table = collections.defaultdict(lambda: [0.0, 0, None])
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        row = table[e.get("name", "?")]
        row[0] += float(e.get("dur", 0.0))
        row[1] += 1
        if row[2] is None:
            row[2] = e.get("args", {})
    return {k: (v[0] / runs, v[1] / runs, v[2]) for k, v in table.items()}, sorted(names.values())


def print_table(times, top=25, hlo=False):
    total = sum(t for t, _, _ in times.values())
    print(f"device time per call: {total / 1e3:.2f} ms in {sum(n for _, n, _ in times.values()):.0f} events")
    print("| kernel | ms / call | share | launches / call |")
    print("|---|---|---|---|")
    for name, (t, n, a) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name[:90]} | {t / 1e3:.3f} | {t / max(total, 1e-9):.1%} | {n:.0f} |")
        if hlo and a:
            keep = {k: str(v)[:300] for k, v in a.items() if k in ("hlo_op", "long_name", "tf_op", "hlo_module")}
            if keep:
                print(f"|   ↳ {keep} | | | |")


def raster_fns(scene_name, kind, backend):
    import numpy as np

    import raster as R

    verts, colors, faces, cam, size = R.scene(scene_name)
    _, render_one = R.workload(kind, size, None, None, backend)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(verts.shape[0], size, size, 4 if kind in (
        "soft_rgb_k10", "hard_k1") else 1)), jnp.float32)

    def forward(v, c):
        return jax.vmap(render_one, in_axes=(0, 0, None, None))(v, c, faces, cam)

    def loss(v, c):
        return jnp.sum(forward(v, c)[0] * w)

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (verts, colors)


def volume_fns(extra):
    import volume as V

    ap_args = argparse.Namespace(
        grid=128, image=128, views=10, samples=150, near=0.1, far=3.0, extent=3.0, mode="pytorch3d",
        chunk_size=None, no_save_samples=False, lr=0.1)
    for kv in extra:
        k, v = kv.split("=")
        setattr(ap_args, k, type(getattr(ap_args, k))(v) if getattr(ap_args, k) is not None else int(v))
    step, params, opt_state = V.build(ap_args)
    return step, (params, opt_state)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["raster", "volume"])
    ap.add_argument("rest", nargs="*", help="raster: SCENE WORKLOAD; volume: key=value overrides of volume.py args")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--fwd", action="store_true", help="raster: profile the forward pass instead of forward + backward")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo", action="store_true")
    a = ap.parse_args(argv)
    if a.what == "raster":
        fwd, fwd_bwd, args = raster_fns(a.rest[0], a.rest[1], a.backend)
        fn = fwd if a.fwd else fwd_bwd
        label = f"raster {a.rest[0]} {a.rest[1]} backend={a.backend or 'auto'} {'fwd' if a.fwd else 'fwd+bwd'}"
    else:
        fn, args = volume_fns(a.rest)
        label = "volume step " + " ".join(a.rest)
    times, procs = device_kernel_times(fn, args, a.runs)
    print(f"## {label} ({jax.devices()[0].device_kind}, JAX {jax.__version__})")
    if not times:
        print(f"no device events found; trace processes: {procs}")
        return
    print_table(times, a.top, a.hlo)


if __name__ == "__main__":
    main()

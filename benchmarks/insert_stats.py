"""How much of a tile's candidate list does the GPU selection kernel process and insert?

A CPU simulation of the Pallas kernel's tile loop (``raster/pallas_select.py``)
on a benchmark scene: candidates in nearest-vertex-depth order, the
depth-ordered early exit checked every ``pallas_block`` candidates, and the
tile-uniform skip (a candidate that enters no pixel's list of the tile).
Prints the candidates per tile, the share the early exit processes, the
share that enters some list, and the compare-select counts of one insertion
per candidate against the sorting-network merge of groups of G.

    python benchmarks/insert_stats.py face_512_b1 50 [--tiles 256]
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import raster as bench  # noqa: E402

import jaxrender as jr  # noqa: E402
from jaxrender.raster.pallas_select import merge_network, sort_network  # noqa: E402

R = importlib.import_module("jaxrender.raster.rasterize")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scene", nargs="?", default="face_512_b1")
    p.add_argument("k", nargs="?", type=int, default=50)
    p.add_argument("--tiles", type=int, default=256, help="random non-empty tiles simulated (0: all)")
    p.add_argument("--block", type=int, default=32, help="pallas_block: candidates between early-exit checks")
    a = p.parse_args(argv)
    k, bs = a.k, 8
    verts, _, faces, cam, size = bench.scene(a.scene)
    s = jr.RasterSettings(image_size=size, faces_per_pixel=k, blur_radius=bench.BLUR, bin_size=bs, backend="xla")
    tri = jr.project(cam, verts[0])[faces]
    valid = R.face_validity(tri, s, cam.znear, cam.zfar)
    nb = -(-size // bs)
    face_s, starts, counts, _ = R._bin_faces(tri, valid, s, nb, nb)
    counts, starts = np.asarray(counts), np.asarray(starts)
    tiles = np.flatnonzero(counts > 0)
    print(f"{a.scene}, K={k}: {len(counts)} tiles, {len(tiles)} non-empty, candidates per non-empty tile: "
          f"mean {counts[tiles].mean():.0f}, max {counts.max()}")
    if a.tiles:
        tiles = tiles[np.random.default_rng(0).permutation(len(tiles))[:a.tiles]]
    cnt, st = jnp.asarray(counts[tiles]), jnp.asarray(starts[tiles])
    pix = np.arange(bs * bs)
    px = jnp.asarray((tiles % nb)[:, None] * bs + pix % bs + 0.5, jnp.float32)
    py = jnp.asarray((tiles // nb)[:, None] * bs + pix // bs + 0.5, jnp.float32)
    geo = dict(perspective_correct=True, clip_barycentrics=True, ndc_per_pixel=s.ndc_per_pixel)
    zmin = jnp.min(tri[..., 2], axis=1)

    def step(carry, i):
        keys, n_reach, active = carry
        has = i < cnt
        f = face_s[jnp.minimum(st + i, face_s.shape[0] - 1)]
        c = [tri[f, u, v][:, None] for u in range(3) for v in range(3)]
        *_, depth, dist, inside = R.geometry_core(*c, px, py, **geo)
        reach = has[:, None] & (inside | (dist < s.blur_radius)) & (depth >= cam.znear)
        key = jnp.where(reach, depth, jnp.inf)
        zn = zmin[f]
        settled = (jnp.max(keys[..., -1], -1) < zn - 1e-6 * jnp.abs(zn)) & (jnp.min(n_reach, -1) > k)
        active = active & has & ~((i % a.block == 0) & settled)
        enters = jnp.any(key < keys[..., -1], -1) & active
        new = jnp.sort(jnp.concatenate([keys, key[..., None]], -1), -1)[..., :k]
        keys = jnp.where(active[:, None, None], new, keys)
        n_reach = n_reach + jnp.where(active[:, None], reach, 0)
        return (keys, n_reach, active), (active, enters)

    init = (jnp.full((len(tiles), bs * bs, k), jnp.inf), jnp.zeros((len(tiles), bs * bs), jnp.int32),
            jnp.ones((len(tiles),), bool))
    n_steps = int(counts[tiles].max())
    _, (act, ent) = jax.jit(lambda: jax.lax.scan(step, init, jnp.arange(n_steps)))()
    act, ent = np.asarray(act), np.asarray(ent)  # (candidates, tiles)
    n_all, n_proc, n_ins = int(np.asarray(cnt).sum()), int(act.sum()), int(ent.sum())
    print(f"processed {n_proc / n_all:.0%} of the candidates (early exit), {n_ins / n_proc:.0%} of those "
          f"enter some list of their tile")
    lin = n_ins * k
    print(f"one insertion each: {lin:.3g} insertion steps")
    for g in (4, 8, 16):
        if g > k:
            continue
        rows = -(-act.shape[0] // g) * g
        e = np.zeros((rows, act.shape[1]), bool)
        e[:act.shape[0]] = ent
        groups = int(e.reshape(rows // g, g, -1).any(1).sum())
        net = (len(sort_network(list(range(g)))[0]) + g + g // 2 * int(np.log2(g))
               + len(merge_network(list(range(k - g)), list(range(k - g, k)))[0]))
        print(f"groups of {g}: {groups} merged ({net} compare-exchanges each): {groups * net:.3g} "
              f"compare-exchanges ({groups * net / lin:.2f} of the insertion steps)")


if __name__ == "__main__":
    main()

"""GPU kernel for the selection pass (Pallas, Triton backend).

One program per screen tile. It walks the tile's candidate faces (a
contiguous run of the sorted (tile, face) pairs) in blocks of ``B``, computes
the same geometry as the XLA path for its ``bs * bs`` pixels in registers,
and keeps, per pixel, the ``K`` nearest faces within reach in a small
register buffer (replace-the-worst; the worst is the largest (depth, face)
pair, so ties keep the lower face index exactly as the XLA path does). No
``(pixels x candidates)`` array ever reaches memory.

The kernel only decides *which* faces are kept (no gradient); the
differentiable recomputation stays in XLA. The XLA path in
``rasterize.py`` is the reference and the fallback on CPU/TPU.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from .rasterize import geometry_core

log = logging.getLogger("jaxrender")

try:  # Pallas' Triton backend is deprecated upstream; guard every import.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    _HAVE_PALLAS = True
except Exception:  # noqa: BLE001
    pl = plgpu = None
    _HAVE_PALLAS = False

_WARNED = set()


def _once(msg):
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


def pallas_available() -> bool:
    """True when the Pallas Triton kernel can run (a CUDA GPU and Pallas' Triton backend)."""
    if not _HAVE_PALLAS:
        return False
    try:
        return jax.default_backend() == "gpu" and any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def resolve_backend(backend, faces_per_pixel: int = 1):
    """Pick ``"pallas"`` or ``"xla"`` for ``backend`` in (None, "auto", "xla", "pallas").

    ``auto`` takes the kernel on a GPU for hard rasterization (``K = 1``),
    where it measured faster than XLA (face_512_b8: 24 vs 40 ms on an H200);
    for soft rasterization (``K > 1``) its per-candidate top-K bookkeeping
    made it slower than XLA's batched top-k (see benchmarks/RESULTS.md), so
    ``auto`` keeps XLA there.
    """
    if backend in (None, "auto"):
        if faces_per_pixel == 1 and pallas_available():
            return "pallas"
        if _HAVE_PALLAS is False and jax.default_backend() == "gpu":
            _once("jaxrender: Pallas' Triton backend is not importable; using the XLA rasterizer")
        return "xla"
    if backend == "xla":
        return "xla"
    if backend == "pallas":
        if not _HAVE_PALLAS:
            _once("jaxrender: backend='pallas' asked for but Pallas' Triton backend is missing; using XLA")
            return "xla"
        return "pallas"
    raise ValueError(f"backend must be None, 'auto', 'xla' or 'pallas', got {backend!r}")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _kernel(starts_ref, counts_ref, faces_ref, x0_ref, y0_ref, z0_ref, x1_ref, y1_ref, z1_ref, x2_ref, y2_ref,
            z2_ref, znear_ref, out_face_ref, out_key_ref, out_reach_ref, *, bs, nbx, k, kp, block, capacity, blur,
            geo):
    t = pl.program_id(0)
    start = starts_ref[t]
    count = jnp.minimum(counts_ref[t], capacity)
    znear = znear_ref[0]
    npix = bs * bs
    pix = jnp.arange(npix, dtype=jnp.int32)
    px = ((t % nbx) * bs + pix % bs).astype(jnp.float32) + 0.5
    py = ((t // nbx) * bs + pix // bs).astype(jnp.float32) + 0.5
    iota_k = jnp.arange(kp, dtype=jnp.int32)[None, :]
    iota_b = jnp.arange(block, dtype=jnp.int32)[None, :]
    # Slots beyond K hold -inf so they are never the worst and never replaced.
    best_key = jnp.where(iota_k < k, jnp.inf, -jnp.inf) + jnp.zeros((npix, 1), jnp.float32)
    best_face = jnp.full((npix, kp), -1, jnp.int32)

    def worst(best_key, best_face):
        wk = jnp.max(best_key, axis=1)
        wf = jnp.max(jnp.where(best_key == wk[:, None], best_face, -1), axis=1)
        return wk, wf

    def block_body(j, carry):
        pos = j * block + jnp.arange(block, dtype=jnp.int32)
        has = pos < count
        fid = faces_ref[pl.ds(start + j * block, block)]
        fid = jnp.where(has, fid, 0)
        c = [r[fid][None, :] for r in (x0_ref, y0_ref, z0_ref, x1_ref, y1_ref, z1_ref, x2_ref, y2_ref, z2_ref)]
        _, _, _, depth, dist, inside = geometry_core(*c, px[:, None], py[:, None], **geo)
        reach = has[None, :] & (inside | (dist < blur)) & (depth >= znear)
        key = jnp.where(reach, depth, jnp.inf)  # (P, B)
        n_reach = carry[4] + jnp.sum(reach.astype(jnp.int32), axis=1)
        carry = carry[:4]

        def col(i, carry):
            sel = iota_b == i
            kc = jnp.min(jnp.where(sel, key, jnp.inf), axis=1)

            def update(carry):
                best_key, best_face, wk, wf = carry
                fc = jnp.max(jnp.where(sel, fid[None, :], -1), axis=1)
                slot = jnp.min(jnp.where((best_key == wk[:, None]) & (best_face == wf[:, None]), iota_k, kp), axis=1)
                repl = (kc < wk)[:, None] & (iota_k == slot[:, None])
                best_key = jnp.where(repl, kc[:, None], best_key)
                best_face = jnp.where(repl, fc[:, None], best_face)
                return (best_key, best_face) + worst(best_key, best_face)

            # Most candidates improve no pixel: skip the slot bookkeeping then.
            return jax.lax.cond(jnp.max((kc < carry[2]).astype(jnp.int32)) > 0, update, lambda c: c, carry)

        def scan_block(carry):
            return jax.lax.fori_loop(0, block, col, carry)

        carry = jax.lax.cond(jnp.max((key < carry[2][:, None]).astype(jnp.int32)) > 0, scan_block, lambda c: c, carry)
        return carry + (n_reach,)

    n_blocks = (count + block - 1) // block
    carry = (best_key, best_face) + worst(best_key, best_face) + (jnp.zeros((npix,), jnp.int32),)
    best_key, best_face, _, _, n_reach = jax.lax.fori_loop(0, n_blocks, block_body, carry)
    out_face_ref[...] = best_face[None]
    out_key_ref[...] = best_key[None]
    out_reach_ref[...] = n_reach[None]


def select_pallas(tri, face_s, starts, counts, znear, *, settings, nby, nbx, interpret=False):
    """Run the selection kernel.

    Returns ``(faces (T, bs*bs, K) int32 sorted by (depth, face), reach (T, bs*bs) int32)``
    where ``reach`` counts the faces that reach each pixel.
    """
    bs = settings.resolved_bin_size
    k = settings.faces_per_pixel
    kp = _pow2(k)
    block = min(_pow2(settings.pallas_block), 64)
    num_tiles = nby * nbx
    npix = bs * bs
    if npix != _pow2(npix):
        raise ValueError(f"the Pallas kernel needs a power-of-two bin_size, got {bs}")
    f = tri.shape[0]
    cols = [tri[:, i, j].astype(jnp.float32) for i in range(3) for j in range(3)]
    cols = [jnp.pad(c, (0, _pow2(f) - f)) for c in cols]
    faces_p = jnp.pad(face_s, (0, _pow2(face_s.shape[0] + block) - face_s.shape[0]))
    tp = _pow2(num_tiles)
    starts_p = jnp.pad(starts, (0, tp - num_tiles))
    counts_p = jnp.pad(counts, (0, tp - num_tiles))
    geo = dict(perspective_correct=settings.perspective_correct,
               clip_barycentrics=settings.resolved_clip_barycentrics,
               ndc_per_pixel=settings.ndc_per_pixel)
    kernel = functools.partial(
        _kernel, bs=bs, nbx=nbx, k=k, kp=kp, block=block,
        capacity=settings.resolved_max_faces_per_bin(f), blur=settings.blur_radius, geo=geo)
    out_face, out_key, out_reach = pl.pallas_call(
        kernel,
        grid=(num_tiles,),
        out_shape=(jax.ShapeDtypeStruct((num_tiles, npix, kp), jnp.int32),
                   jax.ShapeDtypeStruct((num_tiles, npix, kp), jnp.float32),
                   jax.ShapeDtypeStruct((num_tiles, npix), jnp.int32)),
        out_specs=(pl.BlockSpec((1, npix, kp), lambda t: (t, 0, 0)),
                   pl.BlockSpec((1, npix, kp), lambda t: (t, 0, 0)),
                   pl.BlockSpec((1, npix), lambda t: (t, 0))),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=settings.pallas_num_warps),
        interpret=interpret,
        name="jaxrender_select",
    )(starts_p, counts_p, faces_p, *cols, jnp.reshape(znear, (1,)).astype(jnp.float32))
    # Sort each pixel's kept faces by (depth, face); empty slots (inf) last, padding (-inf) dropped.
    key = jnp.where(jnp.isneginf(out_key), jnp.inf, out_key)
    face = jnp.where(jnp.isfinite(key), out_face, jnp.iinfo(jnp.int32).max)
    key, face = jax.lax.sort((key, face), dimension=-1, num_keys=2)
    face = jnp.where(jnp.isfinite(key), face, -1)[..., :k]
    return face.astype(jnp.int32), out_reach

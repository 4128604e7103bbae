"""GPU kernel for the selection pass (Pallas, Triton backend).

One program per screen tile, its pixels spread over the program's threads
(one per thread at the default 8-px tiles). It walks the tile's candidate
faces (a contiguous run of the sorted (tile, face) pairs) one at a time, or
``pallas_unroll`` at a time, optionally merged into the lists by a sorting
network (``pallas_merge``): the face's nine vertex coordinates are scalars shared by the tile,
the geometry (the same ``geometry_core`` as the XLA path) is computed for
every pixel, and the face is inserted into each pixel's ascending list of
the ``K`` nearest (depth, face) pairs within reach, held as ``K`` per-pixel
registers. The candidates come in the binning's order (nearest vertex
depth, then face index), and a face ties with an equal depth already in a
list only after it, so a strict depth comparison keeps ties in that order,
exactly as the XLA path does. Nothing per (pixel, candidate) ever reaches
memory and no step needs communication between threads. With
``depth_exit`` a tile stops as soon as no remaining candidate can enter a
list.

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


# From this K on, a candidate that enters no list of the tile skips its
# insertion (tile-uniform branch); below it the branch costs more than it saves.
SKIP_MIN_K = 16

# The kernel keeps each pixel's K-list in registers (2K values per pixel);
# beyond this the registers spill and XLA's batched top_k is the safer choice.
MAX_PALLAS_K = 64


def resolve_backend(backend, faces_per_pixel: int = 1):
    """Pick ``"pallas"`` or ``"xla"`` for ``backend`` in (None, "auto", "xla", "pallas").

    ``auto`` takes the kernel on a GPU for ``K <= MAX_PALLAS_K``: on an H200
    its selection pass is 4-25x faster than XLA's (benchmarks/RESULTS.md).
    """
    if backend in (None, "auto"):
        if faces_per_pixel <= MAX_PALLAS_K and pallas_available():
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


def merge_network(a, b):
    """Batcher's odd-even merge of two sorted lists of wires ``a`` and ``b`` (any lengths).

    Returns ``(comparators, order)``: compare-exchanges ``(lo, hi)`` (the
    smaller value goes to wire ``lo``) applied in sequence leave the merged
    list in the wires ``order``, smallest first.
    """
    if not a or not b:
        return [], list(a) + list(b)
    if len(a) == 1 and len(b) == 1:
        return [(a[0], b[0])], [a[0], b[0]]
    c_odd, v = merge_network(a[0::2], b[0::2])
    c_even, w = merge_network(a[1::2], b[1::2])
    seq = [x for pair in zip(v, w) for x in pair] + v[len(w):]  # v1 w1 v2 w2 ... (len(v) >= len(w))
    return c_odd + c_even + [(seq[i], seq[i + 1]) for i in range(1, len(seq) - 1, 2)], seq


def sort_network(wires):
    """Batcher's odd-even merge sort of ``wires``: ``(comparators, order)`` as in :func:`merge_network`."""
    if len(wires) <= 1:
        return [], list(wires)
    h = len(wires) // 2
    c_lo, lo = sort_network(wires[:h])
    c_hi, hi = sort_network(wires[h:])
    c, order = merge_network(lo, hi)
    return c_lo + c_hi + c, order


def _less(ka, fa, kb, fb):
    """(depth, tie-break) order: ``a`` before ``b`` (the kernel's tie-break is the candidate's position)."""
    return (ka < kb) | ((ka == kb) & (fa < fb))


def _run_network(keys, faces, comparators, order):
    keys, faces = list(keys), list(faces)
    for lo, hi in comparators:
        swap = _less(keys[hi], faces[hi], keys[lo], faces[lo])
        keys[lo], keys[hi] = jnp.minimum(keys[lo], keys[hi]), jnp.maximum(keys[lo], keys[hi])
        faces[lo], faces[hi] = jnp.where(swap, faces[hi], faces[lo]), jnp.where(swap, faces[lo], faces[hi])
    return [keys[w] for w in order], [faces[w] for w in order]


def merge_group(keys, faces, gkeys, gfaces):
    """The ``K`` first (depth, tie-break) pairs of a sorted ``K``-list and a group of ``G <= K`` candidates.

    Only the list's last ``G`` entries can leave it: the group is sorted,
    reversed against that tail and the smaller of each pair kept (the ``G``
    first of tail and group, a bitonic sequence), which a bitonic merge
    sorts and an odd-even merge merges with the list's ``K - G`` first. At
    ``K = 50``, ``G = 8`` that is ~150 compare-exchanges per group against
    ``8 * 50`` insertion steps.
    """
    k, g = len(keys), len(gkeys)
    if g & (g - 1) or g > k:
        raise ValueError(f"merge_group needs a power-of-two group of at most K, got G={g}, K={k}")
    gk, gf = _run_network(gkeys, gfaces, *sort_network(list(range(g))))
    mk, mf = [], []
    for i in range(g):
        a, b = k - g + i, g - 1 - i
        take = _less(gk[b], gf[b], keys[a], faces[a])
        mk.append(jnp.minimum(keys[a], gk[b]))
        mf.append(jnp.where(take, gf[b], faces[a]))
    stride, bitonic = g // 2, []
    while stride:
        bitonic += [(i, i + stride) for i in range(g) if not i & stride]
        stride //= 2
    mk, mf = _run_network(mk, mf, bitonic, list(range(g)))
    head = list(range(k - g))
    comparators, order = merge_network(head, list(range(k - g, k)))
    return _run_network(list(keys[:k - g]) + mk, list(faces[:k - g]) + mf, comparators, order)


def _kernel(starts_ref, counts_ref, faces_ref, tri_ref, znear_ref, out_face_ref, out_reach_ref, *, bs, nbx, k, kp,
            block, capacity, blur,
            geo, depth_exit, skip_min_k, unroll, merge):
    t = pl.program_id(0)
    start = starts_ref[t]
    count = jnp.minimum(counts_ref[t], capacity)
    znear = znear_ref[0]
    npix = bs * bs
    pix = jnp.arange(npix, dtype=jnp.int32)
    px = ((t % nbx) * bs + pix % bs).astype(jnp.float32) + 0.5
    py = ((t // nbx) * bs + pix // bs).astype(jnp.float32) + 0.5

    def corners(f):  # a face: nine scalars (x, y, depth per vertex) shared by the tile's pixels, one cache line
        return [tri_ref[f * 9 + c] for c in range(9)]

    def load_faces(i0):
        return tuple(faces_ref[start + i0 + u] for u in range(unroll))

    def candidate_key(i, c):
        _, _, _, depth, dist, inside = geometry_core(*c, px, py, need_dist=blur > 0, **geo)
        reach = (inside if dist is None else inside | (dist < blur)) & (depth >= znear) & (i < count)
        return jnp.where(reach, depth, jnp.inf), reach

    def insert_one(key, f, keys, faces):
        # Insert (key, f) into the ascending list: slot s takes the slot
        # above it if the candidate goes higher, the candidate if it lands
        # at s, else keeps its entry; for the depths that is
        # max(keys[s-1], min(key, keys[s])) (keys are never NaN: a NaN depth
        # does not reach). Every entry came earlier in the tile's order, so
        # on a tie the candidate goes after it: a strict compare (one op
        # instead of a four-op (depth, face) compare per slot). Every op is
        # per pixel, so the K slots of a pixel stay in its thread's registers.
        def less(s):
            return key < keys[s]

        def insert():
            lt = [less(s) for s in range(k)]
            new_k = [jnp.minimum(key, keys[0])]
            new_f = [jnp.where(lt[0], f, faces[0])]
            for s in range(1, k):
                new_k.append(jnp.maximum(keys[s - 1], jnp.minimum(key, keys[s])))
                new_f.append(jnp.where(lt[s - 1], faces[s - 1], jnp.where(lt[s], f, faces[s])))
            return tuple(new_k), tuple(new_f)

        if k < skip_min_k:
            return insert()
        # A candidate that enters no pixel's list of the tile (beyond every
        # worst entry, or out of reach) skips the K-step insertion: a branch
        # uniform over the program (a max: Triton has no reduce_or).
        return jax.lax.cond(jnp.max(less(k - 1).astype(jnp.int32)) > 0, insert, lambda: (keys, faces))

    def candidate(i, carry):
        keys, faces, n_reach = carry
        f = faces_ref[start + i]
        key, reach = candidate_key(i, corners(f))
        return insert_one(key, f, keys, faces) + (n_reach + reach.astype(jnp.int32),)

    def candidate_group(j, carry):
        # ``unroll`` candidates per step, their loads issued together and the
        # next step's face indices fetched ahead (on an H200 no faster than
        # one at a time: the kernel is not waiting on memory), inserted one
        # by one or merged as a group. The last group of a tile is padded
        # with out-of-reach candidates.
        keys, faces, n_reach, fs = carry
        i0 = j * unroll
        cs = [corners(f) for f in fs]
        nxt = load_faces(i0 + unroll)
        gk = []
        for u in range(unroll):
            key, reach = candidate_key(i0 + u, cs[u])
            gk.append(key)
            n_reach = n_reach + reach.astype(jnp.int32)
        if not merge:
            for u in range(unroll):
                keys, faces = insert_one(gk[u], fs[u], keys, faces)
            return keys, faces, n_reach, nxt

        def merge_all():
            # Merged lists hold candidate positions, not faces: a sorting
            # network does not keep ties in arrival order, so they are broken
            # by position explicitly (faces are looked up at the end).
            pos = [i0 + u for u in range(unroll)]
            return tuple(map(tuple, merge_group(keys, faces, gk, pos)))

        if k < skip_min_k:
            return merge_all() + (n_reach, nxt)
        # Skip the merge when no candidate of the group can enter a list of
        # the tile (conservative on ties: an equal depth merges).
        low = functools.reduce(jnp.minimum, gk)
        enters = (low <= keys[k - 1]) & (low < jnp.inf)
        keys, faces = jax.lax.cond(jnp.max(enters.astype(jnp.int32)) > 0, merge_all, lambda: (keys, faces))
        return keys, faces, n_reach, nxt

    def run_block(j, carry):
        lo = j * block
        hi = jnp.minimum(lo + block, count)
        if unroll == 1 and not merge:
            return jax.lax.fori_loop(lo, hi, candidate, carry)
        out = jax.lax.fori_loop(lo // unroll, (hi + unroll - 1) // unroll, candidate_group,
                                carry + (load_faces(lo),))
        return out[:3]

    n_blocks = (count + block - 1) // block
    init = (tuple(jnp.full((npix,), jnp.inf, jnp.float32) for _ in range(k)),
            tuple(jnp.full((npix,), -1, jnp.int32) for _ in range(k)),
            jnp.zeros((npix,), jnp.int32))
    if depth_exit:
        # Candidates come in increasing order of their nearest vertex depth,
        # a lower bound of their depth at any pixel. Once every pixel's list
        # is full with a worst entry nearer than the next block's bound, and
        # every pixel is known to be reached by more than K faces (so the
        # truncation count is exact), no later candidate can change anything.
        def settled(j, carry):
            f = faces_ref[start + jnp.clip(j * block, 0, jnp.maximum(count - 1, 0))]
            zn = jnp.minimum(jnp.minimum(tri_ref[f * 9 + 2], tri_ref[f * 9 + 5]), tri_ref[f * 9 + 8])
            worst = carry[0][k - 1]
            return (jnp.max(worst) < zn - 1e-6 * jnp.abs(zn)) & (jnp.min(carry[2]) > k)

        _, (keys, faces, n_reach) = jax.lax.while_loop(
            lambda st: (st[0] < n_blocks) & jnp.logical_not(settled(*st)),
            lambda st: (st[0] + 1, run_block(*st)), (jnp.zeros((), jnp.int32), init))
    else:
        keys, faces, n_reach = jax.lax.fori_loop(0, n_blocks, run_block, init)
    # A slot holds a face only once a candidate within reach (finite key)
    # entered it, so empty slots are still -1.
    if merge:  # positions in the tile's run to faces
        faces = tuple(jnp.where(p >= 0, faces_ref[start + jnp.maximum(p, 0)], -1) for p in faces)
    for s in range(kp):
        out_face_ref[0, s, :] = faces[s] if s < k else jnp.full((npix,), -1, jnp.int32)
    out_reach_ref[0, :] = n_reach


def select_pallas(tri, face_s, starts, counts, znear, *, settings, nby, nbx, depth_exit=False, interpret=False,
                  skip_min_k=None):
    """Run the selection kernel.

    ``depth_exit``: the candidates of each tile are sorted by their nearest
    vertex depth (see ``_bin_faces``) and a tile stops once no later
    candidate can enter any pixel's list.

    Returns ``(faces (T, Kp, bs*bs) int32, reach (T, bs*bs) int32)``: each
    pixel's faces sorted by (depth, face) in slots ``0..K-1`` (``-1`` for
    none; ``Kp`` is ``K`` rounded up to a power of two, the extra slots are
    ``-1``), and ``reach``, the number of faces that reach each pixel
    (exactly up to ``K + 1``; beyond that it may stop counting when
    ``depth_exit`` ends a tile early).
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
    table = tri.astype(jnp.float32).reshape(-1)  # (F * 9,): a face's nine coordinates side by side
    table = jnp.pad(table, (0, _pow2(table.shape[0]) - table.shape[0]))
    # Padding: a tile's last group and the indices fetched ahead for the next one read past its run.
    faces_p = jnp.pad(face_s, (0, _pow2(face_s.shape[0] + 2 * block) - face_s.shape[0]))
    tp = _pow2(num_tiles)
    starts_p = jnp.pad(starts, (0, tp - num_tiles))
    counts_p = jnp.pad(counts, (0, tp - num_tiles))
    geo = dict(perspective_correct=settings.perspective_correct,
               clip_barycentrics=settings.resolved_clip_barycentrics,
               ndc_per_pixel=settings.ndc_per_pixel)
    unroll, merge = settings.resolved_pallas_unroll, settings.resolved_pallas_merge
    unroll = min(unroll, block)  # a group never straddles two checks of the early exit
    kernel = functools.partial(
        _kernel, bs=bs, nbx=nbx, k=k, kp=kp, block=block,
        capacity=settings.resolved_max_faces_per_bin(f), blur=settings.blur_radius, geo=geo, depth_exit=depth_exit,
        skip_min_k=SKIP_MIN_K if skip_min_k is None else skip_min_k, unroll=unroll,
        merge=merge and unroll > 1)
    out_face, out_reach = pl.pallas_call(
        kernel,
        grid=(num_tiles,),
        out_shape=(jax.ShapeDtypeStruct((num_tiles, kp, npix), jnp.int32),
                   jax.ShapeDtypeStruct((num_tiles, npix), jnp.int32)),
        out_specs=(pl.BlockSpec((1, kp, npix), lambda t: (t, 0, 0)),
                   pl.BlockSpec((1, npix), lambda t: (t, 0))),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=settings.resolved_pallas_num_warps),
        interpret=interpret,
        name="jaxrender_select",
    )(starts_p, counts_p, faces_p, table, jnp.reshape(znear, (1,)).astype(jnp.float32))
    return out_face, out_reach

"""The XLA soft rasterizer: binned, non-differentiable face selection followed
by a differentiable recomputation of the kept fragments.

Two passes (docs/rasterizer.md):

1. *Selection* (no gradient). Faces are culled; each face's screen bounding
   box (grown by the blur radius) emits one (tile, face) pair per square
   tile it touches; the pairs are sorted, so each tile's candidates are a
   contiguous run; every pixel tests only its tile's candidates, keeping the
   ``K`` nearest in depth among those within reach. Memory is
   ``O(P + H * W * K + F)`` for ``P`` pairs; the per-pixel work is done a
   chunk of tiles and a block of candidates at a time (or by the Pallas
   kernel in ``pallas_select.py`` on a GPU).
2. *Recompute* (differentiable). For the kept ``(H, W, K)`` face indices the
   barycentrics, depth and signed distance are computed again from the vertex
   positions, so gradients flow to the vertices through ``O(H * W * K)``
   values only.

Both passes use :func:`geometry_core`, so they agree exactly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import custom_batching

from .._checks import check_faces, check_float, check_shape
from .settings import Fragments, RasterSettings

# Tolerances shared by both passes.
_AREA_EPS = 1e-12  # |2 * signed area| (pixels^2) guarding divisions
_SLIVER = 1e-6  # a face is degenerate when |2 * area| <= _SLIVER * (longest edge)^2
_PERSP_EPS = 1e-8  # PyTorch3D's kEpsilon for the perspective-correction denominator
_CLIP_EPS = 1e-5  # PyTorch3D's floor for the clipped-barycentric sum


def _edge(ax, ay, bx, by, px, py):
    """Twice the signed area of (a, b, p); positive when p is left of a->b in y-up."""
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _point_segment_dist2(px, py, ax, ay, bx, by):
    dx, dy = bx - ax, by - ay
    len2 = dx * dx + dy * dy
    inv = 1.0 / jnp.where(len2 > 0, len2, 1.0)  # per edge: the per-pixel work is multiplies only
    t = jnp.clip(((px - ax) * dx + (py - ay) * dy) * inv, 0.0, 1.0)
    t = jnp.where(len2 > 0, t, 0.0)
    ex, ey = px - (ax + t * dx), py - (ay + t * dy)
    return ex * ex + ey * ey


def geometry_core(x0, y0, z0, x1, y1, z1, x2, y2, z2, px, py, *, perspective_correct: bool,
                  clip_barycentrics: bool, ndc_per_pixel: float, need_dist: bool = True):
    """Component-wise core of :func:`fragment_geometry` (elementwise ops only).

    Every argument broadcasts against the others. Used unchanged by the XLA
    path and the GPU kernels, so both select the same faces.

    The face's reciprocal area and edge lengths are per face (multiplies
    per pixel), and perspective correction and clipping share one
    normalisation (the perspective denominator is clamped positive, so
    ``max(w / den, 0) = max(w, 0) / den``): three divisions per pixel
    instead of twelve.
    ``need_dist=False`` (a selection with no blur, where reach is coverage)
    skips the distance and returns ``dist = None``.

    Returns:
      ``(b0, b1, b2, depth, dist, inside)``.
    """
    area = _edge(x0, y0, x1, y1, x2, y2)
    inv_area = 1.0 / jnp.where(jnp.abs(area) > _AREA_EPS, area, 1.0)
    l0 = _edge(x1, y1, x2, y2, px, py) * inv_area
    l1 = _edge(x2, y2, x0, y0, px, py) * inv_area
    l2 = _edge(x0, y0, x1, y1, px, py) * inv_area
    inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
    if perspective_correct:
        w0, w1, w2 = l0 * (z1 * z2), l1 * (z0 * z2), l2 * (z0 * z1)
        den = w0 + w1 + w2
        den = jnp.where(den > _PERSP_EPS, den, _PERSP_EPS)
    else:
        w0, w1, w2, den = l0, l1, l2, None
    if clip_barycentrics:
        # b = max(w / den, 0) / max(sum, eps) = max(w, 0) / max(den * sum, den * eps)
        w0, w1, w2 = jnp.maximum(w0, 0.0), jnp.maximum(w1, 0.0), jnp.maximum(w2, 0.0)
        s = w0 + w1 + w2
        floor = _CLIP_EPS if den is None else _CLIP_EPS * den
        norm = jnp.where(s > floor, s, floor)
    else:
        norm = den
    # Divisions, not a reciprocal: a pixel clipped to one vertex gets
    # exactly (1, 0, 0) (x / x == 1), so faces sharing that vertex tie
    # exactly in depth and the tie rule (nearest vertex depth, then face
    # index) decides, the same on every backend.
    b0, b1, b2 = (w0, w1, w2) if norm is None else (w0 / norm, w1 / norm, w2 / norm)
    depth = b0 * z0 + b1 * z1 + b2 * z2
    if not need_dist:
        return b0, b1, b2, depth, None, inside
    d2 = jnp.minimum(
        jnp.minimum(_point_segment_dist2(px, py, x0, y0, x1, y1), _point_segment_dist2(px, py, x1, y1, x2, y2)),
        _point_segment_dist2(px, py, x2, y2, x0, y0),
    )
    d2 = d2 * (ndc_per_pixel * ndc_per_pixel)
    dist = jnp.where(inside, -d2, d2)
    return b0, b1, b2, depth, dist, inside


def fragment_geometry(tri, px, py, *, perspective_correct: bool, clip_barycentrics: bool, ndc_per_pixel: float,
                      need_dist: bool = True):
    """Barycentrics, depth and signed squared distance of pixels w.r.t. triangles.

    Broadcasts over leading axes: ``tri`` is ``(..., 3, 3)`` with rows
    ``(x_pix, y_pix, depth)`` per vertex; ``px``, ``py`` broadcast against
    ``tri[..., 0, 0]``.

    Returns:
      ``(bary (..., 3), depth (...), dist (...), inside (...))`` where ``bary``
      is perspective-corrected and clipped as asked, ``depth`` is interpolated
      with ``bary``, and ``dist`` is the squared distance to the triangle's
      boundary in NDC units, negative inside (``None`` with ``need_dist=False``).
    """
    comps = [tri[..., i, j] for i in range(3) for j in range(3)]
    b0, b1, b2, depth, dist, inside = geometry_core(
        *comps, px, py, perspective_correct=perspective_correct,
        clip_barycentrics=clip_barycentrics, ndc_per_pixel=ndc_per_pixel, need_dist=need_dist)
    return jnp.stack([b0, b1, b2], axis=-1), depth, dist, inside


def face_validity(tri, settings: RasterSettings, znear, zfar):
    """Which faces survive culling. ``tri`` is ``(F, 3, 3)`` screen vertices.

    A face is culled when it is degenerate on screen (twice its area at most
    1e-6 times its longest edge squared, i.e. a sliver), when any
    vertex is closer than ``znear`` (the "cull" near rule), when all its
    vertices lie beyond ``zfar``, when any coordinate is not finite, or —
    with ``cull_backfaces`` — when it appears clockwise on screen (its signed
    pixel-space area is positive, see docs/conventions.md).
    """
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]
    area = _edge(x[:, 0], y[:, 0], x[:, 1], y[:, 1], x[:, 2], y[:, 2])
    e2 = jnp.stack([(x[:, i] - x[:, (i + 1) % 3]) ** 2 + (y[:, i] - y[:, (i + 1) % 3]) ** 2 for i in range(3)], -1)
    # Scale-free degeneracy test: float32 rounding of a collinear face leaves
    # an area of about 1e-7 * edge^2, which must not count as a real face.
    valid = (jnp.abs(area) > _SLIVER * jnp.max(e2, axis=-1)) & (jnp.abs(area) > _AREA_EPS)
    valid &= jnp.all(jnp.isfinite(tri), axis=(1, 2))
    valid &= jnp.min(z, axis=1) >= znear
    valid &= jnp.min(z, axis=1) <= zfar
    if settings.cull_backfaces:
        valid &= area < 0
    return valid


@functools.lru_cache(maxsize=None)
def _sort_by_key(key_range: int):
    """A stable sort of ``(keys, values)`` by ``keys`` in ``[0, key_range)``, flat under ``vmap``.

    GPUs sort a 1-D array of int32 keys with a radix sort (CUB), but a
    batched sort — what ``vmap`` makes of one — with XLA's comparison sort,
    ~10x slower (H200: 8 x 1.7M pairs, 7.5 vs 0.67 ms). Under ``vmap`` this
    adds ``batch_index * key_range`` to the keys and sorts the flattened
    batch once instead (nested ``vmap``s flatten further), unless the keys
    would then overflow int32.
    """

    @custom_batching.custom_vmap
    def sort(keys, values):
        return tuple(jax.lax.sort((keys, values), num_keys=1, is_stable=True))

    @sort.def_vmap
    def _batched(axis_size, in_batched, keys, values):
        keys = keys if in_batched[0] else jnp.broadcast_to(keys, (axis_size,) + keys.shape)
        values = values if in_batched[1] else jnp.broadcast_to(values, (axis_size,) + values.shape)
        if axis_size * key_range >= 2 ** 31:
            return tuple(jax.lax.sort((keys, values), dimension=-1, num_keys=1, is_stable=True)), (True, True)
        offset = (jnp.arange(axis_size, dtype=keys.dtype) * key_range)[:, None]
        k, v = _sort_by_key(axis_size * key_range)((keys + offset).reshape(-1), values.reshape(-1))
        return (k.reshape(keys.shape) - offset, v.reshape(values.shape)), (True, True)

    return sort


def _bin_faces(tri, valid, settings: RasterSettings, num_bins_y: int, num_bins_x: int):
    """Tile binning with static shapes, by sorting (tile, face) pairs.

    Every surviving face emits one pair per tile its grown bounding box
    touches (at most ``max_tile_pairs`` pairs in all); the pairs are sorted by
    tile, then the face's nearest vertex depth, then face, so each tile's
    candidates are a contiguous run in the order that breaks depth ties
    (docs/rasterizer.md). If a tile can overflow, its first
    ``max_faces_per_bin`` faces in face order come first (the ones kept),
    each part in that order.

    Returns:
      ``(faces_sorted (P,) int32, starts (T,) int32, counts (T,) int32,
      pair_overflow int32)``.
    """
    bs = settings.resolved_bin_size
    r = settings.blur_radius_pixels + 1e-3  # margin: binning may over-include, never miss
    xmin = jnp.min(tri[..., 0], axis=1) - r
    xmax = jnp.max(tri[..., 0], axis=1) + r
    ymin = jnp.min(tri[..., 1], axis=1) - r
    ymax = jnp.max(tri[..., 1], axis=1) + r
    # Tile b covers pixel centres [b*bs + 0.5, b*bs + bs - 0.5].
    big = float(2 ** 20)  # keeps far-off coordinates finite before the int cast
    tx0 = jnp.clip(jnp.ceil((xmin - bs + 0.5) / bs), 0, num_bins_x).astype(jnp.int32)
    ty0 = jnp.clip(jnp.ceil((ymin - bs + 0.5) / bs), 0, num_bins_y).astype(jnp.int32)
    tx1 = jnp.clip(jnp.floor(jnp.clip((xmax - 0.5) / bs, -big, big)), -1, num_bins_x - 1).astype(jnp.int32)
    ty1 = jnp.clip(jnp.floor(jnp.clip((ymax - 0.5) / bs, -big, big)), -1, num_bins_y - 1).astype(jnp.int32)
    nx = jnp.maximum(tx1 - tx0 + 1, 0)
    ny = jnp.maximum(ty1 - ty0 + 1, 0)
    n = jnp.where(valid, nx * ny, 0).astype(jnp.int32)

    num_faces = tri.shape[0]
    num_tiles = num_bins_y * num_bins_x
    budget = settings.resolved_max_tile_pairs(num_faces, num_tiles)
    capacity = settings.resolved_max_faces_per_bin(num_faces)
    # Pairs are generated face by face, so one *stable* sort on the tile
    # alone (a radix sort on GPUs, much faster than a two-key comparison
    # sort) leaves each tile's run in generation order. That order is the
    # faces sorted by their nearest vertex depth when no tile can overflow,
    # else the face index (the runs are then re-sorted below).
    gen = None
    if capacity >= num_faces:
        gen = jnp.argsort(jnp.min(tri[..., 2], axis=1), stable=True).astype(jnp.int32)
    n_g = n if gen is None else n[gen]
    ends = jnp.cumsum(n_g, dtype=jnp.int32)
    total = ends[-1]
    p = jnp.arange(budget, dtype=jnp.int32)
    # The face (in generation order) of pair slot p is the last one whose
    # run starts at or before p: mark each run's first slot with its face
    # and take a running max. One scatter (distinct slots) and one scan,
    # instead of a binary search per slot (~0.4 ms of compare fusions on an
    # H200 at face_512_b8).
    first = ends - n_g
    idx = jnp.arange(num_faces, dtype=jnp.int32)
    mark = jnp.zeros((budget,), jnp.int32).at[jnp.where(n_g > 0, first, budget)].set(idx, mode="drop")
    g = jax.lax.cummax(mark)
    f = g if gen is None else gen[g]
    local = p - first[g]
    nxf = jnp.maximum(nx[f], 1)
    tile = (ty0[f] + local // nxf) * num_bins_x + tx0[f] + local % nxf
    tile = jnp.where(p < total, tile, num_tiles)  # unused slots sort last
    tile_s, face_s = _sort_by_key(num_tiles + 1)(tile, f)
    # bounds[t]: the first slot whose tile is >= t. A run's first slot gives
    # its tile's bound; an empty tile takes the next non-empty one's (a
    # reverse running min, from ``budget`` past the end).
    run_start = jnp.concatenate([jnp.ones((1,), bool), tile_s[1:] != tile_s[:-1]])
    bounds = jnp.full((num_tiles + 1,), budget, jnp.int32).at[jnp.where(run_start, tile_s, num_tiles + 1)].set(
        p, mode="drop")
    bounds = jax.lax.cummin(bounds, reverse=True)
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    if gen is None:
        # A tile may overflow: re-sort each run by nearest vertex depth, the
        # first ``capacity`` faces in face order first (the ones the
        # selection keeps), the dropped ones after them.
        rank = jnp.arange(budget, dtype=jnp.int32) - starts[jnp.minimum(tile_s, num_tiles - 1)]
        dropped = (rank >= capacity).astype(jnp.int32)
        zmin = jnp.min(tri[..., 2], axis=1)[face_s]
        *_, face_s = jax.lax.sort((tile_s, dropped, zmin, face_s), num_keys=4)
    return face_s.astype(jnp.int32), starts, counts, jnp.maximum(total - budget, 0).astype(jnp.int32)


def _select_faces(tri, valid, settings: RasterSettings, znear, tiles=False):
    """The non-differentiable pass: ``(H, W, K)`` face indices and statistics.

    Tiles are sorted by candidate count and processed ``bin_chunk`` at a
    time; inside a chunk the candidates are consumed in blocks of
    ``candidate_block`` with a running top-K merge, and a ``while_loop`` stops
    after the chunk's longest list. Work is therefore proportional to the
    candidates that exist.
    """
    h, w = settings.image_size
    k = settings.faces_per_pixel
    bs = settings.resolved_bin_size
    nby, nbx = -(-h // bs), -(-w // bs)
    num_tiles = nby * nbx
    use_pallas = settings.pallas_interpret
    if not use_pallas and tri.dtype == jnp.float32:
        from .pallas_select import resolve_backend
        use_pallas = resolve_backend(settings.backend, settings.faces_per_pixel) == "pallas"
    # A face's depth at a pixel it reaches is a convex combination of its
    # vertex depths unless unclipped barycentrics extrapolate it (blur > 0).
    depth_exit = use_pallas and (settings.blur_radius == 0.0 or settings.resolved_clip_barycentrics)
    # Both backends walk each tile's candidates in depth order and keep the
    # earlier candidate on an equal depth: that order is the tie rule.
    face_s, starts, counts, pair_overflow = _bin_faces(tri, valid, settings, nby, nbx)
    budget = face_s.shape[0]
    capacity = settings.resolved_max_faces_per_bin(tri.shape[0])
    npix = bs * bs
    block = settings.resolved_candidate_block

    if use_pallas:
        from .pallas_select import select_pallas
        lists, n_reach = select_pallas(tri, face_s, starts, counts, znear, settings=settings, nby=nby, nbx=nbx,
                                       depth_exit=depth_exit, interpret=settings.pallas_interpret)
        sel = jnp.swapaxes(lists, 1, 2)[..., :k]  # lists are sorted by depth (ties: see above), empty slots last
        out = _finish_selection(sel, n_reach, counts, capacity, pair_overflow, settings, nby, nbx)
        return (lists,) + out if tiles else out
    if tiles:
        raise ValueError("the tile layout of the selection is only produced by the Pallas kernel")

    # Busy tiles together, so a chunk's loop length fits all its tiles.
    order = jnp.argsort(-counts)
    chunk = min(settings.resolved_bin_chunk(npix, block), num_tiles)
    n_chunks = -(-num_tiles // chunk)
    pad = n_chunks * chunk - num_tiles
    order_p = jnp.pad(order, (0, pad), constant_values=0).reshape(n_chunks, chunk)
    live_p = (jnp.arange(n_chunks * chunk) < num_tiles).reshape(n_chunks, chunk)

    ly, lx = jnp.meshgrid(jnp.arange(bs), jnp.arange(bs), indexing="ij")
    ly, lx = ly.reshape(1, -1), lx.reshape(1, -1)
    blur = settings.blur_radius
    kk = k
    geo = dict(perspective_correct=settings.perspective_correct,
               clip_barycentrics=settings.resolved_clip_barycentrics,
               ndc_per_pixel=settings.ndc_per_pixel)
    lane = jnp.arange(block, dtype=jnp.int32)[None, :]

    def per_chunk(args):
        tiles, live = args  # (C,), (C,)
        cstart = starts[tiles][:, None]
        ccount = jnp.where(live, jnp.minimum(counts[tiles], capacity), 0)[:, None]
        cpx = ((tiles % nbx)[:, None] * bs + lx).astype(tri.dtype) + 0.5  # (C, P)
        cpy = ((tiles // nbx)[:, None] * bs + ly).astype(tri.dtype) + 0.5
        n_blocks = (jnp.max(ccount) + block - 1) // block

        def body(state):
            j, best_key, best_face, n_reach = state
            pos = j * block + lane  # (1, B)
            has = pos < ccount  # (C, B)
            cand = jnp.where(has, face_s[jnp.minimum(cstart + pos, budget - 1)], 0)
            ctri = tri[cand]  # (C, B, 3, 3)
            _, depth, dist, inside = fragment_geometry(ctri[:, None], cpx[:, :, None], cpy[:, :, None],
                                                       need_dist=blur > 0, **geo)
            reach = has[:, None, :] & (inside if dist is None else inside | (dist < blur)) & (depth >= znear)
            key = jnp.where(reach, depth, jnp.inf)  # (C, P, B)
            face = jnp.broadcast_to(cand[:, None, :], key.shape)
            # Running results first: on equal depth top_k keeps the lower
            # position, i.e. the earlier candidate in the tile's order.
            all_key = jnp.concatenate([best_key, key], axis=-1)
            all_face = jnp.concatenate([best_face, face], axis=-1)
            neg, idx = jax.lax.top_k(-all_key, kk)
            n_reach = n_reach + jnp.sum(reach, axis=-1, dtype=jnp.int32)
            return j + 1, -neg, jnp.take_along_axis(all_face, idx, axis=-1), n_reach

        init = (jnp.zeros((), jnp.int32),
                jnp.full((chunk, npix, kk), jnp.inf, tri.dtype),
                jnp.full((chunk, npix, kk), -1, jnp.int32),
                jnp.zeros((chunk, npix), jnp.int32))
        _, best_key, best_face, n_reach = jax.lax.while_loop(lambda st: st[0] < n_blocks, body, init)
        return jnp.where(jnp.isfinite(best_key), best_face, -1), n_reach

    sel, n_reach = jax.lax.map(per_chunk, (order_p, live_p))  # (n_chunks, C, P, kk), (n_chunks, C, P)
    sel = sel.reshape(n_chunks * chunk, npix, kk)[:num_tiles]
    n_reach = n_reach.reshape(n_chunks * chunk, npix)[:num_tiles]
    sel = jnp.zeros_like(sel).at[order].set(sel)  # back to tile order
    n_reach = jnp.zeros_like(n_reach).at[order].set(n_reach)
    return _finish_selection(sel, n_reach, counts, capacity, pair_overflow, settings, nby, nbx)


def _finish_selection(sel, n_reach, counts, capacity, pair_overflow, settings, nby, nbx):
    """Per-tile ``(T, bs*bs, K)`` selections (and reach counts) to the image and the statistics."""
    h, w = settings.image_size
    bs, k = settings.resolved_bin_size, settings.faces_per_pixel
    img = sel.reshape(nby, nbx, bs, bs, k).transpose(0, 2, 1, 3, 4).reshape(nby * bs, nbx * bs, k)
    face_idx = img[:h, :w]
    reach = n_reach.reshape(nby, nbx, bs, bs).transpose(0, 2, 1, 3).reshape(nby * bs, nbx * bs)[:h, :w]
    num_truncated = jnp.sum(reach > k).astype(jnp.int32)
    num_overflow = (jnp.sum(jnp.maximum(counts - capacity, 0)) + pair_overflow).astype(jnp.int32)
    max_bin_count = jnp.max(counts).astype(jnp.int32)
    return face_idx, num_overflow, max_bin_count, num_truncated


def select_faces(screen_verts, faces, settings: RasterSettings, *, znear=1e-3, zfar=jnp.inf):
    """The non-differentiable selection pass alone.

    Returns:
      ``(face_idx (H, W, K) int32, num_overflow, max_bin_count, num_culled,
      num_truncated)``; no gradient flows through any of them.
    """
    check_shape(screen_verts, "screen_verts", (None, 3))
    check_float(screen_verts, "screen_verts")
    check_faces(faces, screen_verts.shape[0])
    if not isinstance(settings, RasterSettings):
        raise TypeError(f"settings must be a RasterSettings, got {type(settings).__name__}")
    faces = faces.astype(jnp.int32)
    h, w = settings.image_size
    k = settings.faces_per_pixel
    zero = jnp.zeros((), jnp.int32)
    if faces.shape[0] == 0:
        return jnp.full((h, w, k), -1, jnp.int32), zero, zero, zero, zero
    return _select_valid(screen_verts, faces, settings, znear, zfar)


def _select_valid(screen_verts, faces, settings: RasterSettings, znear, zfar, tiles=False):
    """:func:`select_faces` for at least one face; with ``tiles`` (Pallas path only) the
    per-tile lists ``(T, Kp, bin_size**2)`` of the kernel come first."""
    dtype = screen_verts.dtype
    znear = jax.lax.stop_gradient(jnp.asarray(znear, dtype))
    zfar = jax.lax.stop_gradient(jnp.asarray(zfar, dtype))
    tri = jax.lax.stop_gradient(screen_verts)[faces]
    valid = face_validity(tri, settings, znear, zfar)
    out = _select_faces(tri, valid, settings, znear, tiles=tiles)
    culled = jnp.sum(~valid).astype(jnp.int32)
    return out[:-1] + (culled, out[-1])


def rasterize(screen_verts, faces, settings: RasterSettings, *, znear=1e-3, zfar=jnp.inf, vertex_attrs=None):
    """Rasterize one mesh's projected triangles into per-pixel fragments.

    The ``K`` faces nearest in depth among those within reach of each pixel
    centre are kept (a face reaches a pixel when the pixel is inside it or its
    squared NDC distance is below ``settings.blur_radius``). Which faces are
    kept is decided without gradients; the returned barycentrics, depths and
    distances are differentiable functions of ``screen_verts``.

    Args:
      screen_verts: ``(V, 3)`` float, per vertex ``(x_pix, y_pix, depth)`` as
        :func:`jaxrender.camera.project` returns them (pixel centres at +0.5,
        y down, depth = camera-space z).
      faces: ``(F, 3)`` int32 vertex indices.
      settings: :class:`RasterSettings` (static).
      znear: faces with a vertex closer than this are culled ("cull" rule);
        fragments closer than this are dropped. Scalar, may be traced.
      zfar: faces entirely beyond this are culled. Scalar, may be traced.
      vertex_attrs: optional ``(V, C)`` attributes to interpolate in the same
        pass (one gather for geometry and attributes, which makes the
        backward pass several times cheaper than separate
        :func:`interpolate` calls).

    Returns:
      :class:`Fragments` with ``(H, W, K)`` fields and overflow statistics;
      with ``vertex_attrs``, the pair ``(fragments, attrs (H, W, K, C))``.

    Under ``jax.vmap`` this batches over meshes (or cameras) that share
    ``faces`` and ``settings``.
    """
    face_idx, num_overflow, max_bin_count, num_culled, num_truncated = select_faces(
        screen_verts, faces, settings, znear=znear, zfar=zfar)
    faces = faces.astype(jnp.int32)
    if vertex_attrs is not None:
        check_shape(vertex_attrs, "vertex_attrs", (screen_verts.shape[0], None))
    if faces.shape[0] == 0:  # nothing to gather from: every fragment is empty
        dtype = screen_verts.dtype
        shape = face_idx.shape
        bary, depth, dist = jnp.full(shape + (3,), -1.0, dtype), jnp.full(shape, -1.0, dtype), jnp.full(shape, -1.0, dtype)
        attrs = None if vertex_attrs is None else jnp.zeros(shape + (vertex_attrs.shape[-1],), dtype)
    else:
        bary, depth, dist, attrs = recompute_fragments(screen_verts, faces, face_idx, settings, vertex_attrs)
    fr = Fragments(face_idx=face_idx, bary=bary, depth=depth, dist=dist,
                   num_overflow=num_overflow, max_bin_count=max_bin_count, num_culled=num_culled,
                   num_truncated=num_truncated)
    return fr if vertex_attrs is None else (fr, attrs)


@jax.custom_vjp
def gather_rows(table, idx):
    """``table[max(idx, 0)]`` for ``(N, C)`` ``table``; rows with ``idx < 0`` are "no row".

    The backward pass scatter-adds the cotangent rows into the table but
    *drops* those of ``idx < 0`` instead of adding their zeros into row 0:
    empty fragments are often half of all (every background pixel, every
    unused one of the K slots), and as atomic adds onto one address they
    serialise the whole scatter on GPUs.
    """
    return table[jnp.maximum(idx, 0)]


def _gather_rows_fwd(table, idx):
    # A zero-width array carries the table's row count and dtype to the backward pass.
    return gather_rows(table, idx), (idx, jnp.zeros(table.shape[:1] + (0,), table.dtype))


def _gather_rows_bwd(res, ct):
    idx, proto = res
    n = proto.shape[0]
    dropped = jnp.where(idx >= 0, idx, n).reshape(-1)  # out of range: skipped by FILL_OR_DROP
    g = jnp.zeros((n,) + ct.shape[idx.ndim:], proto.dtype)
    g = g.at[dropped].add(ct.reshape((-1,) + ct.shape[idx.ndim:]).astype(proto.dtype), mode="drop")
    return g, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def recompute_fragments(screen_verts, faces, face_idx, settings: RasterSettings, vertex_attrs=None, row_offset=0):
    """The differentiable pass: geometry (and attributes) of the kept fragments.

    Screen positions and attributes are packed per face corner and gathered
    once per fragment, so the backward pass is a single scatter-add of
    ``(H, W, K)`` rows into an ``(F, 3 * (3 + C))`` table.

    Args:
      screen_verts: ``(V, 3)`` projected vertices.
      faces: ``(F, 3)`` int32.
      face_idx: ``(H, W, K)`` int32 kept faces (``-1`` for none).
      settings: the :class:`RasterSettings` used to select them.
      vertex_attrs: optional ``(V, C)`` attributes to interpolate.
      row_offset: image row of ``face_idx[0]`` when ``face_idx`` holds a
        band of rows (the render functions process the image in bands).

    Returns:
      ``(bary (H, W, K, 3), depth (H, W, K), dist (H, W, K), attrs)`` with -1
      fills where ``face_idx`` is -1, and ``attrs`` ``(H, W, K, C)`` (zero
      where empty) or ``None``.
    """
    h, w = face_idx.shape[:2]
    mask = face_idx >= 0
    dtype = screen_verts.dtype
    packed = screen_verts if vertex_attrs is None else jnp.concatenate(
        [screen_verts, vertex_attrs.astype(dtype)], axis=-1)
    corners = packed[faces]  # (F, 3, 3 + C)
    frag = gather_rows(corners.reshape(faces.shape[0], 3 * packed.shape[-1]), face_idx)  # (H, W, K, 3 * (3 + C))
    frag = frag.reshape(face_idx.shape + (3, packed.shape[-1]))
    py = (jnp.arange(h, dtype=dtype) + 0.5 + row_offset)[:, None, None]
    px = (jnp.arange(w, dtype=dtype) + 0.5)[None, :, None]
    bary, depth, dist, _ = fragment_geometry(
        frag[..., :3], px, py,
        perspective_correct=settings.perspective_correct,
        clip_barycentrics=settings.resolved_clip_barycentrics,
        ndc_per_pixel=settings.ndc_per_pixel,
    )
    attrs = None
    if vertex_attrs is not None:
        attrs = jnp.einsum("hwkv,hwkvc->hwkc", jnp.where(mask[..., None], bary, 0.0), frag[..., 3:],
                           precision=jax.lax.Precision.HIGHEST)
        attrs = jnp.where(mask[..., None], attrs, 0.0)
    bary = jnp.where(mask[..., None], bary, -1.0)
    depth = jnp.where(mask, depth, -1.0)
    dist = jnp.where(mask, dist, -1.0)
    return bary, depth, dist, attrs


def interpolate(vertex_attrs, faces, fragments: Fragments):
    """Interpolate per-vertex attributes to the kept fragments.

    Args:
      vertex_attrs: ``(V, C)`` per-vertex values (colours, normals, world
        positions, UVs, ...).
      faces: ``(F, 3)`` int32, the faces the fragments index.
      fragments: :class:`Fragments` from :func:`rasterize`.

    Returns:
      ``(H, W, K, C)``: ``sum_i bary_i * attr[face[i]]``, zero where no face
      is kept. Differentiable w.r.t. ``vertex_attrs`` and the barycentrics.
      To interpolate several attributes, concatenate them (or pass
      ``vertex_attrs`` to :func:`rasterize`): one gather is much cheaper to
      differentiate than several.
    """
    check_shape(vertex_attrs, "vertex_attrs", (None, None))
    check_faces(faces, vertex_attrs.shape[0])
    return interpolate_face_attrs(vertex_attrs[faces], fragments)


def interpolate_face_attrs(face_vertex_attrs, fragments: Fragments):
    """Interpolate per-face-corner attributes ``(F, 3, C)`` (e.g. UVs via ``face_uvs``).

    Returns ``(H, W, K, C)``, zero where no face is kept.
    """
    check_shape(face_vertex_attrs, "face_vertex_attrs", (None, 3, None))
    mask = fragments.face_idx >= 0
    nf, _, c = face_vertex_attrs.shape
    if nf == 0:
        return jnp.zeros(fragments.face_idx.shape + (c,), face_vertex_attrs.dtype)
    attrs = gather_rows(face_vertex_attrs.reshape(nf, 3 * c), fragments.face_idx)
    attrs = attrs.reshape(fragments.face_idx.shape + (3, c))  # (H, W, K, 3, C)
    bary = jnp.where(mask[..., None], fragments.bary, 0.0).astype(attrs.dtype)
    out = jnp.einsum("hwkv,hwkvc->hwkc", bary, attrs, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(mask[..., None], out, 0.0)

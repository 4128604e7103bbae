"""The XLA soft rasterizer: binned, non-differentiable face selection followed
by a differentiable recomputation of the kept fragments.

Two passes (docs/rasterizer.md):

1. *Selection* (no gradient). Faces are culled, their screen bounding boxes
   (grown by the blur radius) are binned into square tiles with a fixed
   capacity per tile, and every pixel tests only its tile's candidates,
   keeping the ``K`` nearest in depth among those within reach. Memory is
   ``O(T * M + H * W * K + F)`` for ``T`` tiles of capacity ``M``; the
   per-pixel work is done a few tiles at a time.
2. *Recompute* (differentiable). For the kept ``(H, W, K)`` face indices the
   barycentrics, depth and signed distance are computed again from the vertex
   positions, so gradients flow to the vertices through ``O(H * W * K)``
   values only.

Both passes use :func:`fragment_geometry`, so they agree exactly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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
    safe = jnp.where(len2 > 0, len2, 1.0)
    t = jnp.clip(((px - ax) * dx + (py - ay) * dy) / safe, 0.0, 1.0)
    t = jnp.where(len2 > 0, t, 0.0)
    ex, ey = px - (ax + t * dx), py - (ay + t * dy)
    return ex * ex + ey * ey


def fragment_geometry(tri, px, py, *, perspective_correct: bool, clip_barycentrics: bool, ndc_per_pixel: float):
    """Barycentrics, depth and signed squared distance of pixels w.r.t. triangles.

    Broadcasts over leading axes: ``tri`` is ``(..., 3, 3)`` with rows
    ``(x_pix, y_pix, depth)`` per vertex; ``px``, ``py`` broadcast against
    ``tri[..., 0, 0]``.

    Returns:
      ``(bary (..., 3), depth (...), dist (...), inside (...))`` where ``bary``
      is perspective-corrected and clipped as asked, ``depth`` is interpolated
      with ``bary``, and ``dist`` is the squared distance to the triangle's
      boundary in NDC units, negative inside.
    """
    x0, y0, z0 = tri[..., 0, 0], tri[..., 0, 1], tri[..., 0, 2]
    x1, y1, z1 = tri[..., 1, 0], tri[..., 1, 1], tri[..., 1, 2]
    x2, y2, z2 = tri[..., 2, 0], tri[..., 2, 1], tri[..., 2, 2]
    area = _edge(x0, y0, x1, y1, x2, y2)
    safe_area = jnp.where(jnp.abs(area) > _AREA_EPS, area, 1.0)
    l0 = _edge(x1, y1, x2, y2, px, py) / safe_area
    l1 = _edge(x2, y2, x0, y0, px, py) / safe_area
    l2 = _edge(x0, y0, x1, y1, px, py) / safe_area
    inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
    if perspective_correct:
        w0, w1, w2 = l0 * z1 * z2, z0 * l1 * z2, z0 * z1 * l2
        den = w0 + w1 + w2
        den = jnp.where(den > _PERSP_EPS, den, _PERSP_EPS)
        b0, b1, b2 = w0 / den, w1 / den, w2 / den
    else:
        b0, b1, b2 = l0, l1, l2
    if clip_barycentrics:
        b0, b1, b2 = jnp.maximum(b0, 0.0), jnp.maximum(b1, 0.0), jnp.maximum(b2, 0.0)
        s = b0 + b1 + b2
        s = jnp.where(s > _CLIP_EPS, s, _CLIP_EPS)
        b0, b1, b2 = b0 / s, b1 / s, b2 / s
    depth = b0 * z0 + b1 * z1 + b2 * z2
    d2 = jnp.minimum(
        jnp.minimum(_point_segment_dist2(px, py, x0, y0, x1, y1), _point_segment_dist2(px, py, x1, y1, x2, y2)),
        _point_segment_dist2(px, py, x2, y2, x0, y0),
    )
    d2 = d2 * (ndc_per_pixel * ndc_per_pixel)
    dist = jnp.where(inside, -d2, d2)
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


def _bin_faces(tri, valid, settings: RasterSettings, num_bins_y: int, num_bins_x: int, capacity: int):
    """Tile binning with static shapes.

    Returns ``(bins (T, M) int32 with -1 padding, counts (T,) int32)`` where
    candidates keep increasing face order inside each tile.
    """
    bs = settings.resolved_bin_size
    r = settings.blur_radius_pixels + 1e-3  # margin: binning may over-include, never miss
    xmin = jnp.min(tri[..., 0], axis=1) - r
    xmax = jnp.max(tri[..., 0], axis=1) + r
    ymin = jnp.min(tri[..., 1], axis=1) - r
    ymax = jnp.max(tri[..., 1], axis=1) + r
    # Tile b covers pixel centres [b*bs + 0.5, b*bs + bs - 0.5].
    tx0 = jnp.ceil((xmin - bs + 0.5) / bs)
    tx1 = jnp.floor((xmax - 0.5) / bs)
    ty0 = jnp.ceil((ymin - bs + 0.5) / bs)
    ty1 = jnp.floor((ymax - 0.5) / bs)
    tx0 = jnp.clip(tx0, 0, num_bins_x).astype(jnp.int32)
    ty0 = jnp.clip(ty0, 0, num_bins_y).astype(jnp.int32)
    tx1 = jnp.clip(tx1, -1, num_bins_x - 1).astype(jnp.int32)
    ty1 = jnp.clip(ty1, -1, num_bins_y - 1).astype(jnp.int32)

    num_faces = tri.shape[0]
    num_tiles = num_bins_y * num_bins_x
    chunk = min(settings.face_chunk, max(num_faces, 1))
    n_chunks = -(-num_faces // chunk)
    pad = n_chunks * chunk - num_faces

    def padded(a, fill):
        return jnp.pad(a, (0, pad), constant_values=fill).reshape(n_chunks, chunk)

    xs = (padded(tx0, 1), padded(tx1, 0), padded(ty0, 1), padded(ty1, 0), padded(valid, False),
          jnp.arange(n_chunks * chunk, dtype=jnp.int32).reshape(n_chunks, chunk))
    tile_y = jnp.arange(num_tiles, dtype=jnp.int32) // num_bins_x
    tile_x = jnp.arange(num_tiles, dtype=jnp.int32) % num_bins_x
    rows = jnp.arange(num_tiles, dtype=jnp.int32)[:, None]

    def step(carry, c):
        bins, counts = carry
        cx0, cx1, cy0, cy1, cvalid, fidx = c
        ov = ((tile_x[:, None] >= cx0[None]) & (tile_x[:, None] <= cx1[None])
              & (tile_y[:, None] >= cy0[None]) & (tile_y[:, None] <= cy1[None]) & cvalid[None])
        ovi = ov.astype(jnp.int32)
        pos = counts[:, None] + jnp.cumsum(ovi, axis=1, dtype=jnp.int32) - 1
        pos = jnp.where(ov, pos, capacity)  # out of range: dropped by the scatter
        bins = bins.at[rows, pos].set(jnp.broadcast_to(fidx[None], pos.shape), mode="drop")
        return (bins, counts + ovi.sum(axis=1, dtype=jnp.int32)), None

    init = (jnp.full((num_tiles, capacity), -1, jnp.int32), jnp.zeros((num_tiles,), jnp.int32))
    (bins, counts), _ = jax.lax.scan(step, init, xs)
    return bins, counts


def _select_faces(tri, valid, settings: RasterSettings, znear):
    """The non-differentiable pass: ``(H, W, K)`` face indices and statistics.

    Tiles are sorted by candidate count and processed ``bin_chunk`` at a
    time; inside a chunk the candidates are consumed in blocks of
    ``candidate_block`` with a running top-K merge, and a ``while_loop`` stops
    after the chunk's largest list. Work is therefore proportional to the
    candidates that exist, not to the capacity ``max_faces_per_bin``.
    """
    h, w = settings.image_size
    k = settings.faces_per_pixel
    bs = settings.resolved_bin_size
    nby, nbx = -(-h // bs), -(-w // bs)
    capacity = settings.resolved_max_faces_per_bin(tri.shape[0])
    bins, counts = _bin_faces(tri, valid, settings, nby, nbx, capacity)
    num_tiles = nby * nbx
    npix = bs * bs
    block = min(settings.resolved_candidate_block, capacity)
    n_blocks_max = -(-capacity // block)
    cap_pad = n_blocks_max * block
    bins = jnp.pad(bins, ((0, 0), (0, cap_pad - capacity)), constant_values=-1)

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
    kk = min(k, cap_pad)
    geo = dict(perspective_correct=settings.perspective_correct,
               clip_barycentrics=settings.resolved_clip_barycentrics,
               ndc_per_pixel=settings.ndc_per_pixel)

    def per_chunk(args):
        tiles, live = args  # (C,), (C,)
        cbins = bins[tiles]  # (C, cap_pad)
        ccount = jnp.where(live, jnp.minimum(counts[tiles], capacity), 0)
        cpx = ((tiles % nbx)[:, None] * bs + lx).astype(tri.dtype) + 0.5  # (C, P)
        cpy = ((tiles // nbx)[:, None] * bs + ly).astype(tri.dtype) + 0.5
        n_blocks = (jnp.max(ccount) + block - 1) // block

        def body(state):
            j, best_key, best_face = state
            cand = jax.lax.dynamic_slice_in_dim(cbins, j * block, block, axis=1)  # (C, B)
            has = cand >= 0
            ctri = tri[jnp.maximum(cand, 0)]  # (C, B, 3, 3)
            _, depth, dist, inside = fragment_geometry(ctri[:, None], cpx[:, :, None], cpy[:, :, None], **geo)
            reach = has[:, None, :] & (inside | (dist < blur)) & (depth >= znear)
            key = jnp.where(reach, depth, jnp.inf)  # (C, P, B)
            face = jnp.broadcast_to(cand[:, None, :], key.shape)
            # Running results first: on equal depth top_k keeps the lower
            # position, i.e. the lower face index (candidates are in face order).
            all_key = jnp.concatenate([best_key, key], axis=-1)
            all_face = jnp.concatenate([best_face, face], axis=-1)
            neg, idx = jax.lax.top_k(-all_key, kk)
            return j + 1, -neg, jnp.take_along_axis(all_face, idx, axis=-1)

        init = (jnp.zeros((), jnp.int32),
                jnp.full((chunk, npix, kk), jnp.inf, tri.dtype),
                jnp.full((chunk, npix, kk), -1, jnp.int32))
        _, best_key, best_face = jax.lax.while_loop(lambda st: st[0] < n_blocks, body, init)
        return jnp.where(jnp.isfinite(best_key), best_face, -1)

    sel = jax.lax.map(per_chunk, (order_p, live_p))  # (n_chunks, C, P, kk)
    sel = sel.reshape(n_chunks * chunk, npix, kk)[:num_tiles]
    sel = jnp.zeros_like(sel).at[order].set(sel)  # back to tile order
    if kk < k:
        sel = jnp.pad(sel, ((0, 0), (0, 0), (0, k - kk)), constant_values=-1)
    img = sel.reshape(nby, nbx, bs, bs, k).transpose(0, 2, 1, 3, 4).reshape(nby * bs, nbx * bs, k)
    face_idx = img[:h, :w]
    num_overflow = jnp.sum(jnp.maximum(counts - capacity, 0)).astype(jnp.int32)
    max_bin_count = jnp.max(counts).astype(jnp.int32)
    return face_idx, num_overflow, max_bin_count


def rasterize(screen_verts, faces, settings: RasterSettings, *, znear=1e-3, zfar=jnp.inf) -> Fragments:
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

    Returns:
      :class:`Fragments` with ``(H, W, K)`` fields and overflow statistics.

    Under ``jax.vmap`` this batches over meshes (or cameras) that share
    ``faces`` and ``settings``.
    """
    check_shape(screen_verts, "screen_verts", (None, 3))
    check_float(screen_verts, "screen_verts")
    check_faces(faces, screen_verts.shape[0])
    if not isinstance(settings, RasterSettings):
        raise TypeError(f"settings must be a RasterSettings, got {type(settings).__name__}")
    faces = faces.astype(jnp.int32)
    dtype = screen_verts.dtype
    znear = jnp.asarray(znear, dtype)
    zfar = jnp.asarray(zfar, dtype)

    if faces.shape[0] == 0:
        h, w = settings.image_size
        k = settings.faces_per_pixel
        zero = jnp.zeros((), jnp.int32)
        return Fragments(
            face_idx=jnp.full((h, w, k), -1, jnp.int32), bary=jnp.full((h, w, k, 3), -1.0, dtype),
            depth=jnp.full((h, w, k), -1.0, dtype), dist=jnp.full((h, w, k), -1.0, dtype),
            num_overflow=zero, max_bin_count=zero, num_culled=zero,
        )

    sv_const = jax.lax.stop_gradient(screen_verts)
    tri_const = sv_const[faces]
    valid = face_validity(tri_const, settings, jax.lax.stop_gradient(znear), jax.lax.stop_gradient(zfar))
    face_idx, num_overflow, max_bin_count = _select_faces(tri_const, valid, settings, jax.lax.stop_gradient(znear))
    num_culled = jnp.sum(~valid).astype(jnp.int32)
    bary, depth, dist = recompute_fragments(screen_verts, faces, face_idx, settings)
    return Fragments(face_idx=face_idx, bary=bary, depth=depth, dist=dist,
                     num_overflow=num_overflow, max_bin_count=max_bin_count, num_culled=num_culled)


def recompute_fragments(screen_verts, faces, face_idx, settings: RasterSettings):
    """The differentiable pass: geometry of the kept fragments.

    Args:
      screen_verts: ``(V, 3)`` projected vertices.
      faces: ``(F, 3)`` int32.
      face_idx: ``(H, W, K)`` int32 kept faces (``-1`` for none).
      settings: the :class:`RasterSettings` used to select them.

    Returns:
      ``(bary (H, W, K, 3), depth (H, W, K), dist (H, W, K))`` filled with -1
      where ``face_idx`` is -1.
    """
    h, w = settings.image_size
    mask = face_idx >= 0
    tri = screen_verts[faces[jnp.maximum(face_idx, 0)]]  # (H, W, K, 3, 3)
    dtype = screen_verts.dtype
    py = (jnp.arange(h, dtype=dtype) + 0.5)[:, None, None]
    px = (jnp.arange(w, dtype=dtype) + 0.5)[None, :, None]
    bary, depth, dist, _ = fragment_geometry(
        tri, px, py,
        perspective_correct=settings.perspective_correct,
        clip_barycentrics=settings.resolved_clip_barycentrics,
        ndc_per_pixel=settings.ndc_per_pixel,
    )
    bary = jnp.where(mask[..., None], bary, -1.0)
    depth = jnp.where(mask, depth, -1.0)
    dist = jnp.where(mask, dist, -1.0)
    return bary, depth, dist


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
    """
    check_shape(vertex_attrs, "vertex_attrs", (None, None))
    check_faces(faces, vertex_attrs.shape[0])
    mask = fragments.face_idx >= 0
    fv = faces[jnp.maximum(fragments.face_idx, 0)]  # (H, W, K, 3)
    attrs = vertex_attrs[fv]  # (H, W, K, 3, C)
    bary = jnp.where(mask[..., None], fragments.bary, 0.0).astype(attrs.dtype)
    out = jnp.einsum("hwkv,hwkvc->hwkc", bary, attrs)
    return jnp.where(mask[..., None], out, 0.0)


def interpolate_face_attrs(face_vertex_attrs, fragments: Fragments):
    """Interpolate per-face-corner attributes ``(F, 3, C)`` (e.g. UVs via ``face_uvs``).

    Returns ``(H, W, K, C)``, zero where no face is kept.
    """
    check_shape(face_vertex_attrs, "face_vertex_attrs", (None, 3, None))
    mask = fragments.face_idx >= 0
    attrs = face_vertex_attrs[jnp.maximum(fragments.face_idx, 0)]  # (H, W, K, 3, C)
    bary = jnp.where(mask[..., None], fragments.bary, 0.0).astype(attrs.dtype)
    out = jnp.einsum("hwkv,hwkvc->hwkc", bary, attrs)
    return jnp.where(mask[..., None], out, 0.0)

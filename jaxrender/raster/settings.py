"""Rasterization settings and the fragments the rasterizer returns."""
from __future__ import annotations

import math
from typing import Tuple, Union

import equinox as eqx
import jax

Array = jax.Array

NEAR_RULES = ("cull",)

# The GPU selection kernel's defaults for ``pallas_unroll`` / ``pallas_merge``
# (benchmarks/RESULTS.md has the sweeps behind them).
PALLAS_UNROLL = 1
PALLAS_MERGE = False


def _image_size(size) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class RasterSettings(eqx.Module):
    """Static configuration of :func:`jaxrender.rasterize`.

    Every field is static: changing one re-traces, changing the arrays passed
    to ``rasterize`` does not.

    Attributes:
      image_size: ``(H, W)`` in pixels (an int means square).
      faces_per_pixel: ``K``, the number of faces kept per pixel, nearest first.
      blur_radius: reach of a face beyond its edges, as a **squared** distance
        in PyTorch3D's NDC units (the shorter image side spans 2 units), so
        PyTorch3D values carry over. A face is kept at a pixel when the pixel
        is inside it or its squared distance is below ``blur_radius``. For
        SoftRas-style rendering use ``ln(1/eps - 1) * sigma`` (eps = 1e-4).
      bin_size: side of the square screen tiles in pixels used for binning.
        ``None`` picks 8 on the Pallas GPU path (a smaller tile means fewer
        candidates per pixel: on an H200 the selection kernel runs about 2x
        faster at 8 than at 16, benchmarks/RESULTS.md) and, on the XLA path,
        8 for images up to 64 px and 16 above.
      max_faces_per_bin: most candidates a tile may hold. Faces beyond it
        are dropped and counted in ``Fragments.num_overflow``; raise it until
        that count is zero (``Fragments.max_bin_count`` is the capacity that
        would have been enough). ``None``: no per-tile limit (only
        ``max_tile_pairs`` bounds the work).
      backend: the selection pass's implementation: ``None`` / ``"auto"``
        (the Pallas GPU kernel for ``K <= 64`` on a CUDA GPU when Pallas'
        Triton backend is available and the inputs are float32; else XLA), ``"xla"`` (the reference, runs everywhere) or
        ``"pallas"``. Both select the same faces; the differentiable part is
        XLA in both.
      pallas_block, pallas_num_warps: the GPU kernel's candidates between
        two checks of its early exit, and Triton warps per program
        (``None``: one thread per pixel of a tile, two for ``K = 1``, at
        most 4 warps).
      pallas_unroll: candidates the GPU kernel loads and tests per step
        (a power of two, at most ``pallas_block``), their loads issued
        together. ``None``: 1 (on an H200, 4 and 8 were no faster: the
        kernel is not load-latency bound).
      pallas_merge: merge each step's ``pallas_unroll`` candidates into the
        per-pixel lists with a sorting network instead of one insertion
        each (needs ``pallas_unroll <= K``; fewer compare-selects at large
        ``K``, but a longer compile). ``None``: off.
      max_fragments_per_band: the ``render_*`` functions shade and blend
        the image in bands of rows holding at most this many fragments
        (``rows * W * K``), each rematerialized in the backward pass, so the
        memory of forward + backward is bounded by one band instead of the
        whole ``(H, W, K)`` fragment set. ``None``: ``2**18``; ``0``: one band.
      pallas_interpret: run the Pallas kernels in interpret mode (any
        backend; slow; for testing the kernels on the CPU).
      fused: on the Pallas backend, let :func:`jaxrender.render_mesh` (Phong,
        Gouraud and unlit shading of vertex colours; soft or hard blend) and
        :func:`jaxrender.render_silhouette` shade and blend in fused GPU
        kernels with a fused backward pass (``raster/fused.py``) instead of
        XLA's banded path; the results agree to float32 rounding.
      max_tile_pairs: static budget of (face, tile) pairs the binning may
        emit in all: each face emits one pair per tile its bounding box
        (grown by the blur radius) touches. Pairs beyond it are dropped and
        counted in ``Fragments.num_overflow``. Costs ``O(P)`` memory and a
        sort of ``P`` keys. ``None`` picks ``min(F * T, 16 * F + 16 * T)``.
      cull_backfaces: drop faces whose vertices appear clockwise on screen
        (normal pointing away from the camera; see docs/conventions.md).
      near_rule: what happens to faces that cross the near plane. ``"cull"``:
        a face with any vertex closer than ``znear`` is dropped and counted in
        ``Fragments.num_culled`` (no clipping); faces entirely beyond ``zfar``
        are dropped too.
      perspective_correct: perspective-correct barycentrics (``True``) or
        screen-space affine ones (``False``, right for orthographic cameras).
      clip_barycentrics: clamp barycentrics of pixels outside a face to the
        triangle before interpolating (``None``: on when ``blur_radius > 0``,
        as PyTorch3D does).
      bin_chunk: how many tiles the per-pixel pass processes at once (memory
        knob of the XLA path; results do not depend on it). ``None`` picks a
        chunk of about 2M pixel-candidate pairs.
      candidate_block: candidates per tile tested per step of the per-pixel
        pass (``None``: ``max(128, K)``).
    """

    image_size: Tuple[int, int] = eqx.field(static=True, converter=_image_size, default=(256, 256))
    faces_per_pixel: int = eqx.field(static=True, default=1)
    blur_radius: float = eqx.field(static=True, default=0.0)
    bin_size: Union[int, None] = eqx.field(static=True, default=None)
    max_faces_per_bin: Union[int, None] = eqx.field(static=True, default=None)
    cull_backfaces: bool = eqx.field(static=True, default=False)
    near_rule: str = eqx.field(static=True, default="cull")
    perspective_correct: bool = eqx.field(static=True, default=True)
    clip_barycentrics: Union[bool, None] = eqx.field(static=True, default=None)
    bin_chunk: Union[int, None] = eqx.field(static=True, default=None)
    candidate_block: Union[int, None] = eqx.field(static=True, default=None)
    max_tile_pairs: Union[int, None] = eqx.field(static=True, default=None)
    backend: Union[str, None] = eqx.field(static=True, default=None)
    pallas_block: int = eqx.field(static=True, default=32)
    pallas_num_warps: Union[int, None] = eqx.field(static=True, default=None)
    pallas_unroll: Union[int, None] = eqx.field(static=True, default=None)
    pallas_merge: Union[bool, None] = eqx.field(static=True, default=None)
    pallas_interpret: bool = eqx.field(static=True, default=False)
    max_fragments_per_band: Union[int, None] = eqx.field(static=True, default=None)
    fused: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        h, w = self.image_size
        if h <= 0 or w <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if int(self.faces_per_pixel) < 1:
            raise ValueError(f"faces_per_pixel must be >= 1, got {self.faces_per_pixel}")
        if not (self.blur_radius >= 0.0) or math.isinf(self.blur_radius):
            raise ValueError(f"blur_radius must be a finite number >= 0, got {self.blur_radius}")
        if self.bin_size is not None and int(self.bin_size) < 1:
            raise ValueError(f"bin_size must be >= 1 or None, got {self.bin_size}")
        if self.max_faces_per_bin is not None and int(self.max_faces_per_bin) < 1:
            raise ValueError(f"max_faces_per_bin must be >= 1 or None, got {self.max_faces_per_bin}")
        if self.near_rule not in NEAR_RULES:
            raise ValueError(f"near_rule must be one of {NEAR_RULES}, got {self.near_rule!r}")
        if self.backend not in (None, "auto", "xla", "pallas"):
            raise ValueError(f"backend must be None, 'auto', 'xla' or 'pallas', got {self.backend!r}")
        for name in ("bin_chunk", "candidate_block", "max_tile_pairs", "pallas_num_warps"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        u = self.pallas_unroll
        if u is not None and (int(u) < 1 or int(u) & (int(u) - 1) or int(u) > 64):
            raise ValueError(f"pallas_unroll must be a power of two in [1, 64] or None, got {u}")
        if self.pallas_merge and self.resolved_pallas_unroll > int(self.faces_per_pixel):
            raise ValueError(f"pallas_merge needs pallas_unroll <= faces_per_pixel, got pallas_unroll="
                             f"{self.resolved_pallas_unroll} and faces_per_pixel={self.faces_per_pixel}")

    # Resolved values -------------------------------------------------------
    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]

    @property
    def resolved_bin_size(self) -> int:
        if self.bin_size is not None:
            return int(self.bin_size)
        if max(self.image_size) <= 64:
            return 8
        from .pallas_select import resolve_backend  # the GPU kernel's choice, made once per trace

        return 8 if resolve_backend(self.backend, self.faces_per_pixel) == "pallas" else 16

    @property
    def resolved_pallas_num_warps(self) -> int:
        if self.pallas_num_warps is not None:
            return int(self.pallas_num_warps)
        # One thread per pixel (two for K = 1, whose lists are one register
        # pair): the fastest on an H200 at 8-px tiles (benchmarks/RESULTS.md).
        per_thread = 2 if self.faces_per_pixel == 1 else 1
        return max(1, min(4, self.resolved_bin_size ** 2 // (32 * per_thread)))

    @property
    def resolved_pallas_unroll(self) -> int:
        return int(self.pallas_unroll) if self.pallas_unroll is not None else PALLAS_UNROLL

    @property
    def resolved_pallas_merge(self) -> bool:
        return bool(self.pallas_merge) if self.pallas_merge is not None else PALLAS_MERGE

    def resolved_max_faces_per_bin(self, num_faces: int) -> int:
        m = self.max_faces_per_bin if self.max_faces_per_bin is not None else num_faces
        return max(int(m), 1)

    def resolved_max_tile_pairs(self, num_faces: int, num_tiles: int) -> int:
        if self.max_tile_pairs is not None:
            return int(self.max_tile_pairs)
        return max(1, min(num_faces * num_tiles, 16 * num_faces + 16 * num_tiles))

    @property
    def resolved_candidate_block(self) -> int:
        if self.candidate_block is not None:
            return int(self.candidate_block)
        return max(128, int(self.faces_per_pixel))

    def resolved_bin_chunk(self, pixels_per_tile: int, block: int) -> int:
        if self.bin_chunk is not None:
            return int(self.bin_chunk)
        return max(1, (1 << 21) // (pixels_per_tile * block))

    def rows_per_band(self) -> int:
        h, w = self.image_size
        budget = (1 << 18) if self.max_fragments_per_band is None else int(self.max_fragments_per_band)
        if budget <= 0:
            return h
        return max(1, min(h, budget // (w * self.faces_per_pixel)))

    @property
    def resolved_clip_barycentrics(self) -> bool:
        if self.clip_barycentrics is None:
            return self.blur_radius > 0.0
        return bool(self.clip_barycentrics)

    @property
    def ndc_per_pixel(self) -> float:
        """Length of one pixel in PyTorch3D NDC units (shorter side spans 2)."""
        return 2.0 / min(self.image_size)

    @property
    def blur_radius_pixels(self) -> float:
        """The blur radius as a (non-squared) distance in pixels."""
        return math.sqrt(self.blur_radius) / self.ndc_per_pixel


class Fragments(eqx.Module):
    """What the rasterizer keeps per pixel: the ``K`` nearest faces in reach.

    Attributes:
      face_idx: ``(H, W, K)`` int32 face indices sorted by depth (nearest
        first; on an equal depth the face with the nearer nearest vertex,
        then the lower index, first), ``-1`` where fewer than ``K`` faces
        reach the pixel.
      bary: ``(H, W, K, 3)`` barycentric coordinates of the pixel centre with
        respect to each face (perspective-correct when the settings say so,
        clipped to the triangle when ``clip_barycentrics``); ``-1`` where empty.
      depth: ``(H, W, K)`` view depth (camera z) of the face at the pixel;
        ``-1`` where empty.
      dist: ``(H, W, K)`` signed squared distance from the pixel centre to the
        face's projected triangle in PyTorch3D NDC units, negative inside;
        ``-1`` where empty.
      num_overflow: int32 scalar, the number of (face, tile) pairs dropped
        because a tile held more than ``max_faces_per_bin`` candidates. Zero
        means nothing was dropped.
      max_bin_count: int32 scalar, the largest number of candidates any tile
        had; ``max_faces_per_bin`` at least this large avoids overflow.
      num_culled: int32 scalar, faces removed before binning (near/far rule,
        back faces when culling, zero-area faces).
      num_truncated: int32 scalar, the number of pixels that more than ``K``
        faces reach: there only the ``K`` nearest are kept, so the image can
        jump when the depth order of the others changes. Raise
        ``faces_per_pixel`` until it is zero (or small) for smooth soft
        gradients; hard rasterization (``K = 1``) truncates by design.
    """

    face_idx: Array
    bary: Array
    depth: Array
    dist: Array
    num_overflow: Array
    max_bin_count: Array
    num_culled: Array
    num_truncated: Array = None

    @property
    def mask(self) -> Array:
        """``(H, W, K)`` bool, True where a face is kept."""
        return self.face_idx >= 0

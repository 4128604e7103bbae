"""Fused ray marching of voxel volumes on GPUs (Pallas, Triton backend), with an analytic backward pass.

The XLA path of :func:`jaxrender.volume.render_volume` samples every ray at
every depth as array programs: a gather of the 2×2×2 neighbourhoods, the
trilinear blend, cumulative products over the samples, weighted sums, and in
the backward pass a scatter-add of ``8 × C`` values per sample into the
grid. Here one program marches a block of rays (a power of two, 128 by
default; one ray per thread at 4 warps) through all its samples in a
``fori_loop``, every per-ray quantity in registers:

* **forward**: per sample, the voxel coordinates ``u = u_o + t d_vox``, the
  padded-table corner and fractions exactly as ``volume._corner_and_frac``,
  the ``8 × C`` corner values (vector gathers from the flat table), the
  trilinear blend of ``volume._interp_blocks``, and front-to-back
  compositing with the formulas of ``volume._weights_opacity``. Only the
  per-ray outputs reach memory, plus (when differentiated) one float per
  sample and ray: the transmittance in front of the sample.
* **backward** (``jax.custom_vjp``): the samples are visited back to front,
  recomputing each sample's values, so that the part of the ray's output
  that lies *behind* the current sample is a running sum (no division by
  ``1 - α``, no cancellation); with the saved transmittance in front of it
  each sample gets the exact cotangent of its density and features (see
  :func:`_composite_grads` for the formulas). The cotangents are spread on the
  8 corners with the trilinear weights and added atomically into the grid
  (relaxed float atomics). Consecutive samples of a ray mostly fall in the
  same or a neighbouring cell: with ``merge_corners`` each ray keeps the
  running sums of its current cell's 8 corners in registers, carries the
  corners it shares with the next cell over, and adds a corner to memory only
  when the ray leaves it, about halving the atomics. Samples outside the open
  box of the grid (value identically zero) add nothing, as ``drop_start``
  does on the XLA path.

Supported: modes ``"pytorch3d"``, ``"physical"`` and ``"absorption"``,
deterministic or stratified (``key``) depths — the jittered depths are drawn
by XLA exactly as on the XLA path (chunk by chunk when ``chunk_size`` is
given) and read by the kernels — a background colour (added by XLA),
float32 grids with up to :data:`MAX_CHANNELS` table channels (density +
features). Not supported (the XLA path is used under ``backend="auto"``, an
error is raised under ``backend="pallas"``): ``return_weights``, other
dtypes, more channels, tables of ``2**31`` or more values.

Gradients: the kernels give the cotangent of the grid (the padded table).
When the rays, depths, ``near``/``far`` or the grid's ``center`` /
``voxel_size`` are differentiated too (which the custom VJP detects with
symbolic zeros), their cotangents come from the XLA formulation of the same
march (``jax.vjp`` of :func:`march_xla`, the whole batch at once), never
silently zero; the grid's cotangent still comes from the kernel.

``tests/test_volume_pallas.py`` checks outputs and gradients against the XLA
path, in Pallas' interpret mode on the CPU and compiled on a GPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# One guard of Pallas' Triton imports and one warn-once log for all the GPU kernels.
from .raster.pallas_select import _HAVE_PALLAS, _once, _pow2, pallas_available, pl, plgpu  # noqa: F401

__all__ = ["MarchConfig", "march", "march_xla", "resolve_backend", "unsupported_reason", "MAX_CHANNELS",
           "DEFAULT_OPTIONS"]

#: Table channels (1 density + features) the kernels take; each ray holds
#: ``8 × C`` gathered values and, with ``merge_corners``, ``8 × C`` sums.
MAX_CHANNELS = 8

#: Kernel tuning: rays per program (a power of two), Triton warps per
#: program, whether the backward merges the corners consecutive samples
#: share before adding them to memory, and whether a program marches only
#: the samples of its rays that can fall inside the grid.
DEFAULT_OPTIONS = {"block_rays": 128, "num_warps": 4, "merge_corners": True, "clip_to_box": True}

def unsupported_reason(*, mode, dtype, channels, table_size, return_weights) -> Optional[str]:
    """Why the kernels cannot render these options, or ``None`` when they can."""
    if return_weights:
        return "return_weights=True (the kernels never write per-sample weights)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"dtype {jnp.dtype(dtype).name} (the kernels are float32)"
    if channels > MAX_CHANNELS:
        return f"{channels} table channels (density + features; the kernels take at most {MAX_CHANNELS})"
    if table_size >= 2**31:
        return f"a padded table of {table_size} values (int32 offsets)"
    if mode not in ("pytorch3d", "physical", "absorption"):
        return f"mode {mode!r}"
    return None


def resolve_backend(backend, reason: Optional[str], interpret: bool = False) -> str:
    """``"pallas"`` or ``"xla"`` for ``backend`` in (None, "auto", "xla", "pallas").

    ``reason`` is :func:`unsupported_reason`'s answer for the render's
    options. ``auto`` takes the kernels on a GPU (or with ``interpret``)
    whenever they support the options; ``pallas`` raises when they do not.
    """
    if backend in (None, "auto"):
        if reason is None and (interpret or pallas_available()):
            return "pallas"
        if not _HAVE_PALLAS and jax.default_backend() == "gpu":
            _once("jaxrender: Pallas' Triton backend is not importable; using the XLA volume renderer")
        return "xla"
    if backend == "xla":
        return "xla"
    if backend == "pallas":
        if reason is not None:
            raise ValueError(f"backend='pallas': the volume kernels do not support {reason}; use backend='xla' "
                             "or 'auto'")
        if not _HAVE_PALLAS:
            _once("jaxrender: backend='pallas' asked for but Pallas' Triton backend is missing; using XLA")
            return "xla"
        return "pallas"
    raise ValueError(f"backend must be None, 'auto', 'xla' or 'pallas', got {backend!r}")


class MarchConfig(NamedTuple):
    """Static description of one fused march (hashable: a jit / custom_vjp static argument)."""

    mode: str  # "pytorch3d", "physical" or "absorption"
    n_samples: int
    dims: Tuple[int, int, int]  # padded table (D + 2, H + 2, W + 2)
    channels: int  # table channels C = 1 + n_feat
    eps: float
    jitter: bool  # per-ray depths (S, N) instead of shared (S,)
    block_rays: int
    num_warps: int
    merge_corners: bool
    clip_to_box: bool  # march only the block's samples that can lie in the grid's open box
    interpret: bool

    @property
    def n_feat(self) -> int:
        return self.channels - 1

    @property
    def one_eps(self) -> float:
        """``1 + eps`` as the float32 the XLA path computes (1.0 for eps below 2**-24)."""
        return float(np.float32(1.0 + self.eps))

    @property
    def separate_q(self) -> bool:
        """pytorch3d mode: ``Π(1 + eps - α)`` and ``Π(1 - α)`` differ in float32 (both are saved)."""
        return self.mode == "pytorch3d" and self.one_eps != 1.0

    @property
    def skips_empty(self) -> bool:
        """Whether samples outside the open box may be skipped: they change nothing only when
        ``1 + eps`` is exactly 1 in float32 (pytorch3d mode), as it is for the default eps."""
        return self.clip_to_box and self.n_samples > 1 and not self.separate_q

    @property
    def n_out(self) -> int:
        """Per-ray outputs: ``rgb`` channels, opacity, depth (opacity only for absorption)."""
        return 1 if self.mode == "absorption" else self.n_feat + 2

    @property
    def n_res(self) -> int:
        """Per-sample floats saved for the backward pass."""
        return 2 if self.separate_q else 1


# --------------------------------------------------------------------------------------
# Per-ray arithmetic on tuples of vectors (also valid on plain JAX arrays)
# --------------------------------------------------------------------------------------


def _axis(c, n):
    """``volume._corner_and_frac`` on one axis: padded-table start, fraction, inside the open box."""
    p = jnp.clip(c + 1.0, 0.0, float(n + 1))
    i0 = jnp.clip(jnp.floor(p), 0.0, float(n))
    return i0.astype(jnp.int32), p - i0, (c > -1.0) & (c < float(n))


def _corner_offsets(cfg: MarchConfig):
    """Flat offsets of the 8 corners, slot ``s = 4 dz + 2 dy + dx``."""
    _, h2, w2 = cfg.dims
    C = cfg.channels
    return tuple(((s >> 2) & 1) * h2 * w2 * C + ((s >> 1) & 1) * w2 * C + (s & 1) * C for s in range(8))


def _lerp(a, b, f):
    return a + f * (b - a)


def _sample(cfg: MarchConfig, tab_ref, o, d, t):
    """One sample of every ray: its table channels and its cell.

    Returns ``(vals, (iz, iy, ix), (fx, fy, fz), inside)``: the ``C``
    trilinearly interpolated values, the padded-table start (z, y, x), the
    fractions (x, y, z) and whether the point lies in the open box where the
    field can be nonzero.
    """
    d2, h2, w2 = cfg.dims
    C = cfg.channels
    ix, fx, in_x = _axis(o[0] + t * d[0], w2 - 2)
    iy, fy, in_y = _axis(o[1] + t * d[1], h2 - 2)
    iz, fz, in_z = _axis(o[2] + t * d[2], d2 - 2)
    base = ((iz * h2 + iy) * w2 + ix) * C
    offs = _corner_offsets(cfg)
    vals = []
    for ch in range(C):
        b = [tab_ref[base + (offs[s] + ch)] for s in range(8)]
        c00 = _lerp(b[0], b[1], fx)
        c01 = _lerp(b[2], b[3], fx)
        c10 = _lerp(b[4], b[5], fx)
        c11 = _lerp(b[6], b[7], fx)
        vals.append(_lerp(_lerp(c00, c01, fy), _lerp(c10, c11, fy), fz))
    return tuple(vals), (iz, iy, ix), (fx, fy, fz), in_x & in_y & in_z


def _depth(cfg: MarchConfig, t_ref, k):
    return t_ref[k, :] if cfg.jitter else t_ref[k]


def _composite_step(cfg: MarchConfig, st, vals, t, delta):
    """Front-to-back compositing of one sample (``volume._weights_opacity``).

    ``st`` holds, for pytorch3d: ``T = Π_{j<i}(1 + eps - α_j)``, ``Q = Π_{j<i}
    (1 - α_j)``; physical: ``acc = Σ_{j<=i} τ_j`` (after the step); absorption:
    ``Q``; and the running ``rgb`` (n_feat) and ``depth`` sums. Returns the new
    state and what the backward pass needs saved for this sample.
    """
    a = vals[0]
    if cfg.mode == "absorption":
        return dict(st, Q=st["Q"] * (1.0 - a)), (st["Q"],)
    if cfg.mode == "pytorch3d":
        w = a * st["T"]
        saved = (st["T"], st["Q"]) if cfg.separate_q else (st["T"],)
        new = dict(st, T=st["T"] * (cfg.one_eps - a), Q=st["Q"] * (1.0 - a))
    else:
        tau = a * delta
        acc = st["acc"] + tau
        w = -jnp.expm1(-tau) * jnp.exp(-(acc - tau))
        saved = (acc,)
        new = dict(st, acc=acc)
    new["rgb"] = tuple(r + w * v for r, v in zip(st["rgb"], vals[1:]))
    new["depth"] = st["depth"] + w * t
    return new, saved


def _composite_init(cfg: MarchConfig, zero):
    one = zero + 1.0
    if cfg.mode == "absorption":
        return dict(Q=one)
    st = dict(rgb=tuple(zero for _ in range(cfg.n_feat)), depth=zero)
    if cfg.mode == "pytorch3d":
        st.update(T=one, Q=one)
    else:
        st.update(acc=zero)
    return st


def _composite_outputs(cfg: MarchConfig, st):
    if cfg.mode == "absorption":
        return (1.0 - st["Q"],)
    opacity = 1.0 - st["Q"] if cfg.mode == "pytorch3d" else -jnp.expm1(-st["acc"])
    return tuple(st["rgb"]) + (opacity, st["depth"])


def _composite_grads(cfg: MarchConfig, bst, vals, t, delta, saved, g):
    """Cotangents of one sample's ``C`` values, visiting the samples back to front.

    With per-ray output cotangents ``G_c`` (rgb), ``G_o`` (opacity), ``G_d``
    (depth), the loss is ``L = Σ_i w_i e_i + G_o · opacity`` with the
    sample's emission ``e_i = Σ_c G_c c_ic + G_d t_i``. ``bst["R"]`` is the
    part of ``Σ w e`` behind sample ``k`` as seen from just behind it, built
    back to front without division.

    * pytorch3d (``w_i = α_i T_i``, ``T_i = Π_{j<i}(1 + ε - α_j)``,
      ``opacity = 1 - Π(1 - α)``): ``R_{k-1} = α_k e_k + (1 + ε - α_k) R_k``,
      ``∂L/∂α_k = T_k (e_k - R_k) + G_o Q_k U_k`` with ``Q_k = Π_{j<k}(1 -
      α_j)`` (saved) and ``U_k = Π_{j>k}(1 - α_j)`` (running);
      ``∂L/∂c_kc = w_k G_c``.
    * physical (``τ_i = σ_i δ_i``, ``w_i = (1 - e^{-τ_i}) T_i``, ``T_i =
      e^{-Σ_{j<i} τ_j}``): ``R_{k-1} = α_k e_k + e^{-τ_k} R_k``,
      ``∂L/∂σ_k = δ_k [T_{k+1} (e_k - R_k) + G_o T_S]``, ``T_S = 1 -
      opacity``; ``∂L/∂c_kc = w_k G_c``.
    * absorption: ``∂L/∂α_k = G_o Q_k U_k``.

    ``g`` = ``(G_rgb tuple or None, G_o or None, G_d or None)`` (``None``: a
    symbolic zero). Returns the new state and the ``C`` cotangents.
    """
    g_rgb, g_o, g_d = g
    a = vals[0]
    zero = jnp.zeros_like(a)
    if cfg.mode == "absorption":
        q = saved[0]
        ga = g_o * q * bst["U"] if g_o is not None else zero
        return dict(bst, U=bst["U"] * (1.0 - a)), (ga,)
    e = zero
    if g_rgb is not None:
        for gc, v in zip(g_rgb, vals[1:]):
            e = e + gc * v
    if g_d is not None:
        e = e + g_d * t
    R = bst["R"]
    if cfg.mode == "pytorch3d":
        T = saved[0]
        Q = saved[1] if cfg.separate_q else T
        w = a * T
        ga = T * (e - R)
        if g_o is not None:
            ga = ga + g_o * Q * bst["U"]
        new = dict(bst, R=a * e + (cfg.one_eps - a) * R, U=bst["U"] * (1.0 - a))
    else:
        acc = saved[0]
        tau = a * delta
        alpha = -jnp.expm1(-tau)
        w = alpha * jnp.exp(-(acc - tau))
        gt = jnp.exp(-acc) * (e - R)
        if g_o is not None:
            gt = gt + g_o * bst["T_end"]
        ga = gt * delta
        new = dict(bst, R=alpha * e + jnp.exp(-tau) * R)
    gf = tuple(w * gc for gc in g_rgb) if g_rgb is not None else tuple(zero for _ in range(cfg.n_feat))
    return new, (ga,) + gf


def _corner_weights(frac):
    fx, fy, fz = frac
    wx, wy, wz = (1.0 - fx, fx), (1.0 - fy, fy), (1.0 - fz, fz)
    wzy = [wz[a] * wy[b] for a in range(2) for b in range(2)]
    return tuple(wzy[s >> 1] * wx[s & 1] for s in range(8))


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


def _ray_refs(refs):
    ox, oy, oz, dx, dy, dz, dn = refs
    return (ox[...], oy[...], oz[...]), (dx[...], dy[...], dz[...]), dn[...]


def _block_range(cfg: MarchConfig, prm_ref, o, d):
    """First and last sample index that a ray of the block may have inside the open box.

    Samples outside it read exactly zero and change no output (see
    ``MarchConfig.skips_empty``), so a program may skip them. Per ray the
    depth interval inside the box ``(-1, size)`` on every axis is turned into
    sample indices with a margin (jittered depths lie within half a step of
    the grid depths); rays that miss give an empty range, rays with NaNs the
    full range.
    """
    S = cfg.n_samples
    if not cfg.skips_empty:
        return 0, S - 1
    near, far = prm_ref[0], prm_ref[1]
    step = (far - near) / float(S - 1)
    d2, h2, w2 = cfg.dims
    t_in = t_out = bad = None
    for oa, da, n in zip(o, d, (w2 - 2, h2 - 2, d2 - 2)):
        nz = da != 0.0
        safe = jnp.where(nz, da, 1.0)
        t1 = (-1.0 - oa) / safe
        t2 = (float(n) - oa) / safe
        inside = (oa > -1.0) & (oa < float(n))
        lo = jnp.where(nz, jnp.minimum(t1, t2), jnp.where(inside, -jnp.inf, jnp.inf))
        hi = jnp.where(nz, jnp.maximum(t1, t2), jnp.where(inside, jnp.inf, -jnp.inf))
        nan = jnp.isnan(oa) | jnp.isnan(da)
        t_in = lo if t_in is None else jnp.maximum(t_in, lo)
        t_out = hi if t_out is None else jnp.minimum(t_out, hi)
        bad = nan if bad is None else bad | nan
    hit = t_in <= t_out
    last = float(S - 1)
    k0 = jnp.clip(jnp.floor((t_in - near) / step - 0.5) - 1.0, 0.0, last)
    k1 = jnp.clip(jnp.ceil((t_out - near) / step + 0.5) + 1.0, 0.0, last)
    k0 = jnp.where(bad, 0.0, jnp.where(hit, k0, float(S)))
    k1 = jnp.where(bad, last, jnp.where(hit, k1, -1.0))
    return jnp.min(k0).astype(jnp.int32), jnp.max(k1).astype(jnp.int32)


def _forward_kernel(*refs, cfg: MarchConfig, save: bool):
    tab_ref = refs[0]
    o, d, dn = _ray_refs(refs[1:8])
    t_ref, dl_ref, prm_ref = refs[8], refs[9], refs[10]
    out_refs = refs[11:11 + cfg.n_out]
    res_refs = refs[11 + cfg.n_out:]
    zero = jnp.zeros_like(dn)
    k_lo, k_hi = _block_range(cfg, prm_ref, o, d)

    def body(k, st):
        t = _depth(cfg, t_ref, k)
        vals, _, _, _ = _sample(cfg, tab_ref, o, d, t)
        delta = dl_ref[k] * dn if cfg.mode == "physical" else None
        st, saved = _composite_step(cfg, st, vals, t, delta)
        if save:
            for r, v in zip(res_refs, saved):
                r[k, :] = v
        return st

    st = jax.lax.fori_loop(k_lo, k_hi + 1, body, _composite_init(cfg, zero))
    for r, v in zip(out_refs, _composite_outputs(cfg, st)):
        r[...] = v


def _add(cfg: MarchConfig, gtab_ref, adds):
    """``gtab[idx] += val`` where ``mask``, for each ``(idx, val, mask)`` in ``adds``, atomically."""
    if cfg.interpret:
        # Interpret mode's atomics drop repeated indices: one scatter-add
        # instead (one op, not one per corner: XLA compiles it much faster).
        idx = jnp.concatenate([a[0] for a in adds])
        val = jnp.concatenate([jnp.where(a[2], a[1], 0.0) for a in adds])
        gtab_ref[...] = gtab_ref[...].at[idx].add(val)
        return
    from jaxrender.raster._atomics import atomic_add_relaxed

    for idx, val, mask in adds:
        atomic_add_relaxed(gtab_ref, idx, val, mask=mask)


def _shift(acc, m, bit):
    """Re-index the 8 corner sums after the cell moved by ``m`` along the axis of slot bit ``bit``.

    New slot ``s`` takes old slot ``s + m`` along that axis when it exists, else 0.
    """
    out = list(acc)
    for s in range(8):
        if s & bit:
            continue
        lo, hi = acc[s], acc[s | bit]
        out[s] = tuple(jnp.where(m == 0, a, jnp.where(m == 1, b, 0.0)) for a, b in zip(lo, hi))
        out[s | bit] = tuple(jnp.where(m == 0, b, jnp.where(m == -1, a, 0.0)) for a, b in zip(lo, hi))
    return out


def _backward_kernel(*refs, cfg: MarchConfig, cts: Tuple[bool, bool, bool]):
    tab_ref = refs[0]
    o, d, dn = _ray_refs(refs[1:8])
    t_ref, dl_ref, prm_ref = refs[8], refs[9], refs[10]
    pos = 11
    res_refs = refs[pos:pos + cfg.n_res]
    pos += cfg.n_res
    has_rgb, has_o, has_d = cts
    g_rgb = None
    if has_rgb:
        g_rgb = tuple(r[...] for r in refs[pos:pos + cfg.n_feat])
        pos += cfg.n_feat
    g_o = refs[pos][...] if has_o else None
    pos += int(has_o)
    g_d = refs[pos][...] if has_d else None
    pos += int(has_d)
    gtab_ref = refs[pos + 1]  # refs[pos] is the aliased input (the zeros the adds go into)
    g = (g_rgb, g_o, g_d)
    C = cfg.channels
    d2, h2, w2 = cfg.dims
    offs = _corner_offsets(cfg)
    zero = jnp.zeros_like(dn)
    izero = jnp.zeros(dn.shape, jnp.int32)

    k_lo, k_hi = _block_range(cfg, prm_ref, o, d)
    bst = {}
    if cfg.mode in ("pytorch3d", "absorption"):
        bst["U"] = zero + 1.0
    if cfg.mode != "absorption":
        bst["R"] = zero
    if cfg.mode == "physical":
        # acc after the block's last marched sample is the ray's total (the rest add 0).
        bst["T_end"] = jnp.exp(-res_refs[0][jnp.maximum(k_hi, 0), :])

    def flat(start):
        iz, iy, ix = start
        return ((iz * h2 + iy) * w2 + ix) * C

    def body(j, carry):
        bst, cell, acc = carry
        k = k_hi - j
        t = _depth(cfg, t_ref, k)
        vals, start, frac, inside = _sample(cfg, tab_ref, o, d, t)
        delta = dl_ref[k] * dn if cfg.mode == "physical" else None
        saved = tuple(r[k, :] for r in res_refs)
        bst, gv = _composite_grads(cfg, bst, vals, t, delta, saved, g)
        gv = tuple(jnp.where(inside, x, 0.0) for x in gv)
        w = _corner_weights(frac)
        if not cfg.merge_corners:
            base = flat(start)
            adds = []
            for s in range(8):
                for ch in range(C):
                    val = gv[ch] * w[s]
                    adds.append((base + (offs[s] + ch), val, val != 0.0))
            _add(cfg, gtab_ref, adds)
            return bst, cell, acc
        # The ray's cell moved by m (per axis) since the previous sample: add
        # to memory the corners it left, keep the sums of the shared ones.
        m = tuple(a - b for a, b in zip(start, cell))  # (z, y, x)
        keep_lo = tuple((mi == 0) | (mi == -1) for mi in m)
        keep_hi = tuple((mi == 0) | (mi == 1) for mi in m)
        old = flat(cell)
        adds = []
        for s in range(8):
            bits = ((s >> 2) & 1, (s >> 1) & 1, s & 1)  # (z, y, x)
            stay = None
            for ax, b in enumerate(bits):
                ok = keep_hi[ax] if b else keep_lo[ax]
                stay = ok if stay is None else stay & ok
            for ch in range(C):
                val = acc[s][ch]
                adds.append((old + (offs[s] + ch), val, jnp.logical_not(stay) & (val != 0.0)))
        _add(cfg, gtab_ref, adds)
        acc = _shift(acc, m[2], 1)
        acc = _shift(acc, m[1], 2)
        acc = _shift(acc, m[0], 4)
        acc = [tuple(acc[s][ch] + gv[ch] * w[s] for ch in range(C)) for s in range(8)]
        return bst, start, acc

    # Without merging, the cell and the corner sums are empty carries.
    acc0 = [tuple(zero for _ in range(C)) for _ in range(8)] if cfg.merge_corners else []
    cell0 = (izero, izero, izero) if cfg.merge_corners else ()
    _, cell, acc = jax.lax.fori_loop(0, k_hi - k_lo + 1, body, (bst, cell0, acc0))
    if cfg.merge_corners:
        last = flat(cell)
        _add(cfg, gtab_ref, [(last + (offs[s] + ch), acc[s][ch], acc[s][ch] != 0.0)
                             for s in range(8) for ch in range(C)])


def _compiler_params(cfg: MarchConfig):
    return None if cfg.interpret else plgpu.CompilerParams(num_warps=cfg.num_warps)


def _ray_specs(cfg: MarchConfig):
    R = cfg.block_rays
    ray = pl.BlockSpec((R,), lambda i: (i,))
    per_sample = pl.BlockSpec((cfg.n_samples, R), lambda i: (0, i))
    t_spec = per_sample if cfg.jitter else pl.no_block_spec
    return ray, per_sample, [ray] * 7 + [t_spec, pl.no_block_spec, pl.no_block_spec]


def _forward_call(cfg: MarchConfig, table, rays, t, dl, prm, save: bool):
    n = rays[0].shape[0]
    ray, per_sample, in_specs = _ray_specs(cfg)
    out_shape = [jax.ShapeDtypeStruct((n,), jnp.float32)] * cfg.n_out
    out_specs = [ray] * cfg.n_out
    if save:
        out_shape += [jax.ShapeDtypeStruct((cfg.n_samples, n), jnp.float32)] * cfg.n_res
        out_specs += [per_sample] * cfg.n_res
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, save=save),
        grid=(n // cfg.block_rays,),
        in_specs=[pl.no_block_spec] + in_specs,
        out_specs=tuple(out_specs),
        out_shape=tuple(out_shape),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="jaxrender_volume_forward",
    )(table, *rays, t, dl, prm)
    return tuple(outs[:cfg.n_out]), tuple(outs[cfg.n_out:])


def _backward_call(cfg: MarchConfig, table, rays, t, dl, prm, res, g):
    n = rays[0].shape[0]
    ray, per_sample, in_specs = _ray_specs(cfg)
    g_rgb, g_o, g_d = g
    g_args = list(g_rgb or ()) + [x for x in (g_o, g_d) if x is not None]
    cts = (g_rgb is not None, g_o is not None, g_d is not None)
    args = [table, *rays, t, dl, prm, *res, *g_args, jnp.zeros_like(table)]
    specs = [pl.no_block_spec] + in_specs + [per_sample] * len(res) + [ray] * len(g_args) + [pl.no_block_spec]
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg, cts=cts),
        grid=(n // cfg.block_rays,),
        in_specs=specs,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(table.shape, jnp.float32),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="jaxrender_volume_backward",
    )(*args)


# --------------------------------------------------------------------------------------
# The XLA formulation (for the cotangents of the rays and depths)
# --------------------------------------------------------------------------------------


def march_xla(cfg: MarchConfig, table, rays, t, dl):
    """The march of the kernels written with ``jaxrender.volume``'s XLA helpers.

    Same arguments and outputs as :func:`march` (all rays at once, no
    chunking); differentiable w.r.t. everything. :func:`march` uses its VJP
    for the cotangents of the rays and depths.
    """
    from jaxrender.volume import _sample_padded, _weights_opacity

    tab = table.reshape(cfg.dims + (cfg.channels,))
    ox, oy, oz, dx, dy, dz, dn = rays
    o_vox = jnp.stack([ox, oy, oz], -1)
    d_vox = jnp.stack([dx, dy, dz], -1)
    tt = t if cfg.jitter else jnp.broadcast_to(t[:, None], (cfg.n_samples, ox.shape[0]))
    coords = o_vox[None] + tt[..., None] * d_vox[None]
    vals = _sample_padded(tab, coords.reshape(-1, 3)).reshape(cfg.n_samples, -1, cfg.channels)
    dens = vals[..., 0]
    if cfg.mode == "absorption":
        return (1 - jnp.prod(1 - dens, axis=0),)
    deltas = dl[:, None] * dn[None, :] if cfg.mode == "physical" else None
    weights, opacity = _weights_opacity(dens, deltas, cfg.mode, cfg.eps, axis=0)
    rgb = tuple(jnp.sum(weights * vals[..., 1 + c], 0) for c in range(cfg.n_feat))
    return rgb + (opacity, jnp.sum(weights * tt, 0))


# --------------------------------------------------------------------------------------
# The differentiable march
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _march(cfg, table, rays, t, dl, prm):
    return _forward_call(cfg, table, rays, t, dl, prm, save=False)[0]


def _value(x):
    return x.value


def _march_fwd(cfg, table, rays, t, dl, prm):
    table_p = table.perturbed
    others_p = any(x.perturbed for x in jax.tree.leaves((rays, t, dl)))
    table, rays, t, dl, prm = jax.tree.map(_value, (table, rays, t, dl, prm))
    outs, res = _forward_call(cfg, table, rays, t, dl, prm, save=table_p)
    # Which inputs are differentiated is static: it is kept in the residuals'
    # structure (None vs arrays), which custom_vjp carries to the backward pass.
    return outs, (table, rays, t, dl, prm, res if table_p else None, () if others_p else None)


def _is_zero(x):
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


def _march_bwd(cfg, residuals, cts):
    table, rays, t, dl, prm, res, others = residuals
    cts = tuple(None if _is_zero(c) else c for c in cts)
    if cfg.mode == "absorption":
        g = (None, cts[0], None)
    else:
        g_rgb = cts[:cfg.n_feat]
        g_rgb = None if cfg.n_feat == 0 or all(c is None for c in g_rgb) else tuple(
            jnp.zeros_like(rays[0]) if c is None else c for c in g_rgb)
        g = (g_rgb, cts[cfg.n_feat], cts[cfg.n_feat + 1])
    g_table = None
    if res is not None:
        if all(x is None for x in (g[0], g[1], g[2])):
            g_table = jnp.zeros_like(table)
        else:
            g_table = _backward_call(cfg, table, rays, t, dl, prm, res, g)
    g_rays = g_t = g_dl = None
    if others is not None:
        full = tuple(jnp.zeros_like(rays[0]) if c is None else c for c in cts)
        _, vjp = jax.vjp(lambda r, t_, dl_: march_xla(cfg, table, r, t_, dl_), rays, t, dl)
        g_rays, g_t, g_dl = vjp(full)
    # prm (near, far) only bounds the samples marched: an integer decision, no gradient.
    return g_table, g_rays, g_t, g_dl, None


_march.defvjp(_march_fwd, _march_bwd, symbolic_zeros=True)


def march(cfg: MarchConfig, table, rays, t, dl, near, far):
    """March rays through a zero-padded voxel table in the fused kernels.

    Args:
      cfg: the static :class:`MarchConfig` (``block_rays`` divides the ray count).
      table: flat float32 ``(D + 2) (H + 2) (W + 2) C`` zero-padded table
        (``volume._pad_table`` of density then features), ``cfg.dims`` its
        first three axes.
      rays: seven float32 ``(N,)`` arrays: the voxel-space origin ``u_o`` (x,
        y, z), the voxel-space direction ``d_vox`` (x, y, z) and the world
        length of the direction per unit depth.
      t: ``(S,)`` depths shared by all rays, or ``(S, N)`` per-ray depths when
        ``cfg.jitter``.
      dl: ``(S,)`` stratum lengths in depth units (read in physical mode only).
      near, far: the depth range the depths were drawn in (with
        ``cfg.clip_to_box``, bounds which samples a program marches).

    Returns:
      tuple of ``(N,)`` arrays: the ``n_feat`` rgb channels, opacity and
      expected depth (opacity only in absorption mode). Differentiable w.r.t.
      ``table`` (kernels) and the other inputs (XLA, see the module docstring).
    """
    prm = jax.lax.stop_gradient(jnp.stack([jnp.asarray(near, jnp.float32), jnp.asarray(far, jnp.float32)]))
    return _march(cfg, table, rays, t, dl, prm)

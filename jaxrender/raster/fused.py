"""Fused shading and blending on GPUs (Pallas, Triton backend), with a fused backward pass.

The XLA render path recomputes, shades and blends the ``(H, W, K)``
fragments as array programs, in bands of rows that are rematerialized in the
backward pass; the backward ends in a scatter-add of one row per fragment.
Here the same arithmetic runs in two kernels over the selection kernel's
per-tile face lists, one program per screen tile, every value of a pixel in
its thread's registers:

* **forward**: for each of a pixel's ``K`` faces, gather the face's packed
  corner data (screen position and vertex attributes), recompute its
  barycentrics, depth and signed distance (``geometry_core``, shared with
  the selection), interpolate the attributes, shade, then blend the ``K``
  fragments (PyTorch3D's softmax blend, the hard blend, or the sigmoid
  silhouette). Only the ``(H, W, C)`` image reaches memory.
* **backward**: the blend's per-pixel statistics saved by the forward (9
  floats per pixel: transmittance, softmax sums, depth maximum), then per
  fragment the recomputed fragment, the blend's analytic cotangents and the
  cotangent of its face's packed corner data (``jax.vjp`` of the fragment
  function, traced inside the kernel), added atomically into an
  ``(F, 3 * (3 + C))`` table that XLA carries back to the vertices (in
  copies, one per pixel residue, summed by XLA, when faces are large on
  screen: ``gradient_table_copies``).
  Fragments whose cotangents are all zero — hidden behind an opaque face,
  or (soft blend) with a softmax weight below ``1e-8`` of the pixel's — add
  nothing, and a slot with no live fragment in the tile skips the VJP and
  the scatter. Gradients w.r.t. the shading and blending parameters
  (lights, material, eye, sigma, gamma, background, znear / zfar) are
  summed per tile.

The arithmetic is the XLA path's, written on tuples of per-pixel vectors
(Triton blocks have power-of-two shapes, so there are no ``(..., 3)``
arrays here); ``tests/test_fused.py`` checks images and gradients against
the XLA path, in interpret mode on the CPU and compiled on a GPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from ._atomics import atomic_add_relaxed
from .pallas_select import _pow2
from .rasterize import geometry_core

try:  # Pallas' Triton backend is deprecated upstream; guard every import.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
except Exception:  # noqa: BLE001
    pl = plgpu = None

_EPS = 1e-10  # blend.py's (PyTorch3D's) blending epsilon
_COLD = 1e-8  # relative softmax weight below which a fragment's blend cotangents are dropped (backward)
# Copies of the backward's gradient table: pixel p of a tile adds into copy
# p % ATOMIC_REPLICAS, so neighbouring pixels on the same face (the same
# address) do not queue on one atomic unit; XLA sums the copies. Only for
# meshes whose faces are large on screen (at least
# COPIES_MIN_PIXELS_PER_FACE image pixels per face): on an H200 that takes
# small_256_b32 soft RGB from 4.00 to 3.56 ms fwd+bwd, while at face_512_b8
# (2.5 pixels per face) it changes nothing but the memory (641 -> 1123 MiB).
ATOMIC_REPLICAS = 4
COPIES_MIN_PIXELS_PER_FACE = 8


def gradient_table_copies(num_faces: int, image_size) -> int:
    """How many copies of the fused backward's gradient table to use (see ``ATOMIC_REPLICAS``)."""
    h, w = image_size
    return ATOMIC_REPLICAS if h * w >= COPIES_MIN_PIXELS_PER_FACE * max(int(num_faces), 1) else 1


SHADINGS = ("phong", "gouraud", "unlit")


class Config(NamedTuple):
    """Static description of one fused render (hashable: a jit/custom_vjp static argument)."""

    mode: str  # "soft" (softmax RGB blend), "hard" (nearest fragment) or "silhouette"
    shading: str  # "phong", "gouraud", "unlit" or "none" (silhouette)
    point_lights: Tuple[bool, ...]  # phong: per non-ambient light, point (True) or directional
    has_albedo: bool
    n_attr: int  # interpolated attributes per vertex
    n_shade: int  # shading parameters (see shading_params)
    n_blend: int  # blend parameters (see blend_params)
    image_size: Tuple[int, int]
    bin_size: int
    faces_per_pixel: int
    slots: int  # K rounded up to a power of two (the selection's list length)
    geo: Tuple[Tuple[str, object], ...]  # geometry_core's keyword arguments
    num_warps: int
    interpret: bool
    replicas: int = 1  # copies of the backward's gradient table (gradient_table_copies)

    @property
    def corner_width(self) -> int:
        return 3 + self.n_attr

    @property
    def n_corner(self) -> int:  # packed values per face
        return 3 * (3 + self.n_attr)

    @property
    def n_out(self) -> int:
        return 1 if self.mode == "silhouette" else 4

    @property
    def grid(self):
        h, w = self.image_size
        bs = self.bin_size
        return -(-h // bs), -(-w // bs)

    @property
    def used_slots(self) -> int:
        return 1 if self.mode == "hard" else self.faces_per_pixel


# --------------------------------------------------------------------------------------
# Per-pixel arithmetic on tuples of vectors (also valid on plain JAX arrays)
# --------------------------------------------------------------------------------------


def _normalize3(v):
    """``v / max(|v|, 1e-6)`` (lighting.safe_normalize) for a 3-tuple."""
    s = jnp.sqrt(jnp.maximum(v[0] * v[0] + v[1] * v[1] + v[2] * v[2], 1e-12))
    return tuple(x / s for x in v)


def _dot3(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _safe_pow(x, p):
    pos = x > 0
    return jnp.where(pos, jnp.exp(p * jnp.log(jnp.where(pos, x, 1.0))), 0.0)


def shade(cfg: Config, attrs, sp, one):
    """Colour ``(r, g, b)`` of interpolated ``attrs`` with shading parameters ``sp``.

    The layouts are those of ``render._vertex_attributes`` and
    :func:`shading_params`; ``one`` is a vector of ones (the white albedo).
    """
    albedo = tuple(attrs[-3:]) if cfg.has_albedo else (one, one, one)
    if cfg.shading == "unlit":
        return albedo
    if cfg.shading == "gouraud":  # attrs: light (3), specular (3) [, albedo (3)]
        return tuple(albedo[c] * attrs[c] + attrs[3 + c] for c in range(3))
    # phong: attrs = points (3), normals (3) [, albedo (3)];
    # sp = eye (3), ambient (3), per light (anchor (3), diffuse (3), specular (3)), shininess.
    p, n = attrs[0:3], _normalize3(attrs[3:6])
    v = _normalize3(tuple(sp[c] - p[c] for c in range(3)))
    diffuse, specular = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    for i, is_point in enumerate(cfg.point_lights):
        o = 6 + 9 * i
        anchor = sp[o:o + 3]
        l = _normalize3(tuple(anchor[c] - p[c] for c in range(3)) if is_point else tuple(anchor))
        cos = _dot3(n, l)
        r = tuple(2.0 * cos * n[c] - l[c] for c in range(3))
        alpha = jnp.where(cos > 0, jnp.maximum(_dot3(v, r), 0.0), 0.0)
        power = _safe_pow(alpha, sp[-1])
        lit = jnp.maximum(cos, 0.0)
        for c in range(3):
            diffuse[c] = diffuse[c] + sp[o + 3 + c] * lit
            specular[c] = specular[c] + sp[o + 6 + c] * power
    return tuple((sp[3 + c] + diffuse[c]) * albedo[c] + specular[c] for c in range(3))


def fragment(cfg: Config, corners, px, py, sp, one):
    """``(dist, depth, colour)`` of one face at pixels ``(px, py)`` from its packed corner data."""
    cw = cfg.corner_width
    x0, y0, z0 = corners[0:3]
    x1, y1, z1 = corners[cw:cw + 3]
    x2, y2, z2 = corners[2 * cw:2 * cw + 3]
    b0, b1, b2, depth, dist, _ = geometry_core(x0, y0, z0, x1, y1, z1, x2, y2, z2, px, py, **dict(cfg.geo))
    if cfg.mode == "silhouette":
        return dist, depth, ()
    attrs = tuple(b0 * corners[3 + j] + b1 * corners[cw + 3 + j] + b2 * corners[2 * cw + 3 + j]
                  for j in range(cfg.n_attr))
    return dist, depth, shade(cfg, attrs, sp, one)


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def shading_params(shading, lights, material, eye):
    """``(point_lights, flat parameters)`` for :func:`shade`, or ``None`` if unsupported.

    Phong: ``eye (3), material.ambient * sum(ambient colours) (3)``, then per
    point / directional light ``anchor (3), material.diffuse * colour (3),
    material.specular * specular colour (3)``, then the shininess.
    """
    from ..lighting import AmbientLight, DirectionalLight, Material, PointLight

    if shading != "phong":
        return (), jnp.zeros((0,), jnp.float32)
    material = Material() if material is None else material
    if isinstance(lights, (AmbientLight, DirectionalLight, PointLight)):
        lights = (lights,)
    if not isinstance(lights, (tuple, list)) or not isinstance(material, Material):
        return None
    ambient = jnp.zeros((3,), jnp.float32)
    kinds, parts = [], []
    for light in lights:
        if isinstance(light, AmbientLight):
            ambient = ambient + light.color
            continue
        if not isinstance(light, (DirectionalLight, PointLight)):
            return None
        is_point = isinstance(light, PointLight)
        anchor = (light.position if is_point else light.direction).reshape(-1, 3)
        n = anchor.shape[0]
        color = jnp.broadcast_to(light.color, (n, 3)) * material.diffuse
        spec = jnp.broadcast_to(light.specular_color, (n, 3)) * material.specular
        parts.append(jnp.concatenate([anchor, color, spec], axis=-1).reshape(-1))
        kinds += [is_point] * n
    flat = jnp.concatenate([jnp.asarray(eye, jnp.float32).reshape(3), (material.ambient * ambient).reshape(3)]
                           + parts + [jnp.reshape(material.shininess, (1,))]).astype(jnp.float32)
    return tuple(kinds), flat


def blend_params(mode, sigma=None, gamma=None, znear=None, zfar=None, background=None):
    """The flat blend parameters :func:`blend` reads for ``mode``."""
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    if mode == "hard":
        return jnp.broadcast_to(f32(background), (3,))
    if mode == "silhouette":
        return jnp.reshape(f32(sigma), (1,))
    return jnp.concatenate([jnp.stack([f32(sigma).reshape(()), f32(gamma).reshape(()), f32(znear).reshape(()),
                                       f32(zfar).reshape(())]), jnp.broadcast_to(f32(background), (3,))])


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


def _pixels(cfg: Config):
    t = pl.program_id(0)
    bs = cfg.bin_size
    nbx = cfg.grid[1]
    pix = jnp.arange(bs * bs, dtype=jnp.int32)
    ix = (t % nbx) * bs + pix % bs
    iy = (t // nbx) * bs + pix // bs
    inside = (ix < cfg.image_size[1]) & (iy < cfg.image_size[0])
    return ix.astype(jnp.float32) + 0.5, iy.astype(jnp.float32) + 0.5, inside


def _slot(cfg: Config, lists_ref, tab_ref, s):
    """Slot ``s`` of every pixel's list: ``(mask, flat table offset, packed corner data)``."""
    f = lists_ref[0, s, :]
    base = jnp.maximum(f, 0) * cfg.n_corner
    return f >= 0, base, tuple(tab_ref[base + c] for c in range(cfg.n_corner))


def _blend_stats(cfg: Config, lists_ref, tab_ref, px, py, sp, bp, one):
    """One pass over a pixel's fragments: what its blend (and its derivative) needs.

    Returns a dict with ``t_nz`` (product of the nonzero ``1 - p_k``) and
    ``n_zero`` (how many are zero: alpha is then exactly 1), and for the soft
    blend the running-max softmax sums ``sw``, ``swc`` relative to ``zmax =
    max(EPS, max_k zinv_k)``, the unclamped maximum ``zraw`` over kept
    fragments and ``n_eq`` (how many share it: jnp.max splits its gradient
    evenly among ties).
    """
    f32 = jnp.float32
    zero = jnp.zeros_like(px)
    init = dict(t_nz=one, n_zero=zero)
    if cfg.mode == "soft":
        init.update(zmax=zero + _EPS, sw=zero, swc=(zero, zero, zero), zraw=zero - jnp.inf, n_eq=zero)

    def body(s, st):
        m, _, corners = _slot(cfg, lists_ref, tab_ref, s)
        dist, depth, col = fragment(cfg, corners, px, py, sp, one)
        p = _prob(m, dist, bp[0])
        q = 1.0 - p
        st = dict(st, t_nz=st["t_nz"] * jnp.where(q == 0, 1.0, q), n_zero=st["n_zero"] + (q == 0).astype(f32))
        if cfg.mode != "soft":
            return st
        z = _zinv(m, depth, bp)
        znew = jnp.maximum(st["zmax"], z)
        scale = jnp.exp((st["zmax"] - znew) / bp[1])
        w = p * jnp.exp((z - znew) / bp[1])
        above, tie = m & (z > st["zraw"]), m & (z == st["zraw"])
        return dict(st, zmax=znew, sw=st["sw"] * scale + w,
                    swc=tuple(a * scale + w * c for a, c in zip(st["swc"], col)),
                    zraw=jnp.where(above, z, st["zraw"]),
                    n_eq=jnp.where(above, 1.0, jnp.where(tie, st["n_eq"] + 1.0, st["n_eq"])))

    return _finish_stats(cfg, jax.lax.fori_loop(0, cfg.used_slots, body, init), bp)


def _stat_names(cfg: Config):
    """The per-pixel statistics the forward kernel saves for the backward (``_blend_stats``'s loop values)."""
    if cfg.mode == "hard":
        return ()
    if cfg.mode == "silhouette":
        return ("t_nz", "n_zero")
    return ("t_nz", "n_zero", "zmax", "sw", "swc", "swc", "swc", "zraw", "n_eq")


def _flat_stats(cfg: Config, st):
    out, seen = [], set()
    for name in _stat_names(cfg):
        if name not in seen:
            seen.add(name)
            out += list(st[name]) if isinstance(st[name], tuple) else [st[name]]
    return out


def _unflat_stats(cfg: Config, flat):
    st, i = {}, 0
    for name in dict.fromkeys(_stat_names(cfg)):
        n = _stat_names(cfg).count(name)
        st[name] = tuple(flat[i:i + n]) if n > 1 else flat[i]
        i += n
    return st


def _finish_stats(cfg: Config, st, bp):
    """The blend's per-pixel values derived from the loop statistics."""
    st = dict(st)
    st["alpha"] = jnp.where(st["n_zero"] > 0, 1.0, 1.0 - st["t_nz"])
    if cfg.mode == "soft":
        st["delta_raw"] = jnp.exp((_EPS - st["zmax"]) / bp[1])
        st["delta"] = jnp.maximum(st["delta_raw"], _EPS)
        st["denom"] = st["sw"] + st["delta"]
        st["rgb"] = tuple((a + st["delta"] * bp[4 + c]) / st["denom"] for c, a in enumerate(st["swc"]))
    return st


def _prob(m, dist, sigma):
    return jnp.where(m, jax.nn.sigmoid(-dist / sigma), 0.0)


def _zinv(m, depth, bp):  # bp = sigma, gamma, znear, zfar, ...
    return jnp.where(m, (bp[3] - depth) / (bp[3] - bp[2]), 0.0)


def _forward_kernel(lists_ref, tab_ref, prm_ref, out_ref, stats_ref, *, cfg: Config):
    px, py, _ = _pixels(cfg)
    one = jnp.ones_like(px)
    prm = [prm_ref[i] for i in range(cfg.n_shade + cfg.n_blend)]
    sp, bp = prm[:cfg.n_shade], prm[cfg.n_shade:]
    if cfg.mode == "hard":
        m, _, corners = _slot(cfg, lists_ref, tab_ref, 0)
        _, _, col = fragment(cfg, corners, px, py, sp, one)
        outs = tuple(jnp.where(m, col[c], bp[c]) for c in range(3)) + (jnp.where(m, 1.0, 0.0),)
    else:
        st = _blend_stats(cfg, lists_ref, tab_ref, px, py, sp, bp, one)
        outs = (st["alpha"],) if cfg.mode == "silhouette" else st["rgb"] + (st["alpha"],)
        # what the backward needs, so that it does not walk the fragments twice
        for c, o in enumerate(_flat_stats(cfg, st)):
            stats_ref[0, c, :] = o
    for c, o in enumerate(outs):
        out_ref[0, c, :] = o


def _blend_cotangents(cfg: Config, st, g, m, dist, depth, col, bp):
    """Cotangents of one fragment's ``(dist, depth, colour)`` and of the blend parameters.

    The derivative of ``blend.py``'s formulas, from the pixel's statistics
    (``_blend_stats``) and the output cotangent ``g`` (channels, alpha last).
    """
    zero = jnp.zeros_like(dist)
    if cfg.mode == "hard":
        return (zero, zero, tuple(jnp.where(m, g[c], 0.0) for c in range(3))), [
            jnp.where(m, 0.0, g[c]) for c in range(3)]
    sigma = bp[0]
    p = _prob(m, dist, sigma)
    q = 1.0 - p
    # prod_{j != k} (1 - p_j) without dividing by zero.
    excl = jnp.where(st["n_zero"] == 0, st["t_nz"] / jnp.where(q == 0, 1.0, q),
                     jnp.where((st["n_zero"] == 1) & (q == 0), st["t_nz"], 0.0))
    g_p = g[-1] * excl
    if cfg.mode == "soft":
        gamma, zn, zf = bp[1], bp[2], bp[3]
        rgb, denom, zmax = st["rgb"], st["denom"], st["zmax"]
        z = _zinv(m, depth, bp)
        e = jnp.exp((z - zmax) / gamma)
        w = p * e
        # A fragment whose softmax weight is below float32 resolution of the
        # blend (w / denom < _COLD) moves the pixel by less than a rounding
        # error: its softmax cotangents are dropped, so that slots hidden
        # behind an opaque face carry exact zeros and skip the scatter.
        g_w = jnp.where(w < _COLD * denom, 0.0,
                        (g[0] * (col[0] - rgb[0]) + g[1] * (col[1] - rgb[1]) + g[2] * (col[2] - rgb[2])) / denom)
        g_col = tuple(jnp.where(w < _COLD * denom, 0.0, w * g[c] / denom) for c in range(3))
        g_p = g_p + g_w * e
        # zmax moves every weight; with delta unclamped the moves cancel, else they leave this:
        g_rgb_bg = (g[0] * (rgb[0] - bp[4]) + g[1] * (rgb[1] - bp[5]) + g[2] * (rgb[2] - bp[6])) / denom
        g_zmax = jnp.where(st["delta_raw"] > _EPS, 0.0, -st["delta"] / gamma * g_rgb_bg)
        g_zraw = jnp.where(st["zraw"] > _EPS, g_zmax, 0.0) / jnp.maximum(st["n_eq"], 1.0)
        g_z = g_w * w / gamma + jnp.where(m & (z == st["zraw"]), g_zraw, 0.0)
        g_z = jnp.where(m, g_z, 0.0)
        span2 = (zf - zn) * (zf - zn)
        g_bp = [None, g_w * (-w * (z - zmax) / (gamma * gamma)), g_z * (zf - depth) / span2,
                g_z * (depth - zn) / span2, zero, zero, zero]
        g_depth = -g_z / (zf - zn)
    else:
        g_col, g_depth, g_bp = (), zero, [None]
    g_u = jnp.where(m, g_p * p * q, 0.0)  # cotangent of -dist / sigma
    g_bp[0] = g_u * dist / (sigma * sigma)
    return (-g_u / sigma, g_depth, g_col), g_bp


def _fragment_used(cfg: Config, corners, px, py, sp, one):
    """:func:`fragment` with the outputs its blend has no cotangent for replaced by constants.

    The silhouette depends on the distance only and the hard blend on the
    colour only; the others' backward would multiply a zero cotangent
    through the barycentric (or distance) chain, which the compiler cannot
    drop (``0 * x`` is not ``0`` for every float). Constants have no VJP.
    """
    dist, depth, col = fragment(cfg, corners, px, py, sp, one)
    if cfg.mode == "silhouette":
        return dist, jnp.zeros_like(px), col
    if cfg.mode == "hard":
        return jnp.zeros_like(px), jnp.zeros_like(px), col
    return dist, depth, col


def _any_nonzero(xs):
    out = xs[0] != 0
    for x in xs[1:]:
        out = out | (x != 0)
    return out


def _pixel_blend_param_grads(cfg: Config, st, g, bp):
    """The per-pixel (not per-fragment) terms of the blend parameters' cotangents."""
    zero = jnp.zeros_like(st["alpha"])
    if cfg.mode != "soft":
        return [zero] * cfg.n_blend
    gamma = bp[1]
    g_delta = (g[0] * (bp[4] - st["rgb"][0]) + g[1] * (bp[5] - st["rgb"][1])
               + g[2] * (bp[6] - st["rgb"][2])) / st["denom"]
    unclamped = st["delta_raw"] > _EPS
    g_gamma = jnp.where(unclamped, g_delta * (-st["delta_raw"] * (_EPS - st["zmax"]) / (gamma * gamma)), 0.0)
    return [zero, g_gamma, zero, zero] + [st["delta"] * g[c] / st["denom"] for c in range(3)]


def _backward_kernel(lists_ref, ct_ref, stats_ref, tab_ref, prm_ref, gtab_in_ref, gtab_ref, gprm_ref, *,
                     cfg: Config):
    del gtab_in_ref  # aliased with gtab_ref: the zeros the atomics add into
    px, py, inside = _pixels(cfg)
    one = jnp.ones_like(px)
    zero = jnp.zeros_like(px)
    copy = (jnp.arange(cfg.bin_size ** 2, dtype=jnp.int32) % cfg.replicas) * (gtab_ref.shape[0] // cfg.replicas)
    # Parameters as per-pixel vectors, so their cotangents come back per pixel
    # and are summed once per tile.
    prm = [prm_ref[i] + zero for i in range(cfg.n_shade + cfg.n_blend)]
    sp, bp = prm[:cfg.n_shade], prm[cfg.n_shade:]
    g = tuple(jnp.where(inside, ct_ref[0, c, :], 0.0) for c in range(cfg.n_out))
    st = None
    if cfg.mode != "hard":  # the forward's statistics (empty pixels outside the image: t_nz = 1, ...)
        st = _finish_stats(cfg, _unflat_stats(cfg, [stats_ref[0, c, :] for c in range(len(_stat_names(cfg)))]), bp)
    g_bp0 = _pixel_blend_param_grads(cfg, st, g, bp) if cfg.mode != "hard" else [zero] * cfg.n_blend

    def body(s, acc):
        g_sp, g_bp = acc
        m, base, corners = _slot(cfg, lists_ref, tab_ref, s)
        dst = base + copy
        (dist, depth, col), frag_vjp = jax.vjp(lambda cs, sp_: _fragment_used(cfg, cs, px, py, sp_, one),
                                               corners, sp)
        cts, g_bp_s = _blend_cotangents(cfg, st, g, m, dist, depth, col, bp)
        # The fragment's VJP is linear in its cotangents: a fragment whose
        # cotangents are all zero (hidden behind an opaque face, outside the
        # image, an empty slot) adds nothing, and a slot with no such pixel in
        # the tile skips the VJP and the scatter altogether (a branch uniform
        # over the program; a max, since Triton lowers no reduce_or).
        hot = m & inside & _any_nonzero((cts[0], cts[1]) + tuple(cts[2]))

        def scatter():
            g_cs, g_sp_s = frag_vjp(cts)
            for c in range(cfg.n_corner):
                if cfg.interpret:  # interpret mode's atomics drop repeated indices: a scatter-add instead
                    gtab_ref[...] = gtab_ref[...].at[dst + c].add(jnp.where(hot, g_cs[c], 0.0))
                else:
                    atomic_add_relaxed(gtab_ref, dst + c, g_cs[c], mask=hot & (g_cs[c] != 0))
            return tuple(jnp.where(hot, b, 0.0) for b in g_sp_s)

        g_sp_s = jax.lax.cond(jnp.max(hot.astype(jnp.int32)) > 0, scatter, lambda: tuple(zero for _ in g_sp))
        g_sp = tuple(a + b for a, b in zip(g_sp, g_sp_s))
        g_bp = tuple(a + jnp.where(inside, b, 0.0) for a, b in zip(g_bp, g_bp_s))  # already 0 where empty
        return g_sp, g_bp

    g_sp, g_bp = jax.lax.fori_loop(0, cfg.used_slots, body, (tuple([zero] * cfg.n_shade), tuple(g_bp0)))
    for i, gi in enumerate(list(g_sp) + list(g_bp)):
        gprm_ref[0, i] = jnp.sum(gi)


def _pad_to(x, n):
    return jnp.pad(x, (0, n - x.shape[0]))


def _compiler_params(cfg):
    return None if cfg.interpret else plgpu.CompilerParams(num_warps=cfg.num_warps)


def _forward_call(table, prm, lists, cfg: Config):
    """``(image tiles (T, n_out_p, P), statistics tiles (T, n_stats_p, P))``."""
    num_tiles, npix = lists.shape[0], cfg.bin_size ** 2
    n_out_p, n_st_p = _pow2(cfg.n_out), _pow2(max(len(_stat_names(cfg)), 1))
    kernel = functools.partial(_forward_kernel, cfg=cfg)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles,),
        in_specs=[pl.BlockSpec((1, cfg.slots, npix), lambda t: (t, 0, 0)), pl.no_block_spec, pl.no_block_spec],
        out_specs=(pl.BlockSpec((1, n_out_p, npix), lambda t: (t, 0, 0)),
                   pl.BlockSpec((1, n_st_p, npix), lambda t: (t, 0, 0))),
        out_shape=(jax.ShapeDtypeStruct((num_tiles, n_out_p, npix), jnp.float32),
                   jax.ShapeDtypeStruct((num_tiles, n_st_p, npix), jnp.float32)),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="jaxrender_fused_forward",
    )(lists, _pad_to(table.reshape(-1), _pow2(table.size)), _pad_to(prm, _pow2(prm.shape[0] + 1)))


def _backward_call(table, prm, lists, stats, ct, cfg: Config):
    num_tiles, npix = lists.shape[0], cfg.bin_size ** 2
    n_prm = prm.shape[0]
    n_tab = _pow2(table.size)
    n_prm_p = _pow2(n_prm + 1)
    kernel = functools.partial(_backward_kernel, cfg=cfg)
    gtab, gprm = pl.pallas_call(
        kernel,
        grid=(num_tiles,),
        in_specs=[pl.BlockSpec((1, cfg.slots, npix), lambda t: (t, 0, 0)),
                  pl.BlockSpec((1, ct.shape[1], npix), lambda t: (t, 0, 0)),
                  pl.BlockSpec((1, stats.shape[1], npix), lambda t: (t, 0, 0)),
                  pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
        out_specs=(pl.no_block_spec, pl.BlockSpec((1, n_prm_p), lambda t: (t, 0))),
        out_shape=(jax.ShapeDtypeStruct((cfg.replicas * n_tab,), jnp.float32),
                   jax.ShapeDtypeStruct((num_tiles, n_prm_p), jnp.float32)),
        input_output_aliases={5: 0},
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="jaxrender_fused_backward",
    )(lists, ct, stats, _pad_to(table.reshape(-1), n_tab), _pad_to(prm, n_prm_p),
      jnp.zeros((cfg.replicas * n_tab,), jnp.float32))
    gtab = jnp.sum(gtab.reshape(cfg.replicas, n_tab), axis=0)
    return gtab[:table.size].reshape(table.shape), jnp.sum(gprm[:, :n_prm], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_tiles(table, prm, lists, cfg: Config):
    return _forward_call(table, prm, lists, cfg)[0]


def _fused_tiles_fwd(table, prm, lists, cfg):
    out, stats = _forward_call(table, prm, lists, cfg)
    return out, (table, prm, lists, stats)


def _fused_tiles_bwd(cfg, res, ct):
    table, prm, lists, stats = res
    gtab, gprm = _backward_call(table, prm, lists, stats, ct, cfg)
    return gtab, gprm, None


_fused_tiles.defvjp(_fused_tiles_fwd, _fused_tiles_bwd)


def _tiles_to_image(x, cfg: Config):
    """``(T, C, bs*bs)`` tile layout → ``(H, W, C)``."""
    nby, nbx = cfg.grid
    bs = cfg.bin_size
    h, w = cfg.image_size
    c = x.shape[1]
    img = x.reshape(nby, nbx, c, bs, bs).transpose(0, 3, 1, 4, 2).reshape(nby * bs, nbx * bs, c)
    return img[:h, :w]


def fused_render(screen_verts, faces, vertex_attrs, prm, lists, cfg: Config):
    """Shade and blend the selected fragments in the fused kernels.

    Args:
      screen_verts: ``(V, 3)`` float32 projected vertices.
      faces: ``(F, 3)`` int32.
      vertex_attrs: ``(V, cfg.n_attr)`` float32 or ``None``.
      prm: flat float32 shading then blend parameters.
      lists: ``(T, cfg.slots, bs*bs)`` int32 per-tile face lists from the
        selection kernel.

    Returns:
      ``(H, W, cfg.n_out)`` image; differentiable w.r.t. ``screen_verts``,
      ``vertex_attrs`` and ``prm``.
    """
    packed = screen_verts if vertex_attrs is None else jnp.concatenate([screen_verts, vertex_attrs], axis=-1)
    table = packed.astype(jnp.float32)[faces].reshape(faces.shape[0], cfg.n_corner)
    out = _fused_tiles(table, prm.astype(jnp.float32), lists, cfg)
    return _tiles_to_image(out, cfg)[..., :cfg.n_out]

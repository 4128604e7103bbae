"""UV texture sampling (bilinear / nearest, repeat / clamp, optional mipmaps).

UV convention (OBJ / OpenGL, see docs/architecture.md): ``u`` runs to the
right and ``v`` runs **up**; ``uv = (0, 0)`` is the bottom-left corner of the
texture image and ``(1, 1)`` its top-right corner, while the image is stored
``(Ht, Wt, C)`` with row 0 at the top. The centre of texel (row ``r``, column
``c``) is at::

    u = (c + 0.5) / Wt,        v = 1 - (r + 0.5) / Ht

so a UV maps to the continuous texel coordinates ``x = u * Wt - 0.5``
(column) and ``y = (1 - v) * Ht - 0.5`` (row). Bilinear filtering
interpolates the four texels around ``(y, x)``; nearest picks the texel that
contains the UV. Out-of-range coordinates either wrap (``"repeat"``, as
``GL_REPEAT``) or are clamped to the border texels (``"clamp"``, as
``GL_CLAMP_TO_EDGE``).

Sampling is differentiable w.r.t. the texture (both modes) and w.r.t. the UVs
(bilinear mode; the gradient is piecewise constant, with kinks on the lines
through texel centres, and zero in nearest mode).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jaxrender._checks import check_shape

__all__ = ["sample_texture", "build_mipmaps", "sample_texture_mip"]

_MODES = ("bilinear", "nearest")
_WRAPS = ("repeat", "clamp")


def _check_args(texture, uv, mode, wrap):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if wrap not in _WRAPS:
        raise ValueError(f"wrap must be one of {_WRAPS}, got {wrap!r}")
    texture = jnp.asarray(texture)
    uv = jnp.asarray(uv)
    check_shape(texture, "texture", ("Ht", "Wt", "C"))
    check_shape(uv, "uv", (2,), batch_ok=True)
    if not jnp.issubdtype(uv.dtype, jnp.floating):
        raise TypeError(f"uv must have a floating dtype, got {uv.dtype}")
    if texture.shape[0] == 0 or texture.shape[1] == 0:
        raise ValueError(f"texture must have at least one texel, got shape {tuple(texture.shape)}")
    return texture, uv


def _wrap_index(i, n, wrap):
    if wrap == "repeat":
        return jnp.mod(i, n)
    return jnp.clip(i, 0, n - 1)


def sample_texture(texture, uv, mode: str = "bilinear", wrap: str = "repeat"):
    """Sample a texture image at UV coordinates.

    Args:
        texture: ``(Ht, Wt, C)`` texture image, row 0 at the top.
        uv: ``(..., 2)`` float UV coordinates, ``u`` right and ``v`` up,
            ``(0, 0)`` = bottom-left corner of the image (see the module
            docstring for the texel-centre convention).
        mode: ``"bilinear"`` (differentiable in ``uv`` and ``texture``) or
            ``"nearest"`` (differentiable in ``texture`` only).
        wrap: ``"repeat"`` (tile the texture) or ``"clamp"`` (clamp to the
            border texels).

    Returns:
        ``(..., C)`` sampled values, dtype of ``texture`` promoted with
        ``uv``'s. At texel centres bilinear sampling returns the texel value.
    """
    texture, uv = _check_args(texture, uv, mode, wrap)
    ht, wt = texture.shape[0], texture.shape[1]
    u, v = uv[..., 0], uv[..., 1]
    dtype = jnp.result_type(texture.dtype, uv.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    tex = texture.astype(dtype)
    x = u * wt - 0.5  # continuous column
    y = (1.0 - v) * ht - 0.5  # continuous row

    if mode == "nearest":
        c = _wrap_index(jnp.floor(x + 0.5).astype(jnp.int32), wt, wrap)
        r = _wrap_index(jnp.floor(y + 0.5).astype(jnp.int32), ht, wrap)
        return tex[r, c]

    x0f = jnp.floor(x)
    y0f = jnp.floor(y)
    fx = (x - x0f)[..., None].astype(dtype)
    fy = (y - y0f)[..., None].astype(dtype)
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    c0 = _wrap_index(x0, wt, wrap)
    c1 = _wrap_index(x0 + 1, wt, wrap)
    r0 = _wrap_index(y0, ht, wrap)
    r1 = _wrap_index(y0 + 1, ht, wrap)
    # one gather of the four corners (one scatter-add in the backward pass)
    flat = tex.reshape(ht * wt, tex.shape[2])
    corners = flat[jnp.stack([r0 * wt + c0, r0 * wt + c1, r1 * wt + c0, r1 * wt + c1])]
    top = corners[0] * (1.0 - fx) + corners[1] * fx
    bottom = corners[2] * (1.0 - fx) + corners[3] * fx
    return top * (1.0 - fy) + bottom * fy


def build_mipmaps(texture, levels: int | None = None):
    """Build a mipmap pyramid by 2x2 box filtering.

    Level 0 is the texture itself; level ``k+1`` averages 2x2 blocks of level
    ``k`` (an odd size is first padded by repeating the last row / column).
    The pyramid stops at ``1 x 1`` or after ``levels`` levels.

    Args:
        texture: ``(Ht, Wt, C)`` texture image.
        levels: number of levels including level 0 (``None``: down to 1x1).

    Returns:
        A tuple of ``(Ht_k, Wt_k, C)`` arrays, level 0 first.
    """
    texture = jnp.asarray(texture)
    check_shape(texture, "texture", ("Ht", "Wt", "C"))
    if levels is not None and levels < 1:
        raise ValueError(f"levels must be >= 1 or None, got {levels}")
    if not jnp.issubdtype(texture.dtype, jnp.floating):
        texture = texture.astype(jnp.result_type(float))
    out = [texture]
    cur = texture
    while (levels is None or len(out) < levels) and (cur.shape[0] > 1 or cur.shape[1] > 1):
        h, w = cur.shape[0], cur.shape[1]
        if h > 1 and h % 2:
            cur = jnp.concatenate([cur, cur[-1:]], axis=0)
        if w > 1 and w % 2:
            cur = jnp.concatenate([cur, cur[:, -1:]], axis=1)
        h2 = max(cur.shape[0] // 2, 1)
        w2 = max(cur.shape[1] // 2, 1)
        fh = cur.shape[0] // h2
        fw = cur.shape[1] // w2
        cur = cur.reshape(h2, fh, w2, fw, cur.shape[2]).mean(axis=(1, 3))
        out.append(cur)
    return tuple(out)


def sample_texture_mip(mipmaps: Sequence, uv, level, mode: str = "bilinear", wrap: str = "repeat"):
    """Sample a mipmap pyramid at a (fractional) level of detail.

    Every level is sampled with :func:`sample_texture` and the two levels
    around ``level`` are linearly blended (trilinear filtering when
    ``mode="bilinear"``). ``level`` is clamped to ``[0, len(mipmaps) - 1]``;
    the result is differentiable w.r.t. ``level`` (between integer levels),
    ``uv`` and the pyramid.

    Args:
        mipmaps: sequence of ``(Ht_k, Wt_k, C)`` levels, e.g. from
            :func:`build_mipmaps`.
        uv: ``(..., 2)`` UV coordinates (see :func:`sample_texture`).
        level: scalar or ``(...)`` level of detail (0 = finest), broadcast
            against ``uv[..., 0]``.
        mode: ``"bilinear"`` or ``"nearest"`` within each level.
        wrap: ``"repeat"`` or ``"clamp"``.

    Returns:
        ``(..., C)`` sampled values.
    """
    if not isinstance(mipmaps, (tuple, list)) or len(mipmaps) == 0:
        raise TypeError("mipmaps must be a non-empty tuple/list of (Ht, Wt, C) arrays")
    samples = jnp.stack([sample_texture(m, uv, mode=mode, wrap=wrap) for m in mipmaps], axis=0)
    n = len(mipmaps)
    lvl = jnp.clip(jnp.asarray(level, dtype=samples.dtype), 0.0, n - 1)
    lvl = jnp.broadcast_to(lvl, samples.shape[1:-1])
    idx = jnp.arange(n, dtype=samples.dtype).reshape((n,) + (1,) * lvl.ndim)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(lvl[None] - idx))
    return jnp.sum(weights[..., None] * samples, axis=0)

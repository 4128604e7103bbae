"""Blending the kept fragments of each pixel into an image.

These follow PyTorch3D's blending functions exactly, so its ``sigma``,
``gamma`` and background values carry over:

* coverage of fragment k: ``p_k = sigmoid(-dist_k / sigma)`` (``dist`` is the
  signed squared NDC distance, negative inside);
* alpha: ``A = 1 - prod_k (1 - p_k)``;
* colour (:func:`softmax_rgb_blend`): a softmax over inverse normalised depth
  ``z_inv = (zfar - z) / (zfar - znear)`` with temperature ``gamma``,
  max-shifted for stability, plus a background term of weight
  ``exp((eps - z_inv_max) / gamma)``.
"""
from __future__ import annotations

from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp

from ._checks import check_shape
from .raster.settings import Fragments

Array = jax.Array

_EPS = 1e-10  # PyTorch3D's blending epsilon


class BlendParams(eqx.Module):
    """Soft-blending parameters (PyTorch3D's ``BlendParams``).

    Attributes:
      sigma: width of the coverage sigmoid, in squared NDC units.
      gamma: softmax temperature over normalised inverse depth; small values
        approach a hard z-buffer.
      background: ``(C,)`` background colour.
    """

    sigma: Array = eqx.field(converter=jnp.asarray, default=1e-4)
    gamma: Array = eqx.field(converter=jnp.asarray, default=1e-4)
    background: Array = eqx.field(converter=jnp.asarray, default=(1.0, 1.0, 1.0))


def coverage(fragments: Fragments, sigma) -> Array:
    """``(H, W, K)`` soft coverage ``sigmoid(-dist / sigma)``, zero where empty."""
    mask = fragments.face_idx >= 0
    prob = jax.nn.sigmoid(-fragments.dist / sigma)
    return jnp.where(mask, prob, 0.0)


def sigmoid_alpha_blend(fragments: Fragments, sigma=1e-4) -> Array:
    """Soft silhouette ``A = 1 - prod_k (1 - sigmoid(-dist_k / sigma))``.

    Returns:
      ``(H, W)`` alpha in ``[0, 1]``.
    """
    prob = coverage(fragments, sigma)
    return 1.0 - jnp.prod(1.0 - prob, axis=-1)


def softmax_rgb_blend(colors, fragments: Fragments, params: BlendParams = BlendParams(), znear=1.0, zfar=100.0) -> Array:
    """PyTorch3D's soft RGB blend (SoftRas), returning RGBA.

    Args:
      colors: ``(H, W, K, C)`` shaded colour of each kept fragment.
      fragments: :class:`Fragments` giving depth, distance and the mask.
      params: :class:`BlendParams` (sigma, gamma, background).
      znear, zfar: the depth range that normalises depth (PyTorch3D uses the
        camera's; default 1 and 100 as there).

    Returns:
      ``(H, W, C + 1)``: the blended colour and the alpha
      ``1 - prod_k (1 - p_k)``.
    """
    check_shape(colors, "colors", fragments.face_idx.shape + (None,))
    mask = fragments.face_idx >= 0
    prob = coverage(fragments, params.sigma)
    alpha = 1.0 - jnp.prod(1.0 - prob, axis=-1)
    z_inv = (zfar - fragments.depth) / (zfar - znear) * mask
    z_inv_max = jnp.maximum(jnp.max(z_inv, axis=-1, keepdims=True), _EPS)
    weights = prob * jnp.exp((z_inv - z_inv_max) / params.gamma)
    delta = jnp.maximum(jnp.exp((_EPS - z_inv_max) / params.gamma), _EPS)
    denom = jnp.sum(weights, axis=-1, keepdims=True) + delta
    rgb = (jnp.sum(weights[..., None] * colors, axis=-2) + delta * params.background) / denom
    return jnp.concatenate([rgb, alpha[..., None]], axis=-1)


def hard_rgb_blend(colors, fragments: Fragments, background=(1.0, 1.0, 1.0)) -> Array:
    """Colour of the nearest fragment, background elsewhere.

    Args:
      colors: ``(H, W, K, C)``.
      fragments: :class:`Fragments`.
      background: ``(C,)`` colour.

    Returns:
      ``(H, W, C + 1)``, alpha 1 where a face is kept, else 0.
    """
    check_shape(colors, "colors", fragments.face_idx.shape + (None,))
    hit = fragments.face_idx[..., 0] >= 0
    bg = jnp.broadcast_to(jnp.asarray(background, colors.dtype), colors.shape[:2] + colors.shape[-1:])
    rgb = jnp.where(hit[..., None], colors[:, :, 0], bg)
    return jnp.concatenate([rgb, hit[..., None].astype(colors.dtype)], axis=-1)


def depth_blend(fragments: Fragments, background=0.0, params: Union[BlendParams, None] = None, znear=1.0, zfar=100.0) -> Array:
    """A depth image.

    With ``params=None`` the nearest fragment's view depth (``background``
    where empty). With :class:`BlendParams` the soft expectation of depth
    under :func:`softmax_rgb_blend`'s weights (background weight included),
    which is differentiable at silhouettes.

    Returns:
      ``(H, W)`` depth.
    """
    if params is None:
        hit = fragments.face_idx[..., 0] >= 0
        return jnp.where(hit, fragments.depth[..., 0], background)
    rgba = softmax_rgb_blend(fragments.depth[..., None], fragments,
                             BlendParams(params.sigma, params.gamma, jnp.asarray([background])), znear, zfar)
    return rgba[..., 0]

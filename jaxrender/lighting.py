"""Lighting: order-2 spherical harmonics and Phong / Blinn-Phong point lights.

Two independent shading models live here.

**Spherical harmonics (SH).** The irradiance of a distant environment on a
Lambertian surface is approximated with the 9 real SH functions of order <= 2
(Ramamoorthi & Hanrahan 2001, "An efficient representation for irradiance
environment maps"). The basis values returned by :func:`sh_basis` already
include the Lambertian convolution constants ``a_l`` and the normalisation
constants ``c_l``, with exactly the ordering and signs used by
Deep3DFaceRecon and FaceVerse, so that their 27 "gamma" coefficients can be
used unchanged::

    a0 = pi,            a1 = 2 pi / sqrt(3),     a2 = 2 pi / sqrt(8)
    c0 = 1/sqrt(4 pi),  c1 = sqrt(3)/sqrt(4 pi), c2 = 3 sqrt(5)/sqrt(12 pi)
    d0 = 0.5 / sqrt(3)

    H0 =  a0 c0
    H1 = -a1 c1 ny          H2 =  a1 c1 nz          H3 = -a1 c1 nx
    H4 =  a2 c2 nx ny       H5 = -a2 c2 ny nz       H6 =  a2 c2 d0 (3 nz^2 - 1)
    H7 = -a2 c2 nx nz       H8 =  a2 c2 (nx^2 - ny^2) / 2

Each ``H_k`` is ``a_l`` times an orthonormal real SH function, so that
``integral over the sphere of H_i H_j = a_l^2 delta_ij``. The irradiance of
colour channel ``c`` is ``E_c(n) = sum_k H_k(n) gamma[c, k]``.

**Phong.** :func:`phong_shading` follows PyTorch3D's ``phong_shading`` /
``SoftPhongShader`` conventions so numbers carry over::

    colour = (ambient + diffuse) * albedo + specular

    ambient  = material.ambient * sum(AmbientLight colours)
    diffuse  = material.diffuse * sum_l colour_l * max(0, n . l_l)
    specular = material.specular * sum_l specular_l * [n . l_l > 0]
               * max(0, r_l . v) ** shininess             (Phong)
               * max(0, n . h_l) ** shininess             (Blinn-Phong)

where ``l`` is the unit vector from the surface point **towards the light**
(PyTorch3D's ``DirectionalLights.direction`` convention), ``v`` the unit
vector from the point towards the eye, ``r = 2 (n . l) n - l`` the mirrored
light direction and ``h = normalize(l + v)`` the half vector. As in PyTorch3D
there is no distance attenuation for point lights. Normals, light and view
directions are re-normalised with a safe normalisation, so zero-length
normals, or a point light placed exactly at the shaded point, give finite
values and finite gradients.

Every light carries only the colours it contributes (``AmbientLight`` the
ambient term, directional / point lights the diffuse and specular terms),
whereas a PyTorch3D light object carries all three. PyTorch3D's default
``PointLights()`` (ambient 0.5, diffuse 0.3, specular 0.2 at ``(0, 1, 0)``)
with default ``Materials()`` is therefore::

    lights = [AmbientLight(0.5), PointLight((0.0, 1.0, 0.0), color=0.3, specular_color=0.2)]
    phong_shading(points, normals, albedo, lights, Material(), eye)

and FaceVerse's renderer (ambient 1, diffuse 0, specular 0) is
``[AmbientLight(1.0)]``, i.e. the SH-shaded vertex colour passes through.

All quantities are unitless linear RGB; positions and directions must be in
one common frame (world or camera).
"""
from __future__ import annotations

import math
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxrender._checks import as_float as _float_array, check_shape

__all__ = [
    "SH_CONSTANTS",
    "sh_basis",
    "sh_shading",
    "shade_sh",
    "AmbientLight",
    "DirectionalLight",
    "PointLight",
    "Material",
    "phong_shading",
    "safe_normalize",
]

# Deep3DFaceRecon / FaceVerse constants (see the module docstring).
_A0 = math.pi
_A1 = 2.0 * math.pi / math.sqrt(3.0)
_A2 = 2.0 * math.pi / math.sqrt(8.0)
_C0 = 1.0 / math.sqrt(4.0 * math.pi)
_C1 = math.sqrt(3.0) / math.sqrt(4.0 * math.pi)
_C2 = 3.0 * math.sqrt(5.0) / math.sqrt(12.0 * math.pi)
_D0 = 0.5 / math.sqrt(3.0)

SH_CONSTANTS = dict(a0=_A0, a1=_A1, a2=_A2, c0=_C0, c1=_C1, c2=_C2, d0=_D0)
"""The Lambertian convolution (``a*``) and SH normalisation (``c*``, ``d0``) constants."""


def safe_normalize(v, axis: int = -1, eps: float = 1e-6):
    """Normalise vectors to unit length, finite for zero vectors.

    Computes ``v / max(|v|, eps)`` (PyTorch's ``F.normalize`` with ``eps``),
    written so that the gradient is finite at ``v = 0`` as well.

    Args:
        v: ``(..., D)`` vectors.
        axis: the vector axis.
        eps: lower bound on the norm used as divisor.

    Returns:
        ``(..., D)`` unit vectors (zero vectors stay zero).
    """
    v = jnp.asarray(v)
    sq = jnp.sum(v * v, axis=axis, keepdims=True)
    return v / jnp.sqrt(jnp.maximum(sq, eps * eps))


# ---------------------------------------------------------------------------
# Spherical harmonics
# ---------------------------------------------------------------------------


def sh_basis(normals, normalize: bool = False):
    """Order-2 real SH basis with the Lambertian constants of Deep3D / FaceVerse.

    Args:
        normals: ``(..., 3)`` surface normals ``(nx, ny, nz)``; they should be
            unit length (FaceVerse and Deep3DFaceRecon pass unit normals and
            do not re-normalise). Any frame may be used as long as the SH
            coefficients are expressed in the same frame (FaceVerse uses the
            rotated model frame).
        normalize: re-normalise ``normals`` first (safe for zero vectors).

    Returns:
        ``(..., 9)`` basis values ``H_0 .. H_8`` in the Deep3D / FaceVerse
        order and signs (see the module docstring); dimensionless. ``H_0`` is
        the constant ``pi / sqrt(4 pi) = sqrt(pi) / 2 ~ 0.886``.
    """
    normals = _float_array(normals)
    check_shape(normals, "normals", (3,), batch_ok=True)
    if normalize:
        normals = safe_normalize(normals)
    nx, ny, nz = normals[..., 0], normals[..., 1], normals[..., 2]
    k1 = _A1 * _C1
    k2 = _A2 * _C2
    h = [
        jnp.full_like(nx, _A0 * _C0),
        -k1 * ny,
        k1 * nz,
        -k1 * nx,
        k2 * nx * ny,
        -k2 * ny * nz,
        k2 * _D0 * (3.0 * nz * nz - 1.0),
        -k2 * nx * nz,
        k2 * 0.5 * (nx * nx - ny * ny),
    ]
    return jnp.stack(h, axis=-1)


def _sh_matrix(sh_coeffs, layout: str, offset):
    """Return the coefficients as a ``(9, 3)`` matrix (bands x channels)."""
    if layout not in ("3x9", "9x3"):
        raise ValueError(f'layout must be "3x9" or "9x3", got {layout!r}')
    sh_coeffs = _float_array(sh_coeffs)
    if sh_coeffs.shape == (27,):
        sh_coeffs = sh_coeffs.reshape((3, 9) if layout == "3x9" else (9, 3))
    want = (3, 9) if layout == "3x9" else (9, 3)
    if sh_coeffs.shape != want:
        raise ValueError(
            f"sh_coeffs must have shape {want} or (27,) for layout={layout!r}, got {tuple(sh_coeffs.shape)}"
        )
    coeffs = sh_coeffs.T if layout == "3x9" else sh_coeffs  # (9, 3)
    if not (isinstance(offset, (int, float)) and offset == 0):
        coeffs = coeffs.at[0].add(jnp.asarray(offset, dtype=coeffs.dtype))
    return coeffs


def sh_shading(normals, sh_coeffs, layout: str = "3x9", offset=0.0, normalize: bool = False):
    """Irradiance ``E(n)`` of an order-2 SH environment (Lambertian, 27 coefficients).

    ``E_c(n) = sum_k H_k(n) * (gamma[c, k] + offset * [k == 0])`` with ``H`` from
    :func:`sh_basis`.

    Args:
        normals: ``(..., 3)`` unit normals (see :func:`sh_basis`).
        sh_coeffs: 27 lighting coefficients: ``(3, 9)`` (colour channel,
            band) for ``layout="3x9"`` (the default, FaceVerse / Deep3D
            ``gamma.view(3, 9)``), ``(9, 3)`` (band, channel) for
            ``layout="9x3"``, or a flat ``(27,)`` array read in the chosen
            layout (row-major).
        layout: ``"3x9"`` or ``"9x3"``.
        offset: added to the first (constant, band-0) coefficient of every
            channel before shading. FaceVerse and Deep3DFaceRecon use
            ``offset=0.8`` so that all-zero coefficients start from a
            uniform white-ish light (irradiance ``0.8 * 0.886 ~ 0.709``).
            Scalar or ``(3,)`` per channel.
        normalize: re-normalise ``normals`` first.

    Returns:
        ``(..., 3)`` irradiance per colour channel (multiply by the albedo to
        get the colour, see :func:`shade_sh`).
    """
    coeffs = _sh_matrix(sh_coeffs, layout, offset)
    basis = sh_basis(normals, normalize=normalize)
    return jnp.einsum("...k,kc->...c", basis, coeffs, precision=jax.lax.Precision.HIGHEST)


def shade_sh(albedo, normals, sh_coeffs, layout: str = "3x9", offset=0.0, normalize: bool = False):
    """Lambertian SH shading: ``albedo * sh_shading(normals, sh_coeffs, ...)``.

    This is FaceVerse's / Deep3DFaceRecon's ``add_illumination`` (with
    ``offset=0.8`` to reproduce them exactly).

    Args:
        albedo: ``(..., 3)`` linear RGB albedo (broadcast against the normals).
        normals: ``(..., 3)`` unit normals.
        sh_coeffs: ``(3, 9)``, ``(9, 3)`` or ``(27,)`` coefficients, see
            :func:`sh_shading`.
        layout: ``"3x9"`` (default) or ``"9x3"``.
        offset: added to each channel's band-0 coefficient (0.8 in FaceVerse).
        normalize: re-normalise the normals first.

    Returns:
        ``(..., 3)`` shaded colour.
    """
    albedo = _float_array(albedo)
    check_shape(albedo, "albedo", (3,), batch_ok=True)
    return albedo * sh_shading(normals, sh_coeffs, layout=layout, offset=offset, normalize=normalize)


# ---------------------------------------------------------------------------
# Lights and materials
# ---------------------------------------------------------------------------


def _color(x, name):
    x = _float_array(x)
    if x.ndim == 0:
        x = jnp.broadcast_to(x, (3,))
    if x.shape[-1] != 3:
        raise ValueError(f"{name} must be a scalar or have a last axis of size 3 (RGB), got shape {tuple(x.shape)}")
    return x


class AmbientLight(eqx.Module):
    """Uniform ambient light.

    Attributes:
        color: ``(3,)`` RGB ambient colour (or a scalar grey). Contributes
            ``material.ambient * color * albedo``.
    """

    color: jax.Array

    def __init__(self, color=(1.0, 1.0, 1.0)):
        self.color = _color(color, "color")


class DirectionalLight(eqx.Module):
    """A light at infinity.

    Attributes:
        direction: ``(3,)`` vector pointing **from the surface towards the
            light** (PyTorch3D's ``DirectionalLights.direction``). E.g. with
            ``direction=(0, 0, -1)`` in OpenCV camera space (z forward) the
            light comes from the camera side. Need not be unit length. A
            stack of ``L`` lights may be given as ``(L, 3)``.
        color: ``(3,)`` or ``(L, 3)`` diffuse RGB colour (PyTorch3D's
            ``diffuse_color``).
        specular_color: ``(3,)`` or ``(L, 3)`` specular RGB colour.
    """

    direction: jax.Array
    color: jax.Array
    specular_color: jax.Array

    def __init__(self, direction=(0.0, 1.0, 0.0), color=(1.0, 1.0, 1.0), specular_color=(0.0, 0.0, 0.0)):
        self.direction = _float_array(direction)
        check_shape(self.direction, "direction", (3,), batch_ok=True)
        self.color = _color(color, "color")
        self.specular_color = _color(specular_color, "specular_color")


class PointLight(eqx.Module):
    """A point light (no distance attenuation, as in PyTorch3D's ``PointLights``).

    Attributes:
        position: ``(3,)`` light position (``(L, 3)`` for a stack of ``L``
            lights), in the same frame as the shaded points.
        color: ``(3,)`` or ``(L, 3)`` diffuse RGB colour.
        specular_color: ``(3,)`` or ``(L, 3)`` specular RGB colour.
    """

    position: jax.Array
    color: jax.Array
    specular_color: jax.Array

    def __init__(self, position=(0.0, 1.0, 0.0), color=(1.0, 1.0, 1.0), specular_color=(0.0, 0.0, 0.0)):
        self.position = _float_array(position)
        check_shape(self.position, "position", (3,), batch_ok=True)
        self.color = _color(color, "color")
        self.specular_color = _color(specular_color, "specular_color")


class Material(eqx.Module):
    """Phong material reflectances (PyTorch3D's ``Materials`` defaults).

    Attributes:
        ambient: ``(3,)`` or scalar, multiplies the ambient light.
        diffuse: ``(3,)`` or scalar, multiplies the diffuse light.
        specular: ``(3,)`` or scalar, multiplies the specular light.
        shininess: scalar Phong exponent (64 by default, as PyTorch3D).
    """

    ambient: jax.Array
    diffuse: jax.Array
    specular: jax.Array
    shininess: jax.Array

    def __init__(self, ambient=(1.0, 1.0, 1.0), diffuse=(1.0, 1.0, 1.0), specular=(1.0, 1.0, 1.0), shininess=64.0):
        self.ambient = _color(ambient, "ambient")
        self.diffuse = _color(diffuse, "diffuse")
        self.specular = _color(specular, "specular")
        self.shininess = _float_array(shininess)


LightLike = Union[AmbientLight, DirectionalLight, PointLight]


def _safe_pow(x, p):
    """``x ** p`` for ``x >= 0`` with finite gradients at ``x = 0`` (also w.r.t. ``p``)."""
    pos = x > 0
    xs = jnp.where(pos, x, 1.0)
    return jnp.where(pos, jnp.exp(p * jnp.log(xs)), 0.0)


def _diffuse_specular(l_dir, n, v, color, spec_color, shininess, blinn):
    """Diffuse and specular terms of one light; ``l_dir`` is (..., 3) towards the light."""
    l = safe_normalize(l_dir)
    cos = jnp.sum(n * l, axis=-1)
    diffuse = color * jnp.maximum(cos, 0.0)[..., None]
    if blinn:
        h = safe_normalize(l + v)
        alpha = jnp.maximum(jnp.sum(n * h, axis=-1), 0.0)
    else:
        r = 2.0 * cos[..., None] * n - l
        alpha = jnp.maximum(jnp.sum(v * r, axis=-1), 0.0)
    alpha = jnp.where(cos > 0, alpha, 0.0)
    specular = spec_color * _safe_pow(alpha, shininess)[..., None]
    return diffuse, specular


def phong_shading(points, normals, albedo, lights, material: Material | None = None, eye=None, blinn: bool = False):
    """Phong / Blinn-Phong shading with PyTorch3D's conventions.

    ``colour = (ambient + diffuse) * albedo + specular`` (see the module
    docstring for the terms). Light directions point towards the light.

    Args:
        points: ``(N, 3)`` shaded positions (any leading shape ``(..., 3)``
            works).
        normals: ``(N, 3)`` normals at the points; re-normalised safely.
        albedo: ``(N, 3)`` texel / vertex colours (broadcast against the
            points).
        lights: a light (``AmbientLight``, ``DirectionalLight``,
            ``PointLight``; directional and point lights may hold a stack
            ``(L, 3)``) or a tuple / list of lights. Light contributions add.
            Without any ``AmbientLight`` the ambient term is zero.
        material: :class:`Material`; ``None`` means ``Material()``
            (PyTorch3D's defaults: all reflectances 1, shininess 64).
        eye: ``(3,)`` camera centre in the frame of ``points`` (needed for
            the specular term; ``None`` disables specular).
        blinn: use the Blinn-Phong half vector ``n . h`` instead of ``r . v``.

    Returns:
        ``(N, 3)`` shaded colours (not clipped).
    """
    points = _float_array(points)
    normals = _float_array(normals)
    albedo = _float_array(albedo)
    check_shape(points, "points", (3,), batch_ok=True)
    check_shape(normals, "normals", (3,), batch_ok=True)
    check_shape(albedo, "albedo", (3,), batch_ok=True)
    if material is None:
        material = Material()
    if not isinstance(material, Material):
        raise TypeError(f"material must be a jaxrender.lighting.Material, got {type(material).__name__}")
    if isinstance(lights, (AmbientLight, DirectionalLight, PointLight)):
        lights = (lights,)
    if not isinstance(lights, (tuple, list)):
        raise TypeError(f"lights must be a light or a tuple/list of lights, got {type(lights).__name__}")

    n = safe_normalize(normals)
    if eye is not None:
        eye = _float_array(eye)
        check_shape(eye, "eye", (3,))
        v = safe_normalize(eye - points)
    else:
        v = None
    shininess = material.shininess

    dtype = jnp.result_type(points, normals, albedo)
    shape = jnp.broadcast_shapes(points.shape, normals.shape)
    ambient = jnp.zeros((3,), dtype)
    diffuse = jnp.zeros(shape, dtype)
    specular = jnp.zeros(shape, dtype)

    for i, light in enumerate(lights):
        if isinstance(light, AmbientLight):
            ambient = ambient + light.color
            continue
        if isinstance(light, DirectionalLight):
            anchor, is_point = light.direction, False
        elif isinstance(light, PointLight):
            anchor, is_point = light.position, True
        else:
            raise TypeError(f"lights[{i}] must be AmbientLight, DirectionalLight or PointLight, got {type(light).__name__}")

        def one(anchor_, color_, spec_):
            l_dir = anchor_ - points if is_point else jnp.broadcast_to(anchor_, shape)
            vv = v if v is not None else jnp.zeros(shape, dtype)
            d, s = _diffuse_specular(l_dir, n, vv, color_, spec_, shininess, blinn)
            return d, s if v is not None else jnp.zeros_like(s)

        if anchor.ndim == 1:
            d, s = one(anchor, light.color, light.specular_color)
        else:
            anchor = anchor.reshape(-1, 3)
            L = anchor.shape[0]
            color = jnp.broadcast_to(light.color, (L, 3))
            spec = jnp.broadcast_to(light.specular_color, (L, 3))
            d, s = jax.vmap(one)(anchor, color, spec)
            d, s = d.sum(0), s.sum(0)
        diffuse = diffuse + d
        specular = specular + s

    return (material.ambient * ambient + material.diffuse * diffuse) * albedo + material.specular * specular

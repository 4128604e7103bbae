"""Voxel volumes: grids, rays, trilinear sampling, emission–absorption marching.

Conventions
===========

**Grid ↔ world.** A :class:`VoxelGrid` stores ``densities`` of shape
``(D, H, W)`` and ``features`` of shape ``(D, H, W, C)``. The array axes are
``(z, y, x)``: axis 0 (``D``) runs along world **z**, axis 1 (``H``) along
world **y** and axis 2 (``W``) along world **x**, the layout of PyTorch3D's
``Volumes`` and of ``torch.nn.functional.grid_sample`` on 5-D inputs. The
**centre** of voxel ``[k, j, i]`` lies at the world point::

    p = center + (i - (W - 1) / 2, j - (H - 1) / 2, k - (D - 1) / 2) * voxel_size

so the voxel centres are symmetric about ``center`` and the first and last
centres along x lie at ``center_x ∓ (W - 1) / 2 * voxel_size_x``. This is
``grid_sample``'s ``align_corners=True`` convention and PyTorch3D's
``Volumes`` world mapping with ``center = -volume_translation``.

**Continuous voxel coordinates** (what :func:`trilinear_sample` takes) are
``u = (p - center) / voxel_size + (size - 1) / 2`` in ``(x, y, z)`` order:
``u = (i, j, k)`` exactly at the centre of voxel ``[k, j, i]``.

**Sampling.** Values live at voxel centres and are interpolated trilinearly
between them. Outside the grid the value is zero (``padding_mode="zeros"``):
a voxel index outside ``[0, size - 1]`` reads as 0, so the value falls
linearly to zero over the one-voxel shell ``u ∈ [-1, 0]`` and
``u ∈ [size - 1, size]``, and is exactly zero beyond. With ``voxel_size = s``
the non-zero support therefore spans ``(size + 1) * s`` per axis.

**Rays.** Rays come from :func:`jaxrender.camera.pixel_rays` with
``normalize=False``: the camera-frame direction has ``z = 1``, so the ray
parameter ``t`` is the *view depth* (PyTorch3D's ray-sampler "lengths").
Sample depths are ``linspace(near, far, n_samples)``; with a PRNG key each
depth is jittered uniformly inside its stratum (the interval between the
midpoints of its neighbours, clipped to ``[near, far]``).

**Compositing.** Per ray, with per-sample densities ``d_i`` and features
``c_i``:

* ``mode="pytorch3d"`` — PyTorch3D's ``EmissionAbsorptionRaymarcher``: the
  density *is* the opacity of the sample, ``α_i = d_i`` (expected in
  ``[0, 1]``), ``w_i = α_i Π_{j<i} (1 + ε - α_j)``, ``rgb = Σ w_i c_i``,
  ``opacity = 1 - Π_i (1 - α_i)``. Results depend on the number of samples.
* ``mode="physical"`` — the density is an extinction coefficient ``σ ≥ 0``
  per world unit; ``α_i = 1 - exp(-σ_i δ_i)`` with ``δ_i`` the world length of
  sample ``i``'s stratum (the strata tile ``[near, far]``), ``T_i =
  exp(-Σ_{j<i} σ_j δ_j)``, ``w_i = α_i T_i``, ``opacity = 1 - exp(-Σ σ_i
  δ_i)``. For a constant density the opacity is ``1 - exp(-σ L)`` whatever
  the number of samples.
* ``mode="absorption"`` — PyTorch3D's ``AbsorptionOnlyRaymarcher``: only
  ``opacity = 1 - Π (1 - d_i)``; features are not sampled.

``depth`` is the expected view depth ``Σ w_i t_i`` (not divided by the
opacity; divide by it for the depth of the visible surface).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrender._checks import check_float, check_shape, is_concrete

__all__ = [
    "VoxelGrid",
    "Rays",
    "grid_rays",
    "sample_rays",
    "ray_depths",
    "trilinear_sample",
    "composite",
    "absorption_only",
    "render_volume",
    "MODES",
]

MODES = ("pytorch3d", "physical", "absorption")

_SAMPLES_NAME = "jaxrender_volume_samples"

_ACTIVATIONS = {
    None: lambda x: x,
    "identity": lambda x: x,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "exp": jnp.exp,
    "relu": jax.nn.relu,
}


def _activation(act, name):
    if callable(act):
        return act
    if act not in _ACTIVATIONS:
        raise ValueError(f"{name} must be a callable or one of {[k for k in _ACTIVATIONS if k]}, got {act!r}")
    return _ACTIVATIONS[act]


def _as_vec3(x, name, dtype):
    x = jnp.asarray(x, dtype=dtype)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (3,))
    if x.shape != (3,):
        raise ValueError(f"{name} must be a scalar or have shape (3,) in (x, y, z) order, got {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------
# Voxel grid
# --------------------------------------------------------------------------------------


class VoxelGrid(eqx.Module):
    """A dense voxel grid of densities and features (a pytree).

    Attributes:
        densities: ``(D, H, W)`` per-voxel density, axes ``(z, y, x)``. In
            ``"pytorch3d"`` / ``"absorption"`` modes an opacity per sample in
            ``[0, 1]``; in ``"physical"`` mode an extinction coefficient
            ``σ ≥ 0`` per world unit.
        features: ``(D, H, W, C)`` per-voxel features (e.g. RGB in ``[0, 1]``),
            or ``None`` for a density-only grid.
        voxel_size: ``(3,)`` spacing between voxel centres in world units,
            ``(x, y, z)`` order.
        center: ``(3,)`` world position of the grid centre (midpoint between
            the first and last voxel centres), ``(x, y, z)`` order. Equals
            ``-volume_translation`` of PyTorch3D's ``Volumes``.

    See the module docstring for the exact world ↔ voxel convention.
    """

    densities: jax.Array
    features: Optional[jax.Array]
    voxel_size: jax.Array
    center: jax.Array

    def __init__(self, densities, features=None, voxel_size=1.0, center=0.0):
        """Build a grid from activated values.

        Args:
            densities: ``(D, H, W)`` float array.
            features: ``(D, H, W, C)`` float array or ``None``.
            voxel_size: scalar or ``(3,)`` world spacing of voxel centres.
            center: scalar or ``(3,)`` world position of the grid centre.
        """
        densities = jnp.asarray(densities)
        check_shape(densities, "densities", ("D", "H", "W"))
        check_float(densities, "densities")
        if features is not None:
            features = jnp.asarray(features)
            check_shape(features, "features", (*densities.shape, "C"))
            check_float(features, "features")
        dtype = densities.dtype
        voxel_size = _as_vec3(voxel_size, "voxel_size", dtype)
        if is_concrete(voxel_size) and not bool(np.all(np.asarray(voxel_size) > 0)):
            raise ValueError(f"voxel_size must be positive, got {np.asarray(voxel_size)}")
        self.densities = densities
        self.features = features
        self.voxel_size = voxel_size
        self.center = _as_vec3(center, "center", dtype)

    @classmethod
    def create(
        cls,
        shape: Sequence[int],
        channels: int = 3,
        voxel_size=1.0,
        center=0.0,
        density: float = 0.0,
        feature: float = 0.0,
        dtype=jnp.float32,
    ) -> "VoxelGrid":
        """A grid filled with constant values.

        Args:
            shape: ``(D, H, W)`` grid size (z, y, x); an int means a cube.
            channels: number of feature channels ``C`` (0 for no features).
            voxel_size: scalar or ``(3,)`` world spacing of voxel centres.
            center: scalar or ``(3,)`` world position of the grid centre.
            density: value of every density.
            feature: value of every feature.
            dtype: float dtype.

        Returns:
            A :class:`VoxelGrid`.
        """
        if isinstance(shape, int):
            shape = (shape,) * 3
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (D, H, W) with positive sizes, got {shape}")
        if channels < 0:
            raise ValueError(f"channels must be >= 0, got {channels}")
        d = jnp.full(shape, density, dtype)
        f = jnp.full(shape + (channels,), feature, dtype) if channels else None
        return cls(d, f, voxel_size, center)

    @classmethod
    def from_activations(
        cls,
        density_logits,
        feature_logits=None,
        voxel_size=1.0,
        center=0.0,
        density_activation: Union[str, Callable, None] = "sigmoid",
        feature_activation: Union[str, Callable, None] = "sigmoid",
    ) -> "VoxelGrid":
        """A grid from unconstrained parameters (what an optimizer updates).

        Args:
            density_logits: ``(D, H, W)`` raw densities (a trailing axis of
                size 1, ``(D, H, W, 1)``, is also accepted).
            feature_logits: ``(D, H, W, C)`` raw features or ``None``.
            voxel_size: scalar or ``(3,)`` world spacing of voxel centres.
            center: scalar or ``(3,)`` world position of the grid centre.
            density_activation: ``"sigmoid"`` (PyTorch3D tutorial; opacities in
                ``[0, 1]``), ``"softplus"``, ``"exp"``, ``"relu"`` (extinction
                coefficients for ``"physical"`` mode), ``None`` or a callable.
            feature_activation: same choices, applied to the features.

        Returns:
            A :class:`VoxelGrid` holding the activated values.
        """
        density_logits = jnp.asarray(density_logits)
        if density_logits.ndim == 4 and density_logits.shape[-1] == 1:
            density_logits = density_logits[..., 0]
        d = _activation(density_activation, "density_activation")(density_logits)
        f = None
        if feature_logits is not None:
            f = _activation(feature_activation, "feature_activation")(jnp.asarray(feature_logits))
        return cls(d, f, voxel_size, center)

    @property
    def shape(self):
        """``(D, H, W)``: grid size along (z, y, x)."""
        return tuple(self.densities.shape)

    @property
    def channels(self) -> int:
        """Number of feature channels ``C`` (0 without features)."""
        return 0 if self.features is None else int(self.features.shape[-1])

    def world_to_voxel(self, points):
        """World points → continuous voxel coordinates.

        Args:
            points: ``(..., 3)`` world points (x, y, z).

        Returns:
            ``(..., 3)`` coordinates ``u`` in (x, y, z) order; ``u = (i, j, k)``
            at the centre of voxel ``[k, j, i]``.
        """
        size_xyz = jnp.asarray(self.shape[::-1], self.voxel_size.dtype)
        return (points - self.center) / self.voxel_size + (size_xyz - 1) / 2

    def voxel_to_world(self, coords):
        """Continuous voxel coordinates (x, y, z order) → world points, ``(..., 3)``."""
        size_xyz = jnp.asarray(self.shape[::-1], self.voxel_size.dtype)
        return (coords - (size_xyz - 1) / 2) * self.voxel_size + self.center

    def voxel_centers(self):
        """World positions of all voxel centres, ``(D, H, W, 3)`` in (x, y, z)."""
        D, H, W = self.shape
        k, j, i = jnp.meshgrid(*(jnp.arange(n, dtype=self.voxel_size.dtype) for n in (D, H, W)), indexing="ij")
        return self.voxel_to_world(jnp.stack([i, j, k], -1))

    def bounds(self):
        """``(lo, hi)``, each ``(3,)``: world box of the first / last voxel centres."""
        size_xyz = jnp.asarray(self.shape[::-1], self.voxel_size.dtype)
        half = (size_xyz - 1) / 2 * self.voxel_size
        return self.center - half, self.center + half

    def sample(self, points):
        """Trilinearly sample the grid at world points (zero outside).

        Args:
            points: ``(..., 3)`` world points.

        Returns:
            ``(densities (...,), features (..., C) or None)``.
        """
        u = self.world_to_voxel(points)
        d = trilinear_sample(self.densities, u)
        f = None if self.features is None else trilinear_sample(self.features, u)
        return d, f


# --------------------------------------------------------------------------------------
# Trilinear sampling
# --------------------------------------------------------------------------------------


def _pad_table(values):
    """``(D, H, W, C)`` → ``(D+2, H+2, W+2, C)`` with a zero border (zero padding)."""
    return jnp.pad(values, ((1, 1), (1, 1), (1, 1), (0, 0)))


def _corner_and_frac(coords, sizes_xyz):
    """Lower corner (in the padded table) and fractions for continuous coords.

    ``coords`` ``(N, 3)`` in (x, y, z) voxel units. Returns int32 ``(N, 3)``
    start indices in (z, y, x) table order, the same indices with an
    out-of-range sentinel for points whose value is identically zero (outside
    the open box ``(-1, size)`` on some axis; used by the backward pass), and
    ``(N, 3)`` fractions (x, y, z). Coordinates are clamped to the padded
    table, whose border is zero, so points far outside read exactly 0 with
    zero gradient and never index out of range.
    """
    n = jnp.asarray(sizes_xyz, coords.dtype)
    p = jnp.clip(coords + 1, 0, n + 1)
    i0 = jnp.clip(jnp.floor(p), 0, n)
    frac = p - lax.stop_gradient(i0)
    start = i0.astype(jnp.int32)[:, ::-1]
    inside = jnp.all((coords > -1) & (coords < n), axis=-1)
    # z start = D + 2 puts the whole 2-voxel window past the end of the table.
    oob = jnp.asarray([int(sizes_xyz[2]) + 2, 0, 0], jnp.int32)
    drop_start = jnp.where(lax.stop_gradient(inside)[:, None], start, oob)
    return start, drop_start, frac


_GATHER_DNUMS = lax.GatherDimensionNumbers(offset_dims=(1, 2, 3, 4), collapsed_slice_dims=(), start_index_map=(0, 1, 2))
_SCATTER_DNUMS = lax.ScatterDimensionNumbers(
    update_window_dims=(1, 2, 3, 4), inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1, 2)
)


@jax.custom_vjp
def _gather_blocks(table, start, drop_start):
    """Gather the 2×2×2 neighbourhood of each start index: ``(N, 2, 2, 2, C)``.

    Linear in ``table``; its transpose is a scatter-add at ``drop_start``,
    whose out-of-range windows (samples where the field is identically zero)
    are skipped: they would otherwise all add zeros-worth of gradient into
    the discarded border, as atomics piling onto a few addresses on GPUs.
    """
    del drop_start
    C = table.shape[-1]
    return lax.gather(
        table, start, _GATHER_DNUMS, slice_sizes=(2, 2, 2, C), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )


def _gather_blocks_fwd(table, start, drop_start):
    # A zero-size array carries the table's shape and dtype into the backward pass.
    return _gather_blocks(table, start, drop_start), (drop_start, jnp.zeros(table.shape[:-1] + (0,), table.dtype))


def _gather_blocks_bwd(res, ct):
    drop_start, proto = res
    zeros = jnp.zeros(proto.shape[:-1] + ct.shape[-1:], proto.dtype)
    g = lax.scatter_add(zeros, drop_start, ct.astype(proto.dtype), _SCATTER_DNUMS, mode=lax.GatherScatterMode.FILL_OR_DROP)
    return g, None, None


_gather_blocks.defvjp(_gather_blocks_fwd, _gather_blocks_bwd)


def _interp_blocks(blocks, frac):
    """Trilinear blend of ``(N, 2, 2, 2, C)`` blocks with ``(N, 3)`` (x, y, z) fractions.

    Written as nested lerps on slices (elementwise only) rather than a
    contraction, so XLA fuses the gather, the blend and, in the backward pass,
    the scatter's updates without materialising ``(N, 8, C)`` arrays.
    """
    fx, fy, fz = (frac[:, a, None].astype(blocks.dtype) for a in range(3))

    def lerp(a, b, f):
        return a + f * (b - a)

    b = blocks
    c00 = lerp(b[:, 0, 0, 0], b[:, 0, 0, 1], fx)
    c01 = lerp(b[:, 0, 1, 0], b[:, 0, 1, 1], fx)
    c10 = lerp(b[:, 1, 0, 0], b[:, 1, 0, 1], fx)
    c11 = lerp(b[:, 1, 1, 0], b[:, 1, 1, 1], fx)
    return lerp(lerp(c00, c01, fy), lerp(c10, c11, fy), fz)


def _sample_padded(table, coords):
    """Sample a zero-padded ``(D+2, H+2, W+2, C)`` table at ``(N, 3)`` coords → ``(N, C)``."""
    sizes_xyz = (table.shape[2] - 2, table.shape[1] - 2, table.shape[0] - 2)
    start, drop_start, frac = _corner_and_frac(coords, sizes_xyz)
    return _interp_blocks(_gather_blocks(table, start, drop_start), frac)


def trilinear_sample(grid_values, coords):
    """Trilinear interpolation of a voxel array with zero padding.

    Values sit at voxel centres: ``coords = (i, j, k)`` returns exactly
    ``grid_values[k, j, i]`` (``align_corners=True``). Voxels outside the array
    read as zero, so the result falls linearly to 0 over one voxel beyond the
    outermost centres and is 0 further out (``padding_mode="zeros"``).
    Implemented with one gather of the 2×2×2 neighbourhood per point;
    differentiable w.r.t. ``grid_values`` (the transpose is a scatter-add) and
    w.r.t. ``coords`` (piecewise linear; kinks on planes through centres).

    Args:
        grid_values: ``(D, H, W)`` or ``(D, H, W, C)`` array, axes (z, y, x).
        coords: ``(..., 3)`` continuous voxel coordinates in (x, y, z) order
            (x indexes the ``W`` axis, z the ``D`` axis).

    Returns:
        ``(...)`` or ``(..., C)`` interpolated values.
    """
    grid_values = jnp.asarray(grid_values)
    coords = jnp.asarray(coords)
    if grid_values.ndim not in (3, 4):
        raise ValueError(f"grid_values must have shape (D, H, W) or (D, H, W, C), got {tuple(grid_values.shape)}")
    check_shape(coords, "coords", (3,), batch_ok=True)
    check_float(coords, "coords")
    squeeze = grid_values.ndim == 3
    table = grid_values[..., None] if squeeze else grid_values
    batch = coords.shape[:-1]
    out = _sample_padded(_pad_table(table), coords.reshape(-1, 3).astype(jnp.result_type(coords, table)))
    out = out.reshape(batch + (table.shape[-1],))
    return out[..., 0] if squeeze else out


# --------------------------------------------------------------------------------------
# Compositing
# --------------------------------------------------------------------------------------


def _exclusive_cumprod(x, axis=-1):
    """``out[i] = prod_{j<i} x[j]`` along ``axis``."""
    x = jnp.moveaxis(x, axis, -1)
    ones = jnp.ones_like(x[..., :1])
    return jnp.moveaxis(jnp.cumprod(jnp.concatenate([ones, x[..., :-1]], -1), axis=-1), -1, axis)


def _weights_opacity(densities, deltas, mode, eps, axis=-1):
    """Per-sample weights and ray opacity; samples run along ``axis``."""
    if mode == "pytorch3d":
        alpha = densities
        trans = _exclusive_cumprod((1 + eps) - alpha, axis)
        weights = alpha * trans
        opacity = 1 - jnp.prod(1 - alpha, axis=axis)
    elif mode == "physical":
        tau = densities * deltas
        acc = jnp.cumsum(tau, axis=axis)
        alpha = -jnp.expm1(-tau)
        weights = alpha * jnp.exp(-(acc - tau))
        opacity = -jnp.expm1(-jnp.take(acc, -1, axis=axis))
    else:
        raise ValueError(f"mode must be 'pytorch3d' or 'physical' for compositing, got {mode!r}")
    return weights, opacity


def composite(densities, features, depths, *, mode="pytorch3d", deltas=None, eps=1e-10, background=None):
    """Emission–absorption compositing of samples along rays.

    Args:
        densities: ``(..., S)`` per-sample density: opacity in ``[0, 1]`` for
            ``mode="pytorch3d"``, extinction ``σ ≥ 0`` per world unit for
            ``mode="physical"``. Samples are ordered front to back.
        features: ``(..., S, C)`` per-sample features (colours), or ``None``.
        depths: ``(..., S)`` sample depths (for the expected depth).
        mode: ``"pytorch3d"`` (EmissionAbsorptionRaymarcher: ``α = density``,
            ``w_i = α_i Π_{j<i}(1 + eps - α_j)``, ``opacity = 1 - Π(1 - α)``) or
            ``"physical"`` (``α = 1 - exp(-σ δ)``).
        deltas: ``(..., S)`` world length represented by each sample;
            required for ``"physical"``.
        eps: PyTorch3D's transmittance epsilon (``"pytorch3d"`` only).
        background: optional ``(C,)`` colour added with weight ``1 - opacity``.

    Returns:
        dict with ``rgb`` ``(..., C)`` (only when ``features`` is given),
        ``opacity`` ``(...)``, ``depth`` ``(...)`` (expected depth ``Σ w t``) and
        ``weights`` ``(..., S)``.
    """
    if mode not in ("pytorch3d", "physical"):
        raise ValueError(f"mode must be 'pytorch3d' or 'physical', got {mode!r}")
    densities = jnp.asarray(densities)
    depths = jnp.asarray(depths)
    if depths.shape != densities.shape:
        raise ValueError(f"depths must have the shape of densities {tuple(densities.shape)}, got {tuple(depths.shape)}")
    if features is not None:
        features = jnp.asarray(features)
        check_shape(features, "features", (*densities.shape, "C"))
    if mode == "physical":
        if deltas is None:
            raise ValueError("deltas is required for mode='physical'")
        deltas = jnp.broadcast_to(jnp.asarray(deltas, densities.dtype), densities.shape)
    weights, opacity = _weights_opacity(densities, deltas, mode, eps)
    out = {"opacity": opacity, "depth": jnp.sum(weights * depths, -1), "weights": weights}
    if features is not None:
        rgb = jnp.einsum("...s,...sc->...c", weights, features)
        if background is not None:
            rgb = rgb + (1 - opacity)[..., None] * jnp.asarray(background, rgb.dtype)
        out["rgb"] = rgb
    return out


def absorption_only(densities, *, mode="pytorch3d", deltas=None):
    """Opacity of rays through an absorbing medium (no emission).

    Args:
        densities: ``(..., S)`` per-sample opacity (``"pytorch3d"``) or
            extinction coefficient (``"physical"``).
        mode: ``"pytorch3d"``: ``1 - Π (1 - d_i)`` (PyTorch3D's
            AbsorptionOnlyRaymarcher); ``"physical"``: ``1 - exp(-Σ σ_i δ_i)``.
        deltas: ``(..., S)`` world lengths (``"physical"`` only).

    Returns:
        ``(...)`` opacity in ``[0, 1]``.
    """
    densities = jnp.asarray(densities)
    if mode == "pytorch3d" or mode == "absorption":
        return 1 - jnp.prod(1 - densities, axis=-1)
    if mode == "physical":
        if deltas is None:
            raise ValueError("deltas is required for mode='physical'")
        return -jnp.expm1(-jnp.sum(densities * deltas, -1))
    raise ValueError(f"mode must be 'pytorch3d' or 'physical', got {mode!r}")


# --------------------------------------------------------------------------------------
# Rays
# --------------------------------------------------------------------------------------


class Rays(eqx.Module):
    """A batch of rays in world space.

    Attributes:
        origins: ``(..., 3)`` ray origins (the camera centre).
        directions: ``(..., 3)`` directions, *not* normalised: their camera-frame
            ``z`` is 1, so the ray parameter is the view depth.
    """

    origins: jax.Array
    directions: jax.Array

    @property
    def shape(self):
        """Batch shape (``origins.shape[:-1]``)."""
        return tuple(self.directions.shape[:-1])


def _pixel_rays(camera, xy=None):
    from jaxrender.camera import pixel_rays

    o, d = pixel_rays(camera, xy, normalize=False)
    d = jnp.asarray(d)
    o = jnp.broadcast_to(jnp.asarray(o, d.dtype), d.shape)
    return Rays(o, d)


def grid_rays(camera) -> Rays:
    """Rays through every pixel centre of a camera.

    Args:
        camera: a :class:`jaxrender.camera.Camera`.

    Returns:
        :class:`Rays` of shape ``(H, W)``; pixel ``(row i, col j)`` is the ray
        through ``(x = j + 0.5, y = i + 0.5)``.
    """
    return _pixel_rays(camera, None)


def sample_rays(key, camera, n: int):
    """Rays through ``n`` distinct pixels drawn uniformly at random.

    Args:
        key: PRNG key.
        camera: a :class:`jaxrender.camera.Camera`.
        n: number of pixels (``<= H * W``).

    Returns:
        ``(rays, pixels)``: :class:`Rays` of shape ``(n,)`` through the pixel
        centres, and ``(n, 2)`` int32 ``(row, col)`` of the chosen pixels, so
        the matching target is ``image[pixels[:, 0], pixels[:, 1]]``.
    """
    H, W = camera.height, camera.width
    if not 0 < n <= H * W:
        raise ValueError(f"n must be in [1, {H * W}] (the number of pixels), got {n}")
    idx = jax.random.permutation(key, H * W)[:n]
    rows, cols = idx // W, idx % W
    dtype = jnp.asarray(camera.fx).dtype
    xy = jnp.stack([cols.astype(dtype) + 0.5, rows.astype(dtype) + 0.5], -1)
    return _pixel_rays(camera, xy), jnp.stack([rows, cols], -1).astype(jnp.int32)


def ray_depths(n_samples: int, near, far, key=None, shape=(), dtype=jnp.float32):
    """Sample depths along rays and the depth length each sample represents.

    Without a key the depths are ``linspace(near, far, n_samples)`` (PyTorch3D's
    grid ray sampler). Sample ``i`` stands for its *stratum*: from the midpoint
    with its predecessor (or ``near``) to the midpoint with its successor (or
    ``far``); the strata tile ``[near, far]``. With a key every depth is drawn
    uniformly inside its stratum, independently per ray (stratified sampling).

    Args:
        n_samples: ``S``.
        near, far: depth range (view depth units), ``0 <= near < far``.
        key: optional PRNG key for stratified jitter.
        shape: batch shape of the rays.
        dtype: float dtype.

    Returns:
        ``(depths, deltas)``, each ``(*shape, S)``: sample depths (increasing)
        and stratum lengths in depth units (``Σ deltas = far - near``).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    near = jnp.asarray(near, dtype)
    far = jnp.asarray(far, dtype)
    t = jnp.linspace(near, far, n_samples, dtype=dtype) if n_samples > 1 else ((near + far) / 2)[None]
    mids = (t[1:] + t[:-1]) / 2
    lower = jnp.concatenate([near[None], mids])
    upper = jnp.concatenate([mids, far[None]])
    deltas = jnp.broadcast_to(upper - lower, tuple(shape) + (n_samples,))
    if key is None:
        return jnp.broadcast_to(t, tuple(shape) + (n_samples,)), deltas
    u = jax.random.uniform(key, tuple(shape) + (n_samples,), dtype)
    return lower + (upper - lower) * u, deltas


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def render_volume(
    grid: VoxelGrid,
    camera=None,
    n_samples: int = 150,
    near: float = 0.1,
    far: float = 3.0,
    mode: str = "pytorch3d",
    rays: Optional[Rays] = None,
    key=None,
    chunk_size: Optional[int] = None,
    *,
    eps: float = 1e-10,
    background=None,
    return_weights: bool = False,
    save_samples: bool = True,
    backend: Optional[str] = None,
    interpret: bool = False,
    pallas_options: Optional[dict] = None,
):
    """Render a voxel grid by ray marching (emission–absorption).

    Each ray is sampled at ``n_samples`` depths in ``[near, far]`` (see
    :func:`ray_depths`), the grid's densities and features are read by
    trilinear interpolation (zero outside the grid) and the samples are
    composited front to back (see :func:`composite` and the module docstring).

    Memory: rays are processed in chunks of ``chunk_size`` with
    ``lax.map``; each chunk is rematerialised in the backward pass, keeping
    only the per-sample values ``(chunk, S, 1 + C)`` when ``save_samples``
    (else nothing, recomputing the gathers), so memory is bounded by the
    chunk size rather than the image size.

    Args:
        grid: the :class:`VoxelGrid` (activated values).
        camera: a :class:`jaxrender.camera.Camera`; used to make rays through
            every pixel when ``rays`` is ``None``.
        n_samples: samples per ray ``S``.
        near, far: depth range along each ray (view depth units).
        mode: ``"pytorch3d"``, ``"physical"`` or ``"absorption"``.
        rays: optional :class:`Rays` of any batch shape (e.g. from
            :func:`sample_rays`); overrides ``camera``.
        key: optional PRNG key; jitters sample depths within their strata.
        chunk_size: rays per chunk (``None``: all rays at once).
        eps: PyTorch3D's transmittance epsilon (``"pytorch3d"`` mode).
        background: optional ``(C,)`` colour composited behind the volume.
        return_weights: also return the per-sample weights ``(..., S)``.
        save_samples: keep the sampled values for the backward pass (faster,
            ``4 (1 + C) S`` bytes per ray in float32) instead of re-gathering.
            XLA path only.
        backend: ``None`` / ``"auto"``: the fused GPU kernels
            (:mod:`jaxrender.volume_pallas`) on a GPU with Pallas' Triton
            backend when they support the options (float32, at most
            ``volume_pallas.MAX_CHANNELS`` table channels, no
            ``return_weights``), else XLA; ``"xla"``: always XLA (the
            reference, and the CPU path); ``"pallas"``: the kernels, raising
            if they do not support the options. The kernels march all rays at
            once (``chunk_size`` then only decides how the jittered depths are
            drawn, so both paths sample the same depths) and need one float
            per ray and sample for the backward pass.
        interpret: run the kernels in Pallas' interpret mode (any device;
            tests). With ``backend=None`` / ``"auto"`` it selects them.
        pallas_options: kernel tuning, keys of
            ``volume_pallas.DEFAULT_OPTIONS`` (``block_rays``, ``num_warps``,
            ``merge_corners``, ``clip_to_box``).

    Returns:
        dict with ``opacity`` ``(...)`` and, except in ``"absorption"`` mode,
        ``rgb`` ``(..., C)`` (when the grid has features), ``depth`` ``(...)``
        (expected view depth, not normalised) and optionally ``weights``
        ``(..., S)``; ``...`` is ``(H, W)`` for camera rays or the batch shape
        of ``rays``.
    """
    if not isinstance(grid, VoxelGrid):
        raise TypeError(f"grid must be a VoxelGrid, got {type(grid).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if isinstance(near, (int, float)) and isinstance(far, (int, float)) and not 0 <= near < far:
        raise ValueError(f"need 0 <= near < far, got near={near}, far={far}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if rays is None:
        if camera is None:
            raise ValueError("give a camera or rays")
        rays = grid_rays(camera)
    if not isinstance(rays, Rays):
        raise TypeError(f"rays must be a Rays, got {type(rays).__name__}")
    check_shape(rays.origins, "rays.origins", (3,), batch_ok=True)
    check_shape(rays.directions, "rays.directions", (3,), batch_ok=True)

    if backend is not None and backend not in ("auto", "xla", "pallas"):
        raise ValueError(f"backend must be None, 'auto', 'xla' or 'pallas', got {backend!r}")
    if backend != "xla":
        from jaxrender import volume_pallas as VP

        channels = 1 + (grid.channels if mode != "absorption" else 0)
        D, H, W = grid.shape
        reason = VP.unsupported_reason(mode=mode, dtype=grid.densities.dtype, channels=channels,
                                       table_size=(D + 2) * (H + 2) * (W + 2) * channels,
                                       return_weights=bool(return_weights))
        if VP.resolve_backend(backend, reason, bool(interpret)) == "pallas":
            opts = dict(VP.DEFAULT_OPTIONS)
            unknown = set(pallas_options or {}) - set(opts)
            if unknown:
                raise ValueError(f"pallas_options: unknown keys {sorted(unknown)}; known: {sorted(opts)}")
            opts.update(pallas_options or {})
            block = int(opts["block_rays"])
            if block < 1 or block & (block - 1):
                raise ValueError(f"pallas_options['block_rays'] must be a power of two, got {block}")
            return _render_pallas_jit(
                grid, rays, near, far, key, background, n_samples=int(n_samples), mode=mode,
                chunk_size=None if chunk_size is None else int(chunk_size), eps=float(eps), block_rays=block,
                num_warps=int(opts["num_warps"]), merge_corners=bool(opts["merge_corners"]),
                clip_to_box=bool(opts["clip_to_box"]), interpret=bool(interpret))

    return _render_jit(
        grid,
        rays,
        near,
        far,
        key,
        background,
        n_samples=int(n_samples),
        mode=mode,
        chunk_size=None if chunk_size is None else int(chunk_size),
        eps=float(eps),
        return_weights=bool(return_weights),
        save_samples=bool(save_samples),
    )


def _volume_table(grid, mode):
    """The zero-padded ``(D+2, H+2, W+2, 1 + n_feat)`` table of density then features, and ``n_feat``."""
    dtype = grid.densities.dtype
    n_feat = grid.channels if mode != "absorption" else 0
    if n_feat:
        table = jnp.concatenate([grid.densities[..., None], grid.features.astype(dtype)], -1)
    else:
        table = grid.densities[..., None]
    return _pad_table(table), n_feat


def _voxel_rays(grid, rays):
    """Flat rays in voxel coordinates: ``(o_vox (N, 3), d_vox (N, 3), d_norm (N,))``."""
    dtype = grid.densities.dtype
    o = jnp.broadcast_to(rays.origins, rays.directions.shape).reshape(-1, 3).astype(dtype)
    d = rays.directions.reshape(-1, 3).astype(dtype)
    # Work in voxel coordinates: u = (p - center) / s + (size - 1) / 2 is affine in p,
    # so the ray in voxel space is u(t) = u_o + t * d / s. The depth strata are
    # converted to world lengths with the world direction norm (physical mode).
    size_xyz = jnp.asarray(grid.shape[::-1], dtype)
    o_vox = (o - grid.center) / grid.voxel_size + (size_xyz - 1) / 2
    d_vox = d / grid.voxel_size
    d_norm = jnp.linalg.norm(d, axis=-1)
    return o_vox, d_vox, d_norm


@functools.partial(
    jax.jit, static_argnames=("n_samples", "mode", "chunk_size", "eps", "return_weights", "save_samples")
)
def _render_jit(grid, rays, near, far, key, background, *, n_samples, mode, chunk_size, eps, return_weights, save_samples):
    dtype = grid.densities.dtype
    table, n_feat = _volume_table(grid, mode)
    batch = rays.shape
    o_vox, d_vox, d_norm = _voxel_rays(grid, rays)
    N = d_vox.shape[0]

    fn = jax.checkpoint(
        _march_chunk_world,
        policy=jax.checkpoint_policies.save_only_these_names(_SAMPLES_NAME) if save_samples else None,
        static_argnums=(5, 6, 7, 8, 9),
    )
    statics = (int(n_samples), mode, float(eps), n_feat, bool(return_weights))

    cs = N if chunk_size is None else min(int(chunk_size), N)
    n_chunks = -(-N // cs)
    pad = n_chunks * cs - N
    if pad:
        o_vox = jnp.concatenate([o_vox, jnp.broadcast_to(o_vox[:1], (pad, 3))])
        d_vox = jnp.concatenate([d_vox, jnp.broadcast_to(d_vox[:1], (pad, 3))])
        d_norm = jnp.concatenate([d_norm, jnp.broadcast_to(d_norm[:1], (pad,))])
    near_a = jnp.asarray(near, dtype)
    far_a = jnp.asarray(far, dtype)
    if n_chunks == 1:
        k = key
        out = fn(table, o_vox, d_vox, d_norm, (near_a, far_a, k), *statics)
    else:
        keys = None if key is None else jax.random.split(key, n_chunks)
        xs = (o_vox.reshape(n_chunks, cs, 3), d_vox.reshape(n_chunks, cs, 3), d_norm.reshape(n_chunks, cs), keys)

        def body(x):
            oc, dc, nc, kc = x
            return fn(table, oc, dc, nc, (near_a, far_a, kc), *statics)

        out = lax.map(body, xs)
        out = jax.tree.map(lambda a: a.reshape((n_chunks * cs,) + a.shape[2:]), out)
    out = {k_: v[:N].reshape(batch + v.shape[1:]) for k_, v in out.items()}
    if background is not None and "rgb" in out:
        out["rgb"] = out["rgb"] + (1 - out["opacity"])[..., None] * jnp.asarray(background, dtype)
    return out


@functools.partial(
    jax.jit, static_argnames=("n_samples", "mode", "chunk_size", "eps", "block_rays", "num_warps", "merge_corners",
                              "clip_to_box", "interpret")
)
def _render_pallas_jit(grid, rays, near, far, key, background, *, n_samples, mode, chunk_size, eps, block_rays,
                       num_warps, merge_corners, clip_to_box, interpret):
    """``_render_jit`` with the fused kernels (``jaxrender.volume_pallas``): same samples, same outputs."""
    from jaxrender import volume_pallas as VP

    dtype = grid.densities.dtype
    table, n_feat = _volume_table(grid, mode)
    batch = rays.shape
    o_vox, d_vox, d_norm = _voxel_rays(grid, rays)
    N = d_vox.shape[0]
    near_a = jnp.asarray(near, dtype)
    far_a = jnp.asarray(far, dtype)
    t, deltas = ray_depths(n_samples, near_a, far_a, key=None, shape=(), dtype=dtype)
    if key is not None:
        # The depths the XLA path draws: one key for all rays, or one per chunk of chunk_size rays.
        cs = N if chunk_size is None else min(int(chunk_size), N)
        n_chunks = -(-N // cs)
        if n_chunks == 1:
            t = ray_depths(n_samples, near_a, far_a, key=key, shape=(cs,), dtype=dtype)[0]
        else:
            keys = jax.random.split(key, n_chunks)
            t = jax.vmap(lambda k: ray_depths(n_samples, near_a, far_a, key=k, shape=(cs,), dtype=dtype)[0])(keys)
            t = t.reshape(n_chunks * cs, n_samples)[:N]
    n_pad = -(-N // block_rays) * block_rays
    pad = n_pad - N
    cols = [o_vox[:, 0], o_vox[:, 1], o_vox[:, 2], d_vox[:, 0], d_vox[:, 1], d_vox[:, 2], d_norm]
    cols = tuple(jnp.concatenate([c, jnp.broadcast_to(c[:1], (pad,))]) if pad else c for c in cols)
    if key is not None:
        t = t.T
        if pad:
            t = jnp.concatenate([t, jnp.broadcast_to(t[:, :1], (n_samples, pad))], 1)
    cfg = VP.MarchConfig(mode=mode, n_samples=int(n_samples), dims=tuple(table.shape[:3]), channels=table.shape[-1],
                         eps=float(eps), jitter=key is not None, block_rays=int(block_rays),
                         num_warps=int(num_warps), merge_corners=bool(merge_corners), clip_to_box=bool(clip_to_box),
                         interpret=bool(interpret))
    outs = VP.march(cfg, table.reshape(-1), cols, t, deltas, near_a, far_a)
    outs = [o_[:N].reshape(batch) for o_ in outs]
    if mode == "absorption":
        return {"opacity": outs[0]}
    out = {"opacity": outs[n_feat], "depth": outs[n_feat + 1]}
    if n_feat:
        out["rgb"] = jnp.stack(outs[:n_feat], -1)
        if background is not None:
            out["rgb"] = out["rgb"] + (1 - out["opacity"])[..., None] * jnp.asarray(background, dtype)
    return out


def _march_chunk_world(table, o_vox, d_vox, d_norm, dyn, n_samples, mode, eps, n_feat, return_weights):
    """One chunk: rays given in voxel coordinates (``u = u_o + t d_vox``)."""
    from jax.ad_checkpoint import checkpoint_name

    near, far, key = dyn
    R = o_vox.shape[0]
    dtype = table.dtype
    t, deltas = ray_depths(n_samples, near, far, key=key, shape=(R,), dtype=dtype)
    # Sample-major layout (S, R, ...): the sums and products over samples
    # reduce the leading axis, which XLA does with coalesced reads (reducing
    # the middle axis of (R, S, C) ran ~4x slower on an H200), and the
    # scatter of the backward pass visits neighbouring rays, not one ray's
    # consecutive samples.
    t, deltas = t.T, deltas.T
    coords = o_vox[None, :, :] + t[..., None] * d_vox[None, :, :]
    vals = _sample_padded(table, coords.reshape(-1, 3))
    vals = checkpoint_name(vals.reshape(n_samples, R, table.shape[-1]), _SAMPLES_NAME)
    dens = vals[..., 0]
    if mode == "absorption":
        return {"opacity": 1 - jnp.prod(1 - dens, axis=0)}
    if mode == "physical":
        deltas = deltas * d_norm[None, :]
    weights, opacity = _weights_opacity(dens, deltas, mode, eps, axis=0)
    out = {"opacity": opacity, "depth": jnp.sum(weights * t, 0)}
    if n_feat:
        out["rgb"] = jnp.sum(weights[..., None] * vals[..., 1:], 0)
    if return_weights:
        out["weights"] = weights.T
    return out

"""Rotations and rigid transforms.

Conventions (see ``docs/conventions.md``):

* Rotation matrices act on **column vectors**: ``v_rotated = R @ v``. For an
  array of points stored as rows ``(N, 3)`` that is ``points @ R.T``.
* Angles are in radians.
* Rotation functions accept any number of leading batch axes (``(..., 3)``
  angles give ``(..., 3, 3)`` matrices). Rigid transforms ``(R, t)`` map
  ``x -> R @ x + t``.
* Quaternions are ``(w, x, y, z)`` (scalar first), Hamilton convention, and
  ``quaternion_to_matrix`` of ``q`` equals ``axis_angle_to_matrix`` of the same
  rotation.

Every function is differentiable with finite gradients everywhere that the
rotation is (the exp/log maps use Taylor expansions near zero; the
matrix -> quaternion map picks the numerically best-conditioned branch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrender._checks import as_float as _as_float, check_shape


__all__ = [
    "EULER_ORDERS",
    "euler_to_matrix",
    "matrix_to_euler",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "rotation_6d_to_matrix",
    "matrix_to_rotation_6d",
    "look_at_rotation",
    "compose_rigid",
    "invert_rigid",
    "apply_rigid",
]


def _mm(a, b):
    """``a @ b`` in true float32: GPUs default float32 matmuls to TF32 (10-bit mantissa)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


#: The six Tait-Bryan axis orders accepted by :func:`euler_to_matrix`.
EULER_ORDERS = ("xyz", "xzy", "yxz", "yzx", "zxy", "zyx")
_AXIS = {"x": 0, "y": 1, "z": 2}


def _check_order(order):
    # Upper case is rejected on purpose: SciPy reads "XYZ" as intrinsic rotations.
    if not isinstance(order, str) or order not in EULER_ORDERS:
        raise ValueError(f"order must be one of {EULER_ORDERS} (lower case, extrinsic), got {order!r}")
    return order


def _axis_rotation(axis: str, angle):
    """Rotation by ``angle`` (..., ) about a coordinate axis, shape (..., 3, 3)."""
    c, s = jnp.cos(angle), jnp.sin(angle)
    one, zero = jnp.ones_like(angle), jnp.zeros_like(angle)
    if axis == "x":
        rows = ((one, zero, zero), (zero, c, -s), (zero, s, c))
    elif axis == "y":
        rows = ((c, zero, s), (zero, one, zero), (-s, zero, c))
    else:
        rows = ((c, -s, zero), (s, c, zero), (zero, zero, one))
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def _safe_norm(v, axis=-1, keepdims=False, eps=1e-30):
    """Euclidean norm with a finite gradient at zero (gradient 0 there)."""
    n2 = jnp.sum(v * v, axis=axis, keepdims=keepdims)
    safe = jnp.where(n2 > eps, n2, 1.0)
    return jnp.where(n2 > eps, jnp.sqrt(safe), 0.0)


def _normalize(v, eps=1e-30):
    n2 = jnp.sum(v * v, axis=-1, keepdims=True)
    return v * jnp.where(n2 > eps, 1.0 / jnp.sqrt(jnp.where(n2 > eps, n2, 1.0)), 0.0)


# ----------------------------------------------------------------------------
# Euler angles
# ----------------------------------------------------------------------------


def euler_to_matrix(angles, order: str = "xyz"):
    """Rotation matrix from Euler (Tait-Bryan) angles.

    ``angles[..., i]`` is the angle about the *fixed* (world) axis
    ``order[i]``, and the three rotations are applied in that order to column
    vectors (extrinsic convention)::

        R = R_{order[2]}(angles[..., 2]) @ R_{order[1]}(angles[..., 1]) @ R_{order[0]}(angles[..., 0])

    Equivalently, intrinsic rotations about the moving axes in the reversed
    order. FaceVerse / Deep3DFaceRecon use ``order="xyz"``, i.e.
    ``R = Rz @ Ry @ Rx`` with angles ``(pitch, yaw, roll)``; their code
    returns ``R.T`` and applies it to row vectors as ``v @ R.T`` — the same
    rotation.

    Args:
      angles: ``(..., 3)`` angles in radians.
      order: one of ``"xyz", "xzy", "yxz", "yzx", "zxy", "zyx"``.

    Returns:
      ``(..., 3, 3)`` rotation matrices.
    """
    order = _check_order(order)
    angles = _as_float(angles)
    check_shape(angles, "angles", (3,), batch_ok=True)
    r0 = _axis_rotation(order[0], angles[..., 0])
    r1 = _axis_rotation(order[1], angles[..., 1])
    r2 = _axis_rotation(order[2], angles[..., 2])
    return _mm(_mm(r2, r1), r0)


def matrix_to_euler(R, order: str = "xyz"):
    """Euler angles of a rotation matrix; the inverse of :func:`euler_to_matrix`.

    The middle angle is returned in ``[-pi/2, pi/2]``, the other two in
    ``[-pi, pi]``. The first angle is read from the matrix, the middle one
    from a well-conditioned ``atan2``, and the last one from what remains of
    ``R`` once the first two rotations are undone, so
    ``euler_to_matrix(matrix_to_euler(R)) == R`` to rounding error for every
    rotation, including at and near gimbal lock (middle angle ``±pi/2``). There
    only the sum or difference of the outer angles is defined; at exact lock
    the first angle is 0.

    Args:
      R: ``(..., 3, 3)`` rotation matrices.
      order: one of ``"xyz", "xzy", "yxz", "yzx", "zxy", "zyx"``.

    Returns:
      ``(..., 3)`` angles in radians, ``angles[..., i]`` about axis ``order[i]``.
    """
    order = _check_order(order)
    R = _as_float(R)
    check_shape(R, "R", (3, 3), batch_ok=True)
    i, j, k = (_AXIS[a] for a in order)
    # +1 for cyclic orders (xyz, yzx, zxy), -1 for the others.
    sign = 1.0 if (j - i) % 3 == 1 else -1.0
    # With R = R_k(c) R_j(b) R_i(a): R[k, i] = -sign sin(b), the rest of column
    # i has norm cos(b), and row k is cos(b) (.., sign sin(a), cos(a)).
    cos_b = _safe_norm(jnp.stack([R[..., i, i], R[..., j, i]], axis=-1))
    beta = jnp.arctan2(-sign * R[..., k, i], cos_b)
    y, x = sign * R[..., k, j], R[..., k, k]
    exact_lock = x * x + y * y < 1e-30  # atan2(0, 0): pick a = 0, keep the gradient finite
    alpha = jnp.arctan2(jnp.where(exact_lock, 0.0, y), jnp.where(exact_lock, 1.0, x))
    # R_k(c) = R @ (R_j(b) R_i(a)).T, read with the two axes that follow k cyclically.
    A = _mm(_axis_rotation(order[1], beta), _axis_rotation(order[0], alpha))
    M = _mm(R, jnp.swapaxes(A, -1, -2))
    p, q = (k + 1) % 3, (k + 2) % 3
    gamma = jnp.arctan2(M[..., q, p], M[..., p, p])
    return jnp.stack([alpha, beta, gamma], axis=-1)


# ----------------------------------------------------------------------------
# Axis-angle (so(3) exp / log)
# ----------------------------------------------------------------------------


def _hat(w):
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    zero = jnp.zeros_like(x)
    return jnp.stack(
        [
            jnp.stack([zero, -z, y], axis=-1),
            jnp.stack([z, zero, -x], axis=-1),
            jnp.stack([-y, x, zero], axis=-1),
        ],
        axis=-2,
    )


def _sinc_of_sq(theta2):
    """sin(theta)/theta as a function of theta**2, smooth and exact at 0."""
    small = theta2 < 1e-4
    theta = jnp.sqrt(jnp.where(small, 1.0, theta2))
    taylor = 1.0 - theta2 / 6.0 + theta2 * theta2 / 120.0
    return jnp.where(small, taylor, jnp.sin(theta) / theta)


def axis_angle_to_matrix(axis_angle):
    """Rotation matrix from an axis-angle vector (the SO(3) exponential map).

    Rodrigues' formula ``R = I + A [w]x + B [w]x^2`` with
    ``A = sin(t)/t``, ``B = (1 - cos t)/t^2 = 0.5 * (sin(t/2)/(t/2))^2`` and
    ``t = |w|``, evaluated with a Taylor series for small ``t`` so that values
    and gradients are exact and finite at ``w = 0``.

    Args:
      axis_angle: ``(..., 3)`` rotation vectors; direction = axis
        (right-hand rule), norm = angle in radians.

    Returns:
      ``(..., 3, 3)`` rotation matrices.
    """
    w = _as_float(axis_angle)
    check_shape(w, "axis_angle", (3,), batch_ok=True)
    theta2 = jnp.sum(w * w, axis=-1)
    a = _sinc_of_sq(theta2)
    b = 0.5 * _sinc_of_sq(theta2 / 4.0) ** 2
    K = _hat(w)
    eye = jnp.eye(3, dtype=w.dtype)
    return eye + a[..., None, None] * K + b[..., None, None] * _mm(K, K)


def matrix_to_axis_angle(R):
    """Axis-angle vector of a rotation matrix (the SO(3) logarithm).

    Computed through the unit quaternion ``(w, v)`` with ``w >= 0`` as
    ``2 * atan2(|v|, w) * v / |v|``, which is accurate near the identity (Taylor
    series, finite gradient at ``R = I``) and near a half turn. Angles are in
    ``[0, pi]``; at exactly ``pi`` the sign of the axis is arbitrary.

    Args:
      R: ``(..., 3, 3)`` rotation matrices.

    Returns:
      ``(..., 3)`` rotation vectors (angle in radians times unit axis).
    """
    R = _as_float(R)
    check_shape(R, "R", (3, 3), batch_ok=True)
    q = matrix_to_quaternion(R)
    w, v = q[..., 0], q[..., 1:]
    n2 = jnp.sum(v * v, axis=-1)
    # atan2(n, w) / n for small n (w ~ 1): (1/w) (1 - x^2/3 + x^4/5), x = n/w.
    small = n2 < 1e-6
    w_safe = jnp.where(small, w, 1.0)
    x2 = n2 / (w_safe * w_safe)
    taylor = (1.0 - x2 / 3.0 + x2 * x2 / 5.0) / w_safe
    n = jnp.sqrt(jnp.where(small, 1.0, n2))
    exact = jnp.arctan2(n, w) / n
    return (2.0 * jnp.where(small, taylor, exact))[..., None] * v


# ----------------------------------------------------------------------------
# Quaternions (w, x, y, z)
# ----------------------------------------------------------------------------


def quaternion_to_matrix(quaternion):
    """Rotation matrix from a quaternion ``(w, x, y, z)``.

    The quaternion need not be unit length; it is normalized (so ``q`` and
    ``c * q`` give the same rotation for any ``c != 0``).

    Args:
      quaternion: ``(..., 4)`` quaternions, scalar part first.

    Returns:
      ``(..., 3, 3)`` rotation matrices.
    """
    q = _as_float(quaternion)
    check_shape(q, "quaternion", (4,), batch_ok=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    n2 = jnp.sum(q * q, axis=-1)
    s = 2.0 / jnp.where(n2 > 0, n2, 1.0)
    rows = (
        (1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)),
        (s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)),
        (s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)),
    )
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_quaternion(R):
    """Unit quaternion ``(w, x, y, z)`` of a rotation matrix, with ``w >= 0``.

    Uses the best-conditioned of the four standard formulas (the one whose
    squared component ``4 q_i^2`` is largest), so it is accurate for every
    rotation including half turns. ``q`` and ``-q`` are the same rotation; the
    one with a non-negative scalar part is returned.

    Args:
      R: ``(..., 3, 3)`` rotation matrices.

    Returns:
      ``(..., 4)`` unit quaternions, scalar part first.
    """
    R = _as_float(R)
    check_shape(R, "R", (3, 3), batch_ok=True)
    r00, r01, r02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    r10, r11, r12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # 4 q_i^2 for i = w, x, y, z.
    sq = jnp.stack(
        [
            1 + r00 + r11 + r22,
            1 + r00 - r11 - r22,
            1 - r00 + r11 - r22,
            1 - r00 - r11 + r22,
        ],
        axis=-1,
    )
    # Row i holds 4 q_i * q, computed from off-diagonal sums/differences.
    cand = jnp.stack(
        [
            jnp.stack([sq[..., 0], r21 - r12, r02 - r20, r10 - r01], axis=-1),
            jnp.stack([r21 - r12, sq[..., 1], r10 + r01, r02 + r20], axis=-1),
            jnp.stack([r02 - r20, r10 + r01, sq[..., 2], r12 + r21], axis=-1),
            jnp.stack([r10 - r01, r20 + r02, r21 + r12, sq[..., 3]], axis=-1),
        ],
        axis=-2,
    )
    # The largest 4 q_i^2 is >= 1, so the floor only guards unused branches.
    denom = 2.0 * jnp.sqrt(jnp.maximum(sq, 0.1))
    cand = cand / denom[..., None]
    best = jnp.argmax(sq, axis=-1)
    onehot = (jnp.arange(4) == best[..., None]).astype(R.dtype)
    q = jnp.sum(onehot[..., None] * cand, axis=-2)
    q = _normalize(q)
    return jnp.where(q[..., :1] < 0, -q, q)


# ----------------------------------------------------------------------------
# 6D representation (Zhou et al. 2019)
# ----------------------------------------------------------------------------


def rotation_6d_to_matrix(d6):
    """Rotation matrix from the continuous 6D representation.

    Zhou, Barnes, Lu, Yang, Li, "On the Continuity of Rotation Representations
    in Neural Networks", CVPR 2019: the two 3-vectors ``a1 = d6[..., :3]`` and
    ``a2 = d6[..., 3:]`` are Gram-Schmidt orthonormalized into ``b1, b2`` and
    completed with ``b3 = b1 x b2``; these are the **columns** of ``R`` (as in
    the paper). PyTorch3D stacks them as rows instead: its 6D vector for ``R``
    is ours for ``R.T``.

    Args:
      d6: ``(..., 6)``; ``a1`` and ``a2`` must be linearly independent.

    Returns:
      ``(..., 3, 3)`` rotation matrices.
    """
    d6 = _as_float(d6)
    check_shape(d6, "d6", (6,), batch_ok=True)
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = _normalize(a1)
    b2 = _normalize(a2 - jnp.sum(b1 * a2, axis=-1, keepdims=True) * b1)
    b3 = jnp.cross(b1, b2)
    return jnp.stack([b1, b2, b3], axis=-1)


def matrix_to_rotation_6d(R):
    """6D representation of a rotation: its first two columns, ``(R[:, 0], R[:, 1])``.

    Args:
      R: ``(..., 3, 3)`` rotation matrices.

    Returns:
      ``(..., 6)``: ``[R[..., :, 0], R[..., :, 1]]`` concatenated; the inverse of
      :func:`rotation_6d_to_matrix`.
    """
    R = _as_float(R)
    check_shape(R, "R", (3, 3), batch_ok=True)
    return jnp.concatenate([R[..., :, 0], R[..., :, 1]], axis=-1)


# ----------------------------------------------------------------------------
# Look-at and rigid transforms
# ----------------------------------------------------------------------------


def look_at_rotation(eye, target, up=(0.0, 1.0, 0.0)):
    """World -> camera rotation of a camera at ``eye`` looking at ``target``.

    The camera frame is OpenCV's: its z axis points from ``eye`` to ``target``,
    x to the right and y **down** in the image, so that the world direction
    ``up`` appears upwards (towards smaller pixel y). The rows of the result are
    the camera axes expressed in world coordinates::

        z = normalize(target - eye);  x = normalize(z x up);  y = z x x

    Use with ``t = -R @ eye`` for the full world -> camera transform
    ``X_cam = R @ X_world + t``. When ``up`` is (nearly) parallel to the
    viewing direction a perpendicular fallback axis is used instead, so the
    result is always a rotation.

    Args:
      eye: ``(..., 3)`` camera position (world).
      target: ``(..., 3)`` point looked at (world).
      up: ``(..., 3)`` world up direction (need not be unit or orthogonal).

    Returns:
      ``(..., 3, 3)`` rotation, ``X_cam = R @ (X_world - eye)``.
    """
    eye = _as_float(eye)
    target = _as_float(target).astype(eye.dtype)
    up = _as_float(up).astype(eye.dtype)
    check_shape(eye, "eye", (3,), batch_ok=True)
    check_shape(target, "target", (3,), batch_ok=True)
    check_shape(up, "up", (3,), batch_ok=True)
    z = _normalize(target - eye)
    x = jnp.cross(z, up)
    n2 = jnp.sum(x * x, axis=-1, keepdims=True)
    up_n2 = jnp.sum(up * up, axis=-1, keepdims=True)
    degenerate = n2 <= 1e-12 * jnp.maximum(up_n2, 1e-30)
    alt_axis = jnp.where(
        jnp.abs(z[..., :1]) < 0.9, jnp.array([1.0, 0.0, 0.0], eye.dtype), jnp.array([0.0, 1.0, 0.0], eye.dtype)
    )
    x = jnp.where(degenerate, jnp.cross(z, alt_axis), x)
    x = _normalize(x)
    y = jnp.cross(z, x)
    return jnp.stack([x, y, z], axis=-2)


def compose_rigid(R1, t1, R2, t2):
    """Compose two rigid transforms: first ``(R2, t2)``, then ``(R1, t1)``.

    ``x -> R1 @ (R2 @ x + t2) + t1 = (R1 @ R2) @ x + (R1 @ t2 + t1)``.

    Args:
      R1: ``(..., 3, 3)`` rotation of the outer (second applied) transform.
      t1: ``(..., 3)`` its translation.
      R2: ``(..., 3, 3)`` rotation of the inner (first applied) transform.
      t2: ``(..., 3)`` its translation.

    Returns:
      ``(R, t)`` with shapes ``(..., 3, 3)`` and ``(..., 3)``.
    """
    R1, t1, R2, t2 = (_as_float(a) for a in (R1, t1, R2, t2))
    check_shape(R1, "R1", (3, 3), batch_ok=True)
    check_shape(t1, "t1", (3,), batch_ok=True)
    check_shape(R2, "R2", (3, 3), batch_ok=True)
    check_shape(t2, "t2", (3,), batch_ok=True)
    return R1 @ R2, jnp.einsum("...ij,...j->...i", R1, t2) + t1


def invert_rigid(R, t):
    """Inverse of the rigid transform ``x -> R @ x + t``: ``(R.T, -R.T @ t)``.

    Args:
      R: ``(..., 3, 3)`` rotation.
      t: ``(..., 3)`` translation.

    Returns:
      ``(R_inv, t_inv)`` with the same shapes.
    """
    R, t = _as_float(R), _as_float(t)
    check_shape(R, "R", (3, 3), batch_ok=True)
    check_shape(t, "t", (3,), batch_ok=True)
    Rt = jnp.swapaxes(R, -1, -2)
    return Rt, -jnp.einsum("...ij,...j->...i", Rt, t)


def apply_rigid(R, t, points):
    """Apply ``x -> R @ x + t`` to points stored as rows.

    One transform, any number of points; ``vmap`` for a batch of transforms.

    Args:
      R: ``(3, 3)`` rotation (any 3x3 matrix works, e.g. scaled rotations).
      t: ``(3,)`` translation.
      points: ``(..., 3)`` points.

    Returns:
      ``(..., 3)`` transformed points, ``points @ R.T + t``.
    """
    R, t, points = _as_float(R), _as_float(t), _as_float(points)
    check_shape(R, "R", (3, 3))
    check_shape(t, "t", (3,))
    check_shape(points, "points", (3,), batch_ok=True)
    return _mm(points, jnp.swapaxes(R, -1, -2)) + t

"""Tests for jaxrender.transforms: closed forms, references, round trips, jit/vmap/grad."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxrender import transforms as T
from tests.helpers import check_grad, fast_jit
from tests.helpers import check_jit_vmap_grad as _check_jit_vmap_grad

ORDERS = T.EULER_ORDERS




# Compiled versions for the value tests: eager JAX compiles every primitive
# separately on first use, which dominates the run time of small tests.
_euler = {o: fast_jit(lambda a, o=o: T.euler_to_matrix(a, o)) for o in ORDERS}
J = SimpleNamespace(
    euler_to_matrix=lambda a, order="xyz": _euler[order](a),
    **{n: fast_jit(getattr(T, n)) for n in T.__all__ if n not in ("EULER_ORDERS", "euler_to_matrix", "matrix_to_euler")},
)


def np_axis(axis, a):
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def faceverse_rotation(angles):
    """FaceVerse's compute_rotation_matrix (seed 000), one example, in NumPy.

    Builds rotX, rotY, rotZ element by element, multiplies rotZ @ rotY @ rotX
    and returns the transpose (applied to row vectors as ``v @ result``).
    """
    sx, sy, sz = np.sin(angles)
    cx, cy, cz = np.cos(angles)
    rx = np.eye(3); rx[1, 1] = cx; rx[1, 2] = -sx; rx[2, 1] = sx; rx[2, 2] = cx
    ry = np.eye(3); ry[0, 0] = cy; ry[0, 2] = sy; ry[2, 0] = -sy; ry[2, 2] = cy
    rz = np.eye(3); rz[0, 0] = cz; rz[0, 1] = -sz; rz[1, 0] = sz; rz[1, 1] = cz
    return (rz @ ry @ rx).T


def random_rotations(rng, n):
    return Rotation.random(n, random_state=int(rng.integers(1 << 30))).as_matrix()


def hat(w):
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


# ----------------------------------------------------------------------------
# Euler
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("axis,idx", [("x", 0), ("y", 1), ("z", 2)])
def test_euler_single_axis_closed_form(axis, idx):
    a = 0.7
    angles = np.zeros(3); angles[idx] = a
    R = np.asarray(J.euler_to_matrix(jnp.asarray(angles, jnp.float32), order="xyz"))
    np.testing.assert_allclose(R, np_axis(axis, a), atol=1e-6)
    # right-hand rule: rotating about z by +90 deg takes x to y
    Rz = np.asarray(J.euler_to_matrix(jnp.array([0.0, 0.0, np.pi / 2])))
    np.testing.assert_allclose(Rz @ [1, 0, 0], [0, 1, 0], atol=1e-6)


@fast_jit
def _euler_all_orders(angles, Rs):
    """Per order: R(angles), euler(R(angles)), R(euler(Rs)), and d sum(euler(R)) / dR at R(angles) and at Rs."""
    out = {}
    for o in ORDERS:
        R = T.euler_to_matrix(angles, o)
        grad = jax.grad(lambda r: T.matrix_to_euler(r, o).sum())
        out[o] = (R, T.matrix_to_euler(R, o), T.euler_to_matrix(T.matrix_to_euler(Rs, o), o), grad(R), grad(Rs))
    return out


def test_euler_all_orders_match_numpy_and_scipy(rng):
    angles = rng.uniform(-np.pi, np.pi, size=(20, 3))
    angles[:, 1] = rng.uniform(-np.pi / 2 + 0.05, np.pi / 2 - 0.05, size=20)
    Rs = random_rotations(rng, 20)
    out = _euler_all_orders(jnp.asarray(angles, jnp.float32), jnp.asarray(Rs, jnp.float32))
    for order in ORDERS:
        R, back, R2, _, _ = (np.asarray(v) for v in out[order])
        for a, r in zip(angles, R):
            ref = np_axis(order[2], a[2]) @ np_axis(order[1], a[1]) @ np_axis(order[0], a[0])
            np.testing.assert_allclose(r, ref, atol=1e-5, err_msg=order)
            # scipy lower-case = extrinsic rotations about fixed axes, same order
            np.testing.assert_allclose(r, Rotation.from_euler(order, a).as_matrix(), atol=1e-5, err_msg=order)
        # round trips: matrix_to_euler(euler_to_matrix(a)) == a away from gimbal lock,
        # euler_to_matrix(matrix_to_euler(R)) == R for any rotation
        np.testing.assert_allclose(back, angles, atol=1e-4, err_msg=order)
        np.testing.assert_allclose(R2, Rs, atol=1e-5, err_msg=order)


def test_euler_faceverse_convention(rng):
    angles = rng.uniform(-1.5, 1.5, size=(4, 3))
    pts = rng.normal(size=(10, 3))
    R = np.asarray(J.euler_to_matrix(jnp.asarray(angles), "xyz"))
    for a, r in zip(angles, R):
        fv = faceverse_rotation(a)
        np.testing.assert_allclose(r, fv.T, atol=1e-6)
        np.testing.assert_allclose(pts @ r.T, pts @ fv, atol=1e-5)


def test_euler_gimbal_lock():
    # middle angle at and near +-pi/2; matrices computed in float32, so small
    # entries carry absolute rounding errors as they would in practice
    d = np.array([0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.0, 1e-6, 1e-4])
    mid = np.concatenate([np.pi / 2 - d, -(np.pi / 2 - d)])
    angles = np.stack([np.linspace(-3, 3, 20), mid, np.linspace(2.5, -2.0, 20)], axis=1)
    # exact quarter turns (exact zeros: atan2(0, 0) territory) and random rotations
    quarter = [np.round(Rotation.from_rotvec(sgn * np.pi / 2 * e).as_matrix()) for e in np.eye(3) for sgn in (1, -1)]
    Rs = np.concatenate([np.stack(quarter), random_rotations(np.random.default_rng(3), 14)])
    out = _euler_all_orders(jnp.asarray(angles, jnp.float32), jnp.asarray(Rs, jnp.float32))
    for order in ORDERS:
        R, back, R2, grad, grad_quarter = (np.asarray(v) for v in out[order])
        assert np.all(np.isfinite(back)) and np.all(np.isfinite(grad)) and np.all(np.isfinite(grad_quarter)), order
        np.testing.assert_allclose(R2, Rs, atol=2e-6, err_msg=order)
        for a, r in zip(back, R):
            R_back = np_axis(order[2], a[2]) @ np_axis(order[1], a[1]) @ np_axis(order[0], a[0])
            np.testing.assert_allclose(R_back, r, atol=2e-6, err_msg=order)


def test_euler_errors():
    with pytest.raises(ValueError, match="order"):
        T.euler_to_matrix(jnp.zeros(3), order="xyx")
    with pytest.raises(ValueError, match="order"):
        T.matrix_to_euler(jnp.eye(3), order="abc")
    with pytest.raises(ValueError, match="order"):
        T.euler_to_matrix(jnp.zeros(3), order="XYZ")  # SciPy's intrinsic spelling
    with pytest.raises(ValueError, match="angles"):
        T.euler_to_matrix(jnp.zeros(4))
    with pytest.raises(ValueError, match="R"):
        T.matrix_to_euler(jnp.zeros((3, 4)))


# ----------------------------------------------------------------------------
# Axis-angle
# ----------------------------------------------------------------------------


def test_axis_angle_matches_scipy(rng):
    w = rng.normal(size=(20, 3)) * rng.uniform(0, 3, size=(20, 1))
    R = np.asarray(J.axis_angle_to_matrix(jnp.asarray(w)))
    np.testing.assert_allclose(R, Rotation.from_rotvec(w).as_matrix(), atol=1e-5)
    # closed form: 90 degrees about z
    np.testing.assert_allclose(np.asarray(J.axis_angle_to_matrix(jnp.array([0, 0, np.pi / 2]))), np_axis("z", np.pi / 2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(J.axis_angle_to_matrix(jnp.zeros(3))), np.eye(3), atol=0)


_log_exp = fast_jit(lambda w: T.matrix_to_axis_angle(T.axis_angle_to_matrix(w)))


def test_log_exp_round_trip(rng, x64):
    axes = rng.normal(size=(30, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([rng.uniform(0, np.pi - 1e-3, 20), [0.0, 1e-12, 1e-8, 1e-5, 1e-3, 1e-2, np.pi - 1e-6, np.pi - 1e-4, 2.0, 3.0]])
    w = axes * angles[:, None]
    back = np.asarray(_log_exp(jnp.asarray(w)))
    np.testing.assert_allclose(back, w, atol=1e-9, rtol=1e-7)
    # exactly pi: the axis is defined up to sign
    for a in axes[:5]:
        w_pi = np.pi * a
        back = np.asarray(J.matrix_to_axis_angle(jnp.asarray(Rotation.from_rotvec(w_pi).as_matrix())))
        assert np.allclose(back, w_pi, atol=1e-7) or np.allclose(back, -w_pi, atol=1e-7)


def test_log_exp_round_trip_float32(rng):
    w = rng.normal(size=(50, 3))
    w *= rng.uniform(0, 3, size=(50, 1)) / np.linalg.norm(w, axis=1, keepdims=True)
    w = np.concatenate([w, [[1e-7, 0, 0], [0, 0, 0], [0, 0, np.pi - 1e-3]]]).astype(np.float32)
    back = np.asarray(_log_exp(jnp.asarray(w)))
    np.testing.assert_allclose(back, w, atol=2e-4)


def test_axis_angle_grad_at_zero_is_exact(x64):
    # dR/dw_i at w = 0 is the generator hat(e_i)
    @fast_jit
    def jacobians(w, R):
        return (
            jax.jacobian(T.axis_angle_to_matrix)(w),
            jax.jacobian(lambda v: T.matrix_to_axis_angle(T.axis_angle_to_matrix(v)))(w),
            jax.grad(lambda r: T.matrix_to_axis_angle(r).sum())(R),
        )

    jac_exp, jac_log_exp, g_log = (np.asarray(v) for v in jacobians(jnp.zeros(3), jnp.eye(3)))
    for i in range(3):
        np.testing.assert_allclose(jac_exp[..., i], hat(np.eye(3)[i]), atol=1e-12)
    # log at the identity: d log(exp(w)) / dw = I
    np.testing.assert_allclose(jac_log_exp, np.eye(3), atol=1e-12)
    assert np.all(np.isfinite(g_log))


# ----------------------------------------------------------------------------
# Quaternions
# ----------------------------------------------------------------------------


def test_quaternion_matches_scipy(rng):
    q = rng.normal(size=(20, 4))
    R = np.asarray(J.quaternion_to_matrix(jnp.asarray(q)))
    ref = Rotation.from_quat(np.concatenate([q[:, 1:], q[:, :1]], axis=1)).as_matrix()  # scipy: scalar last
    np.testing.assert_allclose(R, ref, atol=1e-5)
    # closed form: (cos 45, 0, 0, sin 45) is +90 deg about z
    h = np.sqrt(0.5)
    np.testing.assert_allclose(np.asarray(J.quaternion_to_matrix(jnp.array([h, 0, 0, h]))), np_axis("z", np.pi / 2), atol=1e-6)


def test_quaternion_round_trip_all_rotations(rng, x64):
    Rs = list(random_rotations(rng, 50))
    axes = rng.normal(size=(6, 3)); axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    for a in axes:  # near and at half turns, and near identity
        for ang in (np.pi, np.pi - 1e-7, np.pi - 1e-3, 1e-9, 0.0):
            Rs.append(Rotation.from_rotvec(ang * a).as_matrix())
    for e in np.eye(3):
        Rs.append(Rotation.from_rotvec(np.pi * e).as_matrix())
    Rs = np.stack(Rs)
    q = np.asarray(J.matrix_to_quaternion(jnp.asarray(Rs)))
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-12)
    assert np.all(q[:, 0] >= 0)
    np.testing.assert_allclose(np.asarray(J.quaternion_to_matrix(jnp.asarray(q))), Rs, atol=1e-12)
    ref = Rotation.from_matrix(Rs).as_quat()
    ref = np.concatenate([ref[:, 3:], ref[:, :3]], axis=1)
    dots = np.abs(np.sum(ref * q, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-9)


def test_quaternion_is_normalized():
    q = jnp.array([2.0, 0.0, 0.0, 2.0])
    np.testing.assert_allclose(np.asarray(J.quaternion_to_matrix(q)), np_axis("z", np.pi / 2), atol=1e-6)


# ----------------------------------------------------------------------------
# 6D
# ----------------------------------------------------------------------------


def test_rotation_6d(rng):
    Rs = random_rotations(rng, 20)
    d6 = J.matrix_to_rotation_6d(jnp.asarray(Rs, jnp.float32))
    np.testing.assert_allclose(np.asarray(d6[:, :3]), Rs[:, :, 0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(J.rotation_6d_to_matrix(d6)), Rs, atol=1e-5)
    # arbitrary (non-orthonormal) inputs map to rotations whose first column is a1's direction
    x = rng.normal(size=(20, 6))
    R = np.asarray(J.rotation_6d_to_matrix(jnp.asarray(x)))
    np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
    np.testing.assert_allclose(R[:, :, 0], x[:, :3] / np.linalg.norm(x[:, :3], axis=1, keepdims=True), atol=1e-5)


# ----------------------------------------------------------------------------
# look_at and rigid
# ----------------------------------------------------------------------------


def test_look_at_rotation(rng):
    eye = np.array([1.0, 2.0, 5.0]); target = np.array([0.2, -0.1, 0.3])
    R = np.asarray(J.look_at_rotation(jnp.asarray(eye), jnp.asarray(target), jnp.array([0.0, 1.0, 0.0])))
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-6)
    d = (target - eye) / np.linalg.norm(target - eye)
    np.testing.assert_allclose(R[2], d, atol=1e-6)  # camera z towards the target
    assert R[1] @ np.array([0.0, 1.0, 0.0]) < 0  # camera y (down) opposes world up
    assert abs(R[0] @ np.array([0.0, 1.0, 0.0])) < 1e-6  # no roll
    # canonical: camera at +z looking at the origin sees world +x to the right
    R = np.asarray(J.look_at_rotation(jnp.array([0.0, 0.0, 5.0]), jnp.zeros(3), jnp.array([0.0, 1.0, 0.0])))
    np.testing.assert_allclose(R, np.diag([1.0, -1.0, -1.0]), atol=1e-6)
    # degenerate: up parallel to the view direction still gives a rotation
    for eye in ([0.0, 5.0, 0.0], [0.0, -5.0, 0.0], [5.0, 0.0, 0.0]):
        R = np.asarray(J.look_at_rotation(jnp.asarray(eye), jnp.zeros(3), jnp.asarray(eye)))
        assert np.all(np.isfinite(R))
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-6)


def test_rigid(rng):
    Rs = random_rotations(rng, 2)
    t1, t2 = rng.normal(size=(2, 3))
    pts = rng.normal(size=(7, 3))

    def h(R, t):
        M = np.eye(4); M[:3, :3] = R; M[:3, 3] = t
        return M

    R, t = J.compose_rigid(Rs[0], t1, Rs[1], t2)
    np.testing.assert_allclose(h(np.asarray(R), np.asarray(t)), h(Rs[0], t1) @ h(Rs[1], t2), atol=1e-5)
    Ri, ti = J.invert_rigid(jnp.asarray(Rs[0]), jnp.asarray(t1))
    np.testing.assert_allclose(h(np.asarray(Ri), np.asarray(ti)), np.linalg.inv(h(Rs[0], t1)), atol=1e-5)
    out = np.asarray(J.apply_rigid(Rs[0], t1, pts))
    np.testing.assert_allclose(out, (h(Rs[0], t1) @ np.c_[pts, np.ones(7)].T).T[:, :3], atol=1e-5)
    # batched compose / invert
    Rb, tb = J.compose_rigid(jnp.asarray(Rs), jnp.asarray([t1, t2]), jnp.asarray(Rs[::-1]), jnp.asarray([t2, t1]))
    assert Rb.shape == (2, 3, 3) and tb.shape == (2, 3)
    with pytest.raises(ValueError, match="points"):
        T.apply_rigid(jnp.eye(3), jnp.zeros(3), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="t1"):
        T.compose_rigid(jnp.eye(3), jnp.zeros(2), jnp.eye(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="R"):
        T.invert_rigid(jnp.eye(4), jnp.zeros(3))


def test_shape_errors():
    with pytest.raises(ValueError, match="axis_angle"):
        T.axis_angle_to_matrix(jnp.zeros(4))
    with pytest.raises(ValueError, match="quaternion"):
        T.quaternion_to_matrix(jnp.zeros(3))
    with pytest.raises(ValueError, match="d6"):
        T.rotation_6d_to_matrix(jnp.zeros(5))
    with pytest.raises(ValueError, match="R"):
        T.matrix_to_quaternion(jnp.zeros(9))
    with pytest.raises(ValueError, match="eye"):
        T.look_at_rotation(jnp.zeros(2), jnp.zeros(3))


# ----------------------------------------------------------------------------
# jit / vmap / grad for every public function
# ----------------------------------------------------------------------------

_R0 = Rotation.from_rotvec([0.3, -0.5, 0.8]).as_matrix()
_R1 = Rotation.from_rotvec([-1.2, 0.4, 0.1]).as_matrix()

# name -> (function of one array, example input); several orders / branches are
# concatenated into one function to keep compile time down.
_RPI = Rotation.from_rotvec([3.0, 0.1, 0]).as_matrix()  # a near half turn: x branch of Shepperd's method


def _cat(*arrays):
    return jnp.concatenate([jnp.ravel(a) for a in arrays])


CASES = {
    "euler_to_matrix": (lambda a: _cat(*(T.euler_to_matrix(a, o) for o in ORDERS)), np.array([0.3, -0.7, 1.1])),
    "matrix_to_euler": (lambda r: _cat(*(T.matrix_to_euler(r, o) for o in ORDERS)), _R0),
    "axis_angle_to_matrix": (T.axis_angle_to_matrix, np.array([0.3, -0.5, 0.8])),
    "axis_angle_to_matrix_at_zero": (T.axis_angle_to_matrix, np.zeros(3)),
    "matrix_to_axis_angle": (lambda r: _cat(T.matrix_to_axis_angle(r), T.matrix_to_axis_angle(jnp.asarray(_RPI) @ r)), _R0),
    "quaternion_to_matrix": (T.quaternion_to_matrix, np.array([0.9, 0.1, -0.3, 0.2])),
    "matrix_to_quaternion": (lambda r: _cat(T.matrix_to_quaternion(r), T.matrix_to_quaternion(r @ jnp.asarray(_RPI))), _R0),
    "rotation_6d_to_matrix": (T.rotation_6d_to_matrix, np.array([1.0, 0.2, -0.1, 0.3, 0.9, 0.4])),
    "matrix_to_rotation_6d": (T.matrix_to_rotation_6d, _R0),
    "look_at_rotation": (lambda e: T.look_at_rotation(e, jnp.array([0.1, 0.0, 0.2]), jnp.array([0.0, 1.0, 0.0])), np.array([1.0, 2.0, 4.0])),
    "rigid": (
        lambda t: _cat(
            *T.compose_rigid(jnp.asarray(_R0), t, jnp.asarray(_R1), 2.0 * t),
            *T.invert_rigid(jnp.asarray(_R1), t),
            T.apply_rigid(jnp.asarray(_R0), t, jnp.array([[0.3, 0.2, 1.0], [1.0, -1.0, 2.0]]) * t),
        ),
        np.array([1.0, -2.0, 0.5]),
    ),
}


def check_jit_vmap_grad(f, x):
    _check_jit_vmap_grad(f, x, x2_scale=0.9, seed=1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_vmap_grad(name, x64):
    f, x0 = CASES[name]
    check_jit_vmap_grad(f, jnp.asarray(x0, jnp.float64))


def test_float32_default():
    # eval_shape: dtype rules only, nothing to compile
    assert jax.eval_shape(T.euler_to_matrix, jnp.zeros(3)).dtype == jnp.float32
    assert jax.eval_shape(T.axis_angle_to_matrix, jnp.array([0, 0, 1])).dtype == jnp.float32  # ints are promoted
    assert jax.eval_shape(T.matrix_to_quaternion, jnp.eye(3)).dtype == jnp.float32


def test_float64(x64):
    assert jax.eval_shape(T.euler_to_matrix, jnp.zeros(3, jnp.float64)).dtype == jnp.float64
    assert jax.eval_shape(T.matrix_to_quaternion, jnp.eye(3, dtype=jnp.float64)).dtype == jnp.float64
    assert jax.eval_shape(T.matrix_to_axis_angle, jnp.eye(3, dtype=jnp.float64)).dtype == jnp.float64

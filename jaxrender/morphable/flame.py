"""FLAME (Li et al. 2017, "Learning a model of facial shape and expression from
4D scans"): loader and forward pass with linear blend skinning.

FLAME has 5 joints — 0 global (root), 1 neck, 2 jaw, 3 left eye, 4 right eye —
and is evaluated as::

    v_shaped = v_template + shapedirs[..., :S] @ shape + shapedirs[..., S:] @ expression
    J        = J_regressor @ v_shaped                                  (5, 3)
    R_k      = exp(pose[k])                                            axis-angle -> (3, 3)
    v_posed  = v_shaped + posedirs @ concat_k>0 (R_k - I).ravel()       pose-corrective blendshapes
    G_k      = G_parent(k) @ [R_k | J_k - J_parent(k)]                 kinematic chain
    v        = sum_k weights[:, k] * (G_k @ [v_posed - J_k; 1])         linear blend skinning

The model files (``generic_model.pkl``, ``FLAME2020/*.pkl``, or a ``.npz``
with the same keys) hold ``v_template`` (V, 3), ``shapedirs`` (V, 3, 400:
300 shape then 100 expression components in FLAME 2019/2020), ``posedirs``
(V, 3, 36), ``J_regressor`` (5, V; a SciPy sparse matrix in the ``.pkl``),
``weights`` (V, 5), ``kintree_table`` (2, 5) and ``f`` (F, 3). Units are
metres, y up, z towards the viewer.

The ``.pkl`` files were written with chumpy objects. :func:`load_flame` reads
them **without chumpy**: a restricted unpickler maps ``chumpy`` classes to a
small shim and returns their arrays (and maps SciPy sparse matrices to dense
arrays when SciPy is not installed).
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Tuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from jaxrender._checks import check_faces, check_shape
from jaxrender.morphable.model import MorphableModel

__all__ = ["FlameModel", "load_flame", "flame_forward", "flame_to_morphable", "FLAME_JOINTS"]

FLAME_JOINTS = ("global", "neck", "jaw", "left_eye", "right_eye")


class FlameModel(eqx.Module):
    """FLAME's arrays (see the module docstring for the math).

    Attributes:
      v_template: ``(V, 3)`` template mesh (metres).
      shapedirs: ``(V, 3, S)`` identity blendshapes.
      exprdirs: ``(V, 3, E)`` expression blendshapes.
      posedirs: ``(V, 3, 9 * (J - 1))`` pose-corrective blendshapes.
      J_regressor: ``(J, V)`` dense joint regressor.
      weights: ``(V, J)`` skinning weights.
      faces: ``(F, 3)`` int32.
      parents: static tuple, ``parents[k]`` is joint k's parent (-1 for the root).
    """

    v_template: jnp.ndarray
    shapedirs: jnp.ndarray
    exprdirs: jnp.ndarray
    posedirs: jnp.ndarray
    J_regressor: jnp.ndarray
    weights: jnp.ndarray
    faces: jnp.ndarray
    parents: Tuple[int, ...] = eqx.field(static=True)

    @property
    def num_joints(self) -> int:
        return self.J_regressor.shape[0]


# ----------------------------------------------------------------------------
# Reading chumpy pickles without chumpy


class _ChumpyShim:
    """Stands in for any chumpy class while unpickling; keeps its state."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def to_array(self):
        st = self.__dict__.get("_state")
        if isinstance(st, dict):
            for key in ("x", "r", "_x"):
                if key in st:
                    return _to_array(st[key])
            arrays = [v for v in st.values() if isinstance(v, np.ndarray)]
            if len(arrays) == 1:
                return arrays[0]
        raise ValueError("a chumpy object in this file holds no plain array ('x'); it cannot be read without chumpy")


class _SparseShim:
    """Stands in for a SciPy sparse matrix (csc / csr / coo) when SciPy is missing."""

    fmt = "csc"

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def to_array(self):
        st = self.__dict__["_state"]
        shape = tuple(st.get("_shape", st.get("shape")))
        data = np.asarray(st["data"])
        out = np.zeros(shape, data.dtype)
        if self.fmt == "coo":
            rows, cols = np.asarray(st.get("row", st.get("coords", [None, None])[0])), np.asarray(st.get("col", st.get("coords", [None, None])[1]))
            np.add.at(out, (rows, cols), data)
            return out
        indices, indptr = np.asarray(st["indices"]), np.asarray(st["indptr"])
        major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        if self.fmt == "csc":
            np.add.at(out, (indices, major), data)
        else:
            np.add.at(out, (major, indices), data)
        return out


def _sparse_shim(fmt):
    return type(f"_{fmt}_shim", (_SparseShim,), {"fmt": fmt})


class _FlameUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyShim
        if module.startswith("scipy.sparse"):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                fmt = name[:3] if name[:3] in ("csc", "csr", "coo") else "csc"
                return _sparse_shim(fmt)
        return super().find_class(module, name)


def _to_array(x):
    if isinstance(x, (_ChumpyShim, _SparseShim)):
        return x.to_array()
    if hasattr(x, "toarray"):  # scipy sparse
        return np.asarray(x.toarray())
    if hasattr(x, "r") and not isinstance(x, np.ndarray):  # a real chumpy object
        return np.asarray(x.r)
    return np.asarray(x)


def _read_flame_dict(path):
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=True) as z:
            return {k: z[k] for k in z.files}
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        d = _FlameUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:
        raise ValueError(f"{path}: could not unpickle the FLAME model ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return d


def load_flame(path, num_shape_components: int = 300, n_shape: int | None = None, n_exp: int | None = None,
               dtype=np.float32) -> FlameModel:
    """Load a FLAME model from ``.pkl`` (no chumpy needed) or ``.npz``.

    Args:
      path: model file.
      num_shape_components: how many leading ``shapedirs`` columns are
        identity (300 in FLAME 2019/2020; the remaining ones are expression).
      n_shape, n_exp: keep only the first components (default: all).
      dtype: float dtype.

    Raises:
      ModelFileError: a required key is missing or has the wrong shape.
    """
    from jaxrender.morphable.loaders import _expect_shape, _fail

    d = _read_flame_dict(path)

    def get(key):
        if key not in d:
            _fail(path, key, f"is missing (FLAME needs v_template, shapedirs, posedirs, J_regressor, weights, "
                             f"kintree_table, f); keys present: {sorted(map(str, d.keys()))}")
        return _to_array(d[key])

    vt = _expect_shape(path, "v_template", get("v_template").astype(np.float64), (None, 3))
    V = vt.shape[0]
    sd = _expect_shape(path, "shapedirs", get("shapedirs").astype(np.float64), (V, 3, None))
    if sd.shape[2] < num_shape_components:
        _fail(path, "shapedirs", f"has {sd.shape[2]} components, fewer than num_shape_components={num_shape_components}")
    pd = get("posedirs").astype(np.float64)
    jr = get("J_regressor").astype(np.float64)
    _expect_shape(path, "J_regressor", jr, (None, V))
    J = jr.shape[0]
    pd = _expect_shape(path, "posedirs", pd, (V, 3, 9 * (J - 1)))
    w = _expect_shape(path, "weights", get("weights").astype(np.float64), (V, J))
    kt = _expect_shape(path, "kintree_table", get("kintree_table").astype(np.int64), (2, J))
    f = _expect_shape(path, "f", get("f").astype(np.int64), (None, 3))
    # kintree_table[0] holds parent ids (the root's is a huge sentinel), row 1 the joint ids
    id_to_col = {int(j): i for i, j in enumerate(kt[1])}
    parents = tuple(-1 if i == 0 else id_to_col.get(int(kt[0, i]), -1) for i in range(J))
    if any(p >= i for i, p in enumerate(parents) if i > 0) or any(p < 0 for p in parents[1:]):
        _fail(path, "kintree_table", f"must list every joint after its parent, got parents {parents}")
    shape_dirs = sd[..., :num_shape_components]
    exp_dirs = sd[..., num_shape_components:]
    if n_shape is not None:
        shape_dirs = shape_dirs[..., :n_shape]
    if n_exp is not None:
        exp_dirs = exp_dirs[..., :n_exp]
    c = lambda x: jnp.asarray(np.asarray(x, dtype))  # noqa: E731
    faces = jnp.asarray(f.astype(np.int32))
    check_faces(faces, V, "f")
    return FlameModel(c(vt), c(shape_dirs), c(exp_dirs), c(pd), c(jr), c(w), faces, parents)


def _rigid(R, t):
    top = jnp.concatenate([R, t[:, None]], axis=1)
    bottom = jnp.concatenate([jnp.zeros((1, 3), R.dtype), jnp.ones((1, 1), R.dtype)], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def flame_forward(model: FlameModel, shape=None, expression=None, pose=None, translation=None,
                  return_joints: bool = False):
    """Evaluate FLAME for one example (batch with ``jax.vmap``).

    Args:
      model: a :class:`FlameModel`.
      shape: ``(k_s,)`` identity coefficients (``k_s <=`` the model's), or ``None``.
      expression: ``(k_e,)`` expression coefficients, or ``None``.
      pose: ``(J, 3)`` axis-angle rotations (radians) of the joints
        ``global, neck, jaw, left_eye, right_eye``, or ``None`` (rest pose).
      translation: optional ``(3,)`` added to every vertex.
      return_joints: also return the posed joint positions ``(J, 3)``.

    Returns:
      ``(V, 3)`` posed vertices (and ``(J, 3)`` joints if requested).
    """
    from jaxrender.transforms import axis_angle_to_matrix

    dt = model.v_template.dtype
    v = model.v_template
    for dirs, coeffs, name in ((model.shapedirs, shape, "shape"), (model.exprdirs, expression, "expression")):
        if coeffs is not None:
            coeffs = jnp.asarray(coeffs, dt)
            check_shape(coeffs, name, (None,))
            if coeffs.shape[0] > dirs.shape[-1]:
                raise ValueError(f"{name} has {coeffs.shape[0]} coefficients but the model has {dirs.shape[-1]}")
            v = v + jnp.einsum("vck,k->vc", dirs[..., : coeffs.shape[0]], coeffs)
    J = model.num_joints
    if pose is None:
        pose = jnp.zeros((J, 3), dt)
    pose = jnp.asarray(pose, dt)
    check_shape(pose, "pose", (J, 3))
    joints = model.J_regressor @ v
    R = axis_angle_to_matrix(pose)
    feat = (R[1:] - jnp.eye(3, dtype=dt)).reshape(-1)
    v_posed = v + jnp.einsum("vcp,p->vc", model.posedirs, feat)
    G = []
    for k in range(J):
        p = model.parents[k]
        local = _rigid(R[k], joints[k] - (joints[p] if p >= 0 else 0.0))
        G.append(local if p < 0 else G[p] @ local)
    G = jnp.stack(G)  # (J, 4, 4)
    posed_joints = G[:, :3, 3]
    # remove the rest-pose joint location: A_k = G_k @ [I | -J_k]
    t = posed_joints - jnp.einsum("kij,kj->ki", G[:, :3, :3], joints)
    T_R = jnp.einsum("vk,kij->vij", model.weights, G[:, :3, :3])
    T_t = model.weights @ t
    out = jnp.einsum("vij,vj->vi", T_R, v_posed) + T_t
    if translation is not None:
        tr = jnp.asarray(translation, dt)
        out, posed_joints = out + tr, posed_joints + tr
    return (out, posed_joints) if return_joints else out


def flame_to_morphable(model: FlameModel, albedo=None) -> MorphableModel:
    """The unposed FLAME shape space as a :class:`MorphableModel`
    (``id_basis = shapedirs``, ``exp_basis = exprdirs``; grey albedo unless
    ``albedo`` ``(V, 3)`` is given; no landmarks)."""
    V = model.v_template.shape[0]
    alb = jnp.full((V, 3), 0.6, model.v_template.dtype) if albedo is None else albedo
    return MorphableModel(model.v_template, model.shapedirs, model.exprdirs, alb,
                          jnp.zeros((V, 3, 0), model.v_template.dtype), model.faces)

"""Losses for inverse rendering: image losses, silhouette IoU, landmarks and
mesh regularizers.

All losses are pure functions of one example returning a scalar (batch with
``jax.vmap`` and reduce as you like); they work under ``jit`` / ``vmap`` /
``grad`` with traced vertices and images.

Mesh regularizers need connectivity derived from the (fixed) faces with NumPy.
Two ways to use them inside ``jit``:

- pass concrete ``faces`` (NumPy, or a JAX array closed over rather than
  passed as a traced argument); the adjacency is rebuilt at every trace;
- or precompute it once outside ``jit`` -- :func:`flatten_loss_setup` /
  :func:`normal_consistency_setup` return an :class:`EdgeAdjacency` and
  :func:`jaxrender.mesh.uniform_laplacian` the uniform Laplacian -- and pass
  that instead of the faces; these are pytrees of index arrays, fine as traced
  arguments.

Laplacians and edges come from :mod:`jaxrender.mesh`.
"""
from __future__ import annotations

import itertools


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxrender._checks import as_float as _float, check_shape
from jaxrender.mesh import SparseMatrix, cotangent_laplacian, edges as mesh_edges, laplacian_apply, uniform_laplacian
from jaxrender.mesh import _safe_norm as _mesh_safe_norm, _safe_normalize, _tiny  # one copy of the safe norms

__all__ = [
    "mse",
    "l1",
    "huber",
    "silhouette_iou_loss",
    "landmark_loss",
    "laplacian_smoothing",
    "edge_length_loss",
    "EdgeAdjacency",
    "edge_adjacency",
    "normal_consistency_setup",
    "normal_consistency",
    "flatten_loss_setup",
    "flatten_loss",
]


def _safe_norm(x):
    """Euclidean norm over the last axis with a finite (zero) gradient at the zero vector."""
    return _mesh_safe_norm(x)[0]


def _reduce(err, mask, reduction, name):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    if mask is not None:
        mask = _float(mask)
        try:
            mask = jnp.broadcast_to(mask, err.shape) if mask.ndim <= err.ndim else None
        except ValueError:
            mask = None
        if mask is None:
            raise ValueError(f"{name}: mask must broadcast to the error shape {tuple(err.shape)}")
        err = err * mask
    if reduction == "none":
        return err
    if reduction == "sum":
        return jnp.sum(err)
    if mask is None:
        return jnp.mean(err)
    return jnp.sum(err) / jnp.maximum(jnp.sum(mask), 1e-12)


def _pair(pred, target, fn):
    pred = _float(pred)
    target = _float(target)
    try:
        jnp.broadcast_shapes(pred.shape, target.shape)
    except ValueError:
        raise ValueError(f"{fn}: pred {tuple(pred.shape)} and target {tuple(target.shape)} do not broadcast") from None
    return pred, target


# ---------------------------------------------------------------------------
# Image / value losses
# ---------------------------------------------------------------------------


def mse(pred, target, mask=None, reduction: str = "mean"):
    """Mean squared error ``mean((pred - target)^2)``.

    Args:
        pred: array of any shape, e.g. an ``(H, W, C)`` image.
        target: array broadcastable with ``pred``.
        mask: optional weights broadcastable to the error (e.g. ``(H, W, 1)``
            face mask); with a mask the mean is ``sum(mask * err) /
            sum(mask)`` (the mask broadcast to the error's shape).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (elementwise).

    Returns:
        Scalar loss (or the elementwise error with ``reduction="none"``), in
        squared units of the inputs.
    """
    pred, target = _pair(pred, target, "mse")
    return _reduce((pred - target) ** 2, mask, reduction, "mse")


def l1(pred, target, mask=None, reduction: str = "mean"):
    """Mean absolute error ``mean(|pred - target|)``.

    Args:
        pred: array of any shape.
        target: array broadcastable with ``pred``.
        mask: optional weights, as in :func:`mse`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar loss in the units of the inputs. The gradient at
        ``pred == target`` is 0 (``sign(0)``).
    """
    pred, target = _pair(pred, target, "l1")
    return _reduce(jnp.abs(pred - target), mask, reduction, "l1")


def huber(pred, target, scaling: float = 0.1, mask=None, reduction: str = "mean"):
    """Pseudo-Huber loss of PyTorch3D's volume-fitting tutorial.

    Elementwise ``scaling * (sqrt(max(1 + (pred - target)^2 / scaling^2,
    1e-4)) - 1)``: quadratic ``d^2 / (2 scaling)`` for ``|d| << scaling``
    and linear ``|d| - scaling`` for ``|d| >> scaling``, so a few outliers
    do not dominate. The tutorial takes ``.abs().mean()`` of it; the value is
    already non-negative, so ``reduction="mean"`` is the same.

    Args:
        pred: array of any shape.
        target: array broadcastable with ``pred``.
        scaling: transition scale between the quadratic and linear regimes
            (0.1 in the tutorial), in the units of the inputs.
        mask: optional weights, as in :func:`mse`.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Returns:
        Scalar loss (or elementwise with ``reduction="none"``).
    """
    pred, target = _pair(pred, target, "huber")
    q = (pred - target) ** 2 / (scaling * scaling)
    # sqrt(1 + q) - 1 written as q / (sqrt(1 + q) + 1): same value, no float32
    # cancellation for small q. The tutorial's clamp(1e-4) never binds (q >= 0).
    err = scaling * q / (jnp.sqrt(1.0 + q) + 1.0)
    return _reduce(err, mask, reduction, "huber")


def silhouette_iou_loss(pred, target, eps: float = 1e-6):
    """``1 - soft IoU`` of two silhouettes (SoftRas / Neural Mesh Renderer).

    ``IoU = sum(p t) / (sum(p + t - p t) + eps)`` over all pixels.

    Args:
        pred: ``(H, W)`` or ``(H, W, 1)`` predicted coverage in ``[0, 1]``
            (e.g. the alpha channel of a soft silhouette render); any shape
            works, everything is summed.
        target: same shape (or broadcastable), target mask in ``[0, 1]``;
            use a **binary** target. With a soft target the loss is biased:
            its minimum is not at ``pred == target`` (for the target
            ``(0.5, 1)`` the loss is 0.29 at ``pred == target`` and 0.25 at
            ``pred = (1, 1)``), so fitting to a soft silhouette pulls the
            prediction away from it. Threshold soft targets (``target > 0.5``) or use an
            L2/L1 loss on coverage instead.
        eps: added to the union so that two empty masks give loss 1, not NaN.

    Returns:
        Scalar in ``[0, 1]``; 0 for identical binary masks.
    """
    pred, target = _pair(pred, target, "silhouette_iou_loss")
    inter = jnp.sum(pred * target)
    union = jnp.sum(pred + target - pred * target) + eps
    return 1.0 - inter / union


def landmark_loss(pred, target, weights=None):
    """Weighted mean squared landmark distance (Deep3DFaceRecon / FaceVerse).

    ``sum_i w_i ||pred_i - target_i||^2 / L``. Deep3DFaceRecon weights the 68
    landmarks with 20 at the nose and inner mouth (indices 28-35 and 61-67 in
    1-based counting) and 1 elsewhere; the normalisation is by the number of
    landmarks, not by the sum of the weights.

    Args:
        pred: ``(L, 2)`` predicted landmarks (pixels), or ``(L, D)``.
        target: ``(L, 2)`` detected landmarks.
        weights: optional ``(L,)`` per-landmark weights (default all 1).

    Returns:
        Scalar, in squared pixels.
    """
    pred, target = _pair(pred, target, "landmark_loss")
    check_shape(pred, "pred", ("L", None))
    check_shape(target, "target", (pred.shape[0], pred.shape[1]))
    d2 = jnp.sum((pred - target) ** 2, axis=-1)
    if weights is not None:
        weights = _float(weights)
        check_shape(weights, "weights", (pred.shape[0],))
        d2 = d2 * weights
    return jnp.sum(d2) / pred.shape[0]


# ---------------------------------------------------------------------------
# Mesh regularizers
# ---------------------------------------------------------------------------


def _check_vertices(vertices):
    vertices = _float(vertices)
    check_shape(vertices, "vertices", ("V", 3))
    return vertices


def laplacian_smoothing(vertices, faces, method: str = "uniform", stop_weight_gradient: bool = True, reduction: str = "mean"):
    """Laplacian smoothing loss with PyTorch3D's ``mesh_laplacian_smoothing`` semantics.

    The mean over vertices of ``||delta_i||`` where

    - ``method="uniform"``: ``delta_i = mean_{j in N(i)} v_j - v_i`` (the
      uniform Laplacian, :func:`jaxrender.mesh.uniform_laplacian`);
    - ``method="cot"``: ``delta_i = sum_j w_ij v_j / sum_j w_ij - v_i`` with
      cotangent weights ``w_ij`` (:func:`jaxrender.mesh.cotangent_laplacian`).

    Isolated vertices contribute 0 (they are still counted in the mean).
    For ``"cot"`` vertices whose weight sum is not positive (very obtuse
    neighbourhoods) also contribute 0 -- PyTorch3D would use ``||v_i||``
    there, which depends on the origin.

    Args:
        vertices: ``(V, 3)`` positions.
        faces: ``(F, 3)`` integer faces. For ``"uniform"`` they must be
            concrete (NumPy connectivity), or pass the precomputed
            :class:`jaxrender.mesh.SparseMatrix` from
            ``uniform_laplacian(V, faces)`` instead (then traceable). For
            ``"cot"`` they may be traced.
        method: ``"uniform"`` or ``"cot"``.
        stop_weight_gradient: for ``"cot"``, treat the cotangent weights as
            constants (PyTorch3D computes them under ``torch.no_grad``);
            ``False`` differentiates through them too.
        reduction: ``"mean"`` (default) or ``"none"`` for the ``(V,)``
            per-vertex norms ``||delta_i||``.

    Returns:
        Scalar loss (or ``(V,)`` with ``reduction="none"``), in length units.
    """
    if method not in ("uniform", "cot"):
        raise ValueError(f'method must be "uniform" or "cot", got {method!r}')
    if reduction not in ("mean", "none"):
        raise ValueError(f'reduction must be "mean" or "none", got {reduction!r}')
    vertices = _check_vertices(vertices)
    nv = vertices.shape[0]
    if method == "uniform":
        if isinstance(faces, SparseMatrix):
            L = faces
            if L.shape != (nv, nv):
                raise ValueError(f"faces (a Laplacian) must have shape ({nv}, {nv}), got {L.shape}")
        else:
            if isinstance(faces, jax.core.Tracer):
                raise TypeError(
                    "laplacian_smoothing(method='uniform') needs concrete faces; inside jit pass "
                    "jaxrender.mesh.uniform_laplacian(V, faces) (computed outside jit) instead of the faces"
                )
            check_shape(faces, "faces", ("F", 3))
            L = uniform_laplacian(nv, faces)
        delta = laplacian_apply(L, vertices)
    else:
        check_shape(faces, "faces", ("F", 3))
        L = cotangent_laplacian(vertices, jnp.asarray(faces, jnp.int32))
        if stop_weight_gradient:
            L = jax.lax.stop_gradient(L)
        # L = W - D, so (L v)_i / D_ii = sum_j w_ij v_j / sum_j w_ij - v_i
        diag = jax.ops.segment_sum(jnp.where(L.rows == L.cols, L.values, 0.0), L.rows, num_segments=nv)
        wsum = -diag
        ok = wsum > 0
        inv = jnp.where(ok, 1.0 / jnp.where(ok, wsum, 1.0), 0.0)
        delta = laplacian_apply(L, vertices) * inv[:, None]
    norms = _safe_norm(delta)
    return norms if reduction == "none" else jnp.mean(norms)


def edge_length_loss(vertices, edges_or_faces, target_length=0.0):
    """Mean squared deviation of edge lengths from a target (PyTorch3D's ``mesh_edge_loss``).

    ``mean_e (||v_a - v_b|| - target_length)^2`` over unique edges.

    Args:
        vertices: ``(V, 3)`` positions.
        edges_or_faces: ``(E, 2)`` integer edges (traceable), or ``(F, 3)``
            concrete faces whose unique edges are taken with
            :func:`jaxrender.mesh.edges`.
        target_length: scalar (or ``(E,)``) target length; 0 penalises the
            squared length.

    Returns:
        Scalar, in squared length units. Finite gradients for zero-length
        edges.
    """
    vertices = _check_vertices(vertices)
    e = edges_or_faces
    if not hasattr(e, "shape") or e.ndim != 2 or e.shape[1] not in (2, 3):
        raise ValueError(f"edges_or_faces must have shape (E, 2) or (F, 3), got {getattr(e, 'shape', type(e).__name__)}")
    if e.shape[1] == 3:
        if isinstance(e, jax.core.Tracer):
            raise TypeError("edge_length_loss needs concrete faces; inside jit pass jaxrender.mesh.edges(faces) instead")
        e = mesh_edges(e)
    e = jnp.asarray(e, jnp.int32)
    d = vertices[e[:, 0]] - vertices[e[:, 1]]
    if isinstance(target_length, (int, float)) and target_length == 0:
        # squared length directly: smooth everywhere
        return jnp.mean(jnp.sum(d * d, axis=-1))
    target_length = _float(target_length)
    return jnp.mean((_safe_norm(d) - target_length) ** 2)


class EdgeAdjacency(eqx.Module):
    """Pairs of faces sharing an edge, as index arrays (precomputed from faces).

    For pair ``p``, ``(v0[p], v1[p])`` is the shared edge (``v0 < v1``) and
    ``v2[p]``, ``v3[p]`` are the vertices opposite it in the two faces. A
    manifold interior edge gives one pair; boundary edges give none; an edge
    shared by ``k > 2`` faces gives all ``k (k - 1) / 2`` pairs.

    Attributes:
        v0, v1, v2, v3: ``(P,)`` int32 vertex indices.
    """

    v0: jax.Array
    v1: jax.Array
    v2: jax.Array
    v3: jax.Array


def edge_adjacency(faces) -> EdgeAdjacency:
    """Build the :class:`EdgeAdjacency` of a triangle mesh (NumPy, concrete faces).

    Args:
        faces: ``(F, 3)`` concrete integer faces.

    Returns:
        :class:`EdgeAdjacency` with one entry per pair of faces sharing an edge.
    """
    if isinstance(faces, jax.core.Tracer):
        raise TypeError("edge_adjacency needs concrete faces (NumPy); call it outside jit")
    f = np.asarray(faces)
    check_shape(f, "faces", ("F", 3))
    if f.shape[0] == 0:
        z = jnp.zeros((0,), jnp.int32)
        return EdgeAdjacency(z, z, z, z)
    e, face_edges = mesh_edges(f, return_face_edges=True)
    # face_edges[f, k] is edge (f[k], f[k+1]); its opposite vertex is f[k+2]
    opp = f[:, [2, 0, 1]].reshape(-1)
    eid = face_edges.reshape(-1)
    order = np.argsort(eid, kind="stable")
    eid_s, opp_s = eid[order], opp[order]
    counts = np.bincount(eid_s, minlength=len(e))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    two = np.nonzero(counts == 2)[0]
    a = [e[two, 0]], [e[two, 1]], [opp_s[starts[two]]], [opp_s[starts[two] + 1]]
    for k in np.nonzero(counts > 2)[0]:
        ops = opp_s[starts[k] : starts[k] + counts[k]]
        for x, y in itertools.combinations(ops, 2):
            a[0].append([e[k, 0]]), a[1].append([e[k, 1]]), a[2].append([x]), a[3].append([y])
    arrs = [jnp.asarray(np.concatenate(c).astype(np.int32)) for c in a]
    return EdgeAdjacency(*arrs)


def normal_consistency_setup(faces) -> EdgeAdjacency:
    """Precompute the face pairs used by :func:`normal_consistency` (outside ``jit``).

    Args:
        faces: ``(F, 3)`` concrete integer faces.

    Returns:
        :class:`EdgeAdjacency`.
    """
    return edge_adjacency(faces)


def flatten_loss_setup(faces) -> EdgeAdjacency:
    """Precompute the interior edges and opposite vertices used by :func:`flatten_loss`.

    Args:
        faces: ``(F, 3)`` concrete integer faces.

    Returns:
        :class:`EdgeAdjacency`.
    """
    return edge_adjacency(faces)


def _adjacency(faces_or_adj, fn):
    if isinstance(faces_or_adj, EdgeAdjacency):
        return faces_or_adj
    if isinstance(faces_or_adj, jax.core.Tracer):
        raise TypeError(f"{fn} needs concrete faces; inside jit pass {fn}_setup(faces) (computed outside jit) instead")
    return edge_adjacency(faces_or_adj)


def _gather4(vertices, adj):
    # one gather (one scatter-add in the backward pass) instead of four
    idx = jnp.stack([adj.v0, adj.v1, adj.v2, adj.v3])
    p = vertices[idx]
    return p[0], p[1], p[2], p[3]


def normal_consistency(vertices, faces):
    """Normal consistency (PyTorch3D's ``mesh_normal_consistency``).

    Mean over pairs of faces sharing an edge of ``1 - cos(n0, n1)``, with
    ``n0 = (v1 - v0) x (v2 - v0)`` and ``n1 = -(v1 - v0) x (v3 - v0)`` built
    from the shared edge and the two opposite vertices, so the value does not
    depend on the faces' winding. 0 for a flat surface, 2 for a fully folded
    pair. Degenerate faces give a zero normal (cos = 0, finite gradients).

    Args:
        vertices: ``(V, 3)`` positions.
        faces: ``(F, 3)`` concrete faces, or the :class:`EdgeAdjacency` from
            :func:`normal_consistency_setup` (traceable).

    Returns:
        Scalar in ``[0, 2]``; 0 when no edge is shared.
    """
    vertices = _check_vertices(vertices)
    adj = _adjacency(faces, "normal_consistency")
    if adj.v0.shape[0] == 0:
        return jnp.zeros((), vertices.dtype)
    p0, p1, p2, p3 = _gather4(vertices, adj)
    a = p1 - p0
    n0 = _safe_normalize(jnp.cross(a, p2 - p0))
    n1 = -_safe_normalize(jnp.cross(a, p3 - p0))
    return jnp.mean(1.0 - jnp.sum(n0 * n1, axis=-1))


def flatten_loss(vertices, faces):
    """SoftRas flatten loss: sum over interior edges of ``(cos(theta) + 1)^2``.

    For an edge ``(v0, v1)`` with opposite vertices ``v2`` and ``v3``,
    ``theta`` is the angle between the components of ``v2 - v0`` and
    ``v3 - v0`` perpendicular to the edge (the dihedral angle of the two
    faces): ``theta = pi`` (cos = -1, no penalty) when the faces are
    coplanar, increasing as the surface folds (Liu et al., "Soft
    Rasterizer", 2019). Differences from SoftRas's ``FlattenLoss``: every
    edge shared by two faces is used (SoftRas collects only the edges
    ``(f0, f1)`` and ``(f1, f2)`` of each face and assumes a closed mesh),
    and degenerate configurations give finite values and gradients.

    Args:
        vertices: ``(V, 3)`` positions.
        faces: ``(F, 3)`` concrete faces, or the :class:`EdgeAdjacency` from
            :func:`flatten_loss_setup` (traceable).

    Returns:
        Scalar (summed over edges, as in SoftRas), dimensionless.
    """
    vertices = _check_vertices(vertices)
    adj = _adjacency(faces, "flatten_loss")
    if adj.v0.shape[0] == 0:
        return jnp.zeros((), vertices.dtype)
    p0, p1, p2, p3 = _gather4(vertices, adj)
    a = p1 - p0
    aa = jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), _tiny(a.dtype))
    b1 = p2 - p0
    b2 = p3 - p0
    c1 = _safe_normalize(b1 - a * (jnp.sum(a * b1, axis=-1, keepdims=True) / aa))
    c2 = _safe_normalize(b2 - a * (jnp.sum(a * b2, axis=-1, keepdims=True) / aa))
    cos = jnp.sum(c1 * c2, axis=-1)
    return jnp.sum((cos + 1.0) ** 2)

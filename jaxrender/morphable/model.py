"""Linear 3D morphable models (3DMMs): the :class:`MorphableModel` pytree and
the pure functions that evaluate it.

A morphable model describes a family of meshes with one topology::

    vertices = mean_shape + id_basis @ id_coeffs + exp_basis @ exp_coeffs     (V, 3)
    albedo   = mean_albedo + albedo_basis @ tex_coeffs                        (V, 3)

All bases are stored **already scaled** by the square root of their PCA
variance, so that coefficients drawn from a standard normal distribution give
plausible faces and a plain L2 penalty on the coefficients is the Gaussian
prior. Loaders for the Basel Face Model, FaceVerse, Deep3DFaceRecon's BFM and
FLAME live in :mod:`jaxrender.morphable.loaders`; a procedural stand-in that
needs no download is :func:`jaxrender.data.synthetic_face.synthetic_face_model`.

Units and frames are those of the source file (documented per loader); the
built-in synthetic face uses the BFM convention (millimetres, x to the
subject's left = viewer's right, y up, z towards the viewer).

Everything here is a pure function of arrays, so it works under ``jax.jit``,
``jax.vmap`` (over coefficients, or over a batch of models) and ``jax.grad``.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxrender._checks import check_faces, check_shape, is_concrete

__all__ = [
    "MorphableModel",
    "shape",
    "albedo",
    "landmarks",
    "vertex_normals",
    "to_mesh",
]


def _float(x, name):
    if x is None:
        return None
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _int(x, name):
    if x is None:
        return None
    arr = np.asarray(x) if is_concrete(x) else x
    if is_concrete(x) and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise TypeError(f"{name} must hold integers, got non-integral values of dtype {arr.dtype}")
    return jnp.asarray(arr).astype(jnp.int32)


class MorphableModel(eqx.Module):
    """A linear morphable model (one topology, PCA-style bases).

    Attributes:
      mean_shape: ``(V, 3)`` mean vertex positions (units of the source).
      id_basis: ``(V, 3, Ki)`` identity basis, already scaled by
        ``sqrt(id_variance)``.
      exp_basis: ``(V, 3, Ke)`` expression basis (blendshape offsets or a
        scaled PCA basis); ``Ke`` may be 0.
      mean_albedo: ``(V, 3)`` mean per-vertex RGB albedo, linear, in ``[0, 1]``.
      albedo_basis: ``(V, 3, Ka)`` albedo basis, scaled like ``id_basis``.
      faces: ``(F, 3)`` int32 triangles; normals ``(v1-v0) x (v2-v0)`` point
        out of the head.
      landmark_indices: ``(L,)`` int32 vertex index of each landmark (e.g. the
        iBUG 68-point layout for the synthetic face).
      uvs: optional ``(T, 2)`` texture coordinates.
      face_uvs: optional ``(F, 3)`` int32 indices into ``uvs``.
      masks: optional mapping name -> ``(V,)`` float mask (e.g. ``"face"``,
        ``"skin"``, ``"eyes"``).
      id_variance, exp_variance, albedo_variance: optional ``(K,)`` PCA
        variances the bases were scaled with (informative only).
      eye_ranges: static ``((l0, l1), (r0, r1))`` vertex index ranges of the
        subject's left and right eyeball, or ``None`` (used for eyeball
        rotation in :mod:`jaxrender.morphable.faceverse`).
      landmark_names: static tuple of landmark names, or ``None``.

    The constructor converts arrays to JAX arrays (floats keep their dtype,
    integers become int32) and validates shapes and index ranges, naming the
    offending field. JAX transformations never call it, so a model can be
    vmapped over (e.g. a batch of models with stacked arrays).
    """

    mean_shape: jnp.ndarray
    id_basis: jnp.ndarray
    exp_basis: jnp.ndarray
    mean_albedo: jnp.ndarray
    albedo_basis: jnp.ndarray
    faces: jnp.ndarray
    landmark_indices: jnp.ndarray
    uvs: Optional[jnp.ndarray] = None
    face_uvs: Optional[jnp.ndarray] = None
    masks: Optional[Mapping[str, jnp.ndarray]] = None
    id_variance: Optional[jnp.ndarray] = None
    exp_variance: Optional[jnp.ndarray] = None
    albedo_variance: Optional[jnp.ndarray] = None
    eye_ranges: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = eqx.field(static=True, default=None)
    landmark_names: Optional[Tuple[str, ...]] = eqx.field(static=True, default=None)

    def __init__(
        self,
        mean_shape,
        id_basis,
        exp_basis,
        mean_albedo,
        albedo_basis,
        faces,
        landmark_indices=None,
        *,
        uvs=None,
        face_uvs=None,
        masks=None,
        id_variance=None,
        exp_variance=None,
        albedo_variance=None,
        eye_ranges=None,
        landmark_names=None,
    ):
        mean_shape = _float(mean_shape, "mean_shape")
        check_shape(mean_shape, "mean_shape", ("V", 3))
        V = mean_shape.shape[0]
        dt = mean_shape.dtype

        def basis(b, name):
            if b is None:
                b = jnp.zeros((V, 3, 0), dt)
            b = _float(b, name)
            if b.ndim == 2 and b.shape[0] == 3 * V:  # (3V, K) flat layout
                b = b.reshape(V, 3, b.shape[1])
            check_shape(b, name, (V, 3, "K"))
            return b

        self.mean_shape = mean_shape
        self.id_basis = basis(id_basis, "id_basis")
        self.exp_basis = basis(exp_basis, "exp_basis")
        if mean_albedo is None:
            mean_albedo = jnp.full((V, 3), 0.5, dt)
        self.mean_albedo = check_shape(_float(mean_albedo, "mean_albedo"), "mean_albedo", (V, 3))
        self.albedo_basis = basis(albedo_basis, "albedo_basis")
        self.faces = check_faces(_int(faces, "faces"), V, "faces")
        if landmark_indices is None:
            landmark_indices = np.zeros((0,), np.int32)
        li = _int(landmark_indices, "landmark_indices").reshape(-1)
        if is_concrete(li) and li.shape[0] and (int(li.min()) < 0 or int(li.max()) >= V):
            raise IndexError(
                f"landmark_indices out of range: values span [{int(li.min())}, {int(li.max())}] but there are {V} vertices"
            )
        self.landmark_indices = li
        self.uvs = None if uvs is None else check_shape(_float(uvs, "uvs"), "uvs", ("T", 2))
        if face_uvs is not None:
            face_uvs = check_faces(_int(face_uvs, "face_uvs"), None if uvs is None else self.uvs.shape[0], "face_uvs")
            if face_uvs.shape[0] != self.faces.shape[0]:
                raise ValueError(f"face_uvs must have shape ({self.faces.shape[0]}, 3) like faces, got {tuple(face_uvs.shape)}")
        self.face_uvs = face_uvs
        if masks is not None:
            masks = {str(k): check_shape(_float(v, f"masks[{k!r}]"), f"masks[{k!r}]", (V,)) for k, v in dict(masks).items()}
        self.masks = masks

        def var(v, b, name):
            if v is None:
                return None
            v = _float(v, name).reshape(-1)
            if v.shape[0] != b.shape[2]:
                raise ValueError(f"{name} must have shape ({b.shape[2]},) to match its basis, got {tuple(v.shape)}")
            return v

        self.id_variance = var(id_variance, self.id_basis, "id_variance")
        self.exp_variance = var(exp_variance, self.exp_basis, "exp_variance")
        self.albedo_variance = var(albedo_variance, self.albedo_basis, "albedo_variance")
        if eye_ranges is not None:
            eye_ranges = tuple((int(a), int(b)) for a, b in eye_ranges)
            if len(eye_ranges) != 2 or any(not (0 <= a < b <= V) for a, b in eye_ranges):
                raise ValueError(f"eye_ranges must be ((l0, l1), (r0, r1)) with 0 <= start < end <= {V}, got {eye_ranges}")
        self.eye_ranges = eye_ranges
        if landmark_names is not None:
            landmark_names = tuple(str(n) for n in landmark_names)
            if len(landmark_names) != li.shape[0]:
                raise ValueError(f"landmark_names has {len(landmark_names)} names but there are {li.shape[0]} landmark_indices")
        self.landmark_names = landmark_names

    def astype(self, dtype) -> "MorphableModel":
        """A copy with every floating array cast to ``dtype`` (indices stay int32)."""
        import jax

        def cast(x):
            return x.astype(dtype) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x

        return jax.tree_util.tree_map(cast, self)

    # Sizes are static (array shapes), so these are safe under jit.
    @property
    def num_vertices(self) -> int:
        return self.mean_shape.shape[-2]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[-2]

    @property
    def num_id(self) -> int:
        return self.id_basis.shape[-1]

    @property
    def num_exp(self) -> int:
        return self.exp_basis.shape[-1]

    @property
    def num_albedo(self) -> int:
        return self.albedo_basis.shape[-1]

    @property
    def num_landmarks(self) -> int:
        return self.landmark_indices.shape[-1]


def _apply_basis(basis, coeffs, name):
    """``basis (V,3,K) @ coeffs (k,)`` with ``k <= K`` (the first k columns)."""
    coeffs = jnp.asarray(coeffs)
    if coeffs.ndim != 1:
        raise ValueError(f"{name} must have shape (K,) (one example; batch with jax.vmap), got {tuple(coeffs.shape)}")
    k = coeffs.shape[0]
    K = basis.shape[-1]
    if k > K:
        raise ValueError(f"{name} has {k} coefficients but the model's basis has only {K}")
    # HIGHEST: GPUs would otherwise evaluate float32 products in TF32 (10-bit mantissa).
    return jnp.einsum("vck,k->vc", basis[..., :k], coeffs.astype(basis.dtype), precision=jax.lax.Precision.HIGHEST)


def shape(model: MorphableModel, id_coeffs=None, exp_coeffs=None):
    """Vertex positions of a face.

    Args:
      model: the morphable model.
      id_coeffs: ``(k_i,)`` identity coefficients with ``k_i <= num_id`` (the
        first ``k_i`` basis vectors are used; fit fewer coefficients by passing
        a shorter vector), or ``None`` for the mean identity.
      exp_coeffs: ``(k_e,)`` expression coefficients, likewise, or ``None``.

    Returns:
      ``(V, 3)`` vertices ``mean_shape + id_basis @ id + exp_basis @ exp`` in the
      model's frame and units. Coefficients are in units of standard
      deviations (the bases are pre-scaled).
    """
    v = model.mean_shape
    if id_coeffs is not None:
        v = v + _apply_basis(model.id_basis, id_coeffs, "id_coeffs")
    if exp_coeffs is not None:
        v = v + _apply_basis(model.exp_basis, exp_coeffs, "exp_coeffs")
    return v


def albedo(model: MorphableModel, tex_coeffs=None, clip: bool = False):
    """Per-vertex albedo ``mean_albedo + albedo_basis @ tex_coeffs``.

    Args:
      model: the morphable model.
      tex_coeffs: ``(k_a,)`` albedo coefficients (``k_a <= num_albedo``) or
        ``None`` for the mean.
      clip: clamp the result to ``[0, 1]`` (the gradient is zero outside).

    Returns:
      ``(V, 3)`` linear RGB albedo, nominally in ``[0, 1]``.
    """
    a = model.mean_albedo
    if tex_coeffs is not None:
        a = a + _apply_basis(model.albedo_basis, tex_coeffs, "tex_coeffs")
    return jnp.clip(a, 0.0, 1.0) if clip else a


def landmarks(model: MorphableModel, vertices):
    """Landmark positions ``vertices[model.landmark_indices]``.

    Args:
      vertices: ``(V, D)`` vertex attributes (3-D positions, projected 2-D
        points, ...).

    Returns:
      ``(L, D)``.
    """
    check_shape(vertices, "vertices", (model.num_vertices, None))
    return jnp.take(vertices, model.landmark_indices, axis=0)


def vertex_normals(model: MorphableModel, vertices):
    """Unit, area-weighted vertex normals ``(V, 3)`` of ``vertices`` with the
    model's faces (:func:`jaxrender.mesh.vertex_normals`)."""
    from jaxrender.mesh import vertex_normals as _vertex_normals

    check_shape(vertices, "vertices", (model.num_vertices, 3))
    return _vertex_normals(vertices, model.faces)


def to_mesh(model: MorphableModel, vertices, vertex_colors=None):
    """A :class:`jaxrender.mesh.Mesh` of ``vertices`` with the model's faces
    (and UVs when the model has them)."""
    from jaxrender.mesh import Mesh

    return Mesh(vertices=vertices, faces=model.faces, vertex_colors=vertex_colors, uvs=model.uvs, face_uvs=model.face_uvs)

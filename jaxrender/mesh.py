"""Triangle meshes: the :class:`Mesh` pytree, normals, edges, Laplacians and
procedural shapes.

Conventions (see ``docs/architecture.md``):

- ``vertices`` are ``(V, 3)`` floats (any length unit; float32 by default,
  float64 works), ``faces`` are ``(F, 3)`` int32 indices into them.
- Winding: the face normal is ``(v1 - v0) x (v2 - v0)``. Every closed
  procedural mesh here has it pointing **outward** -- except
  :func:`bumpy_sphere`, which reproduces the benchmark scene's face order
  verbatim and is wound the other way (see its docstring).
- Procedural shapes are y-up unless stated otherwise and return a
  :class:`Mesh` whose arrays use JAX's default dtypes (float32 / int32).
- UVs: ``u`` to the right, ``v`` up; ``(0, 0)`` is the bottom-left of the
  texture image.

The differentiable functions (:func:`face_normals`, :func:`vertex_normals`,
:func:`face_areas`, :func:`cotangent_laplacian`) are pure JAX, work under
``jit`` / ``vmap`` / ``grad``, and have finite values and gradients for
degenerate (zero-area) triangles. Functions that work on the connectivity only
(:func:`edges`, :func:`uniform_laplacian`, the procedural shapes) use NumPy on
concrete faces and are not traceable; call them outside ``jit`` (faces are
almost always fixed data anyway).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxrender._checks import check_faces, check_float, check_shape

Array = jax.Array

__all__ = [
    "Mesh",
    "SparseMatrix",
    "face_normals",
    "vertex_normals",
    "face_areas",
    "edges",
    "uniform_laplacian",
    "cotangent_laplacian",
    "laplacian_apply",
    "icosphere",
    "uv_sphere",
    "bumpy_sphere",
    "cube",
    "torus",
    "plane",
    "teapot",
]


# ----------------------------------------------------------------------------
# The Mesh pytree
# ----------------------------------------------------------------------------

def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _is_concrete(x) -> bool:
    return isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def _to_float_array(x):
    # Non-array leaves (None, or ints used as a vmap in_axes spec) pass through.
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not _is_array(x):
        return x
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _to_color_array(x):
    # uint8 colours / images are scaled to [0, 1]; other integer types are
    # left for the float check to reject (their range is ambiguous).
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not _is_array(x):
        return x
    if x.dtype == np.uint8:
        return jnp.asarray(x).astype(jnp.result_type(float)) / 255.0
    return jnp.asarray(x)


def _to_index_array(x):
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not _is_array(x):
        return x
    if np.issubdtype(np.dtype(x.dtype), np.integer):
        if x.dtype == np.int32:
            return jnp.asarray(x)
        if _is_concrete(x):
            xn = np.asarray(x)
            if xn.size and (xn.max() > np.iinfo(np.int32).max or xn.min() < np.iinfo(np.int32).min):
                return jnp.asarray(xn)  # let the range check report it
            return jnp.asarray(xn, dtype=jnp.int32)
        return x.astype(jnp.int32)
    return jnp.asarray(x)  # non-integer: reported by the check


class Mesh(eqx.Module):
    """A triangle mesh with optional per-vertex colours and a UV texture.

    Attributes:
      vertices: ``(V, 3)`` float vertex positions.
      faces: ``(F, 3)`` int32 vertex indices; normal ``(v1-v0) x (v2-v0)`` is
        the front side.
      vertex_colors: optional ``(V, C)`` float per-vertex attributes (usually
        RGB in [0, 1]).
      uvs: optional ``(T, 2)`` float texture coordinates (u right, v up).
      face_uvs: optional ``(F, 3)`` int32 indices into ``uvs`` (UV corners of
        each face; separate from ``faces`` so seams can be represented).
      texture: optional ``(Ht, Wt, C)`` float texture image, row 0 at the top.

    The constructor converts lists / NumPy arrays to JAX arrays (float
    vertices, int32 indices; uint8 colours and textures are divided by 255)
    and validates them: shapes and dtypes always;
    index ranges only on concrete arrays (inside ``jit`` they are skipped).
    Errors name the offending argument. ``vertices`` and ``vertex_colors`` may
    carry leading batch axes (e.g. to build a batch for ``jax.vmap``); the
    library's functions themselves take one mesh. Non-array values (``None``,
    or ints when the class is used as a ``vmap`` ``in_axes`` spec) are passed
    through unchecked.
    """

    vertices: Array = eqx.field(converter=_to_float_array)
    faces: Array = eqx.field(converter=_to_index_array)
    vertex_colors: Optional[Array] = eqx.field(default=None, converter=_to_color_array)
    uvs: Optional[Array] = eqx.field(default=None, converter=_to_float_array)
    face_uvs: Optional[Array] = eqx.field(default=None, converter=_to_index_array)
    texture: Optional[Array] = eqx.field(default=None, converter=_to_color_array)

    def __check_init__(self):
        v = self.vertices
        nv = None
        if _is_array(v):
            check_shape(v, "vertices", ("V", 3), batch_ok=True)
            check_float(v, "vertices")
            nv = v.shape[-2]
        nf = None
        if _is_array(self.faces):
            check_faces(self.faces, nv if _is_concrete(self.faces) else None, "faces")
            nf = self.faces.shape[0]
        c = self.vertex_colors
        if _is_array(c):
            check_shape(c, "vertex_colors", ("V", "C"), batch_ok=True)
            check_float(c, "vertex_colors")
            if nv is not None and c.shape[-2] != nv:
                raise ValueError(f"vertex_colors must have one row per vertex ({nv}), got shape {tuple(c.shape)}")
        nt = None
        if _is_array(self.uvs):
            check_shape(self.uvs, "uvs", ("T", 2))
            check_float(self.uvs, "uvs")
            nt = self.uvs.shape[0]
        if _is_array(self.face_uvs):
            if self.uvs is None:
                raise ValueError("face_uvs given without uvs")
            check_faces(self.face_uvs, None, "face_uvs")
            if nt is not None and _is_concrete(self.face_uvs) and self.face_uvs.shape[0] > 0:
                fu = np.asarray(self.face_uvs)
                if fu.min() < 0 or fu.max() >= nt:
                    raise IndexError(
                        f"face_uvs index out of range: values span [{fu.min()}, {fu.max()}] but uvs has {nt} rows"
                    )
            if nf is not None and self.face_uvs.shape[0] != nf:
                raise ValueError(
                    f"face_uvs must have one row per face ({nf}), got shape {tuple(self.face_uvs.shape)}"
                )
        elif _is_array(self.uvs) and nv is not None and nt != nv:
            raise ValueError(
                f"uvs without face_uvs are per-vertex and need one row per vertex ({nv}), got shape {tuple(self.uvs.shape)}"
            )
        if _is_array(self.texture):
            check_shape(self.texture, "texture", ("Ht", "Wt", "C"))
            check_float(self.texture, "texture")

    @property
    def num_vertices(self) -> int:
        """Number of vertices ``V``."""
        return self.vertices.shape[-2]

    @property
    def num_faces(self) -> int:
        """Number of faces ``F``."""
        return self.faces.shape[0]

    @property
    def face_uv_indices(self) -> Array:
        """``(F, 3)`` indices into ``uvs``: ``face_uvs`` if set, else ``faces``
        (per-vertex UVs)."""
        return self.faces if self.face_uvs is None else self.face_uvs

    def face_normals(self, normalize: bool = True) -> Array:
        """:func:`face_normals` of this mesh, ``(F, 3)``."""
        return face_normals(self.vertices, self.faces, normalize=normalize)

    def vertex_normals(self) -> Array:
        """:func:`vertex_normals` of this mesh, ``(V, 3)``."""
        return vertex_normals(self.vertices, self.faces)

    def face_areas(self) -> Array:
        """:func:`face_areas` of this mesh, ``(F,)``."""
        return face_areas(self.vertices, self.faces)


# ----------------------------------------------------------------------------
# Normals and areas
# ----------------------------------------------------------------------------

def _tiny(dtype) -> float:
    # Squared norms below this are treated as zero: sqrt(finfo.tiny) keeps
    # 1/|n| (and so the gradient of n/|n|) far from overflow.
    return float(np.sqrt(float(jnp.finfo(dtype).tiny)))


def _safe_norm(x: Array, keepdims: bool = False) -> tuple[Array, Array]:
    """Euclidean norm over the last axis with a finite gradient at 0.

    Returns ``(norm, ok)`` where ``ok`` marks norms that are not treated as 0.
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=keepdims)
    ok = sq > _tiny(x.dtype)
    norm = jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)
    return norm, ok


def _safe_normalize(x: Array) -> Array:
    norm, ok = _safe_norm(x, keepdims=True)
    return jnp.where(ok, x / jnp.where(ok, norm, 1.0), 0.0)


def _corners(vertices: Array, faces: Array):
    return (
        vertices[..., faces[:, 0], :],
        vertices[..., faces[:, 1], :],
        vertices[..., faces[:, 2], :],
    )


def face_normals(vertices: Array, faces: Array, normalize: bool = True) -> Array:
    """Per-face normals ``(v1 - v0) x (v2 - v0)``.

    Args:
      vertices: ``(V, 3)`` float positions (leading batch axes allowed).
      faces: ``(F, 3)`` integer vertex indices.
      normalize: if True return unit normals; if False return the raw cross
        product, whose length is twice the face area (units: length²).

    Returns:
      ``(F, 3)`` normals (with the batch axes of ``vertices``). With
      ``normalize=True`` a degenerate face (zero area, squared norm below
      ``sqrt(finfo.tiny)``) gets the zero vector, with a finite (zero)
      gradient.
    """
    v0, v1, v2 = _corners(vertices, faces)
    n = jnp.cross(v1 - v0, v2 - v0)
    return _safe_normalize(n) if normalize else n


def face_areas(vertices: Array, faces: Array) -> Array:
    """Triangle areas.

    Args:
      vertices: ``(V, 3)`` float positions (leading batch axes allowed).
      faces: ``(F, 3)`` integer vertex indices.

    Returns:
      ``(F,)`` areas in length² units; the gradient is finite (zero) for
      degenerate faces.
    """
    n = face_normals(vertices, faces, normalize=False)
    return 0.5 * _safe_norm(n)[0]


def vertex_normals(vertices: Array, faces: Array) -> Array:
    """Area-weighted vertex normals.

    Each face adds its unnormalized normal (length = 2 × area) to its three
    vertices; the sums are then normalized.

    Args:
      vertices: ``(V, 3)`` float positions (leading batch axes allowed).
      faces: ``(F, 3)`` integer vertex indices.

    Returns:
      ``(V, 3)`` unit normals. Vertices not used by any face (or whose faces
      cancel out) get the zero vector; values and gradients are finite.
    """
    n = face_normals(vertices, faces, normalize=False)
    acc = jnp.zeros_like(vertices)
    for k in range(3):
        acc = acc.at[..., faces[:, k], :].add(n)
    return _safe_normalize(acc)


# ----------------------------------------------------------------------------
# Connectivity
# ----------------------------------------------------------------------------

def _concrete_faces(faces, fn: str) -> np.ndarray:
    if isinstance(faces, jax.core.Tracer):
        raise TypeError(
            f"{fn}() needs concrete faces (it uses NumPy and is not traceable); "
            "call it outside jit/vmap/grad, e.g. on mesh.faces before tracing"
        )
    f = np.asarray(faces)
    check_faces(f, None, "faces")
    return f.astype(np.int64)


def edges(faces, return_face_edges: bool = False):
    """Unique undirected edges of a triangle mesh.

    Uses NumPy on concrete ``faces``: **not traceable** (call it outside
    ``jit``; faces are normally fixed data).

    Args:
      faces: ``(F, 3)`` integer vertex indices (NumPy or JAX, concrete).
      return_face_edges: also return, for every face, the indices of its edges
        ``(v0, v1)``, ``(v1, v2)``, ``(v2, v0)``.

    Returns:
      ``edges``: ``(E, 2)`` int32 NumPy array, each row sorted
      (``edges[:, 0] < edges[:, 1]``), rows in lexicographic order. With
      ``return_face_edges``: ``(edges, face_edges)`` where ``face_edges`` is
      ``(F, 3)`` int32 indexing ``edges``.
    """
    f = _concrete_faces(faces, "edges")
    half = f[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2)
    half = np.sort(half, axis=1)
    if half.shape[0] == 0:
        e = np.zeros((0, 2), np.int32)
        return (e, np.zeros((0, 3), np.int32)) if return_face_edges else e
    e, inv = np.unique(half, axis=0, return_inverse=True)
    e = e.astype(np.int32)
    if return_face_edges:
        return e, inv.reshape(-1, 3).astype(np.int32)
    return e


class SparseMatrix(eqx.Module):
    """A sparse ``(n, m)`` matrix in coordinate (COO) form, as a pytree.

    Duplicate ``(row, col)`` entries are summed. Used for mesh Laplacians:
    apply with :func:`laplacian_apply` (or ``L @ x``), or densify with
    :meth:`todense` for small meshes.

    Attributes:
      rows: ``(nnz,)`` int32 row indices.
      cols: ``(nnz,)`` int32 column indices.
      values: ``(nnz,)`` float entries.
      shape: static ``(n, m)``.
    """

    rows: Array
    cols: Array
    values: Array
    shape: tuple = eqx.field(static=True)

    def todense(self) -> Array:
        """The dense ``(n, m)`` matrix."""
        return jnp.zeros(self.shape, self.values.dtype).at[self.rows, self.cols].add(self.values)

    def __matmul__(self, x):
        return laplacian_apply(self, x)


def laplacian_apply(L: SparseMatrix, x: Array) -> Array:
    """Sparse matrix product ``L @ x``.

    Args:
      L: a :class:`SparseMatrix` of shape ``(n, m)`` (e.g. from
        :func:`uniform_laplacian` or :func:`cotangent_laplacian`).
      x: ``(m,)`` or ``(m, C)`` array, e.g. the ``(V, 3)`` vertex positions.

    Returns:
      ``(n,)`` or ``(n, C)``: ``(L @ x)[i] = sum_k values[k] * x[cols[k]]``
      over entries with ``rows[k] == i``. With the Laplacians here,
      ``(L @ x)[i]`` is a (weighted) sum of ``x[j] - x[i]`` over the
      neighbours ``j`` of ``i``: a vector from ``x[i]`` towards its
      neighbourhood. Differentiable in ``L.values`` and ``x``.
    """
    vals = L.values.reshape(L.values.shape + (1,) * (x.ndim - 1))
    return jax.ops.segment_sum(vals * x[L.cols], L.rows, num_segments=L.shape[0])


def uniform_laplacian(num_vertices: int, faces, normalize: bool = True) -> SparseMatrix:
    """Uniform (graph) Laplacian of the mesh's edge graph.

    ``L = W - D`` with ``W[i, j] = w`` for every edge ``(i, j)`` and ``D`` the
    diagonal of row sums, so ``L @ 1 = 0`` and ``(L @ x)[i] = sum_j w
    (x[j] - x[i])``.

    Uses :func:`edges` (NumPy): **not traceable in** ``faces``.

    Args:
      num_vertices: ``V``; isolated vertices get an all-zero row.
      faces: ``(F, 3)`` integer vertex indices (concrete).
      normalize: if True (default) ``w = 1 / deg(i)`` so ``(L @ x)[i]`` is the
        mean of the neighbours minus ``x[i]`` (not symmetric); if False
        ``w = 1`` (the symmetric combinatorial Laplacian ``A - D``).

    Returns:
      A :class:`SparseMatrix` of shape ``(V, V)`` with float values in JAX's
      default float dtype.
    """
    e = edges(faces).astype(np.int64)
    if e.size and e.max() >= num_vertices:
        raise IndexError(f"faces index out of range: max {int(e.max())} but num_vertices={num_vertices}")
    i, j = e[:, 0], e[:, 1]
    deg = np.bincount(np.concatenate([i, j]), minlength=num_vertices).astype(np.float64)
    diag = np.arange(num_vertices)
    rows = np.concatenate([i, j, diag])
    cols = np.concatenate([j, i, diag])
    if normalize:
        inv = np.where(deg > 0, 1.0 / np.maximum(deg, 1.0), 0.0)
        vals = np.concatenate([inv[i], inv[j], -(deg > 0).astype(np.float64)])
    else:
        ones = np.ones(len(i))
        vals = np.concatenate([ones, ones, -deg])
    return SparseMatrix(
        jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
        jnp.asarray(vals, jnp.result_type(float)), (num_vertices, num_vertices),
    )


def cotangent_laplacian(vertices: Array, faces: Array) -> SparseMatrix:
    """Cotangent Laplacian ``L = W - D``.

    ``W[i, j] = (cot(alpha_ij) + cot(beta_ij)) / 2`` where ``alpha_ij`` and
    ``beta_ij`` are the angles opposite edge ``(i, j)`` in its two faces (one
    for a boundary edge), ``D`` the diagonal of row sums; symmetric, ``L @ 1
    = 0``. Not divided by vertex areas (multiply by an inverse mass matrix
    for the Laplace-Beltrami operator). Weights can be negative for obtuse
    triangles. Degenerate faces contribute zero weight (finite gradients).

    Traceable and differentiable in ``vertices`` (``jit`` / ``vmap`` /
    ``grad``): the sparsity pattern depends only on the shape of ``faces``
    (12 entries per face, duplicates summed).

    Args:
      vertices: ``(V, 3)`` float positions.
      faces: ``(F, 3)`` integer vertex indices.

    Returns:
      A :class:`SparseMatrix` of shape ``(V, V)`` with ``12 F`` entries.
    """
    v0, v1, v2 = _corners(vertices, faces)

    def cot(a, b):
        n, ok = _safe_norm(jnp.cross(a, b))
        return jnp.where(ok, jnp.sum(a * b, -1) / jnp.where(ok, n, 1.0), 0.0)

    # Weight of the edge opposite each corner.
    w = 0.5 * jnp.stack([cot(v1 - v0, v2 - v0), cot(v2 - v1, v0 - v1), cot(v0 - v2, v1 - v2)], -1)
    faces = jnp.asarray(faces, jnp.int32)
    i = faces[:, jnp.array([1, 2, 0])].reshape(-1)
    j = faces[:, jnp.array([2, 0, 1])].reshape(-1)
    w = w.reshape(w.shape[:-2] + (-1,))
    rows = jnp.concatenate([i, j, i, j])
    cols = jnp.concatenate([j, i, i, j])
    vals = jnp.concatenate([w, w, -w, -w], axis=-1)
    n = vertices.shape[-2]
    return SparseMatrix(rows, cols, vals, (n, n))


# ----------------------------------------------------------------------------
# Procedural shapes
# ----------------------------------------------------------------------------

def _make_mesh(v, f, vertex_colors=None, uvs=None, face_uvs=None) -> Mesh:
    return Mesh(
        vertices=jnp.asarray(np.asarray(v, np.float64), jnp.result_type(float)),
        faces=jnp.asarray(np.asarray(f), jnp.int32),
        vertex_colors=None if vertex_colors is None else jnp.asarray(vertex_colors, jnp.result_type(float)),
        uvs=None if uvs is None else jnp.asarray(uvs, jnp.result_type(float)),
        face_uvs=None if face_uvs is None else jnp.asarray(np.asarray(face_uvs), jnp.int32),
    )


def _np_face_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    return np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])


def _grid_quads(n_rows: int, n_cols: int, wrap_cols: bool, stride: Optional[int] = None) -> np.ndarray:
    """Quads ``(a, b, c, d)`` of a vertex grid: a=(i,j), b=(i,j+1), c=(i+1,j),
    d=(i+1,j+1), for i < n_rows-1 and j < n_cols (wrapping) or n_cols-1."""
    stride = n_cols if stride is None else stride
    i, j = np.meshgrid(np.arange(n_rows - 1), np.arange(n_cols if wrap_cols else n_cols - 1), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    j1 = (j + 1) % n_cols if wrap_cols else j + 1
    return np.stack([i * stride + j, i * stride + j1, (i + 1) * stride + j, (i + 1) * stride + j1], -1)


def icosphere(level: int = 3, radius: float = 1.0) -> Mesh:
    """Icosphere: a regular icosahedron subdivided ``level`` times (each
    triangle into four) with the vertices projected onto the sphere.

    Closed, genus 0, outward normals, no UVs (no seam).

    Args:
      level: number of subdivisions (>= 0); ``V = 10 * 4**level + 2``,
        ``F = 20 * 4**level``.
      radius: sphere radius.

    Returns:
      A :class:`Mesh` centred at the origin.
    """
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    p = (1.0 + math.sqrt(5.0)) / 2.0
    v = []
    for a, b in itertools.product((-1.0, 1.0), repeat=2):
        v += [(a, b * p, 0.0), (0.0, a, b * p), (b * p, 0.0, a)]
    v = np.array(v)
    # The 20 faces are the vertex triples at mutual distance 2 (the edge length).
    f = np.array(
        [t for t in itertools.combinations(range(12), 3)
         if all(abs(np.linalg.norm(v[x] - v[y]) - 2.0) < 1e-9 for x, y in itertools.combinations(t, 2))]
    )
    flip = np.einsum("fc,fc->f", _np_face_normals(v, f), v[f].mean(1)) < 0
    f[flip] = f[flip][:, ::-1]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(level):
        e, fe = edges(f, return_face_edges=True)
        mid = v[e[:, 0]] + v[e[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        m = fe.astype(np.int64) + len(v)
        a, b, c = f[:, 0], f[:, 1], f[:, 2]
        m01, m12, m20 = m[:, 0], m[:, 1], m[:, 2]
        f = np.concatenate(
            [np.stack(t, -1) for t in ((a, m01, m20), (m01, b, m12), (m20, m12, c), (m01, m12, m20))]
        )
        v = np.concatenate([v, mid])
    return _make_mesh(v * radius, f)


def _sphere_dir(theta, phi):
    # Same parametrization as the benchmark sphere: y up, phi from +x to +z.
    return np.stack([np.sin(theta) * np.cos(phi), np.cos(theta), np.sin(theta) * np.sin(phi)], -1)


def uv_sphere(n_lat: int = 16, n_lon: int = 32, radius: float = 1.0) -> Mesh:
    """Latitude-longitude sphere with single pole vertices.

    Closed, genus 0, outward normals. Parametrized like :func:`bumpy_sphere`
    (y up; polar angle ``theta`` from +y; azimuth ``phi`` from +x towards +z)
    but with one vertex per pole, so there are no degenerate faces.

    Args:
      n_lat: number of latitude rings including both poles (>= 3).
      n_lon: number of vertices per ring (>= 3).
      radius: sphere radius.

    Returns:
      A :class:`Mesh` with ``V = (n_lat - 2) * n_lon + 2`` vertices,
      ``F = 2 * n_lon * (n_lat - 2)`` faces, and UVs with a seam at
      ``phi = 0``: ``u = phi / 2pi``, ``v = 1 - theta / pi`` (``face_uvs``
      index a ``n_lat x (n_lon + 1)`` grid of ``uvs``).
    """
    if n_lat < 3 or n_lon < 3:
        raise ValueError(f"uv_sphere needs n_lat >= 3 and n_lon >= 3, got n_lat={n_lat}, n_lon={n_lon}")
    theta = np.linspace(0.0, np.pi, n_lat)
    phi = np.linspace(0.0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(theta[1:-1], phi, indexing="ij")
    ring = _sphere_dir(T, P).reshape(-1, 3)
    v = np.concatenate([[[0.0, 1.0, 0.0]], ring, [[0.0, -1.0, 0.0]]]) * radius
    south = len(v) - 1

    def vid(i, j):  # grid (i, j) -> vertex index; i = 0 / n_lat-1 are the poles
        return np.where(i == 0, 0, np.where(i == n_lat - 1, south, 1 + (i - 1) * n_lon + j % n_lon))

    def tid(i, j):
        return i * (n_lon + 1) + j

    i, j = np.meshgrid(np.arange(n_lat - 1), np.arange(n_lon), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    # (b - a) ~ d/dphi and (c - a) ~ d/dtheta: d/dphi x d/dtheta points outward.
    tri_abc = (i > 0)  # [a, b, c] degenerate on the top cap
    tri_bdc = (i < n_lat - 2)  # [b, d, c] degenerate on the bottom cap
    faces, fuv = [], []
    for keep, corners in ((tri_abc, ((0, 0), (0, 1), (1, 0))), (tri_bdc, ((0, 1), (1, 1), (1, 0)))):
        ii, jj = i[keep], j[keep]
        faces.append(np.stack([vid(ii + di, jj + dj) for di, dj in corners], -1))
        fuv.append(np.stack([tid(ii + di, jj + dj) for di, dj in corners], -1))
    faces, fuv = np.concatenate(faces), np.concatenate(fuv)
    ui, uj = np.meshgrid(np.arange(n_lat), np.arange(n_lon + 1), indexing="ij")
    uvs = np.stack([uj / n_lon, 1.0 - ui / (n_lat - 1)], -1).reshape(-1, 2)
    return _make_mesh(v, faces, uvs=uvs, face_uvs=fuv)


def bumpy_sphere(n_lat: int, n_lon: int, amplitude: float = 0.05, reverse_winding: bool = False) -> Mesh:
    """The benchmark scene's bumpy UV sphere, exactly as in BENCHMARKS.md.

    ``theta = linspace(0, pi, n_lat)``, ``phi = linspace(0, 2pi, n_lon,
    endpoint=False)``, radius ``1 + amplitude * sin(5 theta) cos(7 phi)``,
    vertex ``i * n_lon + j`` at ``r (sin(theta) cos(phi), cos(theta),
    sin(theta) sin(phi))``; for each quad ``a = i*n_lon + j``, ``b = i*n_lon +
    (j+1) % n_lon``, ``c = a + n_lon``, ``d = b + n_lon`` the faces ``[a, c,
    b]``, ``[b, c, d]`` (in that order, quad by quad); vertex colours
    ``default_rng(0).uniform(0.2, 1.0, (V, 3))``.

    Orientation: with this face order ``(v1 - v0) x (v2 - v0)`` points
    **inward** (``c - a`` runs along +theta, ``b - a`` along +phi, and
    ``d/dtheta x d/dphi`` points to the centre), i.e. unlike the other
    procedural meshes the benchmark sphere is wound clockwise seen from
    outside. It is kept as specified so benchmark figures are comparable;
    pass ``reverse_winding=True`` to get ``[a, b, c]``, ``[b, d, c]`` (outward)
    with everything else identical. Each pole is ``n_lon`` coincident vertices,
    so the first and last ring of quads contain ``n_lon`` zero-area faces each.

    Args:
      n_lat: number of latitude rings including the poles (36 and 231 in the
        benchmarks).
      n_lon: vertices per ring (36 and 230 in the benchmarks).
      amplitude: bump amplitude (0.05 in the benchmarks).
      reverse_winding: flip every face (not the benchmark definition).

    Returns:
      A :class:`Mesh` with ``V = n_lat * n_lon`` vertices,
      ``F = 2 * (n_lat - 1) * n_lon`` faces (36 x 36 -> 2520,
      231 x 230 -> 105,800) and ``(V, 3)`` ``vertex_colors``.
    """
    theta = np.linspace(0, np.pi, n_lat)
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(theta, phi, indexing="ij")
    r = 1 + amplitude * np.sin(5 * T) * np.cos(7 * P)
    v = np.stack([r * np.sin(T) * np.cos(P), r * np.cos(T), r * np.sin(T) * np.sin(P)], -1).reshape(-1, 3)
    q = _grid_quads(n_lat, n_lon, wrap_cols=True)
    a, b, c, d = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    if reverse_winding:
        f = np.stack([np.stack([a, b, c], -1), np.stack([b, d, c], -1)], 1).reshape(-1, 3)
    else:
        f = np.stack([np.stack([a, c, b], -1), np.stack([b, c, d], -1)], 1).reshape(-1, 3)
    colors = np.random.default_rng(0).uniform(0.2, 1.0, (n_lat * n_lon, 3))
    return _make_mesh(v, f, vertex_colors=colors)


def cube(size: float = 2.0) -> Mesh:
    """Axis-aligned cube centred at the origin with side ``size``.

    8 shared vertices, 12 faces, closed, outward normals. ``face_uvs`` map
    each side to the full ``[0, 1]²`` square.

    Args:
      size: edge length (default 2: the cube ``[-1, 1]³``).

    Returns:
      A :class:`Mesh`; vertex ``k`` is at ``size/2 * (±1, ±1, ±1)`` with the
      signs given by the bits ``(k >> 2, k >> 1, k) & 1`` (x, y, z).
    """
    k = np.arange(8)
    v = (np.stack([(k >> 2) & 1, (k >> 1) & 1, k & 1], -1) * 2.0 - 1.0) * (size / 2.0)
    quads = np.array([[0, 1, 3, 2], [4, 5, 7, 6], [0, 1, 5, 4], [2, 3, 7, 6], [0, 2, 6, 4], [1, 3, 7, 5]])
    qn = np.cross(v[quads[:, 1]] - v[quads[:, 0]], v[quads[:, 2]] - v[quads[:, 0]])
    flip = np.einsum("qc,qc->q", qn, v[quads].mean(1)) < 0
    quads[flip] = quads[flip][:, ::-1]
    f = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    fuv = np.concatenate([np.tile([[0, 1, 2]], (6, 1)), np.tile([[0, 2, 3]], (6, 1))])
    return _make_mesh(v, f, uvs=uvs, face_uvs=fuv)


def torus(R: float = 1.0, r: float = 0.25, n_major: int = 32, n_minor: int = 16) -> Mesh:
    """Torus around the y axis (lying in the x-z plane), centred at the origin.

    Vertex ``(i, j)`` (index ``i * n_minor + j``) is at ``((R + r cos psi)
    cos phi, r sin psi, (R + r cos psi) sin phi)`` with ``phi = 2 pi i /
    n_major`` and ``psi = 2 pi j / n_minor``. Closed, genus 1 (Euler
    characteristic 0), outward normals.

    Args:
      R: distance from the centre to the tube's centre line.
      r: tube radius (``0 < r < R``).
      n_major: segments around the y axis (>= 3).
      n_minor: segments around the tube (>= 3).

    Returns:
      A :class:`Mesh` with ``n_major * n_minor`` vertices, twice as many
      faces, and UVs (``u = i / n_major``, ``v = j / n_minor`` on an
      ``(n_major + 1) x (n_minor + 1)`` grid with ``face_uvs``).
    """
    if n_major < 3 or n_minor < 3:
        raise ValueError(f"torus needs n_major >= 3 and n_minor >= 3, got {n_major}, {n_minor}")
    phi = 2 * np.pi * np.arange(n_major) / n_major
    psi = 2 * np.pi * np.arange(n_minor) / n_minor
    PH, PS = np.meshgrid(phi, psi, indexing="ij")
    rho = R + r * np.cos(PS)
    v = np.stack([rho * np.cos(PH), r * np.sin(PS), rho * np.sin(PH)], -1).reshape(-1, 3)
    # Grid with the major index wrapping too: rows i = 0..n_major, row n_major == row 0.
    i, j = np.meshgrid(np.arange(n_major), np.arange(n_minor), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)

    def vid(ii, jj):
        return (ii % n_major) * n_minor + jj % n_minor

    def tid(ii, jj):
        return ii * (n_minor + 1) + jj

    corners = [((0, 0), (0, 1), (1, 0)), ((0, 1), (1, 1), (1, 0))]
    f = np.concatenate([np.stack([vid(i + a, j + b) for a, b in c], -1) for c in corners])
    fuv = np.concatenate([np.stack([tid(i + a, j + b) for a, b in c], -1) for c in corners])
    # Orient outward: compare with the direction from the tube's centre line.
    centre = v[f].mean(1)
    core = centre.copy()
    core[:, 1] = 0.0
    core *= R / np.maximum(np.linalg.norm(core, axis=1, keepdims=True), 1e-12)
    if np.einsum("fc,fc->", _np_face_normals(v, f), centre - core) < 0:
        f, fuv = f[:, ::-1], fuv[:, ::-1]
    ui, uj = np.meshgrid(np.arange(n_major + 1), np.arange(n_minor + 1), indexing="ij")
    uvs = np.stack([ui / n_major, uj / n_minor], -1).reshape(-1, 2)
    return _make_mesh(v, np.ascontiguousarray(f), uvs=uvs, face_uvs=np.ascontiguousarray(fuv))


def plane(nx: int = 1, ny: int = 1, size: float = 2.0) -> Mesh:
    """Flat square grid in the z = 0 plane, facing +z.

    Spans ``[-size/2, size/2]²`` in x and y, with ``nx`` x ``ny`` quads (two
    triangles each). Normals ``(v1 - v0) x (v2 - v0)`` are ``+z``, so a
    camera on the +z axis looking at the origin sees the front. Open (has a
    boundary).

    Args:
      nx: quads along x (>= 1).
      ny: quads along y (>= 1).
      size: side length.

    Returns:
      A :class:`Mesh` with ``(nx+1)(ny+1)`` vertices (index ``row * (nx+1) +
      col``, row along +y), ``2 nx ny`` faces and per-vertex UVs
      ``u = (x + size/2) / size``, ``v = (y + size/2) / size``.
    """
    if nx < 1 or ny < 1:
        raise ValueError(f"plane needs nx >= 1 and ny >= 1, got nx={nx}, ny={ny}")
    u = np.linspace(0.0, 1.0, nx + 1)
    w = np.linspace(0.0, 1.0, ny + 1)
    W, U = np.meshgrid(w, u, indexing="ij")
    uvs = np.stack([U, W], -1).reshape(-1, 2)
    v = np.concatenate([(uvs - 0.5) * size, np.zeros((len(uvs), 1))], 1)
    q = _grid_quads(ny + 1, nx + 1, wrap_cols=False)
    a, b, c, d = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    f = np.concatenate([np.stack([a, b, c], -1), np.stack([b, d, c], -1)])
    return _make_mesh(v, f, uvs=uvs)


# ----------------------------------------------------------------------------
# The Utah teapot
# ----------------------------------------------------------------------------

def _bernstein3(t: np.ndarray) -> np.ndarray:
    s = 1.0 - t
    return np.stack([s**3, 3 * t * s**2, 3 * t**2 * s, t**3], -1)


def _weld(points: np.ndarray, tol: float) -> np.ndarray:
    """Label points closer than ~tol with a common id (0..n_unique-1).

    Points are bucketed on a grid of cell ``tol`` with each of the 8
    half-cell offsets; points sharing a bucket in any of them are merged
    (transitively), so near neighbours straddling a cell boundary still merge.
    """
    n = len(points)
    groupings = []
    for off in itertools.product((0.0, 0.5), repeat=3):
        keys = np.floor(points / tol + np.array(off)).astype(np.int64)
        groupings.append(np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1))
    label = np.arange(n)
    changed = True
    while changed:
        changed = False
        for inv in groupings:
            m = np.full(inv.max() + 1, n)
            np.minimum.at(m, inv, label)
            new = m[inv]
            if np.any(new != label):
                label, changed = new, True
    return np.unique(label, return_inverse=True)[1].reshape(-1)


def teapot(resolution: int = 8) -> Mesh:
    """The Utah teapot (Newell, 1975): lid, body, handle and spout.

    Built by evaluating the 32 bicubic Bezier patches of the public-domain
    data set (:mod:`jaxrender.data.teapot_patches`) on a ``(resolution + 1)²``
    grid each, welding coincident vertices along patch seams, dropping the
    degenerate triangles at the lid's and bottom's poles, and orienting every
    patch so ``(v1 - v0) x (v2 - v0)`` points outward.

    Geometry: y up (the original's z), spout towards +x, handle towards -x;
    translated so the bounding box is centred at the origin and scaled so
    its largest half-extent is 1 (about ``[-1, 1] x [-0.49, 0.49] x [-0.62,
    0.62]``). As in the original the surface is not watertight: the lid does
    not touch the rim, and the handle and spout pass into the body.

    Args:
      resolution: grid segments per patch side (>= 1); ``F = 32 * 2 *
        resolution² - 8 * resolution``.

    Returns:
      A :class:`Mesh` (vertices and faces only).
    """
    from jaxrender.data import teapot_patches

    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    cp = teapot_patches.control_points()
    idx = teapot_patches.patch_indices()  # (32, 4, 4)
    n = resolution + 1
    B = _bernstein3(np.linspace(0.0, 1.0, n))  # (n, 4)
    pts = np.einsum("ui,vj,pijc->puvc", B, B, cp[idx]).reshape(32, n * n, 3)
    q = _grid_quads(n, n, wrap_cols=False)
    a, b, c, d = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    local = np.concatenate([np.stack([a, b, c], -1), np.stack([b, d, c], -1)])
    # Outward test per patch: flux of (p - ref) through the patch must be > 0.
    # The reference is the body's centre for the pot, lid and bottom, and the
    # centroid of the handle / spout patches for those tubes (split in halves
    # by the symmetry plane, so their centroid lies inside the tube).
    refs = np.tile([0.0, 0.0, 1.2], (32, 1))
    refs[12:16] = pts[12:16].reshape(-1, 3).mean(0)
    refs[16:20] = pts[16:20].reshape(-1, 3).mean(0)
    faces = []
    for p in range(32):
        fn = _np_face_normals(pts[p], local)
        flux = np.einsum("fc,fc->", fn, pts[p][local].mean(1) - refs[p])
        faces.append((local[:, ::-1] if flux < 0 else local) + p * n * n)
    faces = np.concatenate(faces)
    v = pts.reshape(-1, 3)
    v = np.stack([v[:, 0], v[:, 2], -v[:, 1]], -1)  # z-up -> y-up (a proper rotation)
    label = _weld(v, 1e-6 * np.abs(v).max())
    nv = label.max() + 1
    vw = np.zeros((nv, 3))
    vw[label] = v
    faces = label[faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    faces = faces[keep]
    lo, hi = vw.min(0), vw.max(0)
    vw = (vw - (lo + hi) / 2) / ((hi - lo).max() / 2)
    return _make_mesh(vw, faces)

"""Tests for jaxrender.mesh: the Mesh pytree, normals, Laplacians, shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import check_grad
from jaxrender import mesh as M


# ----------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------

def np_face_normals(v, f):
    return np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])


def np_areas(m):
    v, f = np.asarray(m.vertices, np.float64), np.asarray(m.faces)
    return 0.5 * np.linalg.norm(np_face_normals(v, f), axis=1)


def np_unit_normals(m):
    v, f = np.asarray(m.vertices, np.float64), np.asarray(m.faces)
    n = np_face_normals(v, f)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def np_vertex_normals(v, f):
    fn = np_face_normals(v, f)
    acc = np.zeros_like(v)
    for i, face in enumerate(f):
        for k in face:
            acc[k] += fn[i]
    return acc / np.linalg.norm(acc, axis=1, keepdims=True)


def np_cot_laplacian(v, f):
    """Brute force: for every face and every corner, the cotangent of the
    angle (via arccos) added to the opposite edge."""
    n = len(v)
    L = np.zeros((n, n))
    for face in f:
        for k in range(3):
            o, i, j = face[k], face[(k + 1) % 3], face[(k + 2) % 3]
            a, b = v[i] - v[o], v[j] - v[o]
            ang = np.arccos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
            w = 0.5 / np.tan(ang)
            L[i, j] += w
            L[j, i] += w
    L -= np.diag(L.sum(1))
    return L


def signed_volume(m):
    v = np.asarray(m.vertices, np.float64)
    f = np.asarray(m.faces)
    return np.einsum("fc,fc->", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])) / 6.0


def edge_face_counts(m):
    e, fe = M.edges(np.asarray(m.faces), return_face_edges=True)
    return e, np.bincount(fe.reshape(-1), minlength=len(e))


def n_directed_duplicates(m):
    f = np.asarray(m.faces)
    h = f[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2)
    return len(h) - len(np.unique(h, axis=0))


def jittered_ico(seed=0, scale=0.05, level=0):
    m = M.icosphere(level)
    rng = np.random.default_rng(seed)
    v = np.asarray(m.vertices, np.float64) + scale * rng.normal(size=m.vertices.shape)
    return v, np.asarray(m.faces)


# ----------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------

def test_mesh_converts_and_keeps_dtypes():
    m = M.Mesh(np.zeros((4, 3)), [[0, 1, 2], [0, 2, 3]])
    assert m.vertices.dtype == jnp.float32 and m.faces.dtype == jnp.int32
    assert m.num_vertices == 4 and m.num_faces == 2
    assert m.vertex_colors is None and m.texture is None
    m = M.Mesh(np.zeros((4, 3), np.float32), np.array([[0, 1, 2]], np.int64), vertex_colors=np.ones((4, 3)))
    assert m.faces.dtype == jnp.int32 and m.vertex_colors.shape == (4, 3)
    m = M.Mesh(np.zeros((4, 3)), [[0, 1, 2]], vertex_colors=np.full((4, 3), 255, np.uint8),
               uvs=np.zeros((4, 2)), texture=np.zeros((2, 2, 3), np.uint8))
    assert m.vertex_colors.dtype == jnp.float32 and float(m.vertex_colors.max()) == 1.0
    assert m.texture.dtype == jnp.float32
    with pytest.raises(TypeError, match="texture"):
        M.Mesh(np.zeros((4, 3)), [[0, 1, 2]], texture=np.zeros((2, 2, 3), np.int32))


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(vertices=np.zeros((4, 2)), faces=[[0, 1, 2]]), ValueError, "vertices"),
        (dict(vertices=np.zeros((4, 3)), faces=np.zeros((1, 3))), TypeError, "faces"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1]]), ValueError, "faces"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1, 4]]), IndexError, "faces"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, -1, 2]]), IndexError, "faces"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1, 3]], vertex_colors=np.zeros((3, 3))), ValueError, "vertex_colors"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1, 3]], uvs=np.zeros((3, 3)), face_uvs=[[0, 1, 2]]), ValueError, "uvs"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1, 3]], uvs=np.zeros((3, 2)), face_uvs=[[0, 1, 3]]), IndexError, "face_uvs"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1, 3]], face_uvs=[[0, 1, 3]]), ValueError, "face_uvs"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1, 3]], uvs=np.zeros((3, 2))), ValueError, "uvs"),
        (dict(vertices=np.zeros((4, 3)), faces=[[0, 1, 3]], texture=np.zeros((3, 2))), ValueError, "texture"),
    ],
)
def test_mesh_validation_names_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        M.Mesh(**kwargs)


def test_mesh_is_a_pytree_under_jit_and_vmap():
    m = M.icosphere(1)
    out = jax.jit(lambda mm: mm.vertex_normals())(m)
    np.testing.assert_allclose(out, m.vertex_normals(), atol=1e-6)
    # Building a Mesh from traced vertices skips the value checks only.
    area = jax.jit(lambda v: M.Mesh(v, m.faces).face_areas().sum())(m.vertices)
    assert np.isfinite(area)
    vb = jnp.stack([m.vertices, 2.0 * m.vertices])
    res = jax.vmap(lambda v: M.Mesh(v, m.faces).face_areas().sum())(vb)
    np.testing.assert_allclose(res[1], 4.0 * res[0], rtol=1e-5)
    # a batched Mesh (leading axis on vertices) with a Mesh as the in_axes spec
    batched = M.Mesh(vb, m.faces)
    res2 = jax.vmap(lambda mm: mm.face_areas().sum(), in_axes=(M.Mesh(0, None),))(batched)
    np.testing.assert_allclose(res2, res, rtol=1e-6)


# ----------------------------------------------------------------------------
# Normals and areas
# ----------------------------------------------------------------------------

def test_face_normals_match_numpy():
    v, f = jittered_ico(1, 0.1, level=1)
    ref = np_face_normals(v, f)
    np.testing.assert_allclose(M.face_normals(v.astype(np.float32), f, normalize=False), ref, rtol=1e-4, atol=1e-6)
    unit = np.asarray(M.face_normals(v.astype(np.float32), f))
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_face_areas_cube_and_unnormalized_length():
    m = M.cube(2.0)
    np.testing.assert_allclose(M.face_areas(m.vertices, m.faces), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(m.face_areas().sum()), 24.0, rtol=1e-6)
    n = m.face_normals(normalize=False)
    np.testing.assert_allclose(jnp.linalg.norm(n, axis=-1), 2 * M.face_areas(m.vertices, m.faces), rtol=1e-6)
    # unit normals are the axis directions, pointing outward
    c = m.vertices[m.faces].mean(1)
    np.testing.assert_allclose(m.face_normals(), jnp.round(c), atol=1e-6)


def test_vertex_normals_match_numpy_and_sphere():
    v, f = jittered_ico(2, 0.05, level=1)
    np.testing.assert_allclose(M.vertex_normals(v.astype(np.float32), f), np_vertex_normals(v, f), atol=1e-5)
    m = M.icosphere(3)
    vn = np.asarray(m.vertex_normals())
    # area weighting on a sphere: within about a degree of the radial direction
    assert np.einsum("vc,vc->v", vn, np.asarray(m.vertices)).min() > 0.9998
    np.testing.assert_allclose(np.linalg.norm(vn, axis=1), 1.0, atol=1e-6)


def test_degenerate_faces_are_finite():
    v = jnp.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [5, 5, 5]])
    f = jnp.array([[0, 1, 2], [0, 1, 3], [3, 3, 3]])
    fns = {
        "face_normals": lambda v: jnp.sum(M.face_normals(v, f) * jnp.arange(9.0).reshape(3, 3)),
        "vertex_normals": lambda v: jnp.sum(M.vertex_normals(v, f) ** 2 * jnp.arange(15.0).reshape(5, 3)),
        "face_areas": lambda v: jnp.sum(M.face_areas(v, f)),
        "cotangent": lambda v: jnp.sum(M.cotangent_laplacian(v, f).values ** 2),
    }
    results = jax.jit(lambda v: {k: jax.value_and_grad(fn)(v) for k, fn in fns.items()})(v)
    for name, (val, g) in results.items():
        assert np.isfinite(val) and np.all(np.isfinite(g)), name
    fnrm = M.face_normals(v, f)
    np.testing.assert_array_equal(fnrm[0], 0.0)
    np.testing.assert_array_equal(fnrm[2], 0.0)
    np.testing.assert_array_equal(M.vertex_normals(v, f)[4], 0.0)  # unused vertex


# ----------------------------------------------------------------------------
# Connectivity and Laplacians
# ----------------------------------------------------------------------------

def test_edges():
    m = M.cube()
    e, fe = M.edges(m.faces, return_face_edges=True)
    assert e.shape == (18, 2) and e.dtype == np.int32
    assert np.all(e[:, 0] < e[:, 1])
    assert len(np.unique(e, axis=0)) == len(e)
    f = np.asarray(m.faces)
    np.testing.assert_array_equal(np.sort(f[:, [0, 1]], 1), e[fe[:, 0]])
    np.testing.assert_array_equal(np.sort(f[:, [2, 0]], 1), e[fe[:, 2]])
    assert M.edges(M.icosphere(0).faces).shape == (30, 2)
    with pytest.raises(TypeError, match="not traceable"):
        jax.jit(M.edges)(m.faces)


def test_uniform_laplacian():
    m = M.icosphere(1)
    n = m.num_vertices
    for normalize in (True, False):
        L = M.uniform_laplacian(n, m.faces, normalize=normalize)
        np.testing.assert_allclose(M.laplacian_apply(L, jnp.ones(n)), 0.0, atol=1e-6)
        D = np.asarray(L.todense())
        np.testing.assert_allclose(np.asarray(L @ m.vertices), D @ np.asarray(m.vertices), atol=1e-5)
    A = np.zeros((n, n))
    for a, b in M.edges(m.faces):
        A[a, b] = A[b, a] = 1
    np.testing.assert_allclose(M.uniform_laplacian(n, m.faces, normalize=False).todense(), A - np.diag(A.sum(1)))
    np.testing.assert_allclose(
        M.uniform_laplacian(n, m.faces).todense(), A / A.sum(1, keepdims=True) - np.eye(n), atol=1e-6
    )
    # isolated vertex: zero row
    L = M.uniform_laplacian(4, np.array([[0, 1, 2]]))
    np.testing.assert_array_equal(np.asarray(L.todense())[3], 0.0)


def test_cotangent_laplacian_matches_bruteforce(x64):
    v, f = jittered_ico(3, 0.1, level=1)
    @jax.jit
    def run(v, f):
        L = M.cotangent_laplacian(v, f)
        return L.todense(), M.laplacian_apply(L, jnp.ones(v.shape[0], v.dtype)), L @ v

    D, L1, Lv = (np.asarray(x) for x in run(jnp.asarray(v), jnp.asarray(f)))
    np.testing.assert_allclose(D, np_cot_laplacian(v, f), atol=1e-10)
    np.testing.assert_allclose(D, D.T, atol=1e-12)
    np.testing.assert_allclose(L1, 0.0, atol=1e-12)
    np.testing.assert_allclose(Lv, D @ v, atol=1e-10)
    # on a regular flat grid an interior vertex has the 5-point stencil
    p = M.plane(4, 4, size=4.0)
    Lp = np.asarray(run(p.vertices, p.faces)[0])
    c = 2 * 5 + 2
    assert Lp[c, c] == pytest.approx(-4.0)
    assert sorted(np.round(Lp[c][Lp[c] > 1e-9], 6)) == [1.0] * 4


def test_cotangent_laplacian_float32_default():
    m = M.icosphere(1)
    L = M.cotangent_laplacian(m.vertices, m.faces)
    assert L.values.dtype == jnp.float32 and L.values.shape == (12 * m.num_faces,)
    np.testing.assert_allclose(L @ jnp.ones(m.num_vertices), 0.0, atol=1e-5)


# ----------------------------------------------------------------------------
# jit / vmap / grad
# ----------------------------------------------------------------------------

def _diff_fns(f, w_f3, w_v3, w_l):
    return {
        "face_normals": lambda v: jnp.sum(M.face_normals(v, f) * w_f3),
        "face_normals_raw": lambda v: jnp.sum(M.face_normals(v, f, normalize=False) * w_f3),
        "vertex_normals": lambda v: jnp.sum(M.vertex_normals(v, f) * w_v3),
        "face_areas": lambda v: jnp.sum(M.face_areas(v, f) * w_f3[:, 0]),
        "cotangent_laplacian": lambda v: jnp.sum(M.cotangent_laplacian(v, f).values * w_l),
        "cotangent_apply": lambda v: jnp.sum(M.laplacian_apply(M.cotangent_laplacian(v, f), v) * w_v3),
    }


@pytest.mark.parametrize("name", ["face_normals", "face_normals_raw", "vertex_normals", "face_areas",
                                  "cotangent_laplacian", "cotangent_apply"])
def test_gradients_vs_finite_differences(name, x64):
    v, f = jittered_ico(4, 0.1, level=0)
    rng = np.random.default_rng(5)
    fj = jnp.asarray(f)
    fn = _diff_fns(fj, jnp.asarray(rng.normal(size=(len(f), 3))), jnp.asarray(rng.normal(size=v.shape)),
                   jnp.asarray(rng.normal(size=12 * len(f))))[name]
    check_grad(jax.jit(fn), v, rtol=1e-5)


@pytest.mark.parametrize("name", ["face_normals", "vertex_normals", "face_areas", "cotangent_laplacian"])
def test_jit_and_vmap_match_eager(name):
    v, f = jittered_ico(6, 0.1, level=1)
    fn = {
        "face_normals": lambda v: M.face_normals(v, f),
        "vertex_normals": lambda v: M.vertex_normals(v, f),
        "face_areas": lambda v: M.face_areas(v, f),
        "cotangent_laplacian": lambda v: M.cotangent_laplacian(v, f).values,
    }[name]
    vb = jnp.asarray(np.stack([v, 1.5 * v, v + 0.2]), jnp.float32)
    eager = np.stack([np.asarray(fn(x)) for x in vb])
    np.testing.assert_allclose(jax.jit(fn)(vb[0]), eager[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(fn)(vb), eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Procedural shapes
# ----------------------------------------------------------------------------

CLOSED = {
    "icosphere": lambda: M.icosphere(2),
    "uv_sphere": lambda: M.uv_sphere(9, 14),
    "cube": lambda: M.cube(),
    "torus": lambda: M.torus(1.0, 0.3, 20, 10),
}


@pytest.mark.parametrize("name", list(CLOSED))
def test_closed_meshes_are_watertight_and_outward(name):
    m = CLOSED[name]()
    e, counts = edge_face_counts(m)
    assert np.all(counts == 2), "every edge must be shared by exactly two faces"
    assert n_directed_duplicates(m) == 0, "adjacent faces must be consistently oriented"
    chi = m.num_vertices - len(e) + m.num_faces
    assert chi == (0 if name == "torus" else 2)
    assert signed_volume(m) > 0
    assert np_areas(m).min() > 0
    # outward in the strong sense: each face normal points away from the centre
    # (for the torus: away from the tube's centre line)
    c = np.asarray(m.vertices)[np.asarray(m.faces)].mean(1)
    if name == "torus":
        core = c * np.array([1, 0, 1])
        c = c - core / np.linalg.norm(core, axis=1, keepdims=True)
    assert np.all(np.einsum("fc,fc->f", np_unit_normals(m), c) > 0)


def test_icosphere_counts_and_radius():
    for level in range(4):
        m = M.icosphere(level, radius=2.0)
        assert (m.num_vertices, m.num_faces) == (10 * 4**level + 2, 20 * 4**level)
        np.testing.assert_allclose(np.linalg.norm(m.vertices, axis=1), 2.0, rtol=1e-6)


def test_uv_sphere_layout():
    m = M.uv_sphere(5, 8)
    assert m.num_vertices == 3 * 8 + 2 and m.num_faces == 2 * 8 * 3
    np.testing.assert_allclose(np.linalg.norm(m.vertices, axis=1), 1.0, rtol=1e-6)
    assert m.uvs.shape == (5 * 9, 2) and m.face_uvs.shape == (m.num_faces, 3)
    uv = np.asarray(m.uvs)[np.asarray(m.face_uvs)]
    assert uv.min() >= 0 and uv.max() <= 1
    # no face straddles the seam in UV space: its u spread is one step at most
    assert np.ptp(uv[..., 0], axis=1).max() <= 1 / 8 + 1e-6
    # v follows height: v = 1 at the north pole (y = 1)
    vtx = np.asarray(m.vertices)[np.asarray(m.faces)]
    np.testing.assert_allclose(uv[..., 1], 1 - np.arccos(np.clip(vtx[..., 1], -1, 1)) / np.pi, atol=1e-5)


def bumpy_reference(n_lat, n_lon):
    """The scene exactly as written in BENCHMARKS.md."""
    theta = np.linspace(0, np.pi, n_lat)
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(theta, phi, indexing="ij")
    r = 1 + 0.05 * np.sin(5 * T) * np.cos(7 * P)
    v = np.stack([r * np.sin(T) * np.cos(P), r * np.cos(T), r * np.sin(T) * np.sin(P)], -1).reshape(-1, 3)
    faces = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a = i * n_lon + j
            b = i * n_lon + (j + 1) % n_lon
            c = a + n_lon
            d = b + n_lon
            faces += [[a, c, b], [b, c, d]]
    colors = np.random.default_rng(0).uniform(0.2, 1.0, (n_lat * n_lon, 3))
    return v, np.array(faces), colors


@pytest.mark.parametrize("n_lat, n_lon, n_faces", [(36, 36, 2520), (231, 230, 105_800)])
def test_bumpy_sphere_is_the_benchmark_scene(n_lat, n_lon, n_faces):
    m = M.bumpy_sphere(n_lat, n_lon)
    assert m.num_faces == n_faces and m.num_vertices == n_lat * n_lon
    if n_lat == 36:
        v, f, c = bumpy_reference(n_lat, n_lon)
        np.testing.assert_array_equal(np.asarray(m.faces), f)
        np.testing.assert_allclose(m.vertices, v.astype(np.float32), rtol=0, atol=0)
        np.testing.assert_allclose(m.vertex_colors, c.astype(np.float32), rtol=0, atol=0)


def test_bumpy_sphere_orientation():
    m = M.bumpy_sphere(36, 36)
    assert signed_volume(m) < 0  # the benchmark's winding is inward (documented)
    r = M.bumpy_sphere(36, 36, reverse_winding=True)
    assert signed_volume(r) > 0
    np.testing.assert_array_equal(r.vertices, m.vertices)
    assert n_directed_duplicates(m) == 0 and n_directed_duplicates(r) == 0
    # the zero-area faces sit at the poles only
    a = np_areas(m)
    assert (a < 1e-9).sum() <= 2 * 36 and a.sum() > 4 * np.pi * 0.9


def test_plane():
    m = M.plane(3, 2, size=2.0)
    assert m.num_vertices == 12 and m.num_faces == 12
    np.testing.assert_allclose(np_unit_normals(m), np.tile([0.0, 0.0, 1.0], (12, 1)), atol=1e-6)
    np.testing.assert_allclose(np_areas(m).sum(), 4.0, rtol=1e-6)
    np.testing.assert_allclose(m.uvs, (np.asarray(m.vertices)[:, :2] + 1) / 2, atol=1e-6)
    e, counts = edge_face_counts(m)
    assert m.num_vertices - len(e) + m.num_faces == 1


def test_cube_and_torus_uvs_in_range():
    for m in (M.cube(), M.torus()):
        assert m.face_uvs.shape == m.faces.shape
        assert float(m.uvs.min()) >= 0 and float(m.uvs.max()) <= 1
    t = M.torus(2.0, 0.5, 16, 8)
    np.testing.assert_allclose(np_areas(t).sum(), 4 * np.pi**2 * 2.0 * 0.5, rtol=0.05)


@pytest.mark.parametrize("resolution", [4, 8])
def test_teapot(resolution):
    m = M.teapot(resolution)
    v, f = np.asarray(m.vertices, np.float64), np.asarray(m.faces)
    assert m.num_faces == 32 * 2 * resolution**2 - 8 * resolution
    # non-degenerate, no repeated indices, all vertices used
    assert np.all((f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0]))
    assert np_areas(m).min() > 1e-7
    assert len(np.unique(f)) == len(v)
    # welded: no two vertices coincide
    key = np.round(v, 5)
    assert len(np.unique(key, axis=0)) == len(v)
    # consistently oriented and (where two faces meet) 2-manifold
    assert n_directed_duplicates(m) == 0
    _, counts = edge_face_counts(m)
    assert counts.max() == 2
    # centred, largest half-extent 1, upright (y up), spout at +x near the top
    lo, hi = v.min(0), v.max(0)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-6)
    np.testing.assert_allclose((hi - lo).max(), 2.0, rtol=1e-6)
    assert hi[0] - lo[0] > hi[1] - lo[1]
    assert v[np.argmax(v[:, 0]), 1] > 0.2
    # outward: the body's faces at the front/back point away from the axis
    c = v[f].mean(1)
    n = np_unit_normals(m)
    side = np.abs(c[:, 2]) > 0.5
    assert side.sum() > 10
    assert np.all(n[side, 2] * np.sign(c[side, 2]) > 0)
    # the top of the lid faces up, the bottom faces down
    top = c[:, 1] > hi[1] - 0.02
    bottom = c[:, 1] < lo[1] + 0.005
    assert top.any() and bottom.any()
    assert np.all(n[top, 1] > 0) and np.all(n[bottom, 1] < 0)

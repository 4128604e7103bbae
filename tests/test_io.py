"""Tests for jaxrender.io: OBJ / PLY / image / GIF / video round trips and
errors on malformed files."""
import importlib.util
import os
import struct

import numpy as np
import pytest

from jaxrender import io
from jaxrender import mesh as M

needs_pillow = pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="needs pillow")


def textured_mesh():
    s = M.uv_sphere(5, 7)
    rng = np.random.default_rng(0)
    tex = rng.uniform(size=(6, 10, 3)).astype(np.float32)
    return M.Mesh(s.vertices, s.faces, vertex_colors=rng.uniform(size=(s.num_vertices, 3)),
                  uvs=s.uvs, face_uvs=s.face_uvs, texture=tex)


def write(path, text):
    with open(path, "w") as fh:
        fh.write(text)
    return str(path)


# ----------------------------------------------------------------------------
# OBJ
# ----------------------------------------------------------------------------

@needs_pillow
def test_obj_round_trip_with_texture_and_colors(tmp_path):
    m = textured_mesh()
    p = tmp_path / "sphere.obj"
    io.write_obj(p, m, normals=m.vertex_normals())
    assert sorted(os.listdir(tmp_path)) == ["sphere.mtl", "sphere.obj", "sphere.png"]
    r, extras = io.read_obj(p, return_extras=True)
    np.testing.assert_array_equal(r.vertices, m.vertices)
    np.testing.assert_array_equal(r.faces, m.faces)
    np.testing.assert_array_equal(r.uvs, m.uvs)
    np.testing.assert_array_equal(r.face_uvs, m.face_uvs)
    np.testing.assert_array_equal(r.vertex_colors, m.vertex_colors)
    np.testing.assert_allclose(r.texture, m.texture, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(extras.normals, m.vertex_normals(), atol=1e-7)
    np.testing.assert_array_equal(extras.face_normals, m.faces)
    assert extras.material_names == ["material0"] and np.all(extras.face_materials == 0)


def test_obj_round_trip_plain_and_float64(tmp_path):
    m = M.teapot(3)
    io.write_mesh(tmp_path / "t.obj", m)
    r = io.read_mesh(tmp_path / "t.obj")
    np.testing.assert_array_equal(r.vertices, m.vertices)
    np.testing.assert_array_equal(r.faces, m.faces)
    assert r.uvs is None and r.texture is None and r.vertex_colors is None
    # float64 values survive exactly through the text
    v64 = np.random.default_rng(1).normal(size=(5, 3))
    io.write_obj(tmp_path / "d.obj", _mesh64(v64))
    vals = np.array([[float(t) for t in ln.split()[1:]] for ln in open(tmp_path / "d.obj") if ln.startswith("v ")])
    np.testing.assert_array_equal(vals, v64)


def _mesh64(v64):
    """A Mesh holding float64 vertices without enabling x64 globally."""
    import equinox as eqx

    m = M.Mesh(np.zeros((5, 3), np.float32), np.array([[0, 1, 2], [2, 3, 4]]))
    return eqx.tree_at(lambda t: t.vertices, m, v64)


@needs_pillow
def test_obj_reader_features(tmp_path):
    text = """# a quad, a pentagon and a triangle with relative indices
mtllib mat.mtl
o thing
v 0 0 0
v 1 0 0
v 1 1 0
v 0 1 0
vt 0 0
vt 1 0
vt 1 1
vt 0 1
vn 0 0 1
usemtl red
f 1/1/1 2/2/1 3/3/1 4/4/1
v 2 0 0
v 3 0 0
v 3 1 0 \\
   # continued
g part2
s 1
usemtl tex
f -3//1 -2//1 -1//1 3//1 2//1
f 5/1 6/2 7/3
l 1 2
"""
    write(tmp_path / "mat.mtl", "newmtl red\nKd 1 0 0\nnewmtl tex\nKd 1 1 1\nmap_Kd -s 1 1 1 img.png\n")
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 0] = [255, 0, 0]
    io.write_image(tmp_path / "img.png", img)
    m, ex = io.read_obj(write(tmp_path / "a.obj", text), return_extras=True)
    assert m.num_vertices == 7
    expected = [[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 2], [4, 2, 1], [4, 5, 6]]
    np.testing.assert_array_equal(m.faces, expected)
    np.testing.assert_array_equal(m.vertices[6], [3.0, 1.0, 0.0])
    # faces without vt reference an added (0, 0) UV
    assert m.uvs.shape == (5, 2)
    np.testing.assert_array_equal(m.face_uvs[:2], [[0, 1, 2], [0, 2, 3]])
    np.testing.assert_array_equal(m.face_uvs[2:5], 4)
    np.testing.assert_array_equal(m.face_uvs[5], [0, 1, 2])
    np.testing.assert_array_equal(ex.face_normals[2], [0, 0, 0])
    np.testing.assert_array_equal(ex.face_normals[5], [-1, -1, -1])
    assert ex.material_names == ["red", "tex"]
    np.testing.assert_array_equal(ex.face_materials, [0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(ex.materials["red"]["Kd"], [1, 0, 0])
    assert m.texture.shape == (2, 3, 3) and m.texture.dtype == np.float32
    np.testing.assert_allclose(m.texture[0, 0], [1, 0, 0])
    # without the texture
    assert io.read_obj(tmp_path / "a.obj", load_texture=False).texture is None


def test_obj_vertex_colors_and_missing_mtl(tmp_path):
    p = write(tmp_path / "c.obj", "mtllib nope.mtl\nv 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 0 1 0 0 0 1\nf 1 2 3\n")
    with pytest.warns(UserWarning, match="nope.mtl"):
        m = io.read_obj(p)
    np.testing.assert_allclose(m.vertex_colors, np.eye(3))


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n# end\n", r"bad\.obj:4: vertex index 4 out of range"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\nf 3 2 7\n", r"bad\.obj:5: vertex index"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 -4\n", r"bad\.obj:4: vertex index -4 out of range"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n", r"bad\.obj:4: vertex index 0"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2\n", r"bad\.obj:4: face needs at least 3"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 x\n", r"bad\.obj:4: bad vertex index 'x'"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1/1 2/1 3/1\n", r"bad\.obj:4: texture coordinate index 1 out of range \(the file defines 0"),
        ("v 0 0\n", r"bad\.obj:1: 'v' needs at least 3"),
        ("v 0 0 zero\n", r"bad\.obj:1: 'v' has a non-numeric"),
        ("# nothing\n", r"bad\.obj: no vertices"),
    ],
)
def test_obj_malformed(tmp_path, body, pattern):
    with pytest.raises(ValueError, match=pattern):
        io.read_obj(write(tmp_path / "bad.obj", body))


# ----------------------------------------------------------------------------
# PLY
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip(tmp_path, binary):
    m = textured_mesh()
    p = tmp_path / "m.ply"
    io.write_ply(p, m, binary=binary)
    r = io.read_ply(p)
    np.testing.assert_array_equal(r.vertices, m.vertices)
    np.testing.assert_array_equal(r.faces, m.faces)
    np.testing.assert_allclose(r.vertex_colors, np.round(np.asarray(m.vertex_colors) * 255) / 255, atol=1e-7)
    # without colours
    plain = M.icosphere(1)
    io.write_mesh(tmp_path / "p.ply", plain, binary=binary)
    r = io.read_mesh(tmp_path / "p.ply")
    np.testing.assert_array_equal(r.vertices, plain.vertices)
    np.testing.assert_array_equal(r.faces, plain.faces)
    assert r.vertex_colors is None


def test_ply_reader_polygons_other_elements_and_big_endian(tmp_path):
    ascii_text = """ply
format ascii 1.0
comment a quad and a triangle, plus an edge element to skip
element vertex 5
property float x
property float y
property float z
property uchar red
property uchar green
property uchar blue
property float nx
element face 2
property list uchar int vertex_index
property uchar flags
element edge 1
property int vertex1
property int vertex2
end_header
0 0 0 255 0 0 1
1 0 0 0 255 0 1

1 1 0 0 0 255 1
0 1 0 255 255 255 1
2 2 0 0 0 0 1
4 0 1 2 3 7
3 1 4 2 0
0 1
"""
    m = io.read_ply(write(tmp_path / "a.ply", ascii_text))
    np.testing.assert_array_equal(m.faces, [[0, 1, 2], [0, 2, 3], [1, 4, 2]])
    np.testing.assert_allclose(m.vertex_colors[:3], np.eye(3))

    # the same content, binary big-endian, with variable-length lists
    header = ascii_text.split("end_header")[0].replace("format ascii 1.0", "format binary_big_endian 1.0")
    verts = [(0, 0, 0, 255, 0, 0, 1), (1, 0, 0, 0, 255, 0, 1), (1, 1, 0, 0, 0, 255, 1),
             (0, 1, 0, 255, 255, 255, 1), (2, 2, 0, 0, 0, 0, 1)]
    body = b"".join(struct.pack(">fffBBBf", *v) for v in verts)
    body += struct.pack(">B4iB", 4, 0, 1, 2, 3, 7) + struct.pack(">B3iB", 3, 1, 4, 2, 0)
    body += struct.pack(">ii", 0, 1)
    p = tmp_path / "b.ply"
    p.write_bytes((header + "end_header\n").encode() + body)
    b = io.read_ply(p)
    np.testing.assert_array_equal(b.faces, m.faces)
    np.testing.assert_array_equal(b.vertices, m.vertices)
    np.testing.assert_allclose(b.vertex_colors, m.vertex_colors)


def _binary_ply(tmp_path, cut=0):
    io.write_ply(tmp_path / "full.ply", M.cube(), binary=True)
    data = (tmp_path / "full.ply").read_bytes()
    p = tmp_path / "cut.ply"
    p.write_bytes(data[: len(data) - cut])
    return p


def test_ply_truncated_binary(tmp_path):
    with pytest.raises(ValueError, match=r"cut\.ply: binary data truncated in element 'face'"):
        io.read_ply(_binary_ply(tmp_path, cut=5))
    with pytest.raises(ValueError, match=r"cut\.ply: binary data truncated in element 'vertex'"):
        io.read_ply(_binary_ply(tmp_path, cut=12 * 13 + 20))


HEAD = "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n" \
       "element face 1\nproperty list uchar int vertex_indices\nend_header\n"


@pytest.mark.parametrize(
    "text, pattern",
    [
        (HEAD + "0 0 0\n1 0 0\n0 1 0\n3 0 1 3\n", r"bad\.ply: element 'face' has a vertex index out of range"),
        (HEAD + "0 0 0\n1 0 0\n0 1 0\n", r"bad\.ply: element 'face' expects 1 lines"),
        (HEAD + "0 0 0\n1 0 0\n0 1 0\n4 0 1 2\n", r"bad\.ply:13: list 'vertex_indices' of element 'face' announces 4"),
        (HEAD + "0 0 0\n1 0\n0 1 0\n3 0 1 2\n", r"bad\.ply:11: element 'vertex' needs 3 values"),
        (HEAD + "0 0 0\n1 0 a\n0 1 0\n3 0 1 2\n", r"bad\.ply:11: non-numeric value in element 'vertex'"),
        (HEAD.replace("element vertex 3", "element vertex"), r"bad\.ply:3: 'element' needs a name and a count"),
        (HEAD.replace("element vertex 3", "element vertex three"), r"bad\.ply:3: bad element count"),
        (HEAD.replace("format ascii 1.0", "format foo 1.0"), r"bad\.ply:2: unsupported PLY format"),
        ("plx\n", r"bad\.ply: not a PLY file"),
        (HEAD.replace("end_header\n", ""), r"bad\.ply: PLY header has no 'end_header'"),
    ],
)
def test_ply_malformed(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        io.read_ply(write(tmp_path / "bad.ply", text))


def test_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="unknown mesh format"):
        io.read_mesh(tmp_path / "a.stl")


# ----------------------------------------------------------------------------
# Images and animations
# ----------------------------------------------------------------------------

@needs_pillow
def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(7, 5, 3)).astype(np.float32)
    io.write_image(tmp_path / "a.png", img)
    back = io.read_image(tmp_path / "a.png")
    assert back.shape == (7, 5, 3) and back.dtype == np.float32
    np.testing.assert_allclose(back, img, atol=0.5 / 255 + 1e-6)
    # uint8, exact; RGBA; grey -> (H, W, 1)
    u8 = rng.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    io.write_image(tmp_path / "b.png", u8)
    np.testing.assert_array_equal(np.round(io.read_image(tmp_path / "b.png") * 255), u8)
    io.write_image(tmp_path / "g.png", img[..., 0])
    assert io.read_image(tmp_path / "g.png").shape == (7, 5, 1)
    # row 0 is the top: a white top row stays on top
    top = np.zeros((3, 2, 3), np.float32)
    top[0] = 1
    io.write_image(tmp_path / "t.png", top)
    np.testing.assert_array_equal(io.read_image(tmp_path / "t.png")[:, 0, 0], [1, 0, 0])


@needs_pillow
def test_image_errors(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        io.write_image(tmp_path / "a.png", np.zeros((2, 2, 5)))
    with pytest.raises(TypeError, match="float in"):
        io.write_image(tmp_path / "a.png", np.zeros((2, 2, 3), np.int32))
    with pytest.raises(ValueError, match="NaN"):
        io.write_image(tmp_path / "a.png", np.full((2, 2, 3), np.nan))


@needs_pillow
def test_gif(tmp_path):
    from PIL import Image

    frames = np.zeros((4, 8, 9, 3), np.float32)
    for t in range(4):
        frames[t, :, :, t % 3] = 1.0
        frames[t, t] = 0.5
    io.write_gif(tmp_path / "a.gif", frames, fps=10)
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 4
        assert im.size == (9, 8)
        assert im.info["duration"] == 100
        for t in range(4):
            im.seek(t)
            a = np.asarray(im.convert("RGB")).astype(np.float32) / 255
            np.testing.assert_allclose(a, frames[t], atol=2 / 255)
    with pytest.raises(ValueError, match="same shape"):
        io.write_gif(tmp_path / "b.gif", [frames[0], frames[0, :4]])


def test_video_without_ffmpeg_raises_clearly(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "imageio_ffmpeg" else real(n, *a))
    with pytest.raises(ImportError, match="imageio-ffmpeg"):
        io.write_video(tmp_path / "a.mp4", np.zeros((2, 4, 4, 3)))


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None, reason="needs imageio-ffmpeg")
@pytest.mark.filterwarnings("ignore:os.fork")
def test_video_writes_mp4(tmp_path):
    import imageio.v2 as iio

    frames = np.zeros((5, 17, 23, 3), np.float32)
    frames[:, :, :, 1] = np.linspace(0, 1, 5)[:, None, None]
    io.write_video(tmp_path / "a.mp4", frames, fps=5)
    reader = iio.get_reader(tmp_path / "a.mp4")
    try:
        got = [f for f in reader]
    finally:
        reader.close()
    assert len(got) == 5 and got[0].shape == (18, 24, 3)
    np.testing.assert_allclose(got[-1][..., 1].mean() / 255, 1.0, atol=0.05)


def test_obj_forward_references(tmp_path):
    # positive indices may point at vertices defined further down the file
    m = io.read_obj(write(tmp_path / "f.obj", "v 0 0 0\nf 1 2 3\nv 1 0 0\nv 0 1 0\n"))
    np.testing.assert_array_equal(m.faces, [[0, 1, 2]])

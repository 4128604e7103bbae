"""Reading and writing meshes (OBJ, PLY), images (PNG, ...) and animations
(GIF, MP4).

Everything here runs on the host with NumPy; loaders return a
:class:`jaxrender.mesh.Mesh` (JAX arrays, float32 / int32 by default) and
images as NumPy arrays. Polygons are fan-split into triangles
``(p0, p_i, p_i+1)``, which keeps the winding. Malformed files raise
``ValueError`` naming the file and the line (text formats) or element
(binary PLY).

Image and animation functions need Pillow (``pip install pillow``, part of
the ``test`` and ``examples`` extras); MP4 output needs ``imageio`` with its
ffmpeg plugin (``pip install imageio imageio-ffmpeg``). They are imported only
when used.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import NamedTuple, Optional, Union

import numpy as np

from jaxrender.mesh import Mesh

__all__ = [
    "read_obj",
    "write_obj",
    "read_ply",
    "write_ply",
    "read_mesh",
    "write_mesh",
    "read_image",
    "write_image",
    "write_gif",
    "write_video",
    "ObjExtras",
]

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------
# Optional dependencies
# ----------------------------------------------------------------------------

def _pillow(what: str):
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - exercised only without pillow
        raise ImportError(
            f"{what} needs Pillow, which is not installed; install it with "
            "`pip install pillow` (or `pip install 'jaxrender[examples]'`)"
        ) from e
    return Image


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------

def _to_uint8(image, name: str) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf values")
        return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"{name} must be float in [0, 1] or uint8, got dtype {a.dtype}")


def _check_image_shape(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    return a


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file (PNG, JPEG, BMP, ... anything Pillow reads).

    Args:
      path: file name.

    Returns:
      ``(H, W, C)`` float32 NumPy array in ``[0, 1]``, row 0 at the top;
      ``C`` is 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA). 8-bit images
      are divided by 255, 16-bit ones by 65535. Palette images are converted
      to RGB(A).
    """
    Image = _pillow("read_image")
    with Image.open(path) as img:
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        elif img.mode == "1":
            img = img.convert("L")
        mode = img.mode
        a = np.array(img)
    if mode.startswith("I;16") or mode == "I":
        a = a.astype(np.float32) / 65535.0
    elif mode == "F":
        a = a.astype(np.float32)
    else:
        a = a.astype(np.float32) / 255.0
    if a.ndim == 2:
        a = a[..., None]
    return a


def write_image(path: PathLike, image) -> None:
    """Write an image (format from the file extension, e.g. ``.png``).

    Args:
      path: file name.
      image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``;
        float values in ``[0, 1]`` (clipped, rounded to 8 bits) or ``uint8``.
        NumPy or JAX arrays. Row 0 is the top of the picture.
    """
    Image = _pillow("write_image")
    a = _check_image_shape(_to_uint8(image, "image"), "image")
    Image.fromarray(a).save(path)


def _frames_uint8(frames, name: str = "frames") -> list:
    out = [_check_image_shape(_to_uint8(f, name), name) for f in frames]
    if not out:
        raise ValueError(f"{name} is empty")
    shapes = {f.shape for f in out}
    if len(shapes) != 1:
        raise ValueError(f"all {name} must have the same shape, got {sorted(shapes)}")
    return out


def write_gif(path: PathLike, frames, fps: float = 20.0, loop: int = 0) -> None:
    """Write an animated GIF.

    Args:
      path: file name (``.gif``).
      frames: ``(T, H, W[, C])`` array or a sequence of ``(H, W[, C])``
        images, float in ``[0, 1]`` or uint8 (see :func:`write_image`).
      fps: frames per second (GIF stores delays in 10 ms steps, so it is
        rounded).
      loop: number of loops, 0 = forever.

    Note: GIF has a 256-colour palette per frame (colours are quantized), and
    identical consecutive frames are merged into one longer frame.
    """
    Image = _pillow("write_gif")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    imgs = [Image.fromarray(f) for f in _frames_uint8(frames)]
    imgs[0].save(
        path, save_all=True, append_images=imgs[1:], duration=max(int(round(1000.0 / fps)), 10), loop=loop,
        disposal=1,
    )


def write_video(path: PathLike, frames, fps: float = 30.0, quality: Optional[float] = 8.0) -> None:
    """Write an MP4 (H.264) video through imageio's ffmpeg plugin.

    Args:
      path: file name (``.mp4``).
      frames: ``(T, H, W[, C])`` array or sequence of images, float in
        ``[0, 1]`` or uint8. Odd heights / widths are padded by repeating the
        last row / column (H.264 with yuv420p needs even sizes).
      fps: frames per second.
      quality: imageio's quality setting, 0 (worst) to 10 (best), or None
        for ffmpeg's default.

    Raises:
      ImportError: if ``imageio`` or ``imageio-ffmpeg`` is not installed
        (install them with ``pip install imageio imageio-ffmpeg``, or write a
        GIF with :func:`write_gif` instead).
    """
    import importlib.util

    missing = [m for m in ("imageio", "imageio_ffmpeg") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            "write_video needs imageio with its ffmpeg plugin; missing: "
            + ", ".join(m.replace("_", "-") for m in missing)
            + ". Install with `pip install imageio imageio-ffmpeg`, or use write_gif instead."
        )
    import imageio.v2 as iio

    out = _frames_uint8(frames)
    h, w = out[0].shape[:2]
    ph, pw = h % 2, w % 2
    writer = iio.get_writer(
        os.fspath(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
        pixelformat="yuv420p", macro_block_size=1,
    )
    try:
        for f in out:
            if f.ndim == 2:
                f = np.repeat(f[..., None], 3, axis=-1)
            elif f.shape[-1] == 4:
                f = f[..., :3]
            if ph or pw:
                f = np.pad(f, ((0, ph), (0, pw), (0, 0)), mode="edge")
            writer.append_data(f)
    finally:
        writer.close()


# ----------------------------------------------------------------------------
# OBJ
# ----------------------------------------------------------------------------

class ObjExtras(NamedTuple):
    """What an OBJ file holds beyond :class:`Mesh` (from ``read_obj(...,
    return_extras=True)``).

    Attributes:
      normals: ``(N, 3)`` float32 ``vn`` normals, or None.
      face_normals: ``(F, 3)`` int32 indices into ``normals`` per triangle
        corner, or None (faces without ``vn`` get -1 when others have it).
      face_materials: ``(F,)`` int32 index into ``material_names`` (-1 for
        faces before any ``usemtl``).
      material_names: names from ``usemtl``, in order of first use.
      materials: ``{name: {"Kd": (3,) floats or None, "map_Kd": path or
        None}}`` parsed from the ``mtllib`` files.
    """

    normals: Optional[np.ndarray]
    face_normals: Optional[np.ndarray]
    face_materials: np.ndarray
    material_names: list
    materials: dict


def _parse_floats(tokens, n_min, path, lineno, what):
    if len(tokens) < n_min:
        raise ValueError(f"{path}:{lineno}: '{what}' needs at least {n_min} numbers, got {len(tokens)}")
    try:
        return [float(t) for t in tokens]
    except ValueError:
        raise ValueError(f"{path}:{lineno}: '{what}' has a non-numeric value: {' '.join(tokens)}") from None


def _resolve(idx_text, count, path, lineno, kind):
    try:
        i = int(idx_text)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: bad {kind} index {idx_text!r}") from None
    if i > 0:
        j = i - 1
    elif i < 0:
        j = count + i
    else:
        raise ValueError(f"{path}:{lineno}: {kind} index 0 is invalid (OBJ indices start at 1)")
    if j < 0 or (i < 0 and j >= count):
        raise ValueError(
            f"{path}:{lineno}: {kind} index {i} out of range ({count} {kind}s defined so far)"
        )
    # Positive indices may refer to elements defined later; checked at the end.
    return j


def _read_mtl(path) -> dict:
    mats, cur = {}, None
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            key = parts[0]
            if key == "newmtl":
                cur = " ".join(parts[1:])
                mats[cur] = {"Kd": None, "map_Kd": None}
            elif cur is None:
                continue
            elif key == "Kd":
                mats[cur]["Kd"] = np.array(_parse_floats(parts[1:4], 3, path, lineno, "Kd"), np.float32)
            elif key == "map_Kd":
                # Options such as "-s 1 1 1" come first; the file name is last.
                name = _map_filename(parts[1:]).replace("\\", "/")
                mats[cur]["map_Kd"] = os.path.join(os.path.dirname(os.fspath(path)), name)
    return mats


_MAP_OPTION_ARGS = {"-blendu": 1, "-blendv": 1, "-bm": 1, "-boost": 1, "-cc": 1, "-clamp": 1, "-imfchan": 1,
                    "-mm": 2, "-o": 3, "-s": 3, "-t": 3, "-texres": 1}


def _map_filename(tokens) -> str:
    i = 0
    while i < len(tokens) and tokens[i] in _MAP_OPTION_ARGS:
        n = _MAP_OPTION_ARGS[tokens[i]]
        i += 1
        # -o/-s/-t take 1 to 3 numbers
        taken = 0
        while taken < n and i < len(tokens) - 1 and re.fullmatch(r"[-+0-9.eE]+|on|off", tokens[i]):
            i += 1
            taken += 1
    return " ".join(tokens[i:])


def read_obj(path: PathLike, load_texture: bool = True, return_extras: bool = False):
    """Read a Wavefront OBJ file.

    Supported: ``v`` (with optional ``r g b`` vertex colours after ``x y z``),
    ``vt``, ``vn``, ``f`` with ``v``, ``v/vt``, ``v/vt/vn`` and ``v//vn``
    corners, negative (relative) indices, polygons (fan-split into
    triangles), ``mtllib`` / ``usemtl`` with ``Kd`` and ``map_Kd``. Groups,
    objects, smoothing groups, lines and points are ignored.

    Args:
      path: the ``.obj`` file.
      load_texture: read the ``map_Kd`` image of the first used material that
        has one into ``Mesh.texture`` (float32 ``(Ht, Wt, C)``; needs Pillow).
        Missing ``.mtl`` or image files give a warning, not an error.
      return_extras: also return an :class:`ObjExtras` (normals, materials).

    Returns:
      A :class:`Mesh` (``(mesh, extras)`` with ``return_extras``).
      ``vertex_colors`` is set when every ``v`` line has colours; ``uvs`` and
      ``face_uvs`` when any face has texture coordinates (faces without get
      an extra ``(0, 0)`` UV).

    Raises:
      ValueError: malformed content (bad or out-of-range index, a face with
        fewer than 3 corners, a non-numeric value), naming file and line.
    """
    path = os.fspath(path)
    pos, col, uvs, nrm = [], [], [], []
    n_color_lines = 0
    f_v, f_t, f_n, f_m, f_line = [], [], [], [], []
    mtllibs, mat_names, mat_index, cur_mat = [], [], {}, -1
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    lineno = 0
    pending = ""
    for raw in lines:
        lineno += 1
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        key = parts[0]
        if key == "v":
            vals = _parse_floats(parts[1:], 3, path, lineno, "v")
            pos.append(vals[:3])
            if len(vals) >= 6:
                col.append(vals[3:6])
                n_color_lines += 1
            else:
                col.append([1.0, 1.0, 1.0])
        elif key == "vt":
            vals = _parse_floats(parts[1:], 1, path, lineno, "vt")
            uvs.append((vals + [0.0])[:2])
        elif key == "vn":
            nrm.append(_parse_floats(parts[1:], 3, path, lineno, "vn")[:3])
        elif key == "f":
            corners = parts[1:]
            if len(corners) < 3:
                raise ValueError(f"{path}:{lineno}: face needs at least 3 vertices, got {len(corners)}")
            cv, ct, cn = [], [], []
            for c in corners:
                sub = c.split("/")
                if len(sub) > 3 or sub[0] == "":
                    raise ValueError(f"{path}:{lineno}: bad face corner {c!r}")
                cv.append(_resolve(sub[0], len(pos), path, lineno, "vertex"))
                ct.append(_resolve(sub[1], len(uvs), path, lineno, "texture coordinate")
                          if len(sub) > 1 and sub[1] != "" else -1)
                cn.append(_resolve(sub[2], len(nrm), path, lineno, "normal")
                          if len(sub) > 2 and sub[2] != "" else -1)
            for k in range(1, len(cv) - 1):
                f_v.append((cv[0], cv[k], cv[k + 1]))
                f_t.append((ct[0], ct[k], ct[k + 1]))
                f_n.append((cn[0], cn[k], cn[k + 1]))
                f_m.append(cur_mat)
                f_line.append(lineno)
        elif key == "mtllib":
            mtllibs.append(" ".join(parts[1:]))
        elif key == "usemtl":
            name = " ".join(parts[1:])
            if name not in mat_index:
                mat_index[name] = len(mat_names)
                mat_names.append(name)
            cur_mat = mat_index[name]
        # o, g, s, l, p, vp, ... are ignored

    if not pos:
        raise ValueError(f"{path}: no vertices ('v' lines) found")
    vertices = np.asarray(pos, np.float64)
    faces = np.asarray(f_v, np.int64).reshape(-1, 3)
    ft = np.asarray(f_t, np.int64).reshape(-1, 3)
    fn = np.asarray(f_n, np.int64).reshape(-1, 3)
    for arr, count, kind in ((faces, len(pos), "vertex"), (ft, len(uvs), "texture coordinate"),
                             (fn, len(nrm), "normal")):
        bad = np.nonzero((arr >= count).any(1))[0]
        if len(bad):
            k = bad[0]
            raise ValueError(
                f"{path}:{f_line[k]}: {kind} index {int(arr[k].max()) + 1} out of range "
                f"(the file defines {count} {kind}s)"
            )
    vertex_colors = np.asarray(col, np.float32) if n_color_lines == len(pos) else None
    if n_color_lines and n_color_lines != len(pos):
        warnings.warn(f"{path}: only {n_color_lines} of {len(pos)} vertices have colours; colours ignored")

    uv_arr, face_uvs = None, None
    if len(ft) and (ft >= 0).any():
        uv_arr = np.asarray(uvs, np.float32).reshape(-1, 2)
        if (ft < 0).any():
            uv_arr = np.concatenate([uv_arr, np.zeros((1, 2), np.float32)])
            ft = np.where(ft < 0, len(uv_arr) - 1, ft)
        face_uvs = ft

    materials = {}
    for lib in mtllibs:
        mpath = os.path.join(os.path.dirname(path), lib)
        if os.path.exists(mpath):
            materials.update(_read_mtl(mpath))
        else:
            warnings.warn(f"{path}: material library {lib!r} not found at {mpath}")

    texture = None
    if load_texture:
        used = [mat_names[i] for i in sorted(set(f_m)) if i >= 0]
        maps = [materials[n]["map_Kd"] for n in used if n in materials and materials[n]["map_Kd"]]
        if maps:
            if len(set(maps)) > 1:
                warnings.warn(f"{path}: several diffuse textures are used; only {maps[0]!r} is loaded")
            if os.path.exists(maps[0]):
                texture = read_image(maps[0])
            else:
                warnings.warn(f"{path}: texture {maps[0]!r} not found")

    mesh = Mesh(vertices, faces, vertex_colors=vertex_colors, uvs=uv_arr, face_uvs=face_uvs, texture=texture)
    if not return_extras:
        return mesh
    has_n = len(fn) and (fn >= 0).any()
    extras = ObjExtras(
        normals=np.asarray(nrm, np.float32).reshape(-1, 3) if nrm else None,
        face_normals=fn.astype(np.int32) if has_n else None,
        face_materials=np.asarray(f_m, np.int32),
        material_names=mat_names,
        materials=materials,
    )
    return mesh, extras


def _float_fmt(a: np.ndarray) -> str:
    return "%.17g" if a.dtype == np.float64 else "%.9g"


def write_obj(path: PathLike, mesh: Mesh, normals=None, texture_format: str = "png") -> None:
    """Write a mesh as Wavefront OBJ (round-trips through :func:`read_obj`).

    Writes ``v`` lines (with ``r g b`` when ``mesh.vertex_colors`` has 3
    channels), ``vt`` lines for ``mesh.uvs``, optional ``vn`` lines and
    1-based triangle ``f`` lines. When ``mesh.texture`` is set, a material
    file ``<stem>.mtl`` and the image ``<stem>.<texture_format>`` are written
    next to the OBJ and referenced through ``mtllib`` / ``usemtl`` /
    ``map_Kd``.

    Args:
      path: the ``.obj`` file to write.
      mesh: a single (unbatched) :class:`Mesh`.
      normals: optional ``(V, 3)`` per-vertex normals written as ``vn``
        (corner ``v/vt/vn`` uses the vertex index).
      texture_format: image extension for the texture file.
    """
    path = os.fspath(path)
    v = np.asarray(mesh.vertices)
    if v.ndim != 2:
        raise ValueError(f"write_obj writes one mesh; vertices have shape {v.shape}")
    f = np.asarray(mesh.faces, np.int64)
    colors = None if mesh.vertex_colors is None else np.asarray(mesh.vertex_colors)
    if colors is not None and colors.shape[-1] != 3:
        warnings.warn(f"vertex_colors with {colors.shape[-1]} channels cannot be stored in OBJ; skipped")
        colors = None
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# written by jaxrender\n")
        if mesh.texture is not None:
            fh.write(f"mtllib {stem}.mtl\n")
        fmt = _float_fmt(v)
        if colors is not None:
            np.savetxt(fh, np.concatenate([v, colors.astype(v.dtype)], 1), fmt="v " + " ".join([fmt] * 6))
        else:
            np.savetxt(fh, v, fmt="v " + " ".join([fmt] * 3))
        has_uv = mesh.uvs is not None
        if has_uv:
            uv = np.asarray(mesh.uvs)
            np.savetxt(fh, uv, fmt="vt " + " ".join([_float_fmt(uv)] * 2))
        if normals is not None:
            n = np.asarray(normals)
            if n.shape != v.shape:
                raise ValueError(f"normals must have shape {v.shape} (one per vertex), got {n.shape}")
            np.savetxt(fh, n, fmt="vn " + " ".join([_float_fmt(n)] * 3))
        if mesh.texture is not None:
            fh.write("usemtl material0\n")
        fi = f + 1
        if has_uv:
            ti = np.asarray(mesh.face_uv_indices, np.int64) + 1
            if normals is not None:
                cols = np.stack([fi, ti, fi], -1).reshape(len(f), 9)
                np.savetxt(fh, cols, fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
            else:
                cols = np.stack([fi, ti], -1).reshape(len(f), 6)
                np.savetxt(fh, cols, fmt="f %d/%d %d/%d %d/%d")
        elif normals is not None:
            cols = np.stack([fi, fi], -1).reshape(len(f), 6)
            np.savetxt(fh, cols, fmt="f %d//%d %d//%d %d//%d")
        else:
            np.savetxt(fh, fi, fmt="f %d %d %d")
    if mesh.texture is not None:
        tex_name = f"{stem}.{texture_format}"
        write_image(os.path.join(os.path.dirname(path), tex_name), np.asarray(mesh.texture))
        with open(os.path.join(os.path.dirname(path), f"{stem}.mtl"), "w", encoding="utf-8") as fh:
            fh.write(f"# written by jaxrender\nnewmtl material0\nKd 1 1 1\nmap_Kd {tex_name}\n")


# ----------------------------------------------------------------------------
# PLY
# ----------------------------------------------------------------------------

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class _PlyProp(NamedTuple):
    name: str
    dtype: str  # numpy code without byte order
    count_dtype: Optional[str]  # set for list properties


class _PlyElement(NamedTuple):
    name: str
    count: int
    props: list


def _ply_header(fh, path):
    first = fh.readline()
    if first.strip() != b"ply":
        raise ValueError(f"{path}: not a PLY file (first line is {first[:20]!r}, expected 'ply')")
    fmt, elements, lineno = None, [], 1
    while True:
        raw = fh.readline()
        lineno += 1
        if not raw:
            raise ValueError(f"{path}: PLY header has no 'end_header'")
        parts = raw.decode("ascii", errors="replace").split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        key = parts[0]
        if key == "end_header":
            break
        if key == "format":
            if len(parts) < 2 or parts[1] not in ("ascii", "binary_little_endian", "binary_big_endian"):
                raise ValueError(f"{path}:{lineno}: unsupported PLY format {' '.join(parts[1:])!r}")
            fmt = parts[1]
        elif key == "element":
            if len(parts) != 3:
                raise ValueError(f"{path}:{lineno}: 'element' needs a name and a count")
            try:
                count = int(parts[2])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: bad element count {parts[2]!r}") from None
            if count < 0:
                raise ValueError(f"{path}:{lineno}: negative element count {count}")
            elements.append(_PlyElement(parts[1], count, []))
        elif key == "property":
            if not elements:
                raise ValueError(f"{path}:{lineno}: 'property' before any 'element'")
            if len(parts) >= 5 and parts[1] == "list":
                if parts[2] not in _PLY_TYPES or parts[3] not in _PLY_TYPES:
                    raise ValueError(f"{path}:{lineno}: unknown PLY type in {' '.join(parts)!r}")
                elements[-1].props.append(_PlyProp(parts[4], _PLY_TYPES[parts[3]], _PLY_TYPES[parts[2]]))
            elif len(parts) == 3 and parts[1] in _PLY_TYPES:
                elements[-1].props.append(_PlyProp(parts[2], _PLY_TYPES[parts[1]], None))
            else:
                raise ValueError(f"{path}:{lineno}: bad property line {' '.join(parts)!r}")
        else:
            raise ValueError(f"{path}:{lineno}: unexpected header line {' '.join(parts)!r}")
    if fmt is None:
        raise ValueError(f"{path}: PLY header has no 'format' line")
    return fmt, elements, lineno


def _ply_read_ascii(fh, path, elements, header_lines):
    text = fh.read().decode("ascii", errors="replace").splitlines()
    # Skip blank lines but remember real line numbers.
    rows = [(header_lines + 1 + i, t) for i, t in enumerate(text) if t.strip()]
    pos = 0
    data = {}
    for el in elements:
        if pos + el.count > len(rows):
            raise ValueError(
                f"{path}: element '{el.name}' expects {el.count} lines but the file ends after "
                f"{len(rows) - pos}"
            )
        chunk = rows[pos:pos + el.count]
        pos += el.count
        has_list = any(p.count_dtype for p in el.props)
        if not has_list:
            try:
                arr = np.array([t.split() for _, t in chunk], dtype=np.float64).reshape(el.count, -1)
            except ValueError:
                for ln, t in chunk:
                    toks = t.split()
                    if len(toks) != len(el.props):
                        raise ValueError(
                            f"{path}:{ln}: element '{el.name}' needs {len(el.props)} values, got {len(toks)}"
                        ) from None
                    try:
                        [float(x) for x in toks]
                    except ValueError:
                        raise ValueError(f"{path}:{ln}: non-numeric value in element '{el.name}'") from None
                raise
            if arr.shape[1] != len(el.props) and el.count:
                for ln, t in chunk:
                    if len(t.split()) != len(el.props):
                        raise ValueError(
                            f"{path}:{ln}: element '{el.name}' needs {len(el.props)} values, got {len(t.split())}"
                        )
            data[el.name] = {p.name: arr[:, i].astype(p.dtype) for i, p in enumerate(el.props)}
            continue
        cols = {p.name: [] for p in el.props}
        for ln, t in chunk:
            toks = t.split()
            k = 0
            try:
                for p in el.props:
                    if p.count_dtype:
                        if k >= len(toks):
                            raise ValueError(f"{path}:{ln}: missing list count for '{p.name}' in element '{el.name}'")
                        n = int(toks[k])
                        if n < 0 or k + 1 + n > len(toks):
                            raise ValueError(
                                f"{path}:{ln}: list '{p.name}' of element '{el.name}' announces {n} values "
                                f"but the line has {len(toks) - k - 1}"
                            )
                        cols[p.name].append(np.array(toks[k + 1:k + 1 + n], dtype=np.float64).astype(p.dtype))
                        k += 1 + n
                    else:
                        if k >= len(toks):
                            raise ValueError(f"{path}:{ln}: missing value '{p.name}' in element '{el.name}'")
                        cols[p.name].append(float(toks[k]))
                        k += 1
            except ValueError as e:
                if str(e).startswith(path):
                    raise
                raise ValueError(f"{path}:{ln}: non-numeric value in element '{el.name}'") from None
            if k != len(toks):
                raise ValueError(f"{path}:{ln}: element '{el.name}' has {len(toks) - k} extra values")
        data[el.name] = {
            p.name: (cols[p.name] if p.count_dtype else np.asarray(cols[p.name]).astype(p.dtype)) for p in el.props
        }
    return data


def _ply_read_binary(fh, path, elements, big_endian):
    buf = fh.read()
    bo = ">" if big_endian else "<"
    off = 0
    data = {}
    for el in elements:
        if not any(p.count_dtype for p in el.props):
            dt = np.dtype([(p.name, bo + p.dtype) for p in el.props])
            need = dt.itemsize * el.count
            if off + need > len(buf):
                raise ValueError(
                    f"{path}: binary data truncated in element '{el.name}': needs {need} bytes "
                    f"({el.count} records), {len(buf) - off} left"
                )
            rec = np.frombuffer(buf, dt, el.count, off)
            off += need
            data[el.name] = {p.name: rec[p.name].astype(p.dtype) for p in el.props}
            continue
        # Lists: try the fast path (every list as long as the first record's).
        fast = None
        if el.count:
            fields, first_len, o = [], {}, off
            ok = True
            for p in el.props:
                if p.count_dtype:
                    cdt = np.dtype(bo + p.count_dtype)
                    if o + cdt.itemsize > len(buf):
                        ok = False
                        break
                    n = int(np.frombuffer(buf, cdt, 1, o)[0])
                    first_len[p.name] = n
                    fields += [(p.name + "__n", cdt), (p.name, bo + p.dtype, (n,))]
                    o += cdt.itemsize + n * np.dtype(p.dtype).itemsize
                else:
                    fields.append((p.name, bo + p.dtype))
                    o += np.dtype(p.dtype).itemsize
            if ok:
                dt = np.dtype(fields)
                if off + dt.itemsize * el.count <= len(buf):
                    rec = np.frombuffer(buf, dt, el.count, off)
                    if all(np.all(rec[name + "__n"] == n) for name, n in first_len.items()):
                        fast = rec
                        off += dt.itemsize * el.count
        if fast is not None:
            data[el.name] = {p.name: fast[p.name].astype(p.dtype) for p in el.props}
            continue
        cols = {p.name: [] for p in el.props}
        for r in range(el.count):
            for p in el.props:
                if p.count_dtype:
                    cdt = np.dtype(bo + p.count_dtype)
                    if off + cdt.itemsize > len(buf):
                        raise ValueError(f"{path}: binary data truncated in element '{el.name}' record {r}")
                    n = int(np.frombuffer(buf, cdt, 1, off)[0])
                    off += cdt.itemsize
                    vdt = np.dtype(bo + p.dtype)
                    if n < 0 or off + n * vdt.itemsize > len(buf):
                        raise ValueError(f"{path}: binary data truncated in element '{el.name}' record {r}")
                    cols[p.name].append(np.frombuffer(buf, vdt, n, off).astype(p.dtype))
                    off += n * vdt.itemsize
                else:
                    vdt = np.dtype(bo + p.dtype)
                    if off + vdt.itemsize > len(buf):
                        raise ValueError(f"{path}: binary data truncated in element '{el.name}' record {r}")
                    cols[p.name].append(np.frombuffer(buf, vdt, 1, off)[0])
                    off += vdt.itemsize
        data[el.name] = {p.name: (cols[p.name] if p.count_dtype else np.asarray(cols[p.name], p.dtype))
                         for p in el.props}
    return data


def _fan(polys, path) -> np.ndarray:
    if isinstance(polys, np.ndarray) and polys.ndim == 2:
        n = polys.shape[1]
        if n < 3:
            raise ValueError(f"{path}: element 'face' has polygons with {n} vertices (need >= 3)")
        k = np.arange(1, n - 1)
        return np.stack([np.repeat(polys[:, :1], n - 2, 1), polys[:, k], polys[:, k + 1]], -1).reshape(-1, 3)
    out = []
    for i, p in enumerate(polys):
        if len(p) < 3:
            raise ValueError(f"{path}: element 'face' {i} has {len(p)} vertices (need >= 3)")
        out += [(p[0], p[k], p[k + 1]) for k in range(1, len(p) - 1)]
    return np.asarray(out, np.int64).reshape(-1, 3)


def read_ply(path: PathLike) -> Mesh:
    """Read a PLY mesh (ASCII, binary little- or big-endian).

    Reads element ``vertex`` (``x, y, z``; optional colours ``red, green,
    blue`` -- uchar scaled by 1/255, or floats taken as they are; optional
    ``s, t`` / ``u, v`` / ``texture_u, texture_v`` per-vertex UVs) and
    element ``face`` (list ``vertex_indices`` or ``vertex_index``; polygons
    are fan-split). Other elements and properties are parsed and ignored.

    Args:
      path: the ``.ply`` file.

    Returns:
      A :class:`Mesh`.

    Raises:
      ValueError: malformed header (naming the line), truncated or short data
        (naming the element), bad values or out-of-range indices.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        fmt, elements, header_lines = _ply_header(fh, path)
        if fmt == "ascii":
            data = _ply_read_ascii(fh, path, elements, header_lines)
        else:
            data = _ply_read_binary(fh, path, elements, fmt == "binary_big_endian")
    if "vertex" not in data:
        raise ValueError(f"{path}: no 'vertex' element")
    vd = data["vertex"]
    missing = [c for c in "xyz" if c not in vd]
    if missing:
        raise ValueError(f"{path}: element 'vertex' lacks properties {missing}")
    vertices = np.stack([vd["x"], vd["y"], vd["z"]], -1).astype(np.float64)
    colors = None
    if all(c in vd for c in ("red", "green", "blue")):
        c = np.stack([vd["red"], vd["green"], vd["blue"]], -1)
        colors = (c.astype(np.float32) / 255.0) if np.issubdtype(c.dtype, np.integer) else c.astype(np.float32)
        if "alpha" in vd:
            a = vd["alpha"]
            a = a.astype(np.float32) / 255.0 if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)
            colors = np.concatenate([colors, a[:, None]], -1)
    uvs = None
    for un, vn in (("s", "t"), ("u", "v"), ("texture_u", "texture_v")):
        if un in vd and vn in vd:
            uvs = np.stack([vd[un], vd[vn]], -1).astype(np.float32)
            break
    faces = np.zeros((0, 3), np.int64)
    if "face" in data:
        fd = data["face"]
        key = "vertex_indices" if "vertex_indices" in fd else "vertex_index" if "vertex_index" in fd else None
        if key is None:
            raise ValueError(f"{path}: element 'face' has no 'vertex_indices' list")
        faces = _fan(fd[key], path).astype(np.int64)
        if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
            bad = int(np.argmax((faces < 0).any(1) | (faces >= len(vertices)).any(1)))
            raise ValueError(
                f"{path}: element 'face' has a vertex index out of range [0, {len(vertices)}) "
                f"(first at triangle {bad}: {faces[bad].tolist()})"
            )
    return Mesh(vertices, faces, vertex_colors=colors, uvs=uvs)


def write_ply(path: PathLike, mesh: Mesh, binary: bool = True) -> None:
    """Write a mesh as PLY.

    Vertex properties ``x, y, z`` (``float``, or ``double`` for float64
    vertices) and, when ``mesh.vertex_colors`` has 3 or 4 channels, ``red,
    green, blue[, alpha]`` as uchar (``round(clip(c, 0, 1) * 255)``); faces as
    ``list uchar int vertex_indices``. UVs and textures are not written.

    Args:
      path: the ``.ply`` file to write.
      mesh: a single (unbatched) :class:`Mesh`.
      binary: binary little-endian (default) or ASCII.
    """
    path = os.fspath(path)
    v = np.asarray(mesh.vertices)
    if v.ndim != 2:
        raise ValueError(f"write_ply writes one mesh; vertices have shape {v.shape}")
    f = np.asarray(mesh.faces).astype(np.int32)
    vtype, vcode = ("double", "f8") if v.dtype == np.float64 else ("float", "f4")
    fields = [("x", "<" + vcode), ("y", "<" + vcode), ("z", "<" + vcode)]
    cols = None
    if mesh.vertex_colors is not None:
        c = np.asarray(mesh.vertex_colors)
        if c.shape[-1] in (3, 4):
            cols = np.round(np.clip(c, 0.0, 1.0) * 255.0).astype(np.uint8)
            fields += [(n, "u1") for n in ("red", "green", "blue", "alpha")[: c.shape[-1]]]
        else:
            warnings.warn(f"vertex_colors with {c.shape[-1]} channels cannot be stored in PLY; skipped")
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment written by jaxrender",
              f"element vertex {len(v)}"]
    header += [f"property {vtype} {n}" for n in "xyz"]
    header += [f"property uchar {n}" for n, _ in fields[3:]]
    header += [f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]
    vrec = np.empty(len(v), np.dtype(fields))
    for i, n in enumerate("xyz"):
        vrec[n] = v[:, i]
    for i, (n, _) in enumerate(fields[3:]):
        vrec[n] = cols[:, i]
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            fh.write(vrec.tobytes())
            frec = np.empty(len(f), np.dtype([("n", "u1"), ("idx", "<i4", (3,))]))
            frec["n"] = 3
            frec["idx"] = f
            fh.write(frec.tobytes())
        else:
            fmt = _float_fmt(v)
            vfmt = " ".join([fmt] * 3 + ["%d"] * (len(fields) - 3))
            table = np.concatenate([v.astype(np.float64)] + ([cols.astype(np.float64)] if cols is not None else []), 1)
            np.savetxt(fh, table, fmt=vfmt)
            np.savetxt(fh, np.concatenate([np.full((len(f), 1), 3), f], 1), fmt="%d")


# ----------------------------------------------------------------------------
# Dispatch by extension
# ----------------------------------------------------------------------------

def read_mesh(path: PathLike, **kwargs) -> Mesh:
    """Read a ``.obj`` or ``.ply`` mesh (by extension); see :func:`read_obj`
    and :func:`read_ply` for the keyword arguments."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".obj":
        return read_obj(path, **kwargs)
    if ext == ".ply":
        return read_ply(path, **kwargs)
    raise ValueError(f"{path}: unknown mesh format {ext!r} (expected .obj or .ply)")


def write_mesh(path: PathLike, mesh: Mesh, **kwargs) -> None:
    """Write a ``.obj`` or ``.ply`` mesh (by extension); see :func:`write_obj`
    and :func:`write_ply` for the keyword arguments."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".obj":
        return write_obj(path, mesh, **kwargs)
    if ext == ".ply":
        return write_ply(path, mesh, **kwargs)
    raise ValueError(f"{path}: unknown mesh format {ext!r} (expected .obj or .ply)")

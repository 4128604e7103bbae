"""High-level render functions: short compositions of the pipeline stages.

``project -> rasterize -> interpolate / texture -> shade -> blend``. Each
function renders one mesh seen by one camera; batch with ``jax.vmap`` over
cameras, or over meshes that share ``faces`` (vmap the vertices / colours).
Replace any stage by calling the primitives directly (see the source: every
function here is a few lines).
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from . import camera as camera_lib
from .blend import BlendParams, depth_blend, hard_rgb_blend, sigmoid_alpha_blend, softmax_rgb_blend
from .lighting import AmbientLight, Material, PointLight, phong_shading, sh_shading
from .mesh import Mesh, face_normals, vertex_normals
from .raster import (Fragments, RasterSettings, gather_rows, interpolate, interpolate_face_attrs, rasterize,
                     recompute_fragments, select_faces)
from .texture import sample_texture

Array = jax.Array

SHADINGS = ("phong", "gouraud", "flat", "sh", "unlit")


def default_lights():
    """PyTorch3D's default ``PointLights``: ambient 0.5, diffuse 0.3, specular 0.2 at (0, 1, 0)."""
    return (AmbientLight(0.5), PointLight(position=(0.0, 1.0, 0.0), color=0.3, specular_color=0.2))


def _check_size(camera, settings):
    if (camera.height, camera.width) != tuple(settings.image_size):
        raise ValueError(
            f"settings.image_size {tuple(settings.image_size)} must equal the camera's (height, width) "
            f"({camera.height}, {camera.width})")


def rasterize_mesh(mesh: Mesh, camera: camera_lib.Camera, settings: RasterSettings, vertex_attrs=None):
    """Project ``mesh`` with ``camera`` and rasterize it (``settings.image_size`` must match the camera).

    With ``vertex_attrs`` ``(V, C)`` returns ``(fragments, attrs (H, W, K, C))``
    as :func:`jaxrender.rasterize` does.
    """
    _check_size(camera, settings)
    sv = camera_lib.project(camera, mesh.vertices)
    return rasterize(sv, mesh.faces, settings, znear=camera.znear, zfar=camera.zfar, vertex_attrs=vertex_attrs)


def render_bands(mesh: Mesh, camera: camera_lib.Camera, settings: RasterSettings, pixel_fn, vertex_attrs=None):
    """Select faces once, then run ``pixel_fn`` over bands of image rows.

    ``pixel_fn(fragments, attrs)`` maps the :class:`Fragments` of a band of
    rows (and the interpolated ``vertex_attrs`` of those fragments, or
    ``None``) to a per-pixel result ``(rows, W, ...)``. Each band is
    rematerialized in the backward pass (``jax.checkpoint``), so forward +
    backward memory is bounded by one band (``settings.max_fragments_per_band``)
    plus the ``(H, W, K)`` face indices. This is how every ``render_*``
    function runs; use it to build your own per-pixel renders.

    Returns:
      ``(result (H, W, ...), stats)`` where ``stats`` is a :class:`Fragments`
      holding the face indices and the overflow statistics (its ``bary``,
      ``depth`` and ``dist`` are ``None``).
    """
    _check_size(camera, settings)
    sv = camera_lib.project(camera, mesh.vertices)
    face_idx, overflow, max_count, culled, truncated = select_faces(
        sv, mesh.faces, settings, znear=camera.znear, zfar=camera.zfar)
    faces = mesh.faces.astype(jnp.int32)

    def band(fidx, row0):
        bary, depth, dist, attrs = recompute_fragments(sv, faces, fidx, settings, vertex_attrs, row_offset=row0)
        fr = Fragments(fidx, bary, depth, dist, overflow, max_count, culled, truncated)
        return pixel_fn(fr, attrs)

    h, w, k = face_idx.shape
    rows = settings.rows_per_band()
    if rows >= h or faces.shape[0] == 0:
        out = band(face_idx, 0)
    else:
        nb = -(-h // rows)
        fpad = jnp.pad(face_idx, ((0, nb * rows - h), (0, 0), (0, 0)), constant_values=-1)
        offsets = (jnp.arange(nb) * rows).astype(sv.dtype)
        out = jax.lax.map(jax.checkpoint(lambda a: band(a[0], a[1])), (fpad.reshape(nb, rows, w, k), offsets))
        out = out.reshape((nb * rows,) + out.shape[2:])[:h]
    return out, Fragments(face_idx, None, None, None, overflow, max_count, culled, truncated)


def _fused_render(mesh: Mesh, camera, settings: RasterSettings, mode, shading="unlit", attrs=None, names=(),
                  lights=None, material=None, blend=None, sigma=None):
    """Render with the fused GPU kernels when they support the request; ``None`` otherwise.

    Returns ``(image (H, W, C), stats)`` as :func:`render_bands` does.
    """
    from .raster import fused
    from .raster.pallas_select import MAX_PALLAS_K, resolve_backend
    from .raster.rasterize import _select_valid

    k = settings.faces_per_pixel
    bs = settings.resolved_bin_size
    if (not settings.fused or k > MAX_PALLAS_K or bs & (bs - 1) or mesh.faces.shape[0] == 0
            or mesh.vertices.dtype != jnp.float32 or mesh.texture is not None
            or (mode != "silhouette" and shading not in fused.SHADINGS)):
        return None
    if not settings.pallas_interpret and resolve_backend(settings.backend, k) != "pallas":
        return None
    kinds, sp = (), jnp.zeros((0,), jnp.float32)
    if shading == "phong":
        plan = fused.shading_params(shading, default_lights() if lights is None else lights, material,
                                    camera_lib.camera_center(camera))
        if plan is None:
            return None
        kinds, sp = plan
    if mode == "silhouette":
        bp = fused.blend_params(mode, sigma=sigma)
    elif mode == "hard":
        bp = fused.blend_params(mode, background=blend.background)
    else:
        bp = fused.blend_params(mode, blend.sigma, blend.gamma, camera.znear, camera.zfar, blend.background)
    if bp.shape[-1] != (1 if mode == "silhouette" else 7 if mode == "soft" else 3):
        return None  # e.g. a background that is not RGB
    sv = camera_lib.project(camera, mesh.vertices)
    faces = mesh.faces.astype(jnp.int32)
    lists, face_idx, overflow, max_count, culled, truncated = _select_valid(
        sv, faces, settings, camera.znear, camera.zfar, tiles=True)
    cfg = fused.Config(
        mode=mode, shading="none" if mode == "silhouette" else shading, point_lights=kinds,
        has_albedo=any(n == "albedo" for n, _ in names), n_attr=0 if attrs is None else attrs.shape[-1],
        n_shade=sp.shape[0], n_blend=bp.shape[0], image_size=tuple(settings.image_size), bin_size=bs,
        faces_per_pixel=k, slots=lists.shape[1],
        geo=(("perspective_correct", settings.perspective_correct),
             ("clip_barycentrics", settings.resolved_clip_barycentrics),
             ("ndc_per_pixel", settings.ndc_per_pixel)),
        num_warps=settings.resolved_pallas_num_warps, interpret=settings.pallas_interpret,
        replicas=fused.gradient_table_copies(faces.shape[0], settings.image_size))
    img = fused.fused_render(sv, faces, attrs, jnp.concatenate([sp, bp]), lists, cfg)
    return img, Fragments(face_idx, None, None, None, overflow, max_count, culled, truncated)


def _vertex_attributes(mesh: Mesh, camera, lights, shading, material):
    """Per-vertex values the shading needs, packed into one ``(V, C)`` array.

    Returns ``(attrs, names)`` where ``names`` lists ``(name, width)`` in order.
    Packing lets one gather serve every attribute (one scatter in backward).
    """
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    v, f = mesh.vertices, mesh.faces
    cols, names = [], []

    def add(name, a):
        cols.append(a.astype(v.dtype))
        names.append((name, a.shape[-1]))

    if shading in ("phong", "flat"):
        add("points", v)
    if shading in ("phong", "sh"):
        add("normals", vertex_normals(v, f))
    if shading == "gouraud":
        lights = default_lights() if lights is None else lights
        vn = vertex_normals(v, f)
        eye = camera_lib.camera_center(camera)
        # Light seen by a white albedo, split into the albedo-weighted and the additive (specular) part.
        lit = phong_shading(v, vn, jnp.ones_like(v), lights, material, eye)
        spec = phong_shading(v, vn, jnp.zeros_like(v), lights, material, eye)
        add("light", lit - spec)
        add("specular", spec)
    if mesh.texture is None and mesh.vertex_colors is not None:
        add("albedo", mesh.vertex_colors)
    if not cols:
        return None, names
    return jnp.concatenate(cols, axis=-1), names


def _split(attrs, names):
    out, i = {}, 0
    for name, width in names:
        out[name] = attrs[..., i:i + width]
        i += width
    return out


def _face_attributes(mesh: Mesh, shading):
    """Per-face values the shading needs, computed once (not once per band)."""
    out = {}
    if mesh.texture is not None:
        if mesh.uvs is None:
            raise ValueError("mesh.texture is set but mesh.uvs is None: a texture needs UV coordinates")
        face_uvs = mesh.face_uvs if mesh.face_uvs is not None else mesh.faces
        out["corner_uvs"] = mesh.uvs[face_uvs]  # (F, 3, 2)
    if shading == "flat":
        out["face_normals"] = face_normals(mesh.vertices, mesh.faces)
    return out


def _shade(mesh: Mesh, fragments: Fragments, interp: dict, per_face: dict, camera, lights, shading, material,
           sh_layout, sh_offset):
    if "corner_uvs" in per_face:
        albedo = sample_texture(mesh.texture, interpolate_face_attrs(per_face["corner_uvs"], fragments))
    elif "albedo" in interp:
        albedo = interp["albedo"]
    else:
        albedo = jnp.ones(fragments.face_idx.shape + (3,), mesh.vertices.dtype)
    if shading == "unlit":
        return albedo
    if shading == "sh":
        if lights is None:
            raise ValueError("shading='sh' needs the SH coefficients as `lights`")
        return albedo * sh_shading(interp["normals"], lights, layout=sh_layout, offset=sh_offset)
    if shading == "gouraud":
        return albedo * interp["light"] + interp["specular"]
    lights = default_lights() if lights is None else lights
    eye = camera_lib.camera_center(camera)
    if shading == "flat":
        n = gather_rows(per_face["face_normals"], fragments.face_idx)
    else:
        n = interp["normals"]
    return phong_shading(interp["points"], n, albedo, lights, material, eye)


def shade_fragments(mesh: Mesh, fragments: Fragments, camera: camera_lib.Camera, lights=None,
                    shading: str = "phong", material: Union[Material, None] = None,
                    sh_layout: str = "3x9", sh_offset=0.0) -> Array:
    """Colour of every kept fragment, ``(H, W, K, C)``.

    Args:
      mesh: the :class:`Mesh` that was rasterized.
      fragments: its :class:`Fragments`.
      camera: the camera (its centre is the eye for specular terms).
      lights: a light or tuple of lights (``phong``, ``gouraud``, ``flat``;
        ``None`` means :func:`default_lights`), or the 27 SH coefficients for
        ``shading="sh"`` (``(3, 9)``, ``(9, 3)`` or ``(27,)``, see
        :func:`jaxrender.lighting.sh_shading`).
      shading: ``"phong"`` (per-pixel lighting with interpolated vertex
        normals), ``"gouraud"`` (lighting at vertices, interpolated; the
        albedo still comes per pixel), ``"flat"`` (face normals), ``"sh"``
        (albedo times spherical-harmonics irradiance of the interpolated
        world normal), ``"unlit"`` (albedo only).
      material: :class:`Material` for the Phong family.
      sh_layout, sh_offset: passed to :func:`sh_shading`.
    """
    attrs, names = _vertex_attributes(mesh, camera, lights, shading, material)
    interp = {} if attrs is None else _split(interpolate(attrs, mesh.faces, fragments), names)
    return _shade(mesh, fragments, interp, _face_attributes(mesh, shading), camera, lights, shading, material,
                  sh_layout, sh_offset)


def render_mesh(mesh: Mesh, camera: camera_lib.Camera, lights=None, settings: Union[RasterSettings, None] = None, *,
                shading: str = "phong", material: Union[Material, None] = None,
                blend: Union[BlendParams, None] = None, hard: bool = False,
                sh_layout: str = "3x9", sh_offset=0.0, return_fragments: bool = False):
    """Render a shaded mesh to an RGBA image.

    Args:
      mesh: :class:`jaxrender.mesh.Mesh` with vertex colours, a UV texture,
        or neither (white).
      camera: :class:`jaxrender.camera.Camera`.
      lights: see :func:`shade_fragments`.
      settings: :class:`RasterSettings`; ``None`` means a hard rasterization
        at the camera's size (one face per pixel, no blur).
      shading: ``"phong"``, ``"gouraud"``, ``"flat"``, ``"sh"`` or ``"unlit"``.
      material: :class:`jaxrender.lighting.Material`.
      blend: :class:`BlendParams` (sigma, gamma, background) for the soft
        blend; ``None`` means PyTorch3D's defaults (1e-4, 1e-4, white).
      hard: use the nearest fragment's colour (:func:`hard_rgb_blend`)
        instead of the softmax blend.
      return_fragments: also return a :class:`Fragments` with the face
        indices and overflow statistics (e.g. to check ``num_overflow``);
        its ``bary``, ``depth`` and ``dist`` are ``None``.

    Returns:
      ``(H, W, C + 1)`` colour and alpha (and the fragments if asked). The
      soft blend (PyTorch3D's formula) carries the colour out to the blur
      radius; composite ``rgb * alpha + background * (1 - alpha)`` to display
      it.
    """
    settings = RasterSettings(image_size=(camera.height, camera.width)) if settings is None else settings
    blend = BlendParams() if blend is None else blend
    attrs, names = _vertex_attributes(mesh, camera, lights, shading, material)
    per_face = _face_attributes(mesh, shading)

    def pixels(fr, packed):
        interp = {} if packed is None else _split(packed, names)
        colors = _shade(mesh, fr, interp, per_face, camera, lights, shading, material, sh_layout, sh_offset)
        if hard:
            return hard_rgb_blend(colors, fr, blend.background)
        return softmax_rgb_blend(colors, fr, blend, camera.znear, camera.zfar)

    _check_size(camera, settings)
    out = _fused_render(mesh, camera, settings, "hard" if hard else "soft", shading, attrs, names, lights,
                        material, blend)
    img, stats = render_bands(mesh, camera, settings, pixels, attrs) if out is None else out
    return (img, stats) if return_fragments else img


def render_silhouette(mesh: Mesh, camera: camera_lib.Camera, settings: Union[RasterSettings, None] = None,
                      sigma=1e-4, return_fragments: bool = False) -> Array:
    """Soft silhouette ``1 - prod_k (1 - sigmoid(-dist_k / sigma))``, shape ``(H, W)``.

    With ``blur_radius = 0`` and ``K = 1`` this is the hard mask.
    ``return_fragments`` also returns the face indices and overflow
    statistics as :func:`render_mesh` does.
    """
    settings = RasterSettings(image_size=(camera.height, camera.width)) if settings is None else settings
    _check_size(camera, settings)
    out = _fused_render(mesh, camera, settings, "silhouette", sigma=sigma)
    if out is None:
        img, stats = render_bands(mesh, camera, settings, lambda fr, _: sigmoid_alpha_blend(fr, sigma))
    else:
        img, stats = out[0][..., 0], out[1]
    return (img, stats) if return_fragments else img


def render_depth(mesh: Mesh, camera: camera_lib.Camera, settings: Union[RasterSettings, None] = None,
                 background=0.0, blend: Union[BlendParams, None] = None) -> Array:
    """Depth image ``(H, W)``: view depth of the nearest face (``background`` elsewhere), or with
    ``blend`` the softmax-blended depth (differentiable at silhouettes)."""
    settings = RasterSettings(image_size=(camera.height, camera.width)) if settings is None else settings
    return render_bands(mesh, camera, settings,
                        lambda fr, _: depth_blend(fr, background, blend, camera.znear, camera.zfar))[0]


def render_normals(mesh: Mesh, camera: camera_lib.Camera, settings: Union[RasterSettings, None] = None,
                   space: str = "world") -> Array:
    """Normal map ``(H, W, 4)``: the nearest face's interpolated unit normal and alpha.

    Args:
      space: ``"world"`` or ``"camera"`` (OpenCV camera frame).

    The normal components are in ``[-1, 1]`` (map with ``0.5 * n + 0.5`` to
    view them); empty pixels are zero with alpha 0.
    """
    if space not in ("world", "camera"):
        raise ValueError(f"space must be 'world' or 'camera', got {space!r}")
    settings = RasterSettings(image_size=(camera.height, camera.width)) if settings is None else settings

    def pixels(fr, n):
        n = n[:, :, 0]
        if space == "camera":
            n = jnp.matmul(n, camera.R.T, precision=jax.lax.Precision.HIGHEST)
        n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
        hit = fr.face_idx[..., 0] >= 0
        n = jnp.where(hit[..., None], n, 0.0)
        return jnp.concatenate([n, hit[..., None].astype(n.dtype)], axis=-1)

    return render_bands(mesh, camera, settings, pixels, vertex_normals(mesh.vertices, mesh.faces))[0]

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
from .raster import Fragments, RasterSettings, interpolate, interpolate_face_attrs, rasterize
from .texture import sample_texture

Array = jax.Array

SHADINGS = ("phong", "gouraud", "flat", "sh", "unlit")


def default_lights():
    """PyTorch3D's default ``PointLights``: ambient 0.5, diffuse 0.3, specular 0.2 at (0, 1, 0)."""
    return (AmbientLight(0.5), PointLight(position=(0.0, 1.0, 0.0), color=0.3, specular_color=0.2))


def rasterize_mesh(mesh: Mesh, camera: camera_lib.Camera, settings: RasterSettings) -> Fragments:
    """Project ``mesh`` with ``camera`` and rasterize it (``settings.image_size`` must match the camera)."""
    if (camera.height, camera.width) != tuple(settings.image_size):
        raise ValueError(
            f"settings.image_size {tuple(settings.image_size)} must equal the camera's (height, width) "
            f"({camera.height}, {camera.width})")
    sv = camera_lib.project(camera, mesh.vertices)
    return rasterize(sv, mesh.faces, settings, znear=camera.znear, zfar=camera.zfar)


def _albedo(mesh: Mesh, fragments: Fragments) -> Array:
    """Per-fragment base colour ``(H, W, K, C)``: texture, else vertex colours, else white."""
    if mesh.texture is not None:
        if mesh.uvs is None:
            raise ValueError("mesh.texture is set but mesh.uvs is None: a texture needs UV coordinates")
        face_uvs = mesh.face_uvs if mesh.face_uvs is not None else mesh.faces
        uv = interpolate_face_attrs(mesh.uvs[face_uvs], fragments)
        return sample_texture(mesh.texture, uv)
    if mesh.vertex_colors is not None:
        return interpolate(mesh.vertex_colors, mesh.faces, fragments)
    h, w, k = fragments.face_idx.shape
    return jnp.ones((h, w, k, 3), mesh.vertices.dtype)


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
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    albedo = _albedo(mesh, fragments)
    if shading == "unlit":
        return albedo
    v, f = mesh.vertices, mesh.faces
    if shading == "sh":
        if lights is None:
            raise ValueError("shading='sh' needs the SH coefficients as `lights`")
        n = interpolate(vertex_normals(v, f), f, fragments)
        irr = sh_shading(n, lights, layout=sh_layout, offset=sh_offset)
        return albedo * irr
    lights = default_lights() if lights is None else lights
    eye = camera_lib.camera_center(camera)
    points = interpolate(v, f, fragments)
    if shading == "gouraud":
        vn = vertex_normals(v, f)
        ones = jnp.ones_like(v)
        zeros = jnp.zeros_like(v)
        # Light as seen by a white albedo, split into the albedo-weighted and the additive (specular) part.
        lit = phong_shading(v, vn, ones, lights, material, eye)
        spec = phong_shading(v, vn, zeros, lights, material, eye)
        lit_f = interpolate(lit - spec, f, fragments)
        spec_f = interpolate(spec, f, fragments)
        return albedo * lit_f + spec_f
    if shading == "flat":
        fn = face_normals(v, f)
        n = fn[jnp.maximum(fragments.face_idx, 0)]
    else:
        n = interpolate(vertex_normals(v, f), f, fragments)
    return phong_shading(points, n, albedo, lights, material, eye)


def render_mesh(mesh: Mesh, camera: camera_lib.Camera, lights=None, settings: Union[RasterSettings, None] = None, *,
                shading: str = "phong", material: Union[Material, None] = None,
                blend: Union[BlendParams, None] = None, hard: bool = False,
                sh_layout: str = "3x9", sh_offset=0.0) -> Array:
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

    Returns:
      ``(H, W, C + 1)`` colour and alpha.
    """
    settings = RasterSettings(image_size=(camera.height, camera.width)) if settings is None else settings
    blend = BlendParams() if blend is None else blend
    fr = rasterize_mesh(mesh, camera, settings)
    colors = shade_fragments(mesh, fr, camera, lights, shading, material, sh_layout, sh_offset)
    if hard:
        return hard_rgb_blend(colors, fr, blend.background)
    return softmax_rgb_blend(colors, fr, blend, camera.znear, camera.zfar)


def render_silhouette(mesh: Mesh, camera: camera_lib.Camera, settings: Union[RasterSettings, None] = None,
                      sigma=1e-4) -> Array:
    """Soft silhouette ``1 - prod_k (1 - sigmoid(-dist_k / sigma))``, shape ``(H, W)``.

    With ``blur_radius = 0`` and ``K = 1`` this is the hard mask.
    """
    settings = RasterSettings(image_size=(camera.height, camera.width)) if settings is None else settings
    return sigmoid_alpha_blend(rasterize_mesh(mesh, camera, settings), sigma)


def render_depth(mesh: Mesh, camera: camera_lib.Camera, settings: Union[RasterSettings, None] = None,
                 background=0.0, blend: Union[BlendParams, None] = None) -> Array:
    """Depth image ``(H, W)``: view depth of the nearest face (``background`` elsewhere), or with
    ``blend`` the softmax-blended depth (differentiable at silhouettes)."""
    settings = RasterSettings(image_size=(camera.height, camera.width)) if settings is None else settings
    fr = rasterize_mesh(mesh, camera, settings)
    return depth_blend(fr, background, blend, camera.znear, camera.zfar)


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
    fr = rasterize_mesh(mesh, camera, settings)
    n = interpolate(vertex_normals(mesh.vertices, mesh.faces), mesh.faces, fr)[:, :, 0]
    if space == "camera":
        n = n @ camera.R.T
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    hit = fr.face_idx[..., 0] >= 0
    n = jnp.where(hit[..., None], n, 0.0)
    return jnp.concatenate([n, hit[..., None].astype(n.dtype)], axis=-1)

"""jaxrender: differentiable rendering and inverse rendering in JAX.

Pure functions over arrays and equinox pytrees, so everything composes with
``jax.jit``, ``jax.vmap``, ``jax.grad`` and sharding. The pipeline:

``transforms -> camera.project -> rasterize -> interpolate / sample_texture ->
lighting -> blend``, with ``render_*`` as short compositions, ``fit`` as the
Optax fitting loop, ``volume`` for emission-absorption voxel rendering and
``morphable`` for 3D morphable face models.
"""
__version__ = "0.1.0"

from . import blend, camera, data, io, lighting, losses, mesh, morphable, raster, render, texture, transforms, volume
from .blend import BlendParams, hard_rgb_blend, sigmoid_alpha_blend, softmax_rgb_blend
from .camera import Camera, from_fov, from_intrinsics, look_at, pixel_rays, project, unproject
from .lighting import AmbientLight, DirectionalLight, Material, PointLight, phong_shading, sh_basis, sh_shading
from .mesh import Mesh, face_normals, vertex_normals
from .raster import Fragments, RasterSettings, interpolate, rasterize
from .render import render_depth, render_mesh, render_normals, render_silhouette
from .texture import sample_texture
from .volume import VoxelGrid, render_volume
from .morphable import MorphableModel, faceverse_forward, fit_face, load_bfm
from .data.synthetic_face import synthetic_face_model

from .fit import Checkpoint, FitResult, fit  # noqa: E402  (the function shadows the module name on purpose)

__all__ = [
    "blend", "camera", "data", "io", "lighting", "losses", "mesh", "morphable", "raster", "render", "texture",
    "transforms", "volume", "VoxelGrid", "render_volume",
    "MorphableModel", "faceverse_forward", "fit_face", "load_bfm", "synthetic_face_model",
    "BlendParams", "hard_rgb_blend", "sigmoid_alpha_blend", "softmax_rgb_blend",
    "Camera", "from_fov", "from_intrinsics", "look_at", "pixel_rays", "project", "unproject",
    "AmbientLight", "DirectionalLight", "Material", "PointLight", "phong_shading", "sh_basis", "sh_shading",
    "Mesh", "face_normals", "vertex_normals",
    "Fragments", "RasterSettings", "interpolate", "rasterize",
    "render_depth", "render_mesh", "render_normals", "render_silhouette",
    "sample_texture", "Checkpoint", "FitResult", "fit",
]

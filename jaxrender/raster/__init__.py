"""Rasterization: settings, fragments, the binned XLA rasterizer, interpolation."""
from .settings import Fragments, RasterSettings
from .rasterize import (
    face_validity,
    fragment_geometry,
    interpolate,
    interpolate_face_attrs,
    rasterize,
    recompute_fragments,
    select_faces,
)

__all__ = [
    "Fragments", "RasterSettings", "rasterize", "interpolate", "interpolate_face_attrs",
    "fragment_geometry", "face_validity", "recompute_fragments", "select_faces",
]

"""Rasterization: settings, fragments, the binned XLA rasterizer, interpolation."""
from .settings import Fragments, RasterSettings
from .rasterize import (
    face_validity,
    fragment_geometry,
    gather_rows,
    interpolate,
    interpolate_face_attrs,
    rasterize,
    recompute_fragments,
    select_faces,
)

__all__ = [
    "Fragments", "RasterSettings", "rasterize", "interpolate", "interpolate_face_attrs",
    "fragment_geometry", "face_validity", "gather_rows", "recompute_fragments", "select_faces",
]

"""Linear 3D morphable face models.

* :mod:`~jaxrender.morphable.model` — :class:`MorphableModel` and the pure
  functions :func:`shape`, :func:`albedo`, :func:`landmarks`,
  :func:`vertex_normals`, :func:`to_mesh`.
* :mod:`~jaxrender.morphable.loaders` — :func:`load_bfm` / :func:`save_bfm`
  (Basel Face Model 2017/2019), :func:`load_faceverse`, :func:`load_deep3d`.
* :mod:`~jaxrender.morphable.flame` — :func:`load_flame`, :func:`flame_forward`.
* :mod:`~jaxrender.morphable.faceverse` — FaceVerse's coefficient layout and
  forward pass (:func:`faceverse_forward`).
* :mod:`~jaxrender.morphable.fitting` — :func:`fit_face`,
  :func:`fit_faces_batched`, :func:`track_face`.
* The built-in procedural model: :func:`jaxrender.data.synthetic_face.synthetic_face_model`.

See ``docs/faces.md``.
"""
from jaxrender.morphable.model import MorphableModel, albedo, landmarks, shape, to_mesh, vertex_normals
from jaxrender.morphable.loaders import ModelFileError, load_bfm, load_deep3d, load_faceverse, save_bfm
from jaxrender.morphable.flame import FLAME_JOINTS, FlameModel, flame_forward, flame_to_morphable, load_flame
from jaxrender.morphable.faceverse import (
    FaceVerseCoeffs,
    faceverse_forward,
    faceverse_shape,
    merge_coeffs,
    num_coeffs,
    split_coeffs,
    zero_coeffs,
)
from jaxrender.morphable.fitting import FaceFit, TrackResult, fit_face, fit_faces_batched, track_face

__all__ = [
    "MorphableModel",
    "shape",
    "albedo",
    "landmarks",
    "vertex_normals",
    "to_mesh",
    "load_bfm",
    "save_bfm",
    "load_faceverse",
    "load_deep3d",
    "ModelFileError",
    "FlameModel",
    "load_flame",
    "flame_forward",
    "flame_to_morphable",
    "FLAME_JOINTS",
    "FaceVerseCoeffs",
    "faceverse_forward",
    "faceverse_shape",
    "split_coeffs",
    "merge_coeffs",
    "num_coeffs",
    "zero_coeffs",
    "FaceFit",
    "TrackResult",
    "fit_face",
    "fit_faces_batched",
    "track_face",
]

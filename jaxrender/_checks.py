"""Validation helpers used where data enters the library.

They run on concrete arrays and on tracers alike: shape and dtype checks use
static information only, so they are free under ``jit``; value checks (index
ranges, NaNs) run only when the array is concrete (a NumPy array or a
non-traced JAX array) and are skipped silently inside traced code.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def as_float(x, dtype=None):
    """``jnp.asarray(x, dtype)``, with integer / bool input promoted to the default float dtype."""
    x = jnp.asarray(x, dtype=dtype)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def is_concrete(x) -> bool:
    """True when ``x`` holds concrete values (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_shape(x, name: str, shape: Sequence, *, batch_ok: bool = False):
    """Check ``x.shape`` against a spec such as ``(None, 3)``.

    ``None`` matches any size; an int must match exactly; a string is a
    symbolic size that only documents the message. With ``batch_ok`` leading
    extra axes are allowed. Raises ``ValueError`` naming ``name``, the expected
    and the actual shape.
    """
    if not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    shp = tuple(x.shape)
    spec = tuple(shape)
    if batch_ok:
        ok = len(shp) >= len(spec) and all(
            not isinstance(s, int) or s == d for s, d in zip(spec, shp[len(shp) - len(spec):])
        )
    else:
        ok = len(shp) == len(spec) and all(not isinstance(s, int) or s == d for s, d in zip(spec, shp))
    if not ok:
        sym = ", ".join(str(s) if s is not None else "N" for s in spec)
        raise ValueError(f"{name} must have shape ({sym}){' with optional leading batch axes' if batch_ok else ''}, got {shp}")
    return x


def check_float(x, name: str):
    """Require a floating dtype."""
    if not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def check_faces(faces, num_vertices: int | None, name: str = "faces"):
    """Faces must be ``(F, 3)`` integers in ``[0, num_vertices)``.

    The range check runs only on concrete arrays.
    """
    check_shape(faces, name, (None, 3))
    if not np.issubdtype(np.dtype(faces.dtype), np.integer):
        raise TypeError(f"{name} must have an integer dtype (int32), got {faces.dtype}")
    if num_vertices is not None and is_concrete(faces) and faces.shape[0] > 0:
        f = np.asarray(faces)
        lo, hi = int(f.min()), int(f.max())
        if lo < 0 or hi >= num_vertices:
            raise IndexError(f"{name} index out of range: values span [{lo}, {hi}] but there are {num_vertices} vertices")
    return faces

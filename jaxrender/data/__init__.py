"""Small built-in assets generated from code (no binary files are shipped).

- :mod:`jaxrender.data.teapot_patches`: the Utah teapot's Bezier patches, used
  by :func:`jaxrender.mesh.teapot`.
"""

"""jaxrender: differentiable rendering and inverse rendering in JAX."""
__version__ = "0.1.0"

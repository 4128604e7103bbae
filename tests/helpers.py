"""Helpers shared by the tests: central finite differences in float64."""
import jax
import jax.numpy as jnp
import numpy as np


def finite_difference_grad(f, x, eps=1e-6):
    """Central finite-difference gradient of scalar ``f`` at array ``x`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        xp = flat.copy(); xp[i] += eps
        xm = flat.copy(); xm[i] -= eps
        gf[i] = (float(f(jnp.asarray(xp.reshape(x.shape)))) - float(f(jnp.asarray(xm.reshape(x.shape))))) / (2 * eps)
    return g


def check_grad(f, x, eps=1e-6, rtol=1e-5, atol=1e-8):
    """Assert jax.grad(f)(x) matches central differences (call under float64)."""
    x = jnp.asarray(x, dtype=jnp.float64)
    g = np.asarray(jax.grad(f)(x))
    fd = finite_difference_grad(f, x, eps)
    scale = max(np.abs(fd).max(), 1e-12)
    err = np.abs(g - fd).max() / scale
    assert err < rtol or np.allclose(g, fd, rtol=rtol, atol=atol), f"relative gradient error {err:.3e}\njax={g}\nfd={fd}"
    return err

"""Helpers shared by the tests: central finite differences in float64, fast-compiling jit, jit/vmap/grad checks."""
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


# These tests push tiny arrays, so XLA compilation, not execution, is what
# costs time on the CPU. Compiling with the backend (LLVM) optimizations off
# halves that and changes nothing beyond rounding.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fun):
    """``jax.jit(fun)`` for array / pytree arguments, compiled with ``_FAST_COMPILE``.

    Call it with concrete values only (it runs a compiled executable).
    """
    jitted = jax.jit(fun)
    cache = {}

    def call(*args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, bool(jax.config.jax_enable_x64), tuple((np.shape(v), str(getattr(v, "dtype", type(v)))) for v in leaves))
        if key not in cache:
            cache[key] = jitted.lower(*args).compile(_FAST_COMPILE)
        return cache[key](*args)

    return call


def check_jit_vmap_grad(f, x, *, x2_scale=1.01, seed=2):
    """``f`` under jit, under vmap over a leading batch, and its gradient vs central differences.

    Everything is compiled in one function (compilation dominates on the CPU);
    ``check_grad`` sees a ``custom_vjp`` wrapper whose value and gradient come
    from that compiled function.
    """
    x2 = x * x2_scale
    w = jnp.asarray(np.random.default_rng(seed).normal(size=np.shape(jax.eval_shape(f, x))))

    def g(p):
        return jnp.sum(f(p) * w)

    @fast_jit
    def everything(p):
        return f(p), jax.vmap(f)(jnp.stack([p, x2])), jax.value_and_grad(g)(p)

    y, yb, _ = everything(x)
    y2 = everything(x2)[0]  # same compiled function, unbatched value at x2
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_allclose(np.asarray(yb), np.stack([np.asarray(y), np.asarray(y2)]), rtol=1e-12, atol=1e-12)

    @jax.custom_vjp
    def g_compiled(p):
        return everything(p)[2][0]

    g_compiled.defvjp(lambda p: everything(p)[2], lambda grad, ct: (ct * grad,))
    check_grad(g_compiled, x)

"""Relaxed float atomic adds for the Pallas Triton kernels.

``jax.experimental.pallas.triton.atomic_add`` lowers to Triton's
``atomic_rmw`` with *acquire-release* semantics, i.e. every add is ordered
against the thread's other memory operations (PTX ``atom.acq_rel``, with
fences). A gradient scatter needs no ordering at all: only the sums matter,
and they are read after the kernel ends. With *relaxed* semantics the adds
become plain reductions (PTX ``red.relaxed``), which the memory system can
issue without waiting — on an H200 the fused backward's cotangent scatter
went several times faster (benchmarks/RESULTS.md).

:func:`atomic_add_relaxed` is a primitive of its own with the same abstract
evaluation and discharge rule as Pallas' ``atomic_rmw`` (so interpret mode
works too) and a Triton lowering that asks for relaxed semantics. It uses
Pallas' private lowering helpers; where they differ (another JAX version)
the lowering falls back to Pallas' own rule, i.e. acquire-release adds, the
same results a little slower.
"""
from __future__ import annotations

import logging

log = logging.getLogger("jaxrender")

try:  # private Pallas Triton APIs: everything here is optional
    from jax._src import core as _core
    from jax._src.pallas.triton import lowering as _lowering
    from jax._src.pallas.triton import primitives as _tprims
    from jax._src.state import discharge as _discharge
    from jax._src.state import indexing as _indexing
    from jax._src.state import primitives as _state_prims
    from jax._src.lib.triton import dialect as _tt
    from jax import tree_util as _tree_util

    _relaxed_add_p = _core.Primitive("jaxrender_atomic_add_relaxed")
    _relaxed_add_p.def_effectful_abstract_eval(_tprims._atomic_abstract_eval)
    _discharge.register_discharge_rule(_relaxed_add_p)(_tprims._atomic_rmw_discharge_rule)

    def _relaxed_rule(ctx, *args_flat, args_tree, atomic_type):
        try:
            block_info = ctx.block_infos[0]
            ptr, indexers, val, mask = args_tree.unflatten(args_flat)
            *_, value_aval, mask_aval = args_tree.unflatten(ctx.avals_in)
            indexers = list(indexers)
            if len(indexers) != 1 or not isinstance(indexers[0], _indexing.NDIndexer):
                raise NotImplementedError("one NDIndexer expected")
            ptr = _lowering._compute_pointers_from_indices(ptr, block_info, indexers[0])
            val = _lowering._ensure_ir_value(val, value_aval)
            if mask is not None:
                mask = _lowering._ensure_ir_value(mask, mask_aval)
            return _lowering._atomic_rmw(_tt.RMWOp.FADD, ptr, val, mask=mask,
                                         semantic=_tt.MemSemantic.RELAXED)
        except Exception as e:  # noqa: BLE001 - another JAX's internals: Pallas' own (acq_rel) rule
            log.warning("jaxrender: relaxed atomics unavailable (%s); using Pallas' atomic_add", e)
            return _tprims._atomic_lowering_rule(ctx, *args_flat, args_tree=args_tree, atomic_type=atomic_type)

    _lowering.register_lowering(_relaxed_add_p)(_relaxed_rule)
    _HAVE_RELAXED = True
except Exception:  # noqa: BLE001
    _HAVE_RELAXED = False


def atomic_add_relaxed(ref, idx, val, *, mask=None):
    """``ref[idx] += val`` atomically, with no ordering against other memory operations.

    Same arguments as ``jax.experimental.pallas.triton.atomic_add`` (float
    refs). Falls back to it where Pallas' private lowering API is not the one
    this module knows.
    """
    if not _HAVE_RELAXED:
        from jax.experimental.pallas import triton as plgpu
        return plgpu.atomic_add(ref, idx, val, mask=mask)
    x_ref, transforms = _state_prims.get_ref_and_transforms(ref, idx, "atomic_rmw")
    args_flat, args_tree = _tree_util.tree_flatten((x_ref, transforms, val, mask))
    return _relaxed_add_p.bind(*args_flat, args_tree=args_tree, atomic_type=_tprims.AtomicOpType.ADD)

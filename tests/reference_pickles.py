"""Pickles written the way the reference's own code wrote them (JAX 0.4): every array a
`jax._src.array._reconstruct_array(fun, args, arr_state, aval_state)` call with fun =
`numpy.core.multiarray._reconstruct`, dicts of plain containers, no `meta`."""
import pickle
import sys
import types

import numpy as np


class _Recon:  # stands for jax._src.array._reconstruct_array
    pass


class _Arr:
    def __init__(self, a):
        self.a = np.asarray(a)

    def __reduce__(self):
        fun, args, state = self.a.__reduce__()
        return (_Recon, (fun, args, state, {"weak_type": False}))


def _wrap(obj):
    if isinstance(obj, dict):
        return {k: _wrap(v) for k, v in obj.items()}
    return _Arr(obj)


def old_jax_pickle(tree):
    """Bytes of `tree` (nested dicts of arrays) pickled as JAX 0.4 pickled jax arrays. We pickle
    stand-in classes whose __reduce__ names those globals, then patch the module names."""
    _Recon.__module__, _Recon.__qualname__ = "jaxsrcarray", "_reconstruct_array"
    fake = types.ModuleType("jaxsrcarray")
    fake._reconstruct_array = _Recon
    sys.modules["jaxsrcarray"] = fake
    try:
        raw = pickle.dumps(_wrap(tree), protocol=2)
    finally:
        del sys.modules["jaxsrcarray"]
    raw = raw.replace(b"jaxsrcarray", b"jax._src.array")
    # numpy 2 pickles name numpy._core; JAX-0.4-era files name numpy.core
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")

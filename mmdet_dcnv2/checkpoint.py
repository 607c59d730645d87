"""Let ``torch.load``'s default ``weights_only=True`` (torch >= 2.6) read mmengine/mmdet 3.x checkpoints.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means the
restricted unpickler, which rejects what every Runner-written checkpoint holds besides tensors: the
message hub's ``HistoryBuffer`` (with numpy arrays, and ``getattr(HistoryBuffer, 'min')``-style
references to its statistics methods) and numpy scalars in ``meta``. So ``load_from=`` and
``resume=True`` fail on them. Rather than turning the protection off (``weights_only=False``), we
allow-list exactly the types found in real mmengine-written checkpoints -- found by loading them
(``tests/test_checkpoint_safe_globals.py`` does so), not guessed:

- numpy's array and scalar reconstructors, ``numpy.ndarray``, ``numpy.dtype`` and the concrete
  dtype classes of bool, int32/64 and float32/64 (both ``numpy.core`` and ``numpy._core`` spellings,
  so checkpoints written under numpy 1.x load under numpy 2.x);
- ``mmengine.logging.HistoryBuffer``;
- ``getattr``, but only as a restricted stand-in that returns HistoryBuffer's registered statistics
  methods and refuses anything else.

``torch.serialization.add_safe_globals`` is process-wide: after ``import mmdet_dcnv2`` every
``torch.load(weights_only=True)`` in the process accepts these types (and resolves ``getattr`` to
the restricted stand-in). None of them runs code on load beyond building arrays and setting a
HistoryBuffer's attributes.
"""

import pickle
from typing import Any, List, Tuple

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# HistoryBuffer's arrays are float64/int64; metadata scalars (scores, counters, flags) the rest.
_SCALAR_DTYPES = ("bool", "int32", "int64", "float32", "float64")


# HistoryBuffer's built-in statistics; HistoryBuffer.register_statistics adds to _statistics_methods.
_HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_statistic(owner: Any, name: str):
    """``getattr`` as a HistoryBuffer pickle uses it, for its statistics methods only."""
    allowed = set(_HISTORY_BUFFER_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if owner is HistoryBuffer and name in allowed:
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f"weights_only load: getattr({owner!r}, {name!r}) is not allowed; mmdet_dcnv2 allows getattr only "
        "for mmengine HistoryBuffer statistics methods")


def _numpy_multiarray():
    return np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


def safe_globals() -> List[Tuple[Any, str]]:
    """The allow-list, as (object, pickled name) pairs for ``torch.serialization.add_safe_globals``."""
    multiarray = _numpy_multiarray()
    entries = [(_history_buffer_statistic, "builtins.getattr"),
               (HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
               (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    for name in _SCALAR_DTYPES:
        dtype_class = type(np.dtype(name))  # numpy.dtypes.Float64DType etc. (numpy.dtype[float64] in 1.x)
        entries.append((dtype_class, f"{dtype_class.__module__}.{dtype_class.__qualname__}"))
    return entries


def allow_mmengine_checkpoints() -> None:
    """Add :func:`safe_globals` to torch's process-wide weights_only allow-list (idempotent)."""
    torch.serialization.add_safe_globals(safe_globals())


allow_mmengine_checkpoints()

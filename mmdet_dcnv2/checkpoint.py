"""Let ``torch.load``'s default ``weights_only=True`` (torch >= 2.6) read mmengine/mmdet 3.x checkpoints.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, so ``load_from=`` and ``resume=True``
fail on every Runner-written checkpoint: the message hub's ``HistoryBuffer`` (numpy arrays,
``getattr(HistoryBuffer, 'min')``-style references) and numpy scalars in ``meta``. Rather than
``weights_only=False``, :func:`safe_globals` allow-lists exactly the types found by loading real
checkpoints (``tests/test_checkpoint_safe_globals.py``), with ``getattr`` replaced by a stand-in
that returns HistoryBuffer's statistics methods only. ``add_safe_globals`` is process-wide (see
docs/global_effects.md); :func:`disallow_mmengine_checkpoints` undoes it.
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
        "for mmengine HistoryBuffer statistics methods"
    )


def _numpy_multiarray():
    return np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


def safe_globals() -> List[Tuple[Any, str]]:
    """The allow-list, as (object, pickled name) pairs for ``torch.serialization.add_safe_globals``."""
    multiarray = _numpy_multiarray()
    entries = [
        (_history_buffer_statistic, "builtins.getattr"),
        (HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    for name in _SCALAR_DTYPES:
        dtype_class = type(np.dtype(name))  # numpy.dtypes.Float64DType etc. (numpy.dtype[float64] in 1.x)
        entries.append((dtype_class, f"{dtype_class.__module__}.{dtype_class.__qualname__}"))
    return entries


def allow_mmengine_checkpoints() -> None:
    """Add :func:`safe_globals` to torch's process-wide weights_only allow-list (idempotent)."""
    torch.serialization.add_safe_globals(safe_globals())


def disallow_mmengine_checkpoints() -> None:
    """Take :func:`safe_globals` off the allow-list again; entries others added stay."""
    ours = safe_globals()
    others = [entry for entry in torch.serialization.get_safe_globals() if entry not in ours]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(others)


allow_mmengine_checkpoints()

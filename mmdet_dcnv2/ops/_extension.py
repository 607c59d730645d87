"""Loads the compiled operator library and reports what it was built with."""

import os

import torch

from ._build_record import parse_build_info


def _source_tree_hint():
    """One line naming the fix when this package is the source tree (no compiled _C) rather than an install."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(repo, "setup.py")):
        return ""
    return (
        f" This is the source tree at {repo}, which has no compiled extension: import the installed "
        "package instead by running Python with -P (`.venv/bin/python -P ...`) or from another directory."
    )


try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.mmdet_dcnv2.*)
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"mmdet_dcnv2's compiled extension (mmdet_dcnv2._C) could not be loaded.{_source_tree_hint()} "
        "To build it: `pip install --no-build-isolation .` from the source tree, in the environment whose "
        f"torch will run it (`make install` does this into .venv). (Python said: {error})"
    ) from error


def build_info():
    """What the extension was compiled with: 'cuda' (whether CUDA kernels were compiled in, not whether
    a GPU is present), 'cuda_version' (None without CUDA), 'cuda_arch_list' (the architectures compiled,
    e.g. ['8.0', '9.0+PTX']; [] without CUDA), 'torch_version'; plus 'runtime_torch_version'."""
    info = parse_build_info(torch.ops.mmdet_dcnv2._build_info())
    info["runtime_torch_version"] = torch.__version__
    return info


def column_budget():
    """Bytes of column buffer the convolution may use at once (the batch is processed in chunks)."""
    return torch.ops.mmdet_dcnv2._column_budget(-1)


def set_column_budget(num_bytes):
    """Sets the column-buffer budget in bytes and returns the previous one. One image is always
    processed at a time at least, whatever the budget."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"num_bytes must be a non-negative int, got {num_bytes!r}")
    return torch.ops.mmdet_dcnv2._column_budget(num_bytes)

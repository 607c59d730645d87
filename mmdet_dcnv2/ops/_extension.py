"""Loads the compiled operator library and reports what it was built with."""

import torch

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.mmdet_dcnv2.*)
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "mmdet_dcnv2's compiled extension (mmdet_dcnv2._C) could not be loaded: "
        f"{error}. Build it with `pip install --no-build-isolation .` from the source tree, in the "
        "environment whose torch will run it (set MMDET_DCNV2_WITH_CUDA=1 and CUDA_HOME for CUDA kernels). "
        "If you are running from the source tree, make sure the installed package is imported instead."
    ) from error


def build_info():
    """What the extension was compiled with: {'cuda', 'cuda_version', 'cuda_arch_list', 'torch_version'}.

    'cuda' says whether CUDA kernels were compiled in, not whether a GPU is present.
    """
    fields = dict(item.split("=", 1) for item in torch.ops.mmdet_dcnv2._build_info().split(";"))
    return {
        "cuda": fields["cuda"] == "1",
        "cuda_version": fields["cuda_version"] or None,
        "cuda_arch_list": fields["cuda_arch_list"] or None,
        "torch_version": fields["torch_version"],
        "runtime_torch_version": torch.__version__,
    }


def column_budget():
    """Bytes of column buffer the convolution may use at once (the batch is processed in chunks)."""
    return torch.ops.mmdet_dcnv2._column_budget(-1)


def set_column_budget(num_bytes):
    """Sets the column-buffer budget in bytes and returns the previous one. One image is always
    processed at a time at least, whatever the budget."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"num_bytes must be a non-negative int, got {num_bytes!r}")
    return torch.ops.mmdet_dcnv2._column_budget(num_bytes)

"""Shared fixtures, and the CUDA marks (``from conftest import DEVICES, requires_cuda``).

The case protocol and the random-value helpers live in ``cases.py``. Nothing here imports the
compiled extension at import time, so the reference-only tests run even before (or without) a build.
"""

import functools

import pytest
import torch

SEED = 20190218  # fixed: a failure must reproduce


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    """A CUDA device is visible *and* the extension was compiled with CUDA kernels."""
    if not torch.cuda.is_available():
        return False
    try:
        from mmdet_dcnv2.ops import build_info
    except ImportError:
        return False
    return bool(build_info()["cuda"])


_CUDA_REASON = "needs a CUDA device and a CUDA build of mmdet_dcnv2"
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not cuda_usable(), reason=_CUDA_REASON))


def requires_cuda(test):
    """Marks ``test`` (function or class) as a CUDA test: tagged `cuda`, skipped without CUDA."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


# Parametrisation over devices: `@pytest.mark.parametrize("device", DEVICES)`.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS, id="cuda")]


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test, restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def mmdet_scope():
    """mmdet's modules registered and its default scope current, as under the Runner and mmdet's tools
    (so that stock names resolve through mmdet's registry, where mmdet_dcnv2 registers its layers)."""
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmdet"):
        yield


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, fresh for every test (tests do not depend on their order)."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(scope="session")
def pretrained_cache(tmp_path_factory):
    """A tiny pretrained shapes backbone (3 steps of the real command) in a private cache, which
    MMDET_DCNV2_CACHE points at for the whole session (subprocesses included): the benchmark's weights
    are generated, never committed, and the real ones take ~12 min to make."""
    import os

    pytest.importorskip("mmdet")
    from mmdet_dcnv2.tools.pretrain_backbone import pretrain

    root = tmp_path_factory.mktemp("mmdet_dcnv2_cache")
    previous = os.environ.get("MMDET_DCNV2_CACHE")
    os.environ["MMDET_DCNV2_CACHE"] = str(root)
    from mmdet_dcnv2.benchmark import pretrained

    pretrain(pretrained.default_path(), num_samples=32, num_holdout=8, steps=3, batch_size=8, threads=1)
    yield pretrained.default_path()
    if previous is None:
        os.environ.pop("MMDET_DCNV2_CACHE", None)
    else:
        os.environ["MMDET_DCNV2_CACHE"] = previous

"""The installed build: its build record parses whatever the build was, and every public function of
``mmdet_dcnv2.ops`` runs on it.

A build record that used ';' both inside the CUDA architecture list and between fields once broke
`make install` for everyone with a CUDA toolkit; these tests parse synthetic records of every shape.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import mmdet_dcnv2.ops as ops
from mmdet_dcnv2.ops._build_record import arch_list_from_gencode_flags, parse_arch_list, parse_build_info
from reference import deform_roi_pool_ref, modulated_deform_conv2d_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(**fields):
    base = {"cuda": "1", "cuda_version": "13.0", "cuda_arch_list": "9.0", "torch_version": "2.14.1"}
    return json.dumps({**base, **fields})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX", ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0+PTX"]),
        ("8.0 9.0+PTX", ["8.0", "9.0+PTX"]),
        (" 8.0;  9.0 ;", ["8.0", "9.0"]),
        ("9.0", ["9.0"]),
        ("", []),
    ],
)
def test_parse_arch_list(text, expected):
    assert parse_arch_list(text) == expected


@pytest.mark.parametrize("arch_list", ["7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX", "8.0 9.0+PTX", "9.0", 'odd";=,\\value'])
def test_build_record_fields_stay_apart_whatever_they_hold(arch_list):
    info = parse_build_info(record(cuda_arch_list=arch_list))
    assert info == {
        "cuda": True,
        "cuda_version": "13.0",
        "cuda_arch_list": parse_arch_list(arch_list),
        "torch_version": "2.14.1",
    }


def test_cpu_only_build_record():
    info = parse_build_info(record(cuda="0", cuda_version="", cuda_arch_list=""))
    assert info == {"cuda": False, "cuda_version": None, "cuda_arch_list": [], "torch_version": "2.14.1"}


@pytest.mark.parametrize(
    "text",
    [
        "cuda=1;cuda_version=13.0;cuda_arch_list=7.5;8.0;torch_version=2.14.1",  # the old format
        json.dumps({"cuda": "1"}),  # fields missing
        json.dumps({"cuda": 1, "cuda_version": "", "cuda_arch_list": "", "torch_version": "2.14.1"}),  # not a str
        "[]",
    ],
)
def test_malformed_build_record_is_refused_clearly(text):
    with pytest.raises(ValueError, match="build record"):
        parse_build_info(text)


def test_arch_list_from_gencode_flags():
    flags = [
        "-gencode=arch=compute_120,code=compute_120",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    assert arch_list_from_gencode_flags(flags) == ["7.5", "9.0", "9.0a", "10.0", "12.0+PTX"]
    assert arch_list_from_gencode_flags([]) == []
    with pytest.raises(ValueError, match="gencode"):
        arch_list_from_gencode_flags(["-O3"])


def test_installed_build_info():
    info = ops.build_info()
    assert set(info) == {"cuda", "cuda_version", "cuda_arch_list", "torch_version", "runtime_torch_version"}
    # the extension must have been compiled against the torch that runs it (ABI)
    assert torch.__version__.startswith(info["torch_version"])
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
        assert all(arch[0].isdigit() for arch in info["cuda_arch_list"]), info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None and info["cuda_arch_list"] == []


def _call_conv():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    offset = torch.rand(1, 18, 4, 4, generator=gen, dtype=torch.float64) - 0.5
    mask = torch.rand(1, 9, 4, 4, generator=gen, dtype=torch.float64)
    weight = torch.rand(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    out = ops.modulated_deform_conv2d(x, offset, mask, weight, None, 1, 1)
    torch.testing.assert_close(out, modulated_deform_conv2d_ref(x, offset, mask, weight, None, 1, 1))


def _call_pool():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 6, 6, generator=gen, dtype=torch.float64)
    rois = torch.tensor([[0, 0.5, 1.0, 4.0, 5.0]], dtype=torch.float64)
    offset = torch.rand(1, 2, 2, 2, generator=gen, dtype=torch.float64) - 0.5
    out = ops.deform_roi_pool(x, rois, offset, 2, 1.0, 2, 0.1)
    torch.testing.assert_close(out, deform_roi_pool_ref(x, rois, offset, 2, 1.0, 2, 0.1))


def _call_column_budget():
    budget = ops.column_budget()
    assert isinstance(budget, int) and budget > 0
    assert ops.set_column_budget(budget // 2) == budget
    try:
        assert ops.column_budget() == budget // 2
    finally:
        ops.set_column_budget(budget)


# One call per public function; a new public function without an entry here fails the test below.
PUBLIC_CALLS = {
    "build_info": ops.build_info,
    "column_budget": _call_column_budget,
    "set_column_budget": _call_column_budget,
    "modulated_deform_conv2d": _call_conv,
    "deform_roi_pool": _call_pool,
}


def test_every_public_function_of_the_installed_ops_runs():
    assert sorted(ops.__all__) == sorted(PUBLIC_CALLS), "add a call for each public function of mmdet_dcnv2.ops"
    for name in ops.__all__:
        PUBLIC_CALLS[name]()


def test_installed_package_imports_from_another_directory(tmp_path):
    code = "import mmdet_dcnv2, mmdet_dcnv2.ops as ops; print(ops.build_info()['torch_version'])"
    done = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # (mmengine's logger may print the registry override's line to stdout first)
    assert done.stdout.strip().splitlines()[-1] == ops.build_info()["torch_version"]


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "setup.py")), reason="needs the source tree")
def test_importing_the_source_tree_names_the_fix():
    # `python -c` from the repository root puts the source tree (no compiled _C) first on sys.path.
    if glob.glob(os.path.join(REPO, "mmdet_dcnv2", "_C*.so")):
        pytest.skip("the source tree holds an in-place build")
    done = subprocess.run([sys.executable, "-c", "import mmdet_dcnv2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0
    assert "source tree" in done.stderr and "-P" in done.stderr, done.stderr

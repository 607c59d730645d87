"""setup.py's choice of CUDA kernels (issue 15, finding 6), evaluated without building anything:
setup.py runs with setuptools.setup replaced by a recorder, against a fake toolkit (an `nvcc` script
that prints a release number)."""

import os
import pathlib
import runpy
import stat

import pytest
import setuptools
import torch
from torch.utils import cpp_extension

REPO = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch (torch.version.cuda)")


def fake_toolkit(tmp_path, release):
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path / "cuda")


def run_setup(monkeypatch, cuda_home):
    """setup.py's extension, as it would be built with CUDA_HOME=cuda_home in automatic mode."""
    if not (REPO / "setup.py").exists():
        pytest.skip("needs the source tree (setup.py)")
    recorded = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setenv("MMDET_DCNV2_WITH_CUDA", "auto")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("CPATH", os.environ.get("CPATH", ""))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="setup")
    (extension,) = recorded["ext_modules"]
    return extension


def test_toolkit_of_another_major_version_falls_back_to_cpu(tmp_path, monkeypatch, capsys):
    """Automatic mode with a toolkit torch's BuildExtension would refuse: a CPU-only build and a
    message saying why, not a failed install."""
    other_major = int(torch.version.cuda.split(".")[0]) + 1
    extension = run_setup(monkeypatch, fake_toolkit(tmp_path, f"{other_major}.0"))
    assert not any(source.endswith(".cu") for source in extension.sources)
    out = capsys.readouterr().out
    assert f"CUDA {other_major}.0" in out and "building without CUDA kernels" in out


def test_matching_toolkit_builds_cuda_without_duplicate_flags(tmp_path, monkeypatch):
    """A toolkit of torch's major version builds the CUDA kernels; the nvcc flags do not repeat what
    torch's cpp_extension already passes (--expt-relaxed-constexpr)."""
    extension = run_setup(monkeypatch, fake_toolkit(tmp_path, torch.version.cuda))
    assert any(source.endswith(".cu") for source in extension.sources)
    nvcc_flags = extension.extra_compile_args["nvcc"] + cpp_extension.COMMON_NVCC_FLAGS
    assert nvcc_flags.count("--expt-relaxed-constexpr") == 1

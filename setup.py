"""Builds the mmdet_dcnv2._C extension (everything else is in pyproject.toml).

CPU kernels are always built. CUDA kernels are built when a CUDA toolkit is found -- not when a GPU
is visible, so a machine with nvcc and no GPU still cross-compiles them -- or as forced by
MMDET_DCNV2_WITH_CUDA=1 (0 turns them off; default auto). With no GPU to detect and no
TORCH_CUDA_ARCH_LIST given, a default list of architectures is compiled.
"""

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import torch
from setuptools import setup
from setuptools.command.build_py import build_py
from torch.utils import cpp_extension

# The build record's helpers, loaded by path: the package itself cannot be imported before it is built.
HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "_build_record", os.path.join(HERE, "mmdet_dcnv2", "ops", "_build_record.py")
)
build_record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_record)


def default_cuda_arch_list(cuda_version):
    """Architectures to compile for when no GPU can be asked: Turing to Hopper (H100/H200), plus
    Blackwell where the toolkit knows it (CUDA >= 12.8); +PTX lets newer GPUs JIT the last one.
    (CUDA 13 dropped sm_50-72, so the list starts at 7.5.)"""
    major, minor = (int(v) for v in cuda_version.split(".")[:2])
    arches = ["7.5", "8.0", "8.6", "8.9", "9.0"]
    if (major, minor) >= (12, 8):
        arches += ["10.0", "12.0"]
    return ";".join(arches) + "+PTX"


@functools.lru_cache(maxsize=None)  # asked by want_cuda() and extension(): run nvcc once
def nvcc_version():
    """The toolkit's release (e.g. '13.0'), which is what compiles the kernels."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release (\d+\.\d+)", out).group(1)


def compiled_arch_list():
    """The architectures the CUDA kernels are compiled for, as recorded in build_info(): read from the
    nvcc flags torch derives (from TORCH_CUDA_ARCH_LIST, or the visible GPUs when it is unset), so the
    record is what was compiled, not how it was asked for."""
    try:
        flags = cpp_extension._get_cuda_arch_flags()  # what BuildExtension passes to nvcc
    except AttributeError:  # torch moved its private helper: fall back to the list as given
        return build_record.parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    return build_record.arch_list_from_gencode_flags(flags)


def want_cuda():
    choice = os.environ.get("MMDET_DCNV2_WITH_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        sys.exit(f"MMDET_DCNV2_WITH_CUDA must be auto, 0 or 1, got {choice!r}")
    found = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if choice == "1" and not found:
        sys.exit("MMDET_DCNV2_WITH_CUDA=1 but no CUDA toolkit (CUDA_HOME/nvcc) or no CUDA build of torch was found")
    if choice == "auto" and found:
        # torch's BuildExtension refuses a toolkit whose major version differs from torch's CUDA: in
        # automatic mode that is no reason to fail the install, only to leave CUDA out.
        toolkit, torch_cuda = nvcc_version(), torch.version.cuda
        if toolkit.split(".")[0] != torch_cuda.split(".")[0]:
            print(
                f"mmdet_dcnv2: the CUDA toolkit at {cpp_extension.CUDA_HOME} is CUDA {toolkit}, but torch was "
                f"built with CUDA {torch_cuda} (major versions must match): building without CUDA kernels. "
                f"Point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit to build them.",
                flush=True,
            )
            return False
    return found if choice == "auto" else choice == "1"


def nvidia_wheel_include_dirs():
    """Headers torch's CUDA includes but a minimal toolkit may lack (cusparse.h), from torch's nvidia wheels."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return [d for d in dirs if os.path.exists(os.path.join(d, "cusparse.h"))]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    torch_version = torch.__version__.split("+")[0]
    macros = [("MMDET_DCNV2_TORCH_VERSION", f'"{torch_version}"')]
    # BuildExtension adds the C++ standard the running torch needs (C++20 for torch 2.14).
    cxx_flags = ["-O3", "-fopenmp"]
    with_cuda = want_cuda()
    summary = "mmdet_dcnv2: building CPU kernels"
    if not with_cuda:
        print(summary + " only (no CUDA toolkit found or MMDET_DCNV2_WITH_CUDA=0)", flush=True)
        return cpp_extension.CppExtension(
            "mmdet_dcnv2._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )

    cuda_version = nvcc_version()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(cuda_version)
    arch_list = ";".join(compiled_arch_list())
    cusparse_home = os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")
    if not os.path.exists(cusparse_home):
        extra = nvidia_wheel_include_dirs()
        os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH")] + extra))
    macros += [
        ("MMDET_DCNV2_WITH_CUDA", None),
        ("MMDET_DCNV2_CUDA_VERSION", f'"{cuda_version}"'),
        ("MMDET_DCNV2_CUDA_ARCH_LIST", f'"{arch_list}"'),
    ]
    print(
        f"{summary} and CUDA {cuda_version} kernels for {arch_list} (nvcc from {cpp_extension.CUDA_HOME})", flush=True
    )
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return cpp_extension.CUDAExtension(
        "mmdet_dcnv2._C",
        sources,
        define_macros=macros,
        # (torch's cpp_extension already passes --expt-relaxed-constexpr)
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


# openmim finds a package's configs and tools under <package>/.mim, as mmdet ships them; the repo's
# configs/, tools/ and model-index.yml are their source.
MIM_FILES = ["configs", "tools", "model-index.yml"]


class BuildPyWithMim(build_py):
    def run(self):
        super().run()
        mim_dir = os.path.join(self.build_lib, "mmdet_dcnv2", ".mim")
        for name in MIM_FILES:
            src, dst = os.path.join(HERE, name), os.path.join(mim_dir, name)
            if os.path.isdir(src):
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif os.path.isfile(src):
                os.makedirs(mim_dir, exist_ok=True)
                shutil.copy2(src, dst)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithMim},
    # torch's cpp_extension compiles py_limited_api extensions against the 3.10 stable ABI.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

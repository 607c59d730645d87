"""Builds the extension (mmdet_dcnv2/_C) with torch.utils.cpp_extension.load, outside setuptools.

For `make gpu-check` on a bare GPU machine (no pip, no network, and a setuptools that may be too old
for pyproject.toml's metadata) and for `make sanitize`. The extension's sources, macros and flags are
taken from setup.py itself (run with setuptools.setup replaced by a recorder, so nothing of
setuptools' build runs; MMDET_DCNV2_WITH_CUDA chooses as for pip), compiled by torch's ninja-based
loader with MAX_JOBS jobs, and the library is copied to --target (default mmdet_dcnv2/_C.so, where
`import mmdet_dcnv2` from the source tree finds it).

    MMDET_DCNV2_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python scripts/build_extension.py
    MMDET_DCNV2_WITH_CUDA=0 python scripts/build_extension.py --sanitize --build-dir build/sanitize \
        --target build/sanitize/pkg/mmdet_dcnv2/_C.so
"""

import argparse
import os
import pathlib
import runpy
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def extension_from_setup():
    import setuptools

    recorded = {}
    setuptools.setup = lambda **kwargs: recorded.update(kwargs)
    os.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="setup")
    (extension,) = recorded["ext_modules"]
    return extension


def define_flag(name, value):
    # ninja runs the compiler through a shell: single quotes keep a value's double quotes and spaces.
    return f"-D{name}" if value is None else f"-D{name}='{value}'"


# AddressSanitizer + UndefinedBehaviorSanitizer, float-cast-overflow included (a NaN or huge float
# converted to an integer); every finding stops the process.
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default="build/gpu_check")
    parser.add_argument("--target", default="mmdet_dcnv2/_C.so")
    parser.add_argument("--sanitize", action="store_true", help="compile and link with ASan + UBSan (CPU code)")
    parser.add_argument("--require-cuda", action="store_true", help="fail unless setup.py chose the CUDA kernels")
    args = parser.parse_args()
    build_dir, target = REPO / args.build_dir, REPO / args.target

    from torch.utils import cpp_extension

    started = time.time()
    extension = extension_from_setup()
    if args.require_cuda and not any(source.endswith(".cu") for source in extension.sources):
        sys.exit("build_extension: setup.py chose a CPU-only build (see its message above)")
    defines = [define_flag(name, value) for name, value in extension.define_macros]
    sanitize = SANITIZE_FLAGS if args.sanitize else []
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="_C",
        sources=[str(REPO / source) for source in extension.sources],
        extra_cflags=extension.extra_compile_args["cxx"] + defines + sanitize,
        extra_cuda_cflags=extension.extra_compile_args.get("nvcc", []) + defines,
        extra_ldflags=extension.extra_link_args + sanitize[:1],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("VERBOSE") == "1",
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_dir / "_C.so", target)
    print(
        f"build_extension: {target} built in {time.time() - started:.0f} s "
        f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})",
        flush=True,
    )


if __name__ == "__main__":
    main()

"""What a benchmark ran on: CPU vendor/family/model, the ISA flags that decide our code paths, the BLAS
and oneDNN builds torch carries, the thread count, and the GEMM route and loop ISA our CPU op takes.

Printed at the top of every benchmark so that a number never travels without its machine.
"""

import os
import platform
import re

import torch

# Flags that decide which kernels run: ours (avx2/fma/avx512*), oneDNN's bf16/AMX paths.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
)
# Environment variables that change a CPU path (MKL, oneDNN, ours); printed when set.
PATH_ENV = (
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MMDET_DCNV2_CPU_GEMM",
    "MMDET_DCNV2_CPU_ISA",
    "OMP_NUM_THREADS",
)


def cpu_description():
    """'GenuineIntel family 6 model 207 (Intel(R) Xeon(R) Processor), 2 CPUs; flags: ...' on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()

    def field(name):
        m = re.search(rf"^{name}\s*:\s*(.*)$", text, re.M)
        return m.group(1).strip() if m else "?"

    flags = set(field("flags").split())
    have = [f for f in ISA_FLAGS if f in flags]
    cpus = len(re.findall(r"^processor\s*:", text, re.M))
    return (
        f"{field('vendor_id')} family {field('cpu family')} model {field('model')} ({field('model name')}), "
        f"{cpus} CPUs; ISA: {' '.join(have) or 'baseline only'}"
    )


def library_versions():
    """MKL and oneDNN versions from torch's build configuration."""
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    dnnl = re.search(r"MKL-DNN v([\d.]+)", config)
    return (
        f"MKL {mkl.group(1) if mkl else 'none'}, oneDNN {dnnl.group(1) if dnnl else 'none'}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def our_paths(dtypes=(torch.float32, torch.bfloat16)):
    """The CPU GEMM route per dtype and the ISA of our sampling loops ('used/supported'), or why not."""
    try:
        import mmdet_dcnv2.ops  # noqa: F401  (loads the extension)

        routes = ", ".join(
            f"{str(d).replace('torch.', '')}: {torch.ops.mmdet_dcnv2._cpu_gemm_route(d)}" for d in dtypes
        )
        return f"GEMM route {routes}; sampling loops {torch.ops.mmdet_dcnv2._cpu_isa()}"
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"(our op's paths unavailable: {e})"


def describe(threads=None):
    """Lines describing the machine and the paths taken, for the top of a benchmark's output."""
    env = [f"{k}={os.environ[k]}" for k in PATH_ENV if os.environ.get(k)]
    lines = [
        f"CPU: {cpu_description()}",
        f"torch {torch.__version__}: {library_versions()}; threads: {threads or torch.get_num_threads()}",
        f"mmdet_dcnv2: {our_paths()}",
    ]
    if env:
        lines.append("environment: " + " ".join(env))
    try:
        lines.append(f"load average (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    except OSError:
        pass
    return lines

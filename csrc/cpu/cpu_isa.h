// What the x86 CPU we run on offers our CPU code: its vendor and the vector instruction sets our
// loops are built for. Decided once per process from CPUID (never by timing), so a machine always
// takes the same code path and its results are bitwise repeatable at a fixed thread count.
#pragma once

namespace mmdet_dcnv2 {

// Levels of the loops in cpu/deform_conv_kernel.cpp: x86-64 baseline (SSE2), AVX2 + FMA, and
// AVX-512 (F, BW, VL, DQ -- what x86-64-v4 names).
enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The highest level this CPU supports (kBaseline off x86-64).
CpuIsa cpu_isa_supported();

// The level MMDET_DCNV2_CPU_ISA (baseline, avx2, avx512) asks for, capped by what the CPU supports;
// the supported level where unset. Read on every call (cheap), so a test can change it; an unknown
// value raises.
CpuIsa cpu_isa();

// Whether MMDET_DCNV2_CPU_ISA is set: then every loop runs the level cpu_isa() names, even one not
// selected by default -- for testing and measuring each build on one machine.
bool cpu_isa_overridden();

const char* cpu_isa_name(CpuIsa isa);

// True on Intel CPUs, where MKL runs its full-width kernels (it takes a generic path elsewhere).
bool cpu_is_intel();

}  // namespace mmdet_dcnv2

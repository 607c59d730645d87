// CPU feature detection and the ISA override (see cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace mmdet_dcnv2 {

CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) && defined(__GNUC__)
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
      return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
    return CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

CpuIsa cpu_isa() {
  const CpuIsa supported = cpu_isa_supported();
  const char* env = std::getenv("MMDET_DCNV2_CPU_ISA");
  if (env == nullptr || *env == '\0') return supported;
  CpuIsa wanted;
  if (std::strcmp(env, "baseline") == 0) {
    wanted = CpuIsa::kBaseline;
  } else if (std::strcmp(env, "avx2") == 0) {
    wanted = CpuIsa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    wanted = CpuIsa::kAvx512;
  } else {
    TORCH_CHECK_VALUE(false, "MMDET_DCNV2_CPU_ISA must be baseline, avx2 or avx512, got '", env, "'");
  }
  // A cap, never a promotion: asking for more than the CPU has would crash on an illegal instruction.
  return static_cast<int>(wanted) < static_cast<int>(supported) ? wanted : supported;
}

bool cpu_isa_overridden() {
  const char* env = std::getenv("MMDET_DCNV2_CPU_ISA");
  return env != nullptr && *env != '\0';
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

bool cpu_is_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

}  // namespace mmdet_dcnv2

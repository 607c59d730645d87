// Test hooks of the host-run build (../host_emulation.h): set the emulation's knobs and read back the
// launches it ran. Registered in the host-run library's own namespace only.
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "../host_emulation.h"

namespace mmdet_dcnv2 {
namespace {

// Sets the knobs, clears the launch log and restarts the launch count (so the same seed and the
// same sequence of launches give the same block orders). max_blocks <= 0: no cap beyond the CUDA build's.
void set_emulation(int64_t seed, int64_t max_blocks, int64_t multiprocessors, bool force_wide_index) {
  TORCH_CHECK_VALUE(multiprocessors >= 1, "multiprocessors must be >= 1, got ", multiprocessors);
  auto& k = host_emulation::knobs();
  k.seed = static_cast<uint64_t>(seed);
  k.max_blocks = max_blocks;
  k.multiprocessors = multiprocessors;
  k.force_wide_index = force_wide_index;
  host_emulation::launch_log().clear();
  host_emulation::launch_counter() = 0;
}

// One line per launch since the last set_emulation: "<kernel> <grid> <items> <index bits>".
std::vector<std::string> emulation_log() {
  std::vector<std::string> lines;
  for (const auto& r : host_emulation::launch_log()) {
    std::ostringstream line;
    line << r.kernel << ' ' << r.grid << ' ' << r.items << ' ' << r.index_bits;
    lines.push_back(line.str());
  }
  return lines;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdet_dcnv2_hostcuda, m) {
  m.def("_emulation(int seed, int max_blocks, int multiprocessors, bool force_wide_index) -> ()", &set_emulation);
  m.def("_emulation_log() -> str[]", &emulation_log);
}

}  // namespace mmdet_dcnv2

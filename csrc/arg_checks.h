// Argument-check helpers shared by the ops' host code: every error names the argument, what was
// expected and what was got.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace mmdet_dcnv2 {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

inline void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, name, " must have 2 elements (height, width), got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, name, " must be >= ", min_value, ", got ", shape_str(v));
}

inline void check_same_kind(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type(), name, " must have the dtype of input (",
                    input.scalar_type(), "), got ", t.scalar_type(),
                    " (the functional API mmdet_dcnv2.ops casts for you)");
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " must be on the device of input (", input.device(), "), got ",
                    t.device());
}

}  // namespace mmdet_dcnv2

// Raw pointers of a tensor that may be absent: an optional operand (mask, RoI offsets) or a gradient
// that was not asked for is an undefined tensor, and the kernels take it as a null pointer (and skip
// that operand or output).
#pragma once

#include <ATen/core/Tensor.h>

namespace mmdet_dcnv2 {

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace mmdet_dcnv2

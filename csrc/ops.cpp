// The mmdet_dcnv2 operator library: schemas (declared once, here) and build information. Backends
// only add implementations (cpu/, cuda/), each starting from the operands that deform_conv.cpp and
// deform_roi_pool.cpp check (arg_checks.h holds their shared helpers); autograd and fake kernels are
// registered from Python (mmdet_dcnv2/ops).
#include <Python.h>
#include <torch/library.h>

#include <sstream>

#include "deform_conv.h"

// Importing mmdet_dcnv2._C loads this library (and so runs the registrations below). No Python API
// is bound here: everything is reached through torch.ops.mmdet_dcnv2.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace mmdet_dcnv2 {

namespace {

// A JSON object of strings. JSON, not "key=value;...": a field's value may hold any character (the
// CUDA architecture list is itself ';'-separated), and JSON's escaping keeps fields apart whatever
// they contain. Parsed by mmdet_dcnv2.ops._extension.parse_build_info.
std::string json_string(const std::string& value) {
  std::ostringstream s;
  s << '"';
  for (const unsigned char c : value) {
    if (c == '"' || c == '\\') {
      s << '\\' << c;
    } else if (c < 0x20) {
      const char* hex = "0123456789abcdef";
      s << "\\u00" << hex[c >> 4] << hex[c & 0xf];
    } else {
      s << c;
    }
  }
  s << '"';
  return s.str();
}

std::string build_info() {
#ifdef MMDET_DCNV2_WITH_CUDA
  const std::string cuda = "1", cuda_version = MMDET_DCNV2_CUDA_VERSION, arch_list = MMDET_DCNV2_CUDA_ARCH_LIST;
#else
  const std::string cuda = "0", cuda_version, arch_list;
#endif
  return "{\"cuda\": " + json_string(cuda) + ", \"cuda_version\": " + json_string(cuda_version) +
         ", \"cuda_arch_list\": " + json_string(arch_list) +
         ", \"torch_version\": " + json_string(MMDET_DCNV2_TORCH_VERSION) + "}";
}

int64_t column_budget_op(int64_t new_value) { return column_budget_bytes(new_value); }

}  // namespace

TORCH_LIBRARY(mmdet_dcnv2, m) {
  m.def(
      "modulated_deform_conv2d(Tensor input, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int deform_groups) -> Tensor");
  // output_mask: [grad of input, grads of offset and mask, grads of weight and bias]. Grads not asked
  // for (and those of an absent mask or bias) come back as empty tensors.
  m.def(
      "modulated_deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor? mask, "
      "Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int deform_groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, int[2] output_size, float spatial_scale, "
      "int sampling_ratio, float gamma) -> Tensor");
  // output_mask: [grad of input, grad of offset].
  m.def(
      "deform_roi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, "
      "int[2] output_size, float spatial_scale, int sampling_ratio, float gamma, bool[2] output_mask) "
      "-> (Tensor, Tensor)");
  m.def("_build_info() -> str", &build_info);
  m.def("_column_budget(int new_bytes=-1) -> int", &column_budget_op);
}

}  // namespace mmdet_dcnv2

// The host-run build of the CUDA RoI-pooling kernels (test only; see ../host_emulation.h): the .cu
// file itself, compiled as C++. setup.py never sees this directory.
#include "../deform_roi_pool_kernel.cu"

// The host-run build of the CUDA convolution kernels (test only; see ../host_emulation.h): the .cu
// file itself, compiled as C++. setup.py never sees this directory.
#include "../deform_conv_kernel.cu"

// Portable qualifiers so that one definition of the per-element math serves the
// C++ CPU kernels, the CUDA kernels and the plain C++ unit tests.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

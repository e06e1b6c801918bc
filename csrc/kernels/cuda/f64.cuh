// float64 versions of the layer's launchers (internal to csrc/kernels/cuda): one thread per
// output element, exact float64 sums. float64 is the dtype the tests compare against, so these
// favour obviousness over speed.
#pragma once

#include "lora_cuda.cuh"

namespace fastlora::cuda::f64 {

cudaError_t down(const Matrix& x, const double* a, int64_t r, const Dropout& drop, double* xa,
                 cudaStream_t stream);
cudaError_t expand(const Expand& e, cudaStream_t stream);
cudaError_t dy_products(const Matrix& dy, const double* xa, int64_t rx, const double* b, int64_t rb,
                        double scale, double* dxa, double* db, cudaStream_t stream);
cudaError_t grad_A(const Matrix& x, const double* dxa, int64_t r, const Dropout& drop, double* da,
                   cudaStream_t stream);

}  // namespace fastlora::cuda::f64

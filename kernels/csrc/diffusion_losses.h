// Host launchers of the fused DDRL loss kernels (diffusion_losses.cu).
//
// This header needs only the CUDA runtime, not torch: the kernel file compiles on its own with
// `nvcc -c`, and bindings.cpp (the torch extension) calls these functions with raw pointers.
// Layout: every big tensor is contiguous (batch, n_per_sample); per-sample vectors are fp32 (batch,).
// Arithmetic is fp32 whatever the storage dtype. Forward reductions are two-stage (per-block partial
// sums, then one block per sample), so results do not depend on scheduling.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace ddrl {

// Storage dtypes the kernels read and write.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Blocks along one sample for n_per_sample elements: the size of the partial-sum buffer's rows.
int blocks_per_sample(int64_t n_per_sample);

// partial[b, j] = sum over block j's elements of (v - (noise - x0))^2; x0 and noise share data_dtype.
cudaError_t flow_matching_sq_sum_partial(const void* v, DType v_dtype, const void* x0, const void* noise,
                                         DType data_dtype, int64_t batch, int64_t n_per_sample,
                                         float* partial, cudaStream_t stream);

// out (v_dtype) = 2 grad_sum[b] (v - (noise - x0)).
cudaError_t flow_matching_grad(const float* grad_sum, const void* v, DType v_dtype, const void* x0,
                               const void* noise, DType data_dtype, int64_t batch, int64_t n_per_sample,
                               void* out, cudaStream_t stream);

// partial[b, j] = sum over block j of (prev - mean)^2, mean = coef_x[b] x + coef_v[b] v; x and prev
// share data_dtype. mean_out (fp32, nullable) receives the mean in the same pass.
cudaError_t sde_sq_sum_partial(const void* v, DType v_dtype, const void* x, const void* prev,
                               DType data_dtype, const float* coef_x, const float* coef_v, int64_t batch,
                               int64_t n_per_sample, float* partial, float* mean_out, cudaStream_t stream);

// out (v_dtype) = -2 coef_v[b] grad_sum[b] (prev - mean) + coef_v[b] grad_mean (grad_mean fp32, nullable).
cudaError_t sde_grad(const float* grad_sum, const float* grad_mean, const void* v, DType v_dtype,
                     const void* x, const void* prev, DType data_dtype, const float* coef_x,
                     const float* coef_v, int64_t batch, int64_t n_per_sample, void* out,
                     cudaStream_t stream);

// out[b] = sum_j partial[b, j] for the partial rows written above.
cudaError_t sum_partials(const float* partial, int64_t batch, int64_t n_per_sample, float* out,
                         cudaStream_t stream);

}  // namespace ddrl

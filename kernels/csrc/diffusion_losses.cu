// Fused CUDA kernels of the DDRL losses: flow-matching loss and SDE-step log-probability.
//
// Each forward reads every input once and writes per-block partial sums (and, for the SDE step, the
// transition mean when asked); each backward reads every input once and writes the gradient once.
// No torch headers: `nvcc -c diffusion_losses.cu` compiles this file alone (tested), and
// bindings.cpp adapts torch tensors to the launchers declared in diffusion_losses.h.

#include "diffusion_losses.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace ddrl {
namespace {

constexpr int kThreads = 256;
// Elements each thread has in flight per loop trip: independent loads hide memory latency.
constexpr int kUnroll = 4;
// Enough blocks per sample to fill the GPU several times over even for batch 1, few enough that the
// partial-sum buffer stays tiny; the loop strides over the rest.
constexpr int kMaxBlocksPerSample = 1024;

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(value);
  } else {
    return __float2half_rn(value);
  }
}

// Sum of `value` over the block; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

// Grid: (blocks along the sample, batch). Calls body(index) for every element index of this block's
// share of its sample, kUnroll independent elements per trip.
template <typename Body>
__device__ __forceinline__ void for_each_element(int64_t n_per_sample, Body body) {
  const int64_t base = static_cast<int64_t>(blockIdx.y) * n_per_sample;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t column = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (; column + (kUnroll - 1) * stride < n_per_sample; column += kUnroll * stride) {
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      body(base + column + k * stride);
    }
  }
  for (; column < n_per_sample; column += stride) {
    body(base + column);
  }
}

template <typename TV, typename TD>
__global__ void __launch_bounds__(kThreads)
flow_matching_sq_sum_kernel(const TV* __restrict__ v, const TD* __restrict__ x0,
                            const TD* __restrict__ noise, int64_t n_per_sample, float* __restrict__ partial) {
  float sum = 0.0f;
  for_each_element(n_per_sample, [&](int64_t i) {
    const float residual = to_float(v[i]) - (to_float(noise[i]) - to_float(x0[i]));
    sum = fmaf(residual, residual, sum);
  });
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = sum;
  }
}

template <typename TV, typename TD>
__global__ void __launch_bounds__(kThreads)
flow_matching_grad_kernel(const float* __restrict__ grad_sum, const TV* __restrict__ v,
                          const TD* __restrict__ x0, const TD* __restrict__ noise, int64_t n_per_sample,
                          TV* __restrict__ out) {
  const float scale = 2.0f * grad_sum[blockIdx.y];
  for_each_element(n_per_sample, [&](int64_t i) {
    out[i] = from_float<TV>(scale * (to_float(v[i]) - (to_float(noise[i]) - to_float(x0[i]))));
  });
}

template <typename TV, typename TD, bool kWriteMean>
__global__ void __launch_bounds__(kThreads)
sde_sq_sum_kernel(const TV* __restrict__ v, const TD* __restrict__ x, const TD* __restrict__ prev,
                  const float* __restrict__ coef_x, const float* __restrict__ coef_v, int64_t n_per_sample,
                  float* __restrict__ partial, float* __restrict__ mean_out) {
  const float cx = coef_x[blockIdx.y];
  const float cv = coef_v[blockIdx.y];
  float sum = 0.0f;
  for_each_element(n_per_sample, [&](int64_t i) {
    const float mean = fmaf(to_float(x[i]), cx, to_float(v[i]) * cv);
    if constexpr (kWriteMean) {
      mean_out[i] = mean;
    }
    const float residual = to_float(prev[i]) - mean;
    sum = fmaf(residual, residual, sum);
  });
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = sum;
  }
}

template <typename TV, typename TD, bool kHasGradMean>
__global__ void __launch_bounds__(kThreads)
sde_grad_kernel(const float* __restrict__ grad_sum, const float* __restrict__ grad_mean,
                const TV* __restrict__ v, const TD* __restrict__ x, const TD* __restrict__ prev,
                const float* __restrict__ coef_x, const float* __restrict__ coef_v, int64_t n_per_sample,
                TV* __restrict__ out) {
  const float cx = coef_x[blockIdx.y];
  const float cv = coef_v[blockIdx.y];
  const float scale = -2.0f * cv * grad_sum[blockIdx.y];
  for_each_element(n_per_sample, [&](int64_t i) {
    const float mean = fmaf(to_float(x[i]), cx, to_float(v[i]) * cv);
    float grad = scale * (to_float(prev[i]) - mean);
    if constexpr (kHasGradMean) {
      grad = fmaf(cv, grad_mean[i], grad);
    }
    out[i] = from_float<TV>(grad);
  });
}

__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const float* __restrict__ partial, int blocks, float* __restrict__ out) {
  const float* row = partial + static_cast<int64_t>(blockIdx.x) * blocks;
  float sum = 0.0f;
  for (int j = threadIdx.x; j < blocks; j += kThreads) {
    sum += row[j];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = sum;
  }
}

template <typename T>
struct Type {
  using type = T;
};

// Calls launch(Type<TV>{}, Type<TD>{}) for the storage types named by the two codes.
template <typename Launch>
cudaError_t dispatch(DType v_dtype, DType data_dtype, Launch launch) {
  auto with_data = [&](auto v_type) -> cudaError_t {
    switch (data_dtype) {
      case DType::kFloat32: return launch(v_type, Type<float>{});
      case DType::kBFloat16: return launch(v_type, Type<__nv_bfloat16>{});
      case DType::kFloat16: return launch(v_type, Type<__half>{});
    }
    return cudaErrorInvalidValue;
  };
  switch (v_dtype) {
    case DType::kFloat32: return with_data(Type<float>{});
    case DType::kBFloat16: return with_data(Type<__nv_bfloat16>{});
    case DType::kFloat16: return with_data(Type<__half>{});
  }
  return cudaErrorInvalidValue;
}

dim3 grid_for(int64_t batch, int64_t n_per_sample) {
  return dim3(static_cast<unsigned>(blocks_per_sample(n_per_sample)), static_cast<unsigned>(batch));
}

cudaError_t check_launch(int64_t batch, int64_t n_per_sample) {
  // gridDim.y is at most 65535
  if (batch <= 0 || batch > 65535 || n_per_sample <= 0) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

int blocks_per_sample(int64_t n_per_sample) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = (n_per_sample + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocksPerSample ? kMaxBlocksPerSample : blocks));
}

cudaError_t flow_matching_sq_sum_partial(const void* v, DType v_dtype, const void* x0, const void* noise,
                                         DType data_dtype, int64_t batch, int64_t n_per_sample,
                                         float* partial, cudaStream_t stream) {
  if (cudaError_t error = check_launch(batch, n_per_sample); error != cudaSuccess) {
    return error;
  }
  return dispatch(v_dtype, data_dtype, [&](auto v_type, auto data_type) {
    using TV = typename decltype(v_type)::type;
    using TD = typename decltype(data_type)::type;
    flow_matching_sq_sum_kernel<TV, TD><<<grid_for(batch, n_per_sample), kThreads, 0, stream>>>(
        static_cast<const TV*>(v), static_cast<const TD*>(x0), static_cast<const TD*>(noise), n_per_sample,
        partial);
    return cudaGetLastError();
  });
}

cudaError_t flow_matching_grad(const float* grad_sum, const void* v, DType v_dtype, const void* x0,
                               const void* noise, DType data_dtype, int64_t batch, int64_t n_per_sample,
                               void* out, cudaStream_t stream) {
  if (cudaError_t error = check_launch(batch, n_per_sample); error != cudaSuccess) {
    return error;
  }
  return dispatch(v_dtype, data_dtype, [&](auto v_type, auto data_type) {
    using TV = typename decltype(v_type)::type;
    using TD = typename decltype(data_type)::type;
    flow_matching_grad_kernel<TV, TD><<<grid_for(batch, n_per_sample), kThreads, 0, stream>>>(
        grad_sum, static_cast<const TV*>(v), static_cast<const TD*>(x0), static_cast<const TD*>(noise),
        n_per_sample, static_cast<TV*>(out));
    return cudaGetLastError();
  });
}

cudaError_t sde_sq_sum_partial(const void* v, DType v_dtype, const void* x, const void* prev,
                               DType data_dtype, const float* coef_x, const float* coef_v, int64_t batch,
                               int64_t n_per_sample, float* partial, float* mean_out, cudaStream_t stream) {
  if (cudaError_t error = check_launch(batch, n_per_sample); error != cudaSuccess) {
    return error;
  }
  return dispatch(v_dtype, data_dtype, [&](auto v_type, auto data_type) {
    using TV = typename decltype(v_type)::type;
    using TD = typename decltype(data_type)::type;
    const dim3 grid = grid_for(batch, n_per_sample);
    if (mean_out != nullptr) {
      sde_sq_sum_kernel<TV, TD, true><<<grid, kThreads, 0, stream>>>(
          static_cast<const TV*>(v), static_cast<const TD*>(x), static_cast<const TD*>(prev), coef_x, coef_v,
          n_per_sample, partial, mean_out);
    } else {
      sde_sq_sum_kernel<TV, TD, false><<<grid, kThreads, 0, stream>>>(
          static_cast<const TV*>(v), static_cast<const TD*>(x), static_cast<const TD*>(prev), coef_x, coef_v,
          n_per_sample, partial, nullptr);
    }
    return cudaGetLastError();
  });
}

cudaError_t sde_grad(const float* grad_sum, const float* grad_mean, const void* v, DType v_dtype,
                     const void* x, const void* prev, DType data_dtype, const float* coef_x,
                     const float* coef_v, int64_t batch, int64_t n_per_sample, void* out,
                     cudaStream_t stream) {
  if (cudaError_t error = check_launch(batch, n_per_sample); error != cudaSuccess) {
    return error;
  }
  return dispatch(v_dtype, data_dtype, [&](auto v_type, auto data_type) {
    using TV = typename decltype(v_type)::type;
    using TD = typename decltype(data_type)::type;
    const dim3 grid = grid_for(batch, n_per_sample);
    if (grad_mean != nullptr) {
      sde_grad_kernel<TV, TD, true><<<grid, kThreads, 0, stream>>>(
          grad_sum, grad_mean, static_cast<const TV*>(v), static_cast<const TD*>(x),
          static_cast<const TD*>(prev), coef_x, coef_v, n_per_sample, static_cast<TV*>(out));
    } else {
      sde_grad_kernel<TV, TD, false><<<grid, kThreads, 0, stream>>>(
          grad_sum, nullptr, static_cast<const TV*>(v), static_cast<const TD*>(x),
          static_cast<const TD*>(prev), coef_x, coef_v, n_per_sample, static_cast<TV*>(out));
    }
    return cudaGetLastError();
  });
}

cudaError_t sum_partials(const float* partial, int64_t batch, int64_t n_per_sample, float* out,
                         cudaStream_t stream) {
  if (cudaError_t error = check_launch(batch, n_per_sample); error != cudaSuccess) {
    return error;
  }
  sum_partials_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      partial, blocks_per_sample(n_per_sample), out);
  return cudaGetLastError();
}

}  // namespace ddrl

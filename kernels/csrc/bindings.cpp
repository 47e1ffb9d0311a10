// torch extension around the launchers of diffusion_losses.cu: checks tensors, picks the current CUDA
// stream, allocates outputs. Built on demand by kernels/cuda_extension.py (torch.utils.cpp_extension).

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>

#include "diffusion_losses.h"

namespace {

ddrl::DType storage_dtype(const torch::Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case torch::kFloat32: return ddrl::DType::kFloat32;
    case torch::kBFloat16: return ddrl::DType::kBFloat16;
    case torch::kFloat16: return ddrl::DType::kFloat16;
    default:
      TORCH_CHECK(false, "ddrl cuda kernels: ", name, " must be float32, bfloat16 or float16, got ",
                  tensor.scalar_type());
  }
}

// A contiguous (batch, n) CUDA tensor on the device of `like`.
void check_rows(const torch::Tensor& tensor, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(tensor.is_cuda(), "ddrl cuda kernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(tensor.dim() == 2 && tensor.is_contiguous(), "ddrl cuda kernels: ", name,
              " must be a contiguous (batch, n) tensor, got sizes ", tensor.sizes());
  TORCH_CHECK(tensor.sizes() == like.sizes() && tensor.device() == like.device(), "ddrl cuda kernels: ", name,
              " has sizes ", tensor.sizes(), " on ", tensor.device(), ", expected ", like.sizes(), " on ",
              like.device());
}

// A contiguous fp32 (batch,) vector on the device of `like`.
void check_per_sample(const torch::Tensor& tensor, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(tensor.is_cuda() && tensor.device() == like.device() && tensor.is_contiguous(),
              "ddrl cuda kernels: ", name, " must be a contiguous tensor on ", like.device());
  TORCH_CHECK(tensor.scalar_type() == torch::kFloat32 && tensor.dim() == 1 && tensor.size(0) == like.size(0),
              "ddrl cuda kernels: ", name, " must be float32 of shape (", like.size(0), ",), got ",
              tensor.scalar_type(), " ", tensor.sizes());
}

void check_same_dtype(const torch::Tensor& a, const char* a_name, const torch::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "ddrl cuda kernels: ", a_name, " and ", b_name,
              " must share a dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

void check(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "ddrl cuda kernels: ", what, " failed: ", cudaGetErrorString(error));
}

torch::Tensor reduce_partials(const torch::Tensor& partial, int64_t batch, int64_t n, cudaStream_t stream) {
  auto out = torch::empty({batch}, partial.options());
  check(ddrl::sum_partials(partial.data_ptr<float>(), batch, n, out.data_ptr<float>(), stream), "sum_partials");
  return out;
}

torch::Tensor partial_buffer(const torch::Tensor& like, int64_t n) {
  return torch::empty({like.size(0), ddrl::blocks_per_sample(n)}, like.options().dtype(torch::kFloat32));
}

torch::Tensor flow_matching_sq_sum(const torch::Tensor& v, const torch::Tensor& x0, const torch::Tensor& noise) {
  check_rows(v, "v", v);
  check_rows(x0, "x0", v);
  check_rows(noise, "noise", v);
  check_same_dtype(x0, "x0", noise, "noise");
  const c10::cuda::CUDAGuard guard(v.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t batch = v.size(0), n = v.size(1);
  auto partial = partial_buffer(v, n);
  check(ddrl::flow_matching_sq_sum_partial(v.data_ptr(), storage_dtype(v, "v"), x0.data_ptr(), noise.data_ptr(),
                                           storage_dtype(x0, "x0"), batch, n, partial.data_ptr<float>(),
                                           stream),
        "flow_matching_sq_sum_partial");
  return reduce_partials(partial, batch, n, stream);
}

torch::Tensor flow_matching_grad(const torch::Tensor& grad_sum, const torch::Tensor& v, const torch::Tensor& x0,
                                 const torch::Tensor& noise) {
  check_rows(v, "v", v);
  check_rows(x0, "x0", v);
  check_rows(noise, "noise", v);
  check_same_dtype(x0, "x0", noise, "noise");
  check_per_sample(grad_sum, "grad_sum", v);
  const c10::cuda::CUDAGuard guard(v.device());
  auto out = torch::empty_like(v);
  check(ddrl::flow_matching_grad(grad_sum.data_ptr<float>(), v.data_ptr(), storage_dtype(v, "v"), x0.data_ptr(),
                                 noise.data_ptr(), storage_dtype(x0, "x0"), v.size(0), v.size(1), out.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
        "flow_matching_grad");
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> sde_sq_sum(const torch::Tensor& v, const torch::Tensor& x,
                                                    const torch::Tensor& prev, const torch::Tensor& coef_x,
                                                    const torch::Tensor& coef_v, bool return_mean) {
  check_rows(v, "v", v);
  check_rows(x, "x", v);
  check_rows(prev, "prev_sample", v);
  check_same_dtype(x, "x", prev, "prev_sample");
  check_per_sample(coef_x, "coef_x", v);
  check_per_sample(coef_v, "coef_v", v);
  const c10::cuda::CUDAGuard guard(v.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t batch = v.size(0), n = v.size(1);
  auto partial = partial_buffer(v, n);
  auto mean = return_mean ? torch::empty(v.sizes(), v.options().dtype(torch::kFloat32))
                          : torch::empty({0}, v.options().dtype(torch::kFloat32));
  check(ddrl::sde_sq_sum_partial(v.data_ptr(), storage_dtype(v, "v"), x.data_ptr(), prev.data_ptr(),
                                 storage_dtype(x, "x"), coef_x.data_ptr<float>(), coef_v.data_ptr<float>(), batch,
                                 n, partial.data_ptr<float>(), return_mean ? mean.data_ptr<float>() : nullptr,
                                 stream),
        "sde_sq_sum_partial");
  return {reduce_partials(partial, batch, n, stream), mean};
}

torch::Tensor sde_grad(const torch::Tensor& grad_sum, const std::optional<torch::Tensor>& grad_mean,
                       const torch::Tensor& v, const torch::Tensor& x, const torch::Tensor& prev,
                       const torch::Tensor& coef_x, const torch::Tensor& coef_v) {
  check_rows(v, "v", v);
  check_rows(x, "x", v);
  check_rows(prev, "prev_sample", v);
  check_same_dtype(x, "x", prev, "prev_sample");
  check_per_sample(coef_x, "coef_x", v);
  check_per_sample(coef_v, "coef_v", v);
  check_per_sample(grad_sum, "grad_sum", v);
  const float* grad_mean_ptr = nullptr;
  if (grad_mean.has_value()) {
    check_rows(*grad_mean, "grad_mean", v);
    TORCH_CHECK(grad_mean->scalar_type() == torch::kFloat32, "ddrl cuda kernels: grad_mean must be float32");
    grad_mean_ptr = grad_mean->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(v.device());
  auto out = torch::empty_like(v);
  check(ddrl::sde_grad(grad_sum.data_ptr<float>(), grad_mean_ptr, v.data_ptr(), storage_dtype(v, "v"),
                       x.data_ptr(), prev.data_ptr(), storage_dtype(x, "x"), coef_x.data_ptr<float>(),
                       coef_v.data_ptr<float>(), v.size(0), v.size(1), out.data_ptr(),
                       c10::cuda::getCurrentCUDAStream().stream()),
        "sde_grad");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "ddrl-scale fused DDRL loss kernels (CUDA)";
  module.def("flow_matching_sq_sum", &flow_matching_sq_sum, "(B,) sums of (v - (noise - x0))^2",
             pybind11::arg("v"), pybind11::arg("x0"), pybind11::arg("noise"));
  module.def("flow_matching_grad", &flow_matching_grad, "2 grad_sum_b (v - (noise - x0))",
             pybind11::arg("grad_sum"), pybind11::arg("v"), pybind11::arg("x0"), pybind11::arg("noise"));
  module.def("sde_sq_sum", &sde_sq_sum, "(B,) sums of (prev - mean)^2 and the mean when asked",
             pybind11::arg("v"), pybind11::arg("x"), pybind11::arg("prev"), pybind11::arg("coef_x"),
             pybind11::arg("coef_v"), pybind11::arg("return_mean"));
  module.def("sde_grad", &sde_grad, "gradient of sde_sq_sum (and of the mean) w.r.t. v",
             pybind11::arg("grad_sum"), pybind11::arg("grad_mean"), pybind11::arg("v"), pybind11::arg("x"),
             pybind11::arg("prev"), pybind11::arg("coef_x"), pybind11::arg("coef_v"));
}

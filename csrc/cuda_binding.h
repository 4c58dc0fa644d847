// Shared by the ATen binding files (*.cu) of pymeta's CUDA kernels: the ATen -> CUDA
// scalar type map and the current stream, written against c10's device-generic
// interface only, so every .cu file compile-checks with nvcc against a CPU build of torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/core/Device.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace pymeta {

// ATen storage types -> the CUDA types of the torch-free headers (same layout).
template <typename scalar_t>
using cuda_type_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
                                       std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16,
                                                          scalar_t>>;

// The current stream of `device`.
inline cudaStream_t current_stream(const c10::Device& device) {
  return static_cast<cudaStream_t>(c10::impl::VirtualGuardImpl(device.type()).getStream(device).native_handle());
}

}  // namespace pymeta

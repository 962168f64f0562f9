// SwiGLU forward and backward (ops::SwigluForward/SwigluBackward), row strides free.
//
// Block per row, 16-byte packs when every row start is aligned and cols is a multiple of the
// pack. f32 math with expf (not __expf):
//   s = 1 / (1 + exp(-g)), silu(g) = g / (1 + exp(-g))
//   out = silu(g) * u;  dup = dout * silu(g);  dgate = dout * u * s * (1 + g * (1 - s))
// Each thread loads all inputs of an element before storing its outputs, so outputs may alias
// inputs element for element (e.g. dgate over gate).
#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

template <typename T, int V>
__global__ void SwigluForwardKernel(T* out, int64_t out_stride, const T* gate, int64_t gate_stride,
                                    const T* up, int64_t up_stride, int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
      const Pack<T, V> gp = LoadPack<T, V>(gate + r * gate_stride + c);
      const Pack<T, V> up_p = LoadPack<T, V>(up + r * up_stride + c);
      Pack<T, V> op;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float g = ToFloat(gp.v[i]);
        const float silu = g / (1.0f + expf(-g));
        op.v[i] = FromFloat<T>(silu * ToFloat(up_p.v[i]));
      }
      StorePack<T, V>(out + r * out_stride + c, op);
    }
  }
}

template <typename T, int V>
__global__ void SwigluBackwardKernel(T* dgate, int64_t dgate_stride, T* dup, int64_t dup_stride,
                                     const T* dout, int64_t dout_stride, const T* gate,
                                     int64_t gate_stride, const T* up, int64_t up_stride,
                                     int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
      const Pack<T, V> dp = LoadPack<T, V>(dout + r * dout_stride + c);
      const Pack<T, V> gp = LoadPack<T, V>(gate + r * gate_stride + c);
      const Pack<T, V> up_p = LoadPack<T, V>(up + r * up_stride + c);
      Pack<T, V> dg, du;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = ToFloat(dp.v[i]);
        const float g = ToFloat(gp.v[i]);
        const float u = ToFloat(up_p.v[i]);
        const float e = 1.0f + expf(-g);
        const float s = 1.0f / e;
        const float silu = g / e;
        du.v[i] = FromFloat<T>(d * silu);
        dg.v[i] = FromFloat<T>(d * u * s * (1.0f + g * (1.0f - s)));
      }
      StorePack<T, V>(dgate + r * dgate_stride + c, dg);
      StorePack<T, V>(dup + r * dup_stride + c, du);
    }
  }
}

}  // namespace

cudaError_t SwigluForward(cudaStream_t stream, DType dtype, void* out, int64_t out_stride,
                          const void* gate, int64_t gate_stride, const void* up, int64_t up_stride,
                          int64_t rows, int64_t cols) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0 || cols <= 0) return cudaSuccess;
    T* o = static_cast<T*>(out);
    const T* g = static_cast<const T*>(gate);
    const T* u = static_cast<const T*>(up);
    if (RowsVectorizable<T>(cols, {out, gate, up}, {out_stride, gate_stride, up_stride})) {
      SwigluForwardKernel<T, kV><<<RowGrid(rows), ThreadsFor(cols / kV, 256), 0, stream>>>(
          o, out_stride, g, gate_stride, u, up_stride, rows, cols);
    } else {
      SwigluForwardKernel<T, 1><<<RowGrid(rows), ThreadsFor(cols, 256), 0, stream>>>(
          o, out_stride, g, gate_stride, u, up_stride, rows, cols);
    }
    return cudaGetLastError();
  });
}

cudaError_t SwigluBackward(cudaStream_t stream, DType dtype, void* dgate, int64_t dgate_stride,
                           void* dup, int64_t dup_stride, const void* dout, int64_t dout_stride,
                           const void* gate, int64_t gate_stride, const void* up, int64_t up_stride,
                           int64_t rows, int64_t cols) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0 || cols <= 0) return cudaSuccess;
    T* dg = static_cast<T*>(dgate);
    T* du = static_cast<T*>(dup);
    const T* d = static_cast<const T*>(dout);
    const T* g = static_cast<const T*>(gate);
    const T* u = static_cast<const T*>(up);
    if (RowsVectorizable<T>(cols, {dgate, dup, dout, gate, up},
                            {dgate_stride, dup_stride, dout_stride, gate_stride, up_stride})) {
      SwigluBackwardKernel<T, kV><<<RowGrid(rows), ThreadsFor(cols / kV, 256), 0, stream>>>(
          dg, dgate_stride, du, dup_stride, d, dout_stride, g, gate_stride, u, up_stride, rows,
          cols);
    } else {
      SwigluBackwardKernel<T, 1><<<RowGrid(rows), ThreadsFor(cols, 256), 0, stream>>>(
          dg, dgate_stride, du, dup_stride, d, dout_stride, g, gate_stride, u, up_stride, rows,
          cols);
    }
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda

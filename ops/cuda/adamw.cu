// AdamW update (ops::AdamW), elementwise, f32 math in exactly ops.h's order:
//   g = grad * grad_scale
//   p = p * (1 - lr * weight_decay)
//   m = m + (1 - beta1) * (g - m)
//   v = v * beta2 + (1 - beta2) * g * g
//   denom = sqrt(v) / sqrt(1 - beta2^step) + eps
//   p = p - (lr / (1 - beta1^step)) * (m / denom)     (PyTorch's addcdiv_)
// The scalars 1 - lr * weight_decay, lr / (1 - beta1^step) and sqrt(1 - beta2^step) are computed
// once on the host in double and rounded to f32 (as PyTorch computes them in Python floats, and
// as ops/cpu/adamw.cc does); the rest is per element in f32. Optional model weights (f32, bf16
// or f16) receive p rounded to their dtype.
// float4 packs when every buffer is aligned for them; a scalar tail covers n % 4.
#include <cmath>
#include <type_traits>

#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"
#include "ops/internal/stochastic_round.h"

namespace tandem::ops::cuda {
namespace {

struct AdamWScalars {
  float decay;  // 1 - lr * weight_decay
  float one_minus_beta1, beta2, one_minus_beta2;
  float bias2_sqrt;  // sqrt(1 - beta2^step)
  float step_size;   // lr / (1 - beta1^step)
  float eps, grad_scale;
};

// Every operation rounded on its own (the _rn intrinsics are never contracted into FMAs), so
// each kernel that calls this computes the same bits whatever the compiler does around it (and
// the bits of ops/cpu/adamw.cc's plain float expressions).
__device__ __forceinline__ float AdamWElement(float& p, float& m, float& v, float grad,
                                              const AdamWScalars& s) {
  const float g = __fmul_rn(grad, s.grad_scale);
  p = __fmul_rn(p, s.decay);
  m = __fadd_rn(m, __fmul_rn(s.one_minus_beta1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias2_sqrt), s.eps);
  p = __fsub_rn(p, __fmul_rn(s.step_size, __fdiv_rn(m, denom)));
  return p;
}

// Elements [0, n) of one tensor, thread `first` of `stride` threads: float4 packs (V = 4, every
// pointer aligned) then a scalar tail, or all scalar (V = 1).
template <typename TW, int V>
__device__ __forceinline__ void AdamWRange(float* master, float* m, float* v, TW* weights,
                                           const float* grad, int64_t n, int64_t first,
                                           int64_t stride, const AdamWScalars& s) {
  const int64_t num_packs = n / V;
  for (int64_t i = first; i < num_packs; i += stride) {
    const int64_t base = i * V;
    Pack<float, V> pp = LoadPack<float, V>(master + base);
    Pack<float, V> mp = LoadPack<float, V>(m + base);
    Pack<float, V> vp = LoadPack<float, V>(v + base);
    const Pack<float, V> gp = LoadPack<float, V>(grad + base);
    Pack<TW, V> wp;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      wp.v[j] = FromFloat<TW>(AdamWElement(pp.v[j], mp.v[j], vp.v[j], gp.v[j], s));
    }
    StorePack<float, V>(master + base, pp);
    StorePack<float, V>(m + base, mp);
    StorePack<float, V>(v + base, vp);
    if (weights != nullptr) StorePack<TW, V>(weights + base, wp);
  }
  for (int64_t i = num_packs * V + first; i < n; i += stride) {
    const float p = AdamWElement(master[i], m[i], v[i], grad[i], s);
    if (weights != nullptr) weights[i] = FromFloat<TW>(p);
  }
}

template <typename TW, int V>
__global__ void AdamWKernel(float* master, float* m, float* v, TW* weights, const float* grad,
                            int64_t n, AdamWScalars s) {
  AdamWRange<TW, V>(master, m, v, weights, grad, n, GlobalThreadIndex(), GlobalThreadCount(), s);
}

template <typename TW>
cudaError_t LaunchAdamW(cudaStream_t stream, float* master, float* m, float* v, TW* weights,
                        const float* grad, int64_t n, const AdamWScalars& s) {
  constexpr int kV = 4;
  const bool vec = IsAligned(master, 16) && IsAligned(m, 16) && IsAligned(v, 16) &&
                   IsAligned(grad, 16) && IsAligned(weights, sizeof(TW) * kV);
  const int threads = 256;
  if (vec) {
    AdamWKernel<TW, kV><<<GridFor(n / kV + 1, threads), threads, 0, stream>>>(master, m, v,
                                                                             weights, grad, n, s);
  } else {
    AdamWKernel<TW, 1><<<GridFor(n, threads), threads, 0, stream>>>(master, m, v, weights, grad,
                                                                    n, s);
  }
  return cudaGetLastError();
}

constexpr int kMultiMax = 40;  // entries per launch: the table stays well inside 4 KB of parameters

struct MultiEntry {
  float* master;
  float* m;
  float* v;
  void* weights;
  const float* grad;
  int64_t n;
  float decay;
  int vec;  // every pointer aligned for float4 packs
};

struct MultiTable {
  MultiEntry e[kMultiMax];
  int block_start[kMultiMax + 1];  // entry i owns blocks [block_start[i], block_start[i + 1])
  int count;
};

// The entry whose blocks include this block.
__device__ __forceinline__ int EntryOfBlock(const int* block_start, int count) {
  int lo = 0, hi = count - 1;
  const int b = static_cast<int>(blockIdx.x);
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (block_start[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Each entry's elements through AdamWElement, as AdamWKernel does them (elementwise: the grid
// does not change any value).
template <typename TW>
__global__ void AdamWMultiKernel(const __grid_constant__ MultiTable t, AdamWScalars s) {
  const int i = EntryOfBlock(t.block_start, t.count);
  const MultiEntry& e = t.e[i];
  s.decay = e.decay;
  const int64_t first =
      static_cast<int64_t>(blockIdx.x - t.block_start[i]) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(t.block_start[i + 1] - t.block_start[i]) * blockDim.x;
  TW* weights = static_cast<TW*>(e.weights);
  if (e.vec) {
    AdamWRange<TW, 4>(e.master, e.m, e.v, weights, e.grad, e.n, first, stride, s);
  } else {
    AdamWRange<TW, 1>(e.master, e.m, e.v, weights, e.grad, e.n, first, stride, s);
  }
}

// Packs `entries` (each with a field n) into tables of at most Table's capacity, each entry
// owning a range of blocks (its share of the grid: one block per 8 packs of 256 threads, clamped
// to [1, 1024]; empty entries skipped), and calls launch(table, blocks, threads) per table.
template <typename Table, typename Args, typename FillEntry, typename LaunchTable>
cudaError_t LaunchInTables(const Args* entries, int count, FillEntry fill, LaunchTable launch) {
  constexpr int kThreads = 256;
  constexpr int kMax = static_cast<int>(sizeof(Table::e) / sizeof(Table::e[0]));
  for (int first = 0; first < count;) {
    Table t{};
    int blocks = 0;
    int i = first;
    for (; i < count && t.count < kMax; ++i) {
      if (entries[i].n <= 0) continue;
      fill(t.e[t.count], entries[i]);
      t.block_start[t.count] = blocks;
      blocks += static_cast<int>(std::clamp<int64_t>(CeilDiv(entries[i].n, kThreads * 8), 1, 1024));
      ++t.count;
    }
    first = i;
    if (t.count == 0) continue;
    t.block_start[t.count] = blocks;
    const cudaError_t err = launch(t, blocks, kThreads);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

AdamWScalars MakeScalars(float lr, float beta1, float beta2, float eps, float weight_decay,
                         int64_t step, float grad_scale) {
  const double bias1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  s.one_minus_beta1 = 1.0f - beta1;
  s.beta2 = beta2;
  s.one_minus_beta2 = 1.0f - beta2;
  s.bias2_sqrt = static_cast<float>(std::sqrt(bias2));
  s.step_size = static_cast<float>(static_cast<double>(lr) / bias1);
  s.eps = eps;
  s.grad_scale = grad_scale;
  return s;
}

}  // namespace

cudaError_t AdamW(cudaStream_t stream, float* master, float* m, float* v, void* model_weights,
                  DType model_dtype, const float* grad, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step, float grad_scale) {
  if (step < 1) return cudaErrorInvalidValue;
  if (n <= 0) return cudaSuccess;
  const AdamWScalars s = MakeScalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  if (model_weights == nullptr) {
    return LaunchAdamW<float>(stream, master, m, v, nullptr, grad, n, s);
  }
  return DispatchFloating(model_dtype, [&](auto tag) -> cudaError_t {
    using TW = typename decltype(tag)::type;
    return LaunchAdamW<TW>(stream, master, m, v, static_cast<TW*>(model_weights), grad, n, s);
  });
}

cudaError_t AdamWMulti(cudaStream_t stream, const AdamWMultiArgs* entries, int count,
                       DType model_dtype, float lr, float beta1, float beta2, float eps,
                       int64_t step, float grad_scale) {
  if (step < 1 || count < 0) return cudaErrorInvalidValue;
  const AdamWScalars s = MakeScalars(lr, beta1, beta2, eps, 0.0f, step, grad_scale);
  const size_t weights_align = DTypeSize(model_dtype) * 4;
  auto fill = [&](MultiEntry& e, const AdamWMultiArgs& a) {
    e.master = a.master;
    e.m = a.m;
    e.v = a.v;
    e.weights = a.model_weights;
    e.grad = a.grad;
    e.n = a.n;
    e.decay = static_cast<float>(1.0 - static_cast<double>(lr) * a.weight_decay);
    e.vec = IsAligned(a.master, 16) && IsAligned(a.m, 16) && IsAligned(a.v, 16) &&
            IsAligned(a.grad, 16) && IsAligned(a.model_weights, weights_align);
  };
  auto launch = [&](const MultiTable& t, int blocks, int threads) {
    return DispatchFloating(model_dtype, [&](auto tag) -> cudaError_t {
      using TW = typename decltype(tag)::type;
      AdamWMultiKernel<TW><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(t, s);
      return cudaGetLastError();
    });
  };
  return LaunchInTables<MultiTable>(entries, count, fill, launch);
}

namespace {

// [bf16 state] AdamWBf16Multi: parameters (f32 or bf16) updated in place, moments in bf16, bf16
// results rounded stochastically (ops/internal/stochastic_round.h); the f32 math of AdamWElement.

constexpr int kBf16MultiMax = 40;

struct Bf16MultiEntry {
  void* param;
  uint16_t* m;
  uint16_t* v;
  const float* grad;
  int64_t n;
  uint64_t noise_key;
  float decay;
  int vec;  // every pointer aligned for 4-element packs
};

struct Bf16MultiTable {
  Bf16MultiEntry e[kBf16MultiMax];
  int block_start[kBf16MultiMax + 1];
  int count;
};

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Element i: p, m, v in and out (p's rounding to TP happens here when TP is bf16).
template <typename TP>
__device__ __forceinline__ void AdamWBf16Element(TP& p_io, uint16_t& m_io, uint16_t& v_io,
                                                 float grad, int64_t i, uint64_t key,
                                                 const AdamWScalars& s) {
  float p = ToFloat(p_io), m = Bf16BitsToFloat(m_io), v = Bf16BitsToFloat(v_io);
  AdamWElement(p, m, v, grad, s);
  const internal::NoiseWords r = internal::ElementNoise(key, i);
  if constexpr (std::is_same_v<TP, float>) {
    p_io = p;
  } else {
    p_io = __ushort_as_bfloat16(internal::StochasticBf16Bits(p, r.h1));
  }
  m_io = internal::StochasticBf16Bits(m, r.h1 >> 16);
  v_io = internal::StochasticBf16Bits(v, r.h2);
}

template <typename TP, int V>
__device__ __forceinline__ void AdamWBf16Range(const Bf16MultiEntry& e, int64_t first,
                                               int64_t stride, const AdamWScalars& s) {
  TP* param = static_cast<TP*>(e.param);
  const int64_t num_packs = e.n / V;
  for (int64_t k = first; k < num_packs; k += stride) {
    const int64_t base = k * V;
    Pack<TP, V> pp = LoadPack<TP, V>(param + base);
    Pack<uint16_t, V> mp = LoadPack<uint16_t, V>(e.m + base);
    Pack<uint16_t, V> vp = LoadPack<uint16_t, V>(e.v + base);
    const Pack<float, V> gp = LoadPack<float, V>(e.grad + base);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      AdamWBf16Element<TP>(pp.v[j], mp.v[j], vp.v[j], gp.v[j], base + j, e.noise_key, s);
    }
    StorePack<TP, V>(param + base, pp);
    StorePack<uint16_t, V>(e.m + base, mp);
    StorePack<uint16_t, V>(e.v + base, vp);
  }
  for (int64_t i = num_packs * V + first; i < e.n; i += stride) {
    AdamWBf16Element<TP>(param[i], e.m[i], e.v[i], e.grad[i], i, e.noise_key, s);
  }
}

template <typename TP>
__global__ void AdamWBf16MultiKernel(const __grid_constant__ Bf16MultiTable t, AdamWScalars s) {
  const int i = EntryOfBlock(t.block_start, t.count);
  const Bf16MultiEntry& e = t.e[i];
  s.decay = e.decay;
  const int64_t first =
      static_cast<int64_t>(blockIdx.x - t.block_start[i]) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(t.block_start[i + 1] - t.block_start[i]) * blockDim.x;
  if (e.vec) {
    AdamWBf16Range<TP, 4>(e, first, stride, s);
  } else {
    AdamWBf16Range<TP, 1>(e, first, stride, s);
  }
}

}  // namespace

cudaError_t AdamWBf16Multi(cudaStream_t stream, const AdamWBf16Args* entries, int count,
                           DType param_dtype, float lr, float beta1, float beta2, float eps,
                           int64_t step, float grad_scale) {
  if (step < 1 || count < 0) return cudaErrorInvalidValue;
  if (param_dtype != DType::kF32 && param_dtype != DType::kBF16) return cudaErrorInvalidValue;
  const AdamWScalars s = MakeScalars(lr, beta1, beta2, eps, 0.0f, step, grad_scale);
  const size_t param_align = DTypeSize(param_dtype) * 4;
  auto fill = [&](Bf16MultiEntry& e, const AdamWBf16Args& a) {
    e.param = a.param;
    e.m = a.m;
    e.v = a.v;
    e.grad = a.grad;
    e.n = a.n;
    e.noise_key = a.noise_key;
    e.decay = static_cast<float>(1.0 - static_cast<double>(lr) * a.weight_decay);
    e.vec = IsAligned(a.param, param_align) && IsAligned(a.m, 8) && IsAligned(a.v, 8) &&
            IsAligned(a.grad, 16);
  };
  auto launch = [&](const Bf16MultiTable& t, int blocks, int threads) {
    if (param_dtype == DType::kF32) {
      AdamWBf16MultiKernel<float><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(t, s);
    } else {
      AdamWBf16MultiKernel<bf16><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(t, s);
    }
    return cudaGetLastError();
  };
  return LaunchInTables<Bf16MultiTable>(entries, count, fill, launch);
}

}  // namespace tandem::ops::cuda

// Shared by the ring-attention tests (threads and MPI): random global q, k, v, dout for one case,
// the single-process reference (ops::AttentionForward/Backward over the whole sequence), and one
// cp rank's ring forward + backward with its results placed back into global order.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>

#include "collectives/communicator.h"
#include "ops/context.h"
#include "ops/ops.h"
#include "parallel/ring_attention.h"
#include "tests/common/testing.h"

namespace tandem::parallel::testing {

struct RingCase {
  int64_t b, t, hq, hkv, d;
};

// Global tensors of a case and the reference results over the whole sequence.
struct RingProblem {
  RingCase c;
  float scale;
  Tensor q, k, v, dout;         // inputs, [B, T, H, D]
  Tensor out, lse, dq, dk, dv;  // reference
};

inline RingProblem MakeProblem(const RingCase& c, uint64_t seed) {
  RingProblem p{c, 1.0f / std::sqrt(static_cast<float>(c.d))};
  p.q = tandem::testing::RandomUniform({c.b, c.t, c.hq, c.d}, seed + 1, -2.0f, 2.0f);
  p.k = tandem::testing::RandomUniform({c.b, c.t, c.hkv, c.d}, seed + 2, -2.0f, 2.0f);
  p.v = tandem::testing::RandomUniform({c.b, c.t, c.hkv, c.d}, seed + 3);
  p.dout = tandem::testing::RandomUniform({c.b, c.t, c.hq, c.d}, seed + 4);
  auto ctx = ops::Context::Cpu();
  p.out = Tensor::Cpu(p.q.shape(), DType::kF32);
  p.lse = Tensor::Cpu({c.b, c.hq, c.t}, DType::kF32);
  TANDEM_CHECK_OK(ops::AttentionForward(*ctx, p.out, p.lse, p.q, p.k, p.v, p.scale));
  p.dq = Tensor::Cpu(p.q.shape(), DType::kF32);
  p.dk = Tensor::Cpu(p.k.shape(), DType::kF32);
  p.dv = Tensor::Cpu(p.v.shape(), DType::kF32);
  TANDEM_CHECK_OK(
      ops::AttentionBackward(*ctx, p.dq, p.dk, p.dv, p.dout, p.q, p.k, p.v, p.out, p.lse, p.scale));
  return p;
}

// What the ranks computed, gathered into global order.
struct RingResult {
  Tensor out, lse, dq, dk, dv;
};

inline RingResult EmptyResult(const RingProblem& p) {
  return {Tensor::CpuZeros(p.out.shape(), DType::kF32),
          Tensor::CpuZeros(p.lse.shape(), DType::kF32), Tensor::CpuZeros(p.dq.shape(), DType::kF32),
          Tensor::CpuZeros(p.dk.shape(), DType::kF32), Tensor::CpuZeros(p.dv.shape(), DType::kF32)};
}

// One rank's ring forward and backward on its zig-zag share of `p`; writes its slices of `r`
// (ranks write disjoint elements, so threads may share one RingResult).
inline Status RunRingRank(collectives::Communicator& cp, const RingProblem& p, RingResult& r) {
  auto ctx = ops::Context::Cpu();
  const int n = cp.size(), rank = cp.rank();
  TANDEM_ASSIGN_OR_RETURN(Tensor q, ZigZagLocal(p.q, n, rank));
  TANDEM_ASSIGN_OR_RETURN(Tensor k, ZigZagLocal(p.k, n, rank));
  TANDEM_ASSIGN_OR_RETURN(Tensor v, ZigZagLocal(p.v, n, rank));
  TANDEM_ASSIGN_OR_RETURN(Tensor dout, ZigZagLocal(p.dout, n, rank));
  const int64_t tl = q.dim(1);
  Tensor out = Tensor::Cpu(q.shape(), DType::kF32);
  Tensor lse = Tensor::Cpu({p.c.b, p.c.hq, tl}, DType::kF32);
  TANDEM_RETURN_IF_ERROR(RingAttentionForward(*ctx, cp, out, lse, q, k, v, p.scale));
  Tensor dq = Tensor::Cpu(q.shape(), DType::kF32);
  Tensor dk = Tensor::Cpu(k.shape(), DType::kF32);
  Tensor dv = Tensor::Cpu(v.shape(), DType::kF32);
  TANDEM_RETURN_IF_ERROR(
      RingAttentionBackward(*ctx, cp, dq, dk, dv, dout, q, k, v, out, lse, p.scale));
  TANDEM_RETURN_IF_ERROR(ZigZagPlace(r.out, out, n, rank));
  TANDEM_RETURN_IF_ERROR(ZigZagPlace(r.lse, lse, n, rank, /*seq_dim=*/2));
  TANDEM_RETURN_IF_ERROR(ZigZagPlace(r.dq, dq, n, rank));
  TANDEM_RETURN_IF_ERROR(ZigZagPlace(r.dk, dk, n, rank));
  return ZigZagPlace(r.dv, dv, n, rank);
}

// f32 ring vs f32 single-process attention: the same math summed in another order (blocks merged
// through lse, gradients summed over blocks).
inline constexpr tandem::testing::Tolerance kRingF32Tol{2e-5, 2e-5};

inline void ExpectMatchesReference(const RingResult& r, const RingProblem& p) {
  EXPECT_TRUE(tandem::testing::AllClose(r.out, p.out, kRingF32Tol)) << "out";
  EXPECT_TRUE(tandem::testing::AllClose(r.lse, p.lse, kRingF32Tol)) << "lse";
  EXPECT_TRUE(tandem::testing::AllClose(r.dq, p.dq, kRingF32Tol)) << "dq";
  EXPECT_TRUE(tandem::testing::AllClose(r.dk, p.dk, kRingF32Tol)) << "dk";
  EXPECT_TRUE(tandem::testing::AllClose(r.dv, p.dv, kRingF32Tol)) << "dv";
}

}  // namespace tandem::parallel::testing

// The raw PTX of the fused attention kernels, and nothing else: the bf16 tensor-core mma,
// ldmatrix, cp.async, the bf16x2 conversion and exp2. Each wrapper states the exact
// lane <-> element contract the code above it (attention_common.cuh) relies on.
//
// Private to ops/cuda (included through attention_common.cuh). Everything is a device function.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tandem::ops::cuda::attn {

using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D[16x8] = A[16x16] * B[16x8] + C.
// With lane = 0..31, g = lane / 4 ("groupID") and t = lane % 4 ("threadID_in_group"), each lane
// holds (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   A: 4 x .b32 (two bf16 each, the lower column in the low 16 bits)
//        a0 = A[g    ][2t, 2t+1]      a1 = A[g + 8][2t, 2t+1]
//        a2 = A[g    ][2t+8, 2t+9]    a3 = A[g + 8][2t+8, 2t+9]
//   B: 2 x .b32 (two bf16 each, the lower k in the low 16 bits)
//        b0 = B[2t, 2t+1][g]          b1 = B[2t+8, 2t+9][g]
//   C, D: 4 x f32
//        c0, c1 = C[g    ][2t, 2t+1]  c2, c3 = C[g + 8][2t, 2t+1]
// So C fragments of two adjacent 16x8 tiles (columns n0..n0+7 and n0+8..n0+15) are, once
// rounded to bf16, exactly the A fragment of the 16x16 block at columns n0..n0+15:
//   a0 = (c_lo[0], c_lo[1]), a1 = (c_lo[2], c_lo[3]),
//   a2 = (c_hi[0], c_hi[1]), a3 = (c_hi[2], c_hi[3])
// (PackA below). This is how P and dS flow from one mma's output into the next one's input.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 -> one .b32 of two bf16, round to nearest even; `lo` goes to the low 16 bits.
// (PTX cvt.rn.bf16x2.f32 d, a, b puts a in the upper half and b in the lower half.)
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// 2^x with the SFU (ex2.approx.ftz): 2^-inf = +0, which the masking relies on.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8x8 b16 matrices. Lanes 8i..8i+7 give
// the shared addresses of rows 0..7 of matrix i (16 contiguous bytes each); register r[i] of every
// lane receives matrix i:
//   plain:  r[i] = M_i[g][2t, 2t+1]           (row g, two adjacent columns)
//   .trans: r[i] = (M_i[2t][g], M_i[2t+1][g]) (column g, two adjacent rows)
// The volatile asm with a memory clobber keeps each load after the __syncthreads() or
// __syncwarp() that published its data, and before later stores that reuse the buffer.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void Ldsm4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// ---------------------------------------------------------------------------------------------
// cp.async (16 bytes, L2 only). With valid == false the source size is 0: nothing is read and the
// 16 destination bytes are zero-filled (the source address is still a legal one).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void CpAsync16(uint32_t smem_addr, const void* gmem, bool valid) {
  const uint32_t src_bytes = valid ? 16u : 0u;
  const size_t gaddr = __cvta_generic_to_global(gmem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gaddr),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

}  // namespace tandem::ops::cuda::attn

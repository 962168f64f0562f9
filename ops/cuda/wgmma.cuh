// Hopper warpgroup matrix multiply (wgmma) for the sm_90a attention kernels: the PTX wrappers,
// the shared-memory matrix descriptor and the one tile layout every operand uses, and the
// synchronisation the warp-specialized kernels need (named barriers, setmaxnreg, mbarriers, TMA
// tensor loads). Only .cu files compiled for sm_90a include it (see CMakeLists.txt:
// tandem_ops_sm90a).
//
// Tile layout ("panelled, 128-byte swizzle"): a bf16 tile of R rows x C columns (C a multiple
// of 64) is stored as C / 64 panels of R rows x 64 columns; a panel row is 128 bytes, the panels
// follow each other (panel stride R * 128 bytes). Inside a row, 16-byte chunk c (columns
// 8c .. 8c + 7) sits at chunk position c ^ (row % 8). With every tile 1024-byte aligned this is
// exactly the 128-byte swizzle the wgmma unit applies to shared addresses (bits 4-6 of the byte
// address XOR bits 7-9), so one layout serves both operand orientations:
//   - K-major (the reduction runs along the row, e.g. Q and K in S = Q K^T): 8-row groups are
//     1024 bytes apart (SBO); the leading offset is unused. A k-step of 16 columns moves the start
//     address by 32 bytes inside a panel; k-steps 4.. move on to the next panel.
//   - MN-major (the reduction runs down the rows, e.g. V in O = P V, transposed B; or a
//     transposed A, dS stored as dS^T in dQ = dS K): 64 columns of N (or M) per panel, panels LBO =
//     R * 128 bytes apart; 8-row groups (of the reduction) 1024 bytes apart (SBO). A k-step of 16
//     rows moves the start address by 2048 bytes.
// (PTX ISA, "Shared Memory Matrix Layout", canonical layouts with 128B swizzling, T = 8 bf16.)
//
// Accumulators: a warpgroup's m64nN f32 result is d[N / 8][4]; warp w of the group holds rows
// 16w .. 16w + 15 and lane (g = lane / 4, t = lane % 4) holds d[i] = rows 16w + g (d[i][0..1]) and
// 16w + g + 8 (d[i][2..3]) at columns 8i + 2t, +1: each warp's slice is laid out exactly like
// the mma.sync m16n8 C fragments of attention_ptx.cuh, so the softmax and masking helpers of
// attention_common.cuh apply unchanged, and two adjacent 8-column slices rounded to bf16 are the
// A fragment (registers) of a k-step of the next product (PackA).
#pragma once

#include <cstdint>

#include "ops/cuda/attention_ptx.cuh"

namespace tandem::ops::cuda::attn::sm90 {

// Fences and groups (all warpgroup-collective: every thread of the 128 executes them).
// WgmmaFence orders this thread's earlier register writes (accumulators, A fragments) before the
// next wgmma reads them; Commit closes a group of issued wgmmas; Wait<N> blocks until at most N
// groups are in flight.
__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kN>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kN) : "memory");
}
// Makes this thread's generic-proxy writes to shared memory (st.shared, cp.async) visible to
// the async proxy that wgmma reads through; a barrier after it publishes them to the others.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator across an asynchronous wgmma.
template <int kN>
__device__ __forceinline__ void PinAccumulator(float (&d)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// Named barriers (ids 1.. ; 0 is __syncthreads) over `threads` threads: Sync waits for all of
// them, Arrive counts this warp in and goes on.
__device__ __forceinline__ void NamedBarrierSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Moves this warpgroup's register budget to kRegs a thread (all its warps call it).
template <int kRegs>
__device__ __forceinline__ void SetMaxRegsInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void SetMaxRegsDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
// mbarriers (shared-memory transaction barriers) and TMA tensor loads. A barrier completes a
// phase when its expected arrivals have arrived and the bytes announced by ArriveExpectTx have
// landed; Wait(parity) returns once the phase of that parity has completed (the first phase
// has parity 0). Arrivals release and waits acquire at CTA scope, so plain shared-memory stores
// made before an arrival are visible to the threads that waited for it.
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes the initialised barriers visible to the other threads and to the TMA unit (a
// __syncthreads() follows it).
__device__ __forceinline__ void MbarInitFence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// One box of a 4-D tensor map (a CUtensorMap kernel parameter, `tmap` its generic address) at
// coordinates c0..c3 into shared memory at dst; its bytes complete a transaction on `bar`.
__device__ __forceinline__ void TmaLoad4d(uint32_t dst, const void* tmap, int c0, int c1, int c2,
                                          int c3, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits 62-63); addresses
// and offsets are in bytes, encoded >> 4 into 14-bit fields; base offset 0 (1024-aligned tiles).
__device__ __forceinline__ uint64_t MakeDesc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFFu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFFu) >> 4) << 32) | (uint64_t{1} << 62);
}
// Operand A or B read K-major from a panelled tile at `tile` (its row 0), k-step kk (16 columns).
__device__ __forceinline__ uint64_t DescKMajor(uint32_t tile, int rows, int kk) {
  return MakeDesc(tile + static_cast<uint32_t>((kk >> 2) * rows * 128 + (kk & 3) * 32), 16, 1024);
}
// Operand B read MN-major (transposed) from a panelled tile, k-step kk (16 rows).
__device__ __forceinline__ uint64_t DescMnMajor(uint32_t tile, int rows, int kk) {
  return MakeDesc(tile + static_cast<uint32_t>(kk * 2048), static_cast<uint32_t>(rows * 128), 1024);
}

// Byte offset of the 16-byte chunk (row, chunk) of a panelled tile with `rows` rows.
__host__ __device__ constexpr uint32_t SwizzledChunk(int rows, int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * rows * 128 + row * 128 +
                               (((chunk & 7) ^ (row & 7)) << 4));
}

// Starts the copy of rows row0 .. row0 + kRows - 1 of a [T, kD] operand (row r at
// gmem + r * row_stride) into a panelled tile; rows >= num_rows are zero-filled. All kThreads
// threads call it; consecutive threads take consecutive 16-byte chunks of a row.
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void LoadTileSwizzled(uint32_t tile, const bf16* gmem,
                                                 int64_t row_stride, int row0, int num_rows,
                                                 int tid) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    if (kChunks % kThreads != 0 && c >= kChunks) break;
    const int r = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const int row = row0 + r;
    const bool valid = row < num_rows;
    const bf16* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    CpAsync16(tile + SwizzledChunk(kRows, r, chunk), src, valid);
  }
}

// Writes a warpgroup's 64 x kD f32 accumulator as bf16 into rows row0 .. row0 + 63 of a panelled
// tile (`tile`, `rows` rows), each warp its own 16 rows; a lane's rows g and g + 8 are scaled by
// mul_lo and mul_hi.
template <int kD>
__device__ __forceinline__ void StoreAccSwizzled(unsigned char* tile, int rows, int row0,
                                                 const float (&acc)[kD / 8][4], float mul_lo,
                                                 float mul_hi, int warp, int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = row0 + warp * 16 + g + 8 * hf;
      const float mul = hf == 0 ? mul_lo : mul_hi;
      *reinterpret_cast<uint32_t*>(tile + SwizzledChunk(rows, r, dt) + 4u * t) =
          PackBf16x2(acc[dt][2 * hf] * mul, acc[dt][2 * hf + 1] * mul);
    }
}

// Copies rows [0, kRows) of a panelled tile to global rows row0 + r < num_rows (16-byte stores);
// all kThreads threads call it (LoadTileSwizzled's way back).
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void StoreTileSwizzled(bf16* gmem, int64_t row_stride, int row0,
                                                  int num_rows, const unsigned char* tile,
                                                  int tid) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    if (kChunks % kThreads != 0 && c >= kChunks) break;
    const int r = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    if (row0 + r < num_rows) {
      *reinterpret_cast<uint4*>(gmem + static_cast<int64_t>(row0 + r) * row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(tile + SwizzledChunk(kRows, r, chunk));
    }
  }
}

// d (= or +=) A . B for one k-step, A and B from shared memory (descriptors), B K-major.
template <int kN>
__device__ void WgmmaSS(float (&d)[kN / 8][4], uint64_t desc_a, uint64_t desc_b, int accumulate);
// d (= or +=) A . B for one k-step, A and B from shared memory, both MN-major (transposed).
template <int kN>
__device__ void WgmmaSSTransposed(float (&d)[kN / 8][4], uint64_t desc_a, uint64_t desc_b,
                                  int accumulate);
// d (= or +=) A . B for one k-step, A from registers (a PackA fragment per warp), B MN-major.
template <int kN>
__device__ void WgmmaRS(float (&d)[kN / 8][4], const uint32_t (&a)[4], uint64_t desc_b,
                        int accumulate);

// The specializations list one 8-column slice of the accumulator per line.
// clang-format off
// One k-step of m64n64 with A and B from shared memory; kTransA / kTransB: read MN-major.
template <int kTransA, int kTransB>
__device__ __forceinline__ void WgmmaSS64(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                          int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, %35, %36;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));
}

template <>
__device__ __forceinline__ void WgmmaSS<64>(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                            int accumulate) {
  WgmmaSS64<0, 0>(d, desc_a, desc_b, accumulate);
}

template <>
__device__ __forceinline__ void WgmmaSSTransposed<64>(float (&d)[8][4], uint64_t desc_a,
                                                      uint64_t desc_b, int accumulate) {
  WgmmaSS64<1, 1>(d, desc_a, desc_b, accumulate);
}

template <>
__device__ __forceinline__ void WgmmaRS<64>(float (&d)[8][4], const uint32_t (&a)[4],
                                            uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),
        "r"(accumulate));
}

template <>
__device__ __forceinline__ void WgmmaSS<128>(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b,
                                            int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
        "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
        "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

template <>
__device__ __forceinline__ void WgmmaRS<128>(float (&d)[16][4], const uint32_t (&a)[4],
                                            uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
        "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
        "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),
        "r"(accumulate));
}

// clang-format on

}  // namespace tandem::ops::cuda::attn::sm90

// The Hopper (sm_90a, wgmma) attention kernels (forward, and backward dK/dV and dQ), compiled in
// their own object library for sm_90a only (CMakeLists.txt: tandem_ops_sm90a), and the check that
// picks them. Private to ops/cuda.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/attention_forward_kernel.cuh"

namespace tandem::ops::cuda::attn {

namespace sm90 {
// The TMA tensor map of a [B, T, H, head_dim] bf16 operand (token stride row_stride elements), read
// in boxes of 64 columns x box_rows tokens of one head, 128-byte swizzled (wgmma.cuh's panelled
// layout); tokens past T read as zeros. Coordinates (column, head, token, batch).
cudaError_t EncodeOperandMap(CUtensorMap* map, const bf16* base, int head_dim, int heads,
                             int64_t row_stride, int seq, int64_t batch, int box_rows);
}  // namespace sm90

// True when the current device has compute capability 9.0 (the sm_90a code runs there only).
bool DeviceRunsSm90a();

// The forward of attention_forward_sm90a.cu; head_dim 64 or 128 (cudaErrorInvalidValue else).
cudaError_t AttentionForwardSm90(cudaStream_t stream, const FwdParams& p, int64_t batch,
                                 int head_dim);
// The dK/dV and dQ kernels of attention_backward_sm90a.cu (p.delta must be computed already);
// head_dim 64 or 128 (cudaErrorInvalidValue else). With p.dq_acc set, dQ is computed inside the
// dK/dV kernel; the counters at p.dq_sem (sem_bytes of them, the ticket included) are zeroed on
// the stream first.
cudaError_t AttentionBackwardSm90(cudaStream_t stream, const BwdParams& p, int64_t batch,
                                  int head_dim, size_t sem_bytes);

}  // namespace tandem::ops::cuda::attn

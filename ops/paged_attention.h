// Paged KV cache ops for inference (the serving engine, serve/infer_model.h): write K and V rows
// into fixed-size cache pages, and decode/prefill attention that reads a request's keys through a
// block table (vLLM's PagedAttention). CPU reference (f32) and CUDA kernel (bf16 or f32).
//
// Page layout. `kv` is [P, page_elems] with row stride free: row p is one page of the unified
// pool viewed in the compute dtype (a pool page may hold more bytes than a KV block uses). A page
// holds one KV block of one layer: `block_tokens` consecutive positions of one request,
//   K of position slot t, kv head h, element d at  (t * Hkv + h) * D + d
//   V of the same                                 at  block_tokens * Hkv * D + (t * Hkv + h) * D +
//   d
// so page_elems >= 2 * block_tokens * Hkv * D.
//
// Query tokens are ragged: token n belongs to request req[n] and sits at position pos[n]; it
// attends to positions 0..pos[n] of its request (causal; the token's own K/V must have been
// written first), whose pages are block_table[req[n], pos / block_tokens]. GQA: query head h
// reads kv head h / (Hq / Hkv).
//
// Numerics: scores and the softmax in f32 (the CPU sums the exponentials in f64 and rounds once);
// the CUDA kernel uses an online softmax in f32. Deterministic on both (fixed summation order).
// Thread-safety: as every op (ops/ops.h).
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "ops/context.h"

namespace tandem::ops {

// kv[slot[n] / block_tokens] K row (slot[n] % block_tokens) = k[n] and likewise V = v[n].
// k, v [N, Hkv, D] (token stride free, the compute dtype of kv); slot i32 [N] on the device, each
// in [0, P * block_tokens) (checked on the host for CPU contexts only); kv [P, page_elems].
Status PagedKvWrite(Context& ctx, Tensor& kv, const Tensor& k, const Tensor& v, const Tensor& slot,
                    int64_t block_tokens);

// Decode's RoPE and KV write in one kernel: qk [N, Hq + Hkv, D] (q heads, then k heads; token
// stride free) is rotated in place as ops::Rope(qk, qk, positions, inv_freq) does, and the rotated
// k heads and v [N, Hkv, D] are written to the pages as PagedKvWrite does; the results are
// bitwise those of the two ops. positions i32 [N], inv_freq f32 [D/2], slot i32 [N] (checked on
// the host for CPU contexts only); qk, v and kv share the compute dtype; D even.
Status RopePagedKvWrite(Context& ctx, Tensor& qk, Tensor& kv, const Tensor& v,
                        const Tensor& positions, const Tensor& inv_freq, const Tensor& slot,
                        int64_t kv_heads, int64_t block_tokens);

// out[n, h] = softmax_j(scale * q[n, h] . K_j) V_j over positions j in [0, pos[n]] of request
// req[n]. q, out [N, Hq, D] (token stride free); kv as above with Hkv kv heads; req, pos i32 [N];
// block_table i32 [R, max_blocks] contiguous (entries past a request's length are not read).
// Callers guarantee pos[n] < max_blocks * block_tokens and valid page indices (programmer
// errors: the CPU path checks them, the CUDA kernel trusts them).
// CUDA: bf16 or f32, D a multiple of 32 up to 256. CPU: f32, any D.
Status PagedAttention(Context& ctx, Tensor& out, const Tensor& q, const Tensor& kv,
                      const Tensor& block_table, const Tensor& req, const Tensor& pos,
                      int64_t kv_heads, int64_t block_tokens, float scale);

}  // namespace tandem::ops

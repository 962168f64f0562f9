// Every math op of tandem, one function each, on CPU and CUDA.
//
// Each op validates its tensors once (shapes, dtypes, devices, strides) and returns
// InvalidArgument naming the tensor and what was expected; then it runs the CPU reference (f32)
// or the CUDA kernel on ctx.stream() (bf16 or f32, accumulating in f32) without waiting.
// All tensors of one call live on ctx.device(). Shapes in comments: N tokens (B*T), C hidden,
// V vocabulary, H heads, D head dim, F ffn width.
//
// Conventions:
// - Row-major 2-D views: stride(1) == 1, stride(0) >= cols (views into fused projections allowed
//   where noted "row stride free"); everything else is contiguous.
// - Gradients of weights ("dw", "dtable") are f32 and ACCUMULATE (+=), so micro-batches add up;
//   pass an undefined tensor to skip a weight gradient (frozen weights).
// - Gradients of activations overwrite unless an op says otherwise.
// - Deterministic: the same inputs on the same device give bitwise-identical outputs (no float
//   atomics in any reduction).
//
// dtypes: the CPU path takes f32 (ids and targets i32). The CUDA path takes bf16 or f32 for
// activations and weights, except attention, which takes bf16.
#pragma once

#include <cstdint>
#include <span>

#include "core/tensor.h"
#include "ops/context.h"

namespace tandem::ops {

inline constexpr int32_t kIgnoreIndex = -100;  // target id with no loss (prompt tokens, padding)

// c = alpha * op(a) @ op(b) + beta * c, fp32 accumulation.
// op(a) [M, K] (a is [K, M] when trans_a), op(b) [K, N] (b is [N, K] when trans_b), c [M, N].
// a and b share a dtype (f32 or bf16); c is f32 or bf16. Row stride free for a, b and c.
// With beta == 0, c's old contents are ignored (NaNs in it do not propagate).
Status Matmul(Context& ctx, Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
              float alpha = 1.0f, float beta = 0.0f);

// out[n, :] = table[ids[n], :]. ids i32 [N] in [0, V) (InvalidArgument on CPU otherwise; the
// CUDA kernel writes zeros for an out-of-range id), table [V, C], out [N, C].
Status EmbeddingForward(Context& ctx, Tensor& out, const Tensor& ids, const Tensor& table);
// dtable[v, :] += sum over n with ids[n] == v of dout[n, :], summed in increasing n.
// dtable f32 [V, C]; dout [N, C].
Status EmbeddingBackward(Context& ctx, Tensor& dtable, const Tensor& dout, const Tensor& ids);

// y = x * rstd * w with rstd[n] = 1 / sqrt(mean_c(x[n, c]^2) + eps), computed in f32 and rounded
// once. x, y [N, C] (row stride free); w [C] (x's dtype); rstd f32 [N], or undefined to not save.
Status RmsNormForward(Context& ctx, Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                      float eps);
// sum = a + b (computed in f32 and rounded, as Add), then y = RmsNormForward(sum) (no rstd): a
// block's residual add and the next norm in one pass over each row (the serving forward). a, b,
// sum, y [N, C] (row stride free; sum may be a or b); w [C]. The values of Add followed by
// RmsNormForward.
Status AddRmsNormForward(Context& ctx, Tensor& sum, Tensor& y, const Tensor& a, const Tensor& b,
                         const Tensor& w, float eps);
// dx = (or += when accumulate_dx) the input gradient; dw += sum_n dy * x * rstd (f32 [C], or
// undefined to skip). rstd from the forward.
Status RmsNormBackward(Context& ctx, Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x,
                       const Tensor& w, const Tensor& rstd, bool accumulate_dx);

// Rotary embedding, HF "rotate_half" convention: for each head, element i < D/2 pairs with
// i + D/2; angle = float(positions[n]) * inv_freq[i] computed in f32; cos/sin in f32:
//   y[i]       = x[i] * cos - x[i + D/2] * sin
//   y[i + D/2] = x[i + D/2] * cos + x[i] * sin
// inverse == true rotates by -angle (the backward pass). x, y [N, H, D] with token stride free
// (views into fused qkv) and heads contiguous; y may be x (in place). positions i32 [N];
// inv_freq f32 [D/2] (see model/rope.h for Llama-3 scaling).
Status Rope(Context& ctx, Tensor& y, const Tensor& x, const Tensor& positions,
            const Tensor& inv_freq, bool inverse);

// Causal grouped-query attention, fused: the [T, T] score matrix is never stored.
// q [B, T, Hq, D], k and v [B, T, Hkv, D], Hq % Hkv == 0, query head h reads kv head
// h / (Hq / Hkv). Token stride free (views into fused qkv); heads and D contiguous.
// out [B, T, Hq, D] (same rule), lse f32 [B, Hq, T] = natural-log sum of exp(scale * q.k) over
// visible keys, saved for the backward. Key j is visible to query i iff j <= i and, when
// segment_ids [B, T] i32 is given, segment_ids[b, j] == segment_ids[b, i] (packed documents).
// CUDA: bf16, D in {64, 128}. CPU: f32, any D.
Status AttentionForward(Context& ctx, Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                        const Tensor& v, float scale, const Tensor& segment_ids = Tensor());
// dq [B, T, Hq, D], dk and dv [B, T, Hkv, D] (summed over each kv head's query group); all
// overwritten; token stride free. out and lse from the forward.
Status AttentionBackward(Context& ctx, Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                         const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                         const Tensor& lse, float scale, const Tensor& segment_ids = Tensor());

// Which CUDA attention kernels run (process-wide; every call reads it). kAuto: the Hopper
// warpgroup (wgmma) kernels on devices of compute capability 9.0, the mma.sync kernels elsewhere;
// on Hopper the backward computes dQ inside the dK/dV kernel (five products per tile, dQ summed
// over key tiles in a fixed order through an f32 buffer). kWgmmaSplitDq: the wgmma kernels with
// dQ in a kernel of its own that recomputes S and dP (seven products). kMmaSync: the mma.sync
// kernels everywhere. The last two are the benchmarks' and parity tests' comparisons.
enum class AttentionKernel { kAuto, kWgmmaSplitDq, kMmaSync };
void SetAttentionKernel(AttentionKernel kernel);
AttentionKernel GetAttentionKernel();

// Attention over blocks of a longer sequence, for context-parallel ring attention
// (parallel/ring_attention.h): a block of T queries against a block of T keys of the same length.
enum class AttentionMask {
  kCausal,  // the same chunk of the sequence: key j visible to query i iff j <= i
  kFull,    // a key chunk entirely before the query chunk: every key visible
};
// The attention of the block alone: out and lse (over the block's keys only) overwritten, same
// layouts, dtypes and head dims as AttentionForward (kCausal computes exactly AttentionForward).
Status AttentionBlockForward(Context& ctx, Tensor& out, Tensor& lse, const Tensor& q,
                             const Tensor& k, const Tensor& v, float scale, AttentionMask mask);
// The block's share of the gradients, given the FINAL out and lse of the queries (over every key
// block; flash backward with delta = rowsum(dout * out)): dq is the block's contribution to dq,
// dk and dv the contributions to the key block's gradients; all three overwritten in q's dtype.
// Summing the contributions over all key blocks (for dq) and all query blocks (for dk, dv) gives
// the gradients of the whole attention.
Status AttentionBlockBackward(Context& ctx, Tensor& dq, Tensor& dk, Tensor& dv,
                              const Tensor& dout, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& out, const Tensor& lse, float scale,
                              AttentionMask mask);
// Merges one block's partial result into a running one, per row (b, t, h) in f32:
//   l = log(exp(lse_acc) + exp(lse_blk))
//   out_acc = exp(lse_acc - l) * out_acc + exp(lse_blk - l) * out_blk,  lse_acc = l.
// A row with lse_acc = -inf (nothing merged yet) takes the block as is. out_acc f32
// [B, T, H, D], lse_acc and lse_blk f32 [B, H, T], out_blk [B, T, H, D] in the context's
// attention dtype (f32 on CPU, bf16 or f32 on CUDA); all contiguous.
Status AttentionMerge(Context& ctx, Tensor& out_acc, Tensor& lse_acc, const Tensor& out_blk,
                      const Tensor& lse_blk);
// Moves tokens between the sequence layout x [B, C * Tc, H, D] (token stride free) and the
// chunk-major layout chunked [C, B, Tc, H, D] (contiguous): chunked[c, b, t] = x[b, c * Tc + t].
// Any dtype (a [B, H, T] lse is x [B * H, T, 1, 1]); no arithmetic, so results are exact.
Status ToChunkMajor(Context& ctx, Tensor& chunked, const Tensor& x);
Status FromChunkMajor(Context& ctx, Tensor& x, const Tensor& chunked);

// out = silu(gate) * up with silu(g) = g / (1 + exp(-g)), in f32. gate, up, out [N, F], row
// stride free (views into a fused gate|up projection).
Status SwigluForward(Context& ctx, Tensor& out, const Tensor& gate, const Tensor& up);
// dgate, dup [N, F] (row stride free), overwritten.
Status SwigluBackward(Context& ctx, Tensor& dgate, Tensor& dup, const Tensor& dout,
                      const Tensor& gate, const Tensor& up);

// Row-wise cross-entropy. losses f32 [N]: logsumexp(logits[n]) - logits[n, targets[n]], or 0
// when targets[n] == kIgnoreIndex. If dlogits is defined:
//   dlogits[n, :] = grad_scale * (softmax(logits[n, :]) - onehot(targets[n]))
// (a zero row when ignored). dlogits may be logits itself (in place). logits, dlogits [N, V] f32
// or bf16, contiguous; targets i32 [N] in [0, V) or kIgnoreIndex. Callers chunk N so the logits
// of a whole batch never exist at once (see model/llama.h).
Status CrossEntropy(Context& ctx, Tensor& losses, Tensor& dlogits, const Tensor& logits,
                    const Tensor& targets, float grad_scale);

// Cross-entropy over a vocabulary split across ranks (tensor parallelism): this rank holds the
// logits of vocabulary ids [vocab_start, vocab_start + valid) in the first `valid` columns of
// logits [N, Vl] (columns past `valid` are padding and take no part). targets i32 [N] hold
// GLOBAL ids or kIgnoreIndex. Two steps around one all-gather of the partials:
//   1. ShardedCrossEntropyPartials: partials f32 [N, 3] = (max over the row's valid columns,
//      sum of exp(x - max), the target's logit if this rank holds it else 0).
//   2. all-gather the partials of the tp ranks in rank order into all_partials f32 [R, N, 3].
//   3. ShardedCrossEntropyFinish: lse = logsumexp of the R partials (combined in rank order, so
//      every rank gets the same bits), losses f32 [N] = lse - sum of the target slots (0 for
//      ignored rows); if dlogits [N, Vl] is defined (may be logits, in place):
//      dlogits = grad_scale * (exp(x - lse) - onehot) on valid columns, 0 on padding and on
//      ignored rows.
// logits / dlogits f32 or bf16 (the context's float types), contiguous. 0 <= valid <= Vl.
Status ShardedCrossEntropyPartials(Context& ctx, Tensor& partials, const Tensor& logits,
                                   const Tensor& targets, int64_t vocab_start, int64_t valid);
Status ShardedCrossEntropyFinish(Context& ctx, Tensor& losses, Tensor& dlogits,
                                 const Tensor& logits, const Tensor& all_partials,
                                 const Tensor& targets, int64_t vocab_start, int64_t valid,
                                 float grad_scale);

struct AdamWParams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;         // 1-based step count after this update, for bias correction
  float grad_scale = 1.0f;  // multiplies grad before use (clipping, averaging)
};
// One AdamW update, PyTorch's order of operations, all in f32:
//   g = grad * grad_scale
//   p = p * (1 - lr * weight_decay)
//   m = m + (1 - beta1) * (g - m)
//   v = v * beta2 + (1 - beta2) * g * g
//   denom = sqrt(v) / sqrt(1 - beta2^step) + eps
//   p = p - (lr / (1 - beta1^step)) * m / denom
// master, m, v, grad f32 [n] contiguous, same numel. model_weights (optional, bf16 or f32, same
// numel) receives p rounded to its dtype.
Status AdamW(Context& ctx, Tensor& master, Tensor& m, Tensor& v, Tensor& model_weights,
             const Tensor& grad, const AdamWParams& params);

// out[0] += sum of x^2 over all elements, in f32 (out: f32 [1] on ctx's device). x any floating
// dtype, contiguous. Used for the global gradient norm.
Status SumSquares(Context& ctx, Tensor& out, const Tensor& x);

// out = a + b elementwise (same shape and dtype, contiguous; out may alias a or b).
Status Add(Context& ctx, Tensor& out, const Tensor& a, const Tensor& b);
// out = in converted between f32, bf16 and f16 (round to nearest even). Same shape, contiguous.
Status Cast(Context& ctx, Tensor& out, const Tensor& in);
// Sets every element of a contiguous floating or integer tensor to value.
Status Fill(Context& ctx, Tensor& out, float value);
// x *= s elementwise (floating, contiguous).
Status Scale(Context& ctx, Tensor& x, float s);
// dst = src for 2-D matrices of the same shape and dtype (any dtype), both row stride free: a
// column block of a wider matrix to or from another.
Status CopyMatrix(Context& ctx, Tensor& dst, const Tensor& src);
// dst[i] = src[i] for every pair (CopyMatrix's rules each). On the device, pairs with rows under
// 512 bytes go through one kernel launch per 8 (a LoRA group's factors into its wide matrix),
// the others through cudaMemcpy2DAsync.
Status CopyMatrices(Context& ctx, std::span<Tensor> dst, std::span<const Tensor> src);

}  // namespace tandem::ops

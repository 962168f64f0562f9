// LlamaModel: batch validation, activation buffers, the forward pass and the chunked loss head.
#include <algorithm>
#include <cmath>

#include "model/internal/layer_stream.h"
#include "model/internal/llama_state.h"
#include "model/llama.h"
#include "ops/ops.h"

namespace tandem::model {

namespace {

// A Batch field: i32 [B, T], contiguous, on the host.
Status CheckBatchTensor(const Tensor& t, const char* name, int64_t B, int64_t T) {
  if (!t.device().is_cpu() || t.dtype() != DType::kI32 || !t.is_contiguous() ||
      t.shape() != Shape{B, T}) {
    return InvalidArgumentError(StrCat("batch.", name, ": expected a contiguous host i32 tensor ",
                                       ShapeToString({B, T}), ", found ", t.DebugString()));
  }
  return Status::Ok();
}

// Every element in [lo, hi), or kIgnoreIndex when allow_ignore.
Status CheckRange(const Tensor& t, const char* name, int32_t lo, int64_t hi, bool allow_ignore) {
  const int32_t* p = t.data<int32_t>();
  const int64_t T = t.dim(1);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if ((p[i] >= lo && p[i] < hi) || (allow_ignore && p[i] == ops::kIgnoreIndex)) continue;
    return InvalidArgumentError(StrCat("batch.", name, "[", i / T, ", ", i % T, "] = ", p[i],
                                       " is outside [", lo, ", ", hi, ")",
                                       allow_ignore ? " and is not ops::kIgnoreIndex (-100)" : ""));
  }
  return Status::Ok();
}

Tensor Rows(const Tensor& t, int64_t begin, int64_t end) { return t.Slice(0, begin, end); }

}  // namespace

Status LlamaModel::EnsureActivations(int64_t B, int64_t T, bool backward) {
  Activations* a = acts_.get();
  const int64_t N = B * T, C = config_.hidden_size, F = ffn_;  // this rank's share under tp
  const int64_t D = config_.head_dim, Hq = hq_;
  const int64_t H3 = Hq + 2 * hkv_;
  const DType A = compute_dtype_;
  auto alloc = [&](Tensor* t, const Shape& shape, DType dtype) -> Status {
    TANDEM_ASSIGN_OR_RETURN(*t, Tensor::Empty(shape, dtype, ctx_.allocator()));
    return Status::Ok();
  };
  // [adapter] a wide buffer and its first `cols` columns.
  auto alloc_wide = [&](Tensor* narrow, Tensor* wide, int64_t cols, int64_t spare) -> Status {
    TANDEM_RETURN_IF_ERROR(alloc(wide, {N, cols + spare}, A));
    *narrow = spare > 0 ? wide->Slice(1, 0, cols) : *wide;
    return Status::Ok();
  };
  int64_t wide_qkv = 0, wide_gate_up = 0, wide_o = 0, wide_down = 0;  // [adapter] spare columns
  if (adapter_ != nullptr && stream_ == nullptr) {
    // The adapter's columns rounded up to `multiple`: whole heads where a buffer is also viewed
    // as [.., heads, D] (qkv, dqkv, attn, dattn), else 16 bytes.
    auto spare = [&](std::span<const Projection> projs, int64_t multiple) {
      const int64_t r = std::max<int64_t>(adapter_->WideColumns(projs), 0);
      return (r + multiple - 1) / multiple * multiple;
    };
    constexpr Projection kQkv[] = {Projection::kQ, Projection::kK, Projection::kV};
    constexpr Projection kO[] = {Projection::kO};
    constexpr Projection kGateUp[] = {Projection::kGate, Projection::kUp};
    constexpr Projection kDown[] = {Projection::kDown};
    wide_qkv = spare(kQkv, D);
    wide_o = spare(kO, D);
    wide_gate_up = spare(kGateUp, 8);
    // Not under recompute: its repeat of a block stops before down, so s h would go stale.
    wide_down = options_.recompute ? 0 : spare(kDown, 8);
  }
  bool allocate = a == nullptr || a->batch != B || a->seq != T;
  if (a != nullptr) {  // widths only grow: an adapter detached for a pass comes back
    allocate = allocate || wide_qkv > a->wide_qkv || wide_gate_up > a->wide_gate_up ||
               wide_o > a->wide_o || wide_down > a->wide_down;
    wide_qkv = std::max(wide_qkv, a->wide_qkv);
    wide_gate_up = std::max(wide_gate_up, a->wide_gate_up);
    wide_o = std::max(wide_o, a->wide_o);
    wide_down = std::max(wide_down, a->wide_down);
  }
  if (allocate) {
    acts_.reset();  // free the old shape's buffers before allocating the new ones
    acts_ = std::make_unique<Activations>();
    a = acts_.get();
    a->batch = B;
    a->seq = T;
    a->wide_qkv = wide_qkv;
    a->wide_gate_up = wide_gate_up;
    a->wide_o = wide_o;
    a->wide_down = wide_down;
    TANDEM_RETURN_IF_ERROR(alloc(&a->tokens, {N}, DType::kI32));
    TANDEM_RETURN_IF_ERROR(alloc(&a->targets, {N}, DType::kI32));
    TANDEM_RETURN_IF_ERROR(alloc(&a->positions, {N}, DType::kI32));
    a->x.resize(config_.num_hidden_layers + 1);
    for (Tensor& x : a->x) TANDEM_RETURN_IF_ERROR(alloc(&x, {N, C}, A));
    a->blocks.resize(options_.recompute ? 1 : config_.num_hidden_layers);
    for (Activations::Block& b : a->blocks) {
      TANDEM_RETURN_IF_ERROR(alloc_wide(&b.ln1, &b.ln1_wide, C, a->wide_qkv));
      TANDEM_RETURN_IF_ERROR(alloc(&b.rstd1, {N}, DType::kF32));
      // As wide as dqkv: the attention backward reads both with one token stride.
      TANDEM_RETURN_IF_ERROR(alloc_wide(&b.qkv, &b.qkv_wide, H3 * D, a->wide_qkv));
      TANDEM_RETURN_IF_ERROR(alloc_wide(&b.attn, &b.attn_wide, Hq * D, a->wide_o));
      TANDEM_RETURN_IF_ERROR(alloc(&b.lse, {B, Hq, T}, DType::kF32));
      TANDEM_RETURN_IF_ERROR(alloc(&b.x_mid, {N, C}, A));
      TANDEM_RETURN_IF_ERROR(alloc_wide(&b.ln2, &b.ln2_wide, C, a->wide_gate_up));
      TANDEM_RETURN_IF_ERROR(alloc(&b.rstd2, {N}, DType::kF32));
      TANDEM_RETURN_IF_ERROR(alloc(&b.gate_up, {N, 2 * F}, A));
      TANDEM_RETURN_IF_ERROR(alloc_wide(&b.act, &b.act_wide, F, a->wide_down));
    }
    TANDEM_RETURN_IF_ERROR(alloc(&a->lnf, {N, C}, A));
    TANDEM_RETURN_IF_ERROR(alloc(&a->rstdf, {N}, DType::kF32));
    TANDEM_RETURN_IF_ERROR(alloc(&a->proj, {N, C}, A));
    const int64_t chunk = std::min(options_.loss_chunk_tokens, N);
    TANDEM_RETURN_IF_ERROR(alloc(&a->logits, {chunk, vocab_rows_}, A));
    if (tp()) TANDEM_RETURN_IF_ERROR(alloc(&a->embed_ids, {N}, DType::kI32));
    TANDEM_RETURN_IF_ERROR(alloc(&a->losses, {N}, DType::kF32));
  }
  if (backward && !a->has_backward) {
    TANDEM_RETURN_IF_ERROR(
        alloc_wide(&a->dres, &a->dres_wide, C, std::max(a->wide_o, a->wide_down)));
    TANDEM_RETURN_IF_ERROR(alloc(&a->dln, {N, C}, A));
    TANDEM_RETURN_IF_ERROR(alloc_wide(&a->dqkv, &a->dqkv_wide, H3 * D, a->wide_qkv));
    TANDEM_RETURN_IF_ERROR(alloc_wide(&a->dattn, &a->dattn_wide, Hq * D, a->wide_o));
    TANDEM_RETURN_IF_ERROR(alloc_wide(&a->dgate_up, &a->dgate_up_wide, 2 * F, a->wide_gate_up));
    TANDEM_RETURN_IF_ERROR(alloc(&a->dact, {N, F}, A));
    a->has_backward = true;
  }
  return Status::Ok();
}

Status LlamaModel::PrepareBatch(const Batch& batch, bool need_targets, bool backward) {
  const Tensor& tok = batch.tokens;
  if (!tok.defined() || tok.ndim() != 2 || tok.dim(0) <= 0 || tok.dim(1) <= 0) {
    return InvalidArgumentError(StrCat("batch.tokens: expected a host i32 tensor [B, T] with ",
                                       "B, T > 0, found ", tok.DebugString()));
  }
  const int64_t B = tok.dim(0), T = tok.dim(1), N = B * T;
  TANDEM_RETURN_IF_ERROR(CheckBatchTensor(tok, "tokens", B, T));
  TANDEM_RETURN_IF_ERROR(CheckRange(tok, "tokens", 0, config_.vocab_size, false));
  if (need_targets) {
    if (!batch.targets.defined()) return InvalidArgumentError("batch.targets is undefined");
    TANDEM_RETURN_IF_ERROR(CheckBatchTensor(batch.targets, "targets", B, T));
    TANDEM_RETURN_IF_ERROR(CheckRange(batch.targets, "targets", 0, config_.vocab_size, true));
  }
  if (batch.positions.defined()) {
    TANDEM_RETURN_IF_ERROR(CheckBatchTensor(batch.positions, "positions", B, T));
    TANDEM_RETURN_IF_ERROR(CheckRange(batch.positions, "positions", 0, INT32_MAX, false));
  }
  if (batch.segment_ids.defined()) {
    TANDEM_RETURN_IF_ERROR(CheckBatchTensor(batch.segment_ids, "segment_ids", B, T));
    if (cp()) {
      return UnimplementedError(
          "batch.segment_ids (packed documents, data.packing = doc_mask) with context "
          "parallelism (cp > 1) is not supported: use data.packing = eos");
    }
  }
  if (cp() && !batch.positions.defined()) {
    return InvalidArgumentError(
        "context parallelism (cp > 1): batch.positions must hold the global positions of this "
        "rank's zig-zag chunks");
  }
  if (tp() && adapter_ != nullptr && !adapter_->SupportsTensorParallel()) {
    return UnimplementedError(
        "this adapter does not support tensor parallelism (tp > 1): only LoRA (peft::AdapterSet) "
        "does; S2FT trains with tp = 1");
  }
  if (batch.adapter_ids.defined()) {  // [adapter] the adapter checks the values
    if (adapter_ == nullptr) {
      return InvalidArgumentError(
          "batch.adapter_ids is set but no adapter is attached (LlamaModel::SetAdapter)");
    }
    const Tensor& ids = batch.adapter_ids;
    if (!ids.device().is_cpu() || ids.dtype() != DType::kI32 || ids.shape() != Shape{B}) {
      return InvalidArgumentError(StrCat("batch.adapter_ids: expected a host i32 tensor [", B,
                                         "], found ", ids.DebugString()));
    }
  }
  TANDEM_RETURN_IF_ERROR(EnsureActivations(B, T, backward));
  Activations& a = *acts_;
  const CudaStream stream = ctx_.stream();
  TANDEM_RETURN_IF_ERROR(CopyTensor(a.tokens, tok.View({N}), stream));
  Tensor embed_ids;  // tp: row of the local table, or the zero sink row for other ranks' tokens
  if (tp()) {
    embed_ids = Tensor::Cpu({N}, DType::kI32);
    const int32_t* t = tok.data<int32_t>();
    for (int64_t i = 0; i < N; ++i) {
      const int64_t local = t[i] - vocab_start_;
      embed_ids.data<int32_t>()[i] =
          static_cast<int32_t>(local >= 0 && local < vocab_rows_ ? local : vocab_rows_);
    }
    TANDEM_RETURN_IF_ERROR(CopyTensor(a.embed_ids, embed_ids, stream));
  }
  a.host_targets.clear();
  a.num_targets = 0;
  if (need_targets) {
    TANDEM_RETURN_IF_ERROR(CopyTensor(a.targets, batch.targets.View({N}), stream));
    const int32_t* t = batch.targets.data<int32_t>();
    a.host_targets.assign(t, t + N);
    for (int32_t id : a.host_targets) a.num_targets += id != ops::kIgnoreIndex;
  }
  Tensor positions = batch.positions;
  if (!positions.defined()) {  // 0..T-1 in every row
    positions = Tensor::Cpu({B, T}, DType::kI32);
    for (int64_t i = 0; i < N; ++i) positions.data<int32_t>()[i] = static_cast<int32_t>(i % T);
  }
  TANDEM_RETURN_IF_ERROR(CopyTensor(a.positions, positions.View({N}), stream));
  a.use_segments = batch.segment_ids.defined();
  if (a.use_segments) {
    if (!a.segment_ids.defined()) {
      TANDEM_ASSIGN_OR_RETURN(a.segment_ids, Tensor::Empty({B, T}, DType::kI32, ctx_.allocator()));
    }
    TANDEM_RETURN_IF_ERROR(CopyTensor(a.segment_ids, batch.segment_ids, stream));
  }
  if (adapter_ != nullptr) TANDEM_RETURN_IF_ERROR(adapter_->BeginBatch(batch, backward));
  return ctx_.Synchronize();  // the host tensors above may die when we return
}

Status LlamaModel::Forward() {
  TANDEM_RETURN_IF_ERROR(ForwardStart());
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) TANDEM_RETURN_IF_ERROR(ForwardLayer(l));
  return weights_needed_ ? weights_needed_({final_norm_, lm_head_}) : Status::Ok();
}

Status LlamaModel::ForwardStart() {
  Activations& a = *acts_;
  if (weights_needed_) TANDEM_RETURN_IF_ERROR(weights_needed_({embed_}));
  if (tp()) {  // vocabulary-parallel lookup: other ranks' tokens read the zero sink row
    TANDEM_RETURN_IF_ERROR(
        ops::EmbeddingForward(ctx_, a.x[0], a.embed_ids, groups_[group_of_[embed_]].weight));
    TANDEM_RETURN_IF_ERROR(options_.parallel.hooks->TpAllReduceSum(a.x[0]));
  } else {
    TANDEM_RETURN_IF_ERROR(ops::EmbeddingForward(ctx_, a.x[0], a.tokens, params_[embed_].weight));
  }
  if (stream_) stream_->Invalidate();  // [offload] host weights may have changed since
  return Status::Ok();
}

Status LlamaModel::ForwardLayer(int64_t l) {
  const int64_t L = config_.num_hidden_layers;
  const Layer& y = layers_[l];
  if (weights_needed_) {
    TANDEM_RETURN_IF_ERROR(
        weights_needed_({y.q, y.k, y.v, y.o, y.gate, y.up, y.down, y.attn_norm, y.mlp_norm}));
  }
  TANDEM_ASSIGN_OR_RETURN(const LayerWeights w, WeightsOf(l, l + 1 < L ? l + 1 : -1));
  return BlockForward(l, /*write_output=*/true, w);
}

bool LlamaModel::WideGroup(int g, int64_t spare) const {
  if (spare == 0 || adapter_ == nullptr || stream_ != nullptr) return false;
  for (size_t i : groups_[g].members) {
    if (params_[i].trainable) return false;
  }
  return true;
}

Status LlamaModel::Project(int64_t l, std::span<const Projection> projs,
                           std::span<const int64_t> col_start, const Tensor& x, const Tensor& w,
                           Tensor& y, const Tensor& x_wide) {
  if (adapter_ != nullptr && x_wide.defined()) {  // [adapter] the wide path
    TANDEM_ASSIGN_OR_RETURN(
        const bool done, adapter_->ProjectionsForwardWide(l, projs, col_start, x_wide, x.dim(1), w,
                                                          weights_generation_, y));
    if (done) return Status::Ok();
  }
  bool first = false;  // [adapter]
  if (adapter_ != nullptr) {
    TANDEM_ASSIGN_OR_RETURN(first, adapter_->ProjectionsForwardFirst(l, projs, col_start, x, y));
  }
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, y, x, w, false, true, 1.0f, first ? 1.0f : 0.0f));
  if (adapter_ == nullptr || first) return Status::Ok();
  for (size_t m = 0; m < projs.size(); ++m) {
    Tensor y_m = y.Slice(1, col_start[m], col_start[m + 1]);  // [N, rows_m]
    TANDEM_RETURN_IF_ERROR(adapter_->ProjectionForward(l, projs[m], x, y_m));
  }
  return Status::Ok();
}

// x[l] -> x[l + 1]. Without write_output (recompute) it stops after SwiGLU: backward needs
// everything but the block's output.
Status LlamaModel::BlockForward(int64_t l, bool write_output, const LayerWeights& w) {
  Activations& a = *acts_;
  Activations::Block& b = a.blocks[options_.recompute ? 0 : l];
  const Layer& layer = layers_[l];
  const int64_t B = a.batch, T = a.seq, N = B * T;
  const int64_t Hq = hq_, Hkv = hkv_;  // this rank's heads
  const int64_t D = config_.head_dim, F = ffn_, H3 = Hq + 2 * Hkv;
  ParallelHooks* hooks = options_.parallel.hooks;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const Tensor& x_in = a.x[l];  // [N, C]

  // Attention: ln1 = norm(x); q|k|v = ln1 Wqkv^T; rope(q, k); attn = softmax(q k^T) v.
  TANDEM_RETURN_IF_ERROR(ops::RmsNormForward(ctx_, b.ln1, b.rstd1, x_in, w.attn_norm, eps));
  constexpr Projection kQkv[] = {Projection::kQ, Projection::kK, Projection::kV};
  const Tensor ln1_wide = WideGroup(layer.qkv_group, a.wide_qkv) ? b.ln1_wide : Tensor();
  TANDEM_RETURN_IF_ERROR(  // [N, H3 D], adapter deltas included before RoPE reads them
      Project(l, kQkv, groups_[layer.qkv_group].row_start, b.ln1, w.qkv, b.qkv, ln1_wide));
  const int64_t Hw = b.qkv_wide.dim(1) / D;  // H3 and the wide path's spare heads
  const Tensor heads = b.qkv_wide.View({N, Hw, D}).Slice(1, 0, H3);
  Tensor qk_rot = heads.Slice(1, 0, Hq + Hkv);  // q's heads then k's: [N, Hq + Hkv, D]
  TANDEM_RETURN_IF_ERROR(ops::Rope(ctx_, qk_rot, qk_rot, a.positions, inv_freq_, false));
  const Tensor qkv4 = b.qkv_wide.View({B, T, Hw, D}).Slice(2, 0, H3);
  const Tensor q = qkv4.Slice(2, 0, Hq);         // [B, T, Hq, D]
  const Tensor k = qkv4.Slice(2, Hq, Hq + Hkv);  // [B, T, Hkv, D]
  const Tensor v = qkv4.Slice(2, Hq + Hkv, H3);  // [B, T, Hkv, D]
  Tensor attn4 = b.attn_wide.View({B, T, b.attn_wide.dim(1) / D, D}).Slice(2, 0, Hq);
  const Tensor seg = a.use_segments ? a.segment_ids : Tensor();
  if (cp()) {
    TANDEM_RETURN_IF_ERROR(hooks->CpAttentionForward(attn4, b.lse, q, k, v, scale));
  } else {
    TANDEM_RETURN_IF_ERROR(ops::AttentionForward(ctx_, attn4, b.lse, q, k, v, scale, seg));
  }
  const int64_t c_cols[] = {0, a.proj.dim(1)};  // the o and down projections' one block
  constexpr Projection kO[] = {Projection::kO};
  const Tensor attn_wide = WideGroup(group_of_[layer.o], a.wide_o) ? b.attn_wide : Tensor();
  TANDEM_RETURN_IF_ERROR(Project(l, kO, c_cols, b.attn, w.o, a.proj, attn_wide));
  if (tp()) TANDEM_RETURN_IF_ERROR(hooks->TpAllReduceSum(a.proj));  // row parallel
  TANDEM_RETURN_IF_ERROR(ops::Add(ctx_, b.x_mid, x_in, a.proj));    // [N, C]

  // MLP: ln2 = norm(x_mid); gate|up = ln2 Wgu^T; act = silu(gate) * up; out = act Wdown^T.
  TANDEM_RETURN_IF_ERROR(ops::RmsNormForward(ctx_, b.ln2, b.rstd2, b.x_mid, w.mlp_norm, eps));
  constexpr Projection kGateUp[] = {Projection::kGate, Projection::kUp};
  const Tensor ln2_wide = WideGroup(layer.gate_up_group, a.wide_gate_up) ? b.ln2_wide : Tensor();
  TANDEM_RETURN_IF_ERROR(Project(l, kGateUp, groups_[layer.gate_up_group].row_start, b.ln2,
                                 w.gate_up, b.gate_up, ln2_wide));
  const Tensor gate = b.gate_up.Slice(1, 0, F);  // [N, F], row stride 2F
  const Tensor up = b.gate_up.Slice(1, F, 2 * F);
  TANDEM_RETURN_IF_ERROR(ops::SwigluForward(ctx_, b.act, gate, up));
  if (!write_output) return Status::Ok();
  constexpr Projection kDown[] = {Projection::kDown};
  const Tensor act_wide = WideGroup(group_of_[layer.down], a.wide_down) ? b.act_wide : Tensor();
  TANDEM_RETURN_IF_ERROR(Project(l, kDown, c_cols, b.act, w.down, a.proj, act_wide));
  if (tp()) TANDEM_RETURN_IF_ERROR(hooks->TpAllReduceSum(a.proj));  // row parallel
  return ops::Add(ctx_, a.x[l + 1], b.x_mid, a.proj);
}

// Final norm, then per chunk of rows: logits = h Wlm^T, losses (and dlogits in place), and in
// backward dh = dlogits Wlm, dWlm += dlogits^T h; finally dres = d(final norm input).
Status LlamaModel::LossHead(float grad_scale, bool backward) {
  Activations& a = *acts_;
  const int64_t N = a.batch * a.seq;
  const int64_t L = config_.num_hidden_layers;
  const Tensor& w_norm = params_[final_norm_].weight;
  TANDEM_RETURN_IF_ERROR(ops::RmsNormForward(ctx_, a.lnf, a.rstdf, a.x[L], w_norm,
                                             static_cast<float>(config_.rms_norm_eps)));
  const Tensor& w_lm = params_[lm_head_].weight;  // [V, C]
  const int64_t chunk = a.logits.dim(0);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t r1 = std::min(N, r0 + chunk);
    Tensor losses = a.losses.Slice(0, r0, r1);  // f32 [n]
    const bool any = std::any_of(a.host_targets.begin() + r0, a.host_targets.begin() + r1,
                                 [](int32_t t) { return t != ops::kIgnoreIndex; });
    if (!any) {  // no loss and no gradient from these rows
      TANDEM_RETURN_IF_ERROR(ops::Fill(ctx_, losses, 0.0f));
      if (backward) {
        Tensor dh = Rows(a.dln, r0, r1);
        TANDEM_RETURN_IF_ERROR(ops::Fill(ctx_, dh, 0.0f));
      }
      continue;
    }
    const Tensor h = Rows(a.lnf, r0, r1);        // [n, C]
    Tensor logits = Rows(a.logits, 0, r1 - r0);  // [n, V]
    const Tensor targets = a.targets.Slice(0, r0, r1);
    TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, logits, h, w_lm, false, true));
    if (tp()) {
      TANDEM_RETURN_IF_ERROR(
          VocabParallelCrossEntropy(losses, logits, targets, grad_scale, backward));
    } else {
      Tensor dlogits = backward ? logits : Tensor();  // in place
      TANDEM_RETURN_IF_ERROR(ops::CrossEntropy(ctx_, losses, dlogits, logits, targets, grad_scale));
    }
    if (!backward) continue;
    Tensor dh = Rows(a.dln, r0, r1);  // [n, C]
    TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dh, logits, w_lm, false, false));
    TANDEM_RETURN_IF_ERROR(WeightGrad(lm_head_, logits, h));
  }
  if (!backward) return Status::Ok();
  if (tp()) TANDEM_RETURN_IF_ERROR(options_.parallel.hooks->TpAllReduceSum(a.dln));
  TANDEM_RETURN_IF_ERROR(TouchGrad(final_norm_));
  Tensor dw = params_[final_norm_].trainable ? params_[final_norm_].grad : Tensor();
  TANDEM_RETURN_IF_ERROR(
      ops::RmsNormBackward(ctx_, a.dres, dw, a.dln, a.x[L], w_norm, a.rstdf, false));
  std::vector<size_t> ready = {final_norm_};
  if (lm_head_ != embed_) ready.push_back(lm_head_);
  return NotifyGradsReady(ready);
}

Status LlamaModel::NotifyGradsReady(const std::vector<size_t>& params) {
  for (size_t i : params) TANDEM_RETURN_IF_ERROR(TouchGrad(i));  // [lazy zero] none this pass
  return grad_ready_ ? grad_ready_(params) : Status::Ok();
}

// Two passes over this rank's [n, V/tp] logits around one all-gather of the rows' partials
// (max, sum-exp, target logit), all on the context's device; see ops::ShardedCrossEntropy*.
Status LlamaModel::VocabParallelCrossEntropy(Tensor& losses, Tensor& logits, const Tensor& targets,
                                             float grad_scale, bool backward) {
  const int64_t n = logits.dim(0), tp = options_.parallel.tp_size;
  // Columns of real tokens here (the last rank's padding columns take no part).
  const int64_t valid = std::clamp<int64_t>(config_.vocab_size - vocab_start_, 0, vocab_rows_);
  Activations& a = *acts_;
  if (!a.ce_partials.defined() || a.ce_partials.dim(0) < tp * n * 3) {
    TANDEM_ASSIGN_OR_RETURN(a.ce_partials,
                            Tensor::Empty({tp * n * 3}, DType::kF32, ctx_.allocator()));
  }
  if (!a.ce_mine.defined() || a.ce_mine.numel() < n * 3) {
    TANDEM_ASSIGN_OR_RETURN(a.ce_mine, Tensor::Empty({n * 3}, DType::kF32, ctx_.allocator()));
  }
  Tensor mine = a.ce_mine.Slice(0, 0, n * 3).View({n, 3});
  TANDEM_RETURN_IF_ERROR(
      ops::ShardedCrossEntropyPartials(ctx_, mine, logits, targets, vocab_start_, valid));
  Tensor all = a.ce_partials.Slice(0, 0, tp * n * 3);  // [tp, n, 3] flat
  TANDEM_RETURN_IF_ERROR(options_.parallel.hooks->TpAllGather(all, mine.View({n * 3})));
  Tensor dlogits = backward ? logits : Tensor();  // in place
  return ops::ShardedCrossEntropyFinish(ctx_, losses, dlogits, logits, all.View({tp, n, 3}),
                                        targets, vocab_start_, valid, grad_scale);
}

StatusOr<LossSum> LlamaModel::SumLosses() {
  TANDEM_ASSIGN_OR_RETURN(Tensor host, ToHostF32(acts_->losses));  // syncs
  LossSum out;
  const float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) out.sum += p[i];
  out.count = acts_->num_targets;
  return out;
}

StatusOr<LossSum> LlamaModel::ForwardBackward(const Batch& batch, float grad_scale) {
  TANDEM_RETURN_IF_ERROR(BeginForwardBackward(batch, grad_scale));
  TANDEM_ASSIGN_OR_RETURN(const bool done, ContinueForwardBackward(INT64_MAX));
  TANDEM_CHECK(done);
  return FinishForwardBackward();
}

Status LlamaModel::BeginForwardBackward(const Batch& batch, float grad_scale) {
  fb_ = PiecewisePass{};
  TANDEM_RETURN_IF_ERROR(EnsureTrainingState(/*relayout_grads=*/false));
  TANDEM_RETURN_IF_ERROR(PrepareBatch(batch, /*need_targets=*/true, /*backward=*/true));
  fb_.active = true;
  fb_.grad_scale = grad_scale;
  return Status::Ok();
}

StatusOr<bool> LlamaModel::ContinueForwardBackward(int64_t max_units) {
  if (!fb_.active) {
    return FailedPreconditionError(
        "LlamaModel::ContinueForwardBackward: no pass in progress (BeginForwardBackward)");
  }
  const int64_t L = config_.num_hidden_layers;
  // Any error abandons the pass: its buffers are in an unknown state.
  auto unit = [&](int64_t u) -> Status {
    if (u < L) {  // forward of block u
      if (u == 0) TANDEM_RETURN_IF_ERROR(ForwardStart());
      return ForwardLayer(u);
    }
    if (u == L) {  // the loss head
      if (weights_needed_) TANDEM_RETURN_IF_ERROR(weights_needed_({final_norm_, lm_head_}));
      return LossHead(fb_.grad_scale, /*backward=*/true);
    }
    const int64_t l = L - 1 - (u - L - 1) / 2;  // backward of block l: its MLP, then attention
    if ((u - L - 1) % 2 == 0) return BackwardLayer(l, BackwardPart::kMlp);
    TANDEM_RETURN_IF_ERROR(BackwardLayer(l, BackwardPart::kAttention));
    if (l != 0) return Status::Ok();
    if (adapter_ != nullptr) TANDEM_RETURN_IF_ERROR(adapter_->EndBackward());  // [adapter]
    return EmbeddingBackward();
  };
  for (int64_t done = 0; done < max_units && fb_.next_unit < 3 * L + 1; ++done) {
    const Status s = unit(fb_.next_unit);
    if (!s.ok()) {
      fb_.active = false;
      return s;
    }
    ++fb_.next_unit;
  }
  return fb_.next_unit == 3 * L + 1;
}

StatusOr<LossSum> LlamaModel::FinishForwardBackward() {
  if (!fb_.active || fb_.next_unit != 3 * config_.num_hidden_layers + 1) {
    return FailedPreconditionError(
        "LlamaModel::FinishForwardBackward: the pass is not complete (ContinueForwardBackward)");
  }
  fb_.active = false;
  return SumLosses();
}

Status LlamaModel::BackwardLayer(int64_t l, BackwardPart part) {
  const int64_t L = config_.num_hidden_layers;
  TANDEM_ASSIGN_OR_RETURN(const LayerWeights w, WeightsOf(l, l - 1));
  // With recompute the shared block buffers still hold the last layer from the forward pass.
  if (options_.recompute && l != L - 1 && part != BackwardPart::kAttention) {
    TANDEM_RETURN_IF_ERROR(BlockForward(l, /*write_output=*/false, w));
  }
  TANDEM_RETURN_IF_ERROR(BlockBackward(l, w, part));
  if (part == BackwardPart::kMlp) return Status::Ok();
  const Layer& y = layers_[l];
  return NotifyGradsReady({y.q, y.k, y.v, y.o, y.gate, y.up, y.down, y.attn_norm, y.mlp_norm});
}

Status LlamaModel::EmbeddingBackward() {
  if (params_[embed_].trainable) {
    for (size_t i : groups_[group_of_[embed_]].members) TANDEM_RETURN_IF_ERROR(TouchGrad(i));
    Tensor dout = acts_->dres;
    if (!dout.is_contiguous()) {  // [adapter] dres has the wide path's spare columns: pack it
      dout = acts_->dln;          // free now
      TANDEM_RETURN_IF_ERROR(ops::CopyMatrix(ctx_, dout, acts_->dres));
    }
    if (tp()) {  // the sink row's gradient is never read
      Tensor dtable = groups_[group_of_[embed_]].grad;
      TANDEM_RETURN_IF_ERROR(ops::EmbeddingBackward(ctx_, dtable, dout, acts_->embed_ids));
    } else {
      TANDEM_RETURN_IF_ERROR(
          ops::EmbeddingBackward(ctx_, params_[embed_].grad, dout, acts_->tokens));
    }
  }
  return NotifyGradsReady({embed_});
}

StatusOr<LossSum> LlamaModel::Loss(const Batch& batch) {
  fb_ = PiecewisePass{};  // [co-serving] this pass reuses the buffers of one in pieces
  TANDEM_RETURN_IF_ERROR(PrepareBatch(batch, /*need_targets=*/true, /*backward=*/false));
  TANDEM_RETURN_IF_ERROR(Forward());
  TANDEM_RETURN_IF_ERROR(LossHead(1.0f, /*backward=*/false));
  return SumLosses();
}

StatusOr<Tensor> LlamaModel::Logits(const Batch& batch) {
  fb_ = PiecewisePass{};
  TANDEM_RETURN_IF_ERROR(PrepareBatch(batch, /*need_targets=*/false, /*backward=*/false));
  TANDEM_RETURN_IF_ERROR(Forward());
  Activations& a = *acts_;
  const int64_t N = a.batch * a.seq, V = config_.vocab_size;
  TANDEM_RETURN_IF_ERROR(ops::RmsNormForward(ctx_, a.lnf, a.rstdf, a.x[config_.num_hidden_layers],
                                             params_[final_norm_].weight,
                                             static_cast<float>(config_.rms_norm_eps)));
  Tensor out = Tensor::Cpu({a.batch, a.seq, V}, DType::kF32);  // [B, T, V]
  float* dst = out.data<float>();
  const int64_t chunk = a.logits.dim(0);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t r1 = std::min(N, r0 + chunk);
    Tensor logits = Rows(a.logits, 0, r1 - r0);  // [n, V] ([n, V/tp] under tp)
    TANDEM_RETURN_IF_ERROR(
        ops::Matmul(ctx_, logits, Rows(a.lnf, r0, r1), params_[lm_head_].weight, false, true));
    TANDEM_ASSIGN_OR_RETURN(Tensor host, ToHostF32(logits));
    if (!tp()) {
      std::copy(host.data<float>(), host.data<float>() + host.numel(), dst + r0 * V);
      continue;
    }
    // tp: every rank's vocabulary columns, in rank order, without the padding.
    const int64_t n = r1 - r0, Vl = vocab_rows_, tp = options_.parallel.tp_size;
    Tensor all = Tensor::Cpu({tp * n * Vl}, DType::kF32);
    TANDEM_RETURN_IF_ERROR(options_.parallel.hooks->TpAllGather(all, host.View({n * Vl})));
    for (int64_t r = 0; r < tp; ++r) {
      const int64_t cols = std::clamp<int64_t>(V - r * Vl, 0, Vl);
      for (int64_t i = 0; i < n; ++i) {
        const float* src = all.data<float>() + (r * n + i) * Vl;
        std::copy(src, src + cols, dst + (r0 + i) * V + r * Vl);
      }
    }
  }
  return out;
}

}  // namespace tandem::model

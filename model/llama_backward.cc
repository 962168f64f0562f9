// LlamaModel: the backward pass of one decoder block and the weight-gradient GEMMs.
#include <cmath>

#include "model/internal/llama_state.h"
#include "model/llama.h"
#include "ops/ops.h"

namespace tandem::model {

// grad(param) += dy^T x: dy [N, out], x [N, in], grad f32 [out, in] (= on the first write after
// ZeroGrads). Skipped for frozen weights.
Status LlamaModel::WeightGrad(size_t param, const Tensor& dy, const Tensor& x) {
  Parameter& p = params_[param];
  if (!p.trainable) return Status::Ok();
  return ops::Matmul(ctx_, p.grad, dy, x, /*trans_a=*/true, /*trans_b=*/false, 1.0f,
                     TakeGradBeta(param));
}

// The weight gradient of a fused projection y = x W^T with W the group's [rows, C] block:
// one GEMM when every member trains, else one per trainable member on its column slice of dy.
Status LlamaModel::ProjectionGrad(const Group& group, const Tensor& dy, const Tensor& x) {
  bool all = true;
  for (size_t i : group.members) all = all && params_[i].trainable;
  if (all) {
    Tensor grad = group.grad;  // [rows, C]
    bool unwritten = true;     // every member: one overwriting GEMM
    for (size_t i : group.members)
      unwritten = unwritten && i < grad_unwritten_.size() && grad_unwritten_[i];
    float beta = 0.0f;
    for (size_t i : group.members) {
      if (unwritten) {
        TakeGradBeta(i);
      } else {
        TANDEM_RETURN_IF_ERROR(TouchGrad(i));
        beta = 1.0f;
      }
    }
    return ops::Matmul(ctx_, grad, dy, x, true, false, 1.0f, beta);
  }
  for (size_t m = 0; m < group.members.size(); ++m) {
    const Tensor dy_m = dy.Slice(1, group.row_start[m], group.row_start[m + 1]);  // [N, rows_m]
    TANDEM_RETURN_IF_ERROR(WeightGrad(group.members[m], dy_m, x));
  }
  return Status::Ok();
}

// q rows as usual; the k|v rows of this pass are computed apart, summed over the tp ranks that
// share this kv head (in tp rank order, so every sharer gets the same bits), then added.
Status LlamaModel::KvProjectionGrad(const Group& group, const Tensor& dy, const Tensor& x) {
  const int64_t C = config_.hidden_size, D = config_.head_dim, tp = options_.parallel.tp_size;
  const int64_t kv_rows = 2 * hkv_ * D, q_rows = hq_ * D;
  if (!kv_grad_scratch_.defined()) {
    TANDEM_ASSIGN_OR_RETURN(kv_grad_scratch_,
                            Tensor::Empty({kv_rows, C}, DType::kF32, ctx_.allocator()));
  }
  TANDEM_RETURN_IF_ERROR(WeightGrad(group.members[0], dy.Slice(1, 0, q_rows), x));
  TANDEM_RETURN_IF_ERROR(
      ops::Matmul(ctx_, kv_grad_scratch_, dy.Slice(1, q_rows, q_rows + kv_rows), x, true, false));
  if (!kv_grad_gather_.defined()) {
    TANDEM_ASSIGN_OR_RETURN(kv_grad_gather_,
                            Tensor::Empty({tp * kv_rows * C}, DType::kF32, ctx_.allocator()));
  }
  TANDEM_RETURN_IF_ERROR(options_.parallel.hooks->TpAllGather(
      kv_grad_gather_, kv_grad_scratch_.View({kv_rows * C})));
  const int64_t first = options_.parallel.tp_rank / kv_share_ * kv_share_;
  auto part = [&](int64_t r) {  // rank r's [2 D, C]
    return kv_grad_gather_.Slice(0, r * kv_rows * C, (r + 1) * kv_rows * C).View({kv_rows, C});
  };
  TANDEM_RETURN_IF_ERROR(CopyTensor(kv_grad_scratch_, part(first), ctx_.stream()));
  for (int64_t r = first + 1; r < first + kv_share_; ++r) {  // in tp rank order: same bits
    TANDEM_RETURN_IF_ERROR(ops::Add(ctx_, kv_grad_scratch_, kv_grad_scratch_, part(r)));
  }
  Tensor kv_grad = group.grad.Slice(0, q_rows, q_rows + kv_rows);  // [2 D, C], contiguous
  for (size_t m = 1; m < group.members.size(); ++m)
    TANDEM_RETURN_IF_ERROR(TouchGrad(group.members[m]));
  return ops::Add(ctx_, kv_grad, kv_grad, kv_grad_scratch_);
}

Status LlamaModel::ProjectBackward(int64_t l, std::span<const Projection> projs,
                                   std::span<const int64_t> col_start, const Tensor& x,
                                   const Tensor& dy, const Tensor& w, Tensor& dx,
                                   const Tensor& x_wide, const Tensor& dy_wide) {
  if (adapter_ != nullptr && x_wide.defined()) {  // [adapter] the wide path
    TANDEM_ASSIGN_OR_RETURN(const bool done,
                            adapter_->ProjectionsBackwardWide(l, projs, col_start, x_wide, x.dim(1),
                                                              dy_wide, w, weights_generation_, dx));
    if (done) return Status::Ok();
  }
  bool first = false;  // [adapter]
  if (adapter_ != nullptr) {
    TANDEM_ASSIGN_OR_RETURN(first,
                            adapter_->ProjectionsBackwardFirst(l, projs, col_start, x, dy, dx));
  }
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dx, dy, w, false, false, 1.0f, first ? 1.0f : 0.0f));
  if (adapter_ == nullptr || first) return Status::Ok();
  for (size_t m = 0; m < projs.size(); ++m) {
    const Tensor dy_m = dy.Slice(1, col_start[m], col_start[m + 1]);  // [N, rows_m]
    TANDEM_RETURN_IF_ERROR(adapter_->ProjectionBackward(l, projs[m], x, dy_m, dx));
  }
  return Status::Ok();
}

// On entry a.dres = dL/d x[l + 1]; on exit a.dres = dL/d x[l]. Reads the block's saved (or
// recomputed) activations; weight gradients accumulate into the parameters' grads.
Status LlamaModel::BlockBackward(int64_t l, const LayerWeights& w, BackwardPart part) {
  Activations& a = *acts_;
  Activations::Block& b = a.blocks[options_.recompute ? 0 : l];
  const Layer& layer = layers_[l];
  const int64_t B = a.batch, T = a.seq, N = B * T;
  const int64_t Hq = hq_, Hkv = hkv_;  // this rank's heads
  const int64_t D = config_.head_dim, F = ffn_, H3 = Hq + 2 * Hkv;
  ParallelHooks* hooks = options_.parallel.hooks;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  auto norm_grad = [&](size_t i) { return params_[i].trainable ? params_[i].grad : Tensor(); };

  // MLP. x[l + 1] = x_mid + act Wdown^T, so d x_mid = dres + d(norm2 path).
  if (part != BackwardPart::kAttention) {
    constexpr Projection kDown[] = {Projection::kDown};
    const int64_t c_cols[] = {0, a.dres.dim(1)};
    const bool wide_down = WideGroup(group_of_[layer.down], a.wide_down);
    TANDEM_RETURN_IF_ERROR(ProjectBackward(l, kDown, c_cols, b.act, a.dres, w.down, a.dact,
                                           wide_down ? b.act_wide : Tensor(),
                                           wide_down ? a.dres_wide : Tensor()));
    TANDEM_RETURN_IF_ERROR(WeightGrad(layer.down, a.dres, b.act));  // [C, F]
    Tensor dgate = a.dgate_up.Slice(1, 0, F);  // [N, F], row stride 2F
    Tensor dup = a.dgate_up.Slice(1, F, 2 * F);
    TANDEM_RETURN_IF_ERROR(ops::SwigluBackward(ctx_, dgate, dup, a.dact, b.gate_up.Slice(1, 0, F),
                                               b.gate_up.Slice(1, F, 2 * F)));
    const Group& gate_up = groups_[layer.gate_up_group];
    constexpr Projection kGateUp[] = {Projection::kGate, Projection::kUp};
    const bool wide = WideGroup(layer.gate_up_group, a.wide_gate_up);
    TANDEM_RETURN_IF_ERROR(  // [N, C]
        ProjectBackward(l, kGateUp, gate_up.row_start, b.ln2, a.dgate_up, w.gate_up, a.dln,
                        wide ? b.ln2_wide : Tensor(), wide ? a.dgate_up_wide : Tensor()));
    if (tp()) TANDEM_RETURN_IF_ERROR(hooks->TpAllReduceSum(a.dln));  // column parallel input
    if (gate_up.grad.defined()) TANDEM_RETURN_IF_ERROR(ProjectionGrad(gate_up, a.dgate_up, b.ln2));
    TANDEM_RETURN_IF_ERROR(TouchGrad(layer.mlp_norm));
    Tensor dw2 = norm_grad(layer.mlp_norm);
    TANDEM_RETURN_IF_ERROR(ops::RmsNormBackward(ctx_, a.dres, dw2, a.dln, b.x_mid, w.mlp_norm,
                                                b.rstd2,
                                                /*accumulate_dx=*/true));
  }
  if (part == BackwardPart::kMlp) return Status::Ok();

  // Attention. x_mid = x[l] + attn Wo^T.
  constexpr Projection kO[] = {Projection::kO};
  const int64_t c_cols[] = {0, a.dres.dim(1)};
  const bool wide_o = WideGroup(group_of_[layer.o], a.wide_o);
  TANDEM_RETURN_IF_ERROR(ProjectBackward(l, kO, c_cols, b.attn, a.dres, w.o, a.dattn,  // [N, Hq D]
                                         wide_o ? b.attn_wide : Tensor(),
                                         wide_o ? a.dres_wide : Tensor()));
  TANDEM_RETURN_IF_ERROR(WeightGrad(layer.o, a.dres, b.attn));        // [C, Hq D]
  const int64_t Hw = a.dqkv_wide.dim(1) / D;  // H3 and the wide path's spare heads
  const Tensor qkv4 = b.qkv_wide.View({B, T, Hw, D}).Slice(2, 0, H3);
  const Tensor dqkv4 = a.dqkv_wide.View({B, T, Hw, D}).Slice(2, 0, H3);
  Tensor dq = dqkv4.Slice(2, 0, Hq);  // [B, T, Hq, D], token stride Hw D
  Tensor dk = dqkv4.Slice(2, Hq, Hq + Hkv);
  Tensor dv = dqkv4.Slice(2, Hq + Hkv, H3);
  const Tensor seg = a.use_segments ? a.segment_ids : Tensor();
  const int64_t Ho = b.attn_wide.dim(1) / D;  // Hq and the wide path's spare heads
  const Tensor attn4 = b.attn_wide.View({B, T, Ho, D}).Slice(2, 0, Hq);
  const Tensor dattn4 = a.dattn_wide.View({B, T, Ho, D}).Slice(2, 0, Hq);
  if (cp()) {
    TANDEM_RETURN_IF_ERROR(hooks->CpAttentionBackward(
        dq, dk, dv, dattn4, qkv4.Slice(2, 0, Hq), qkv4.Slice(2, Hq, Hq + Hkv),
        qkv4.Slice(2, Hq + Hkv, H3), attn4, b.lse, scale));
  } else {
    TANDEM_RETURN_IF_ERROR(ops::AttentionBackward(
        ctx_, dq, dk, dv, dattn4, qkv4.Slice(2, 0, Hq), qkv4.Slice(2, Hq, Hq + Hkv),
        qkv4.Slice(2, Hq + Hkv, H3), attn4, b.lse, scale, seg));
  }
  // RoPE is a rotation: its backward rotates the gradient back.
  const Tensor dheads = a.dqkv_wide.View({N, Hw, D}).Slice(1, 0, H3);
  Tensor dqk_rot = dheads.Slice(1, 0, Hq + Hkv);  // dq's heads then dk's: [N, Hq + Hkv, D]
  TANDEM_RETURN_IF_ERROR(ops::Rope(ctx_, dqk_rot, dqk_rot, a.positions, inv_freq_, true));
  const Group& qkv = groups_[layer.qkv_group];
  constexpr Projection kQkv[] = {Projection::kQ, Projection::kK, Projection::kV};
  const bool wide = WideGroup(layer.qkv_group, a.wide_qkv);
  TANDEM_RETURN_IF_ERROR(  // [N, C]; dq, dk are already rotated back
      ProjectBackward(l, kQkv, qkv.row_start, b.ln1, a.dqkv, w.qkv, a.dln,
                      wide ? b.ln1_wide : Tensor(), wide ? a.dqkv_wide : Tensor()));
  if (tp()) TANDEM_RETURN_IF_ERROR(hooks->TpAllReduceSum(a.dln));  // column parallel input
  if (qkv.grad.defined()) {
    TANDEM_RETURN_IF_ERROR(kv_share_ > 1 ? KvProjectionGrad(qkv, a.dqkv, b.ln1)
                                         : ProjectionGrad(qkv, a.dqkv, b.ln1));
  }
  TANDEM_RETURN_IF_ERROR(TouchGrad(layer.attn_norm));
  Tensor dw1 = norm_grad(layer.attn_norm);
  return ops::RmsNormBackward(ctx_, a.dres, dw1, a.dln, a.x[l], w.attn_norm, b.rstd1,
                              /*accumulate_dx=*/true);
}

}  // namespace tandem::model

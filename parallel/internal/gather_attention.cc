// Context-parallel attention by all-gathering q, k, v over cp (host tensors): the exact
// attention of the whole sequence, each rank keeping its zig-zag rows. The reference that ring
// attention must match, and the fallback until it is wired in.
#include <cstring>

#include "ops/ops.h"
#include "parallel/model_hooks.h"
#include "parallel/ring_attention.h"

namespace tandem::parallel {

namespace {

// x [B, Tl, H, D] (token stride free; heads and D contiguous) -> contiguous host [B, Tl, H, D].
Tensor PackLocal(const Tensor& x) {
  const int64_t B = x.dim(0), Tl = x.dim(1), HD = x.dim(2) * x.dim(3);
  Tensor out = Tensor::Cpu({B, Tl, x.dim(2), x.dim(3)}, DType::kF32);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tl; ++t) {
      const float* src = x.data<float>() + b * x.stride(0) + t * x.stride(1);
      std::memcpy(out.data<float>() + (b * Tl + t) * HD, src, HD * sizeof(float));
    }
  }
  return out;
}

// Gathers every cp rank's x over `cp` and lays the tokens out in global order: [B, T, H, D].
StatusOr<Tensor> GatherGlobal(ops::Context& ctx, collectives::Communicator& cp, const Tensor& x) {
  const int P = cp.size();
  const int64_t B = x.dim(0), Tl = x.dim(1), H = x.dim(2), D = x.dim(3), HD = H * D;
  const Tensor local = PackLocal(x);
  Tensor all = Tensor::Cpu({P * local.numel()}, DType::kF32);
  TANDEM_RETURN_IF_ERROR(AllGatherAnywhere(ctx, cp, all, local.View({local.numel()})));
  const int64_t T = Tl * P;
  Tensor global = Tensor::Cpu({B, T, H, D}, DType::kF32);
  for (int r = 0; r < P; ++r) {
    const std::vector<int64_t> idx = ZigZagIndices(T, P, r);
    const float* src = all.data<float>() + r * local.numel();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < Tl; ++i) {
        std::memcpy(global.data<float>() + (b * T + idx[i]) * HD, src + (b * Tl + i) * HD,
                    HD * sizeof(float));
      }
    }
  }
  return global;
}

// dst [B, Tl, H, D] (token stride free) = this rank's rows of global [B, T, H, D].
void TakeLocal(Tensor& dst, const Tensor& global, const std::vector<int64_t>& idx) {
  const int64_t B = dst.dim(0), Tl = dst.dim(1), HD = dst.dim(2) * dst.dim(3);
  const int64_t T = global.dim(1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < Tl; ++i) {
      std::memcpy(dst.data<float>() + b * dst.stride(0) + i * dst.stride(1),
                  global.data<float>() + (b * T + idx[i]) * HD, HD * sizeof(float));
    }
  }
}

Status CheckHost(const ops::Context& ctx, collectives::Communicator* cp, const Tensor& q) {
  if (cp == nullptr) return FailedPreconditionError("cp attention without a cp communicator");
  if (ctx.is_cuda()) {
    return UnimplementedError(
        "context parallelism on CUDA needs ring attention (parallel/ring_attention.h); the "
        "all-gather fallback runs on the CPU only");
  }
  if (q.dim(1) % 2 != 0) {
    return InvalidArgumentError(StrCat("context parallelism: this rank's ", q.dim(1),
                                       " tokens are not two equal zig-zag chunks"));
  }
  return Status::Ok();
}

// Full-sequence attention forward of the gathered q, k, v.
Status FullForward(ops::Context& ctx, Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                   const Tensor& v, float scale) {
  const int64_t B = q.dim(0), T = q.dim(1), H = q.dim(2), D = q.dim(3);
  out = Tensor::Cpu({B, T, H, D}, DType::kF32);
  lse = Tensor::Cpu({B, H, T}, DType::kF32);
  return ops::AttentionForward(ctx, out, lse, q, k, v, scale);
}

}  // namespace

Status MeshModelHooks::GatherForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                     const Tensor& v, float scale) {
  TANDEM_RETURN_IF_ERROR(CheckHost(ctx_, cp_, q));
  TANDEM_ASSIGN_OR_RETURN(Tensor qg, GatherGlobal(ctx_, *cp_, q));
  TANDEM_ASSIGN_OR_RETURN(Tensor kg, GatherGlobal(ctx_, *cp_, k));
  TANDEM_ASSIGN_OR_RETURN(Tensor vg, GatherGlobal(ctx_, *cp_, v));
  Tensor out_g, lse_g;
  TANDEM_RETURN_IF_ERROR(FullForward(ctx_, out_g, lse_g, qg, kg, vg, scale));
  const int64_t T = qg.dim(1), B = q.dim(0), H = q.dim(2), Tl = q.dim(1);
  const std::vector<int64_t> idx = ZigZagIndices(T, cp_->size(), cp_->rank());
  TakeLocal(out, out_g, idx);
  for (int64_t bh = 0; bh < B * H; ++bh) {  // lse [B, H, Tl] from [B, H, T]
    for (int64_t i = 0; i < Tl; ++i) {
      lse.data<float>()[bh * Tl + i] = lse_g.data<float>()[bh * T + idx[i]];
    }
  }
  return Status::Ok();
}

Status MeshModelHooks::GatherBackward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                      const Tensor& q, const Tensor& k, const Tensor& v,
                                      float scale) {
  TANDEM_RETURN_IF_ERROR(CheckHost(ctx_, cp_, q));
  TANDEM_ASSIGN_OR_RETURN(Tensor qg, GatherGlobal(ctx_, *cp_, q));
  TANDEM_ASSIGN_OR_RETURN(Tensor kg, GatherGlobal(ctx_, *cp_, k));
  TANDEM_ASSIGN_OR_RETURN(Tensor vg, GatherGlobal(ctx_, *cp_, v));
  TANDEM_ASSIGN_OR_RETURN(Tensor dog, GatherGlobal(ctx_, *cp_, dout));
  Tensor out_g, lse_g;  // recomputed: rows of these equal this rank's out and lse
  TANDEM_RETURN_IF_ERROR(FullForward(ctx_, out_g, lse_g, qg, kg, vg, scale));
  Tensor dqg = Tensor::Cpu(qg.shape(), DType::kF32);
  Tensor dkg = Tensor::Cpu(kg.shape(), DType::kF32);
  Tensor dvg = Tensor::Cpu(vg.shape(), DType::kF32);
  TANDEM_RETURN_IF_ERROR(
      ops::AttentionBackward(ctx_, dqg, dkg, dvg, dog, qg, kg, vg, out_g, lse_g, scale));
  const std::vector<int64_t> idx = ZigZagIndices(qg.dim(1), cp_->size(), cp_->rank());
  TakeLocal(dq, dqg, idx);
  TakeLocal(dk, dkg, idx);
  TakeLocal(dv, dvg, idx);
  return Status::Ok();
}

}  // namespace tandem::parallel

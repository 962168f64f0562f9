// AdapterWeights and the LoRA sites (serve/infer_model.h).
#include <algorithm>
#include <cstring>
#include <string>

#include "serve/infer_model.h"

namespace tandem::serve {

std::vector<model::Projection> LoraSiteProjections(LoraSite site) {
  using model::Projection;
  switch (site) {
    case LoraSite::kQkv:
      return {Projection::kQ, Projection::kK, Projection::kV};
    case LoraSite::kO:
      return {Projection::kO};
    case LoraSite::kGateUp:
      return {Projection::kGate, Projection::kUp};
    case LoraSite::kDown:
      return {Projection::kDown};
  }
  TANDEM_CHECK(false);
  return {};
}

std::pair<int64_t, int64_t> LoraSiteShape(const model::LlamaConfig& c, LoraSite site) {
  const std::vector<model::Projection> projs = LoraSiteProjections(site);
  const int64_t in = peft::ProjectionShape(c, projs[0]).first;
  int64_t out = 0;
  for (model::Projection p : projs) out += peft::ProjectionShape(c, p).second;
  return {in, out};
}

namespace {

// A site's host f32 weights before rounding: A [r, in], B [out, r].
struct HostTarget {
  Tensor a, b;
  float scale = 1.0f;
  int64_t layer = 0;
  LoraSite site = LoraSite::kQkv;
};

StatusOr<Tensor> HostF32(const Tensor& t, const std::string& name) {
  if (!t.device().is_cpu() || !t.is_contiguous()) {
    return InvalidArgumentError(
        StrCat("AdapterWeights::FromLora: expected ", name, " contiguous on the host"));
  }
  if (t.dtype() == DType::kF32) return t;
  return CastCpu(t, DType::kF32);
}

// Checks target t's A [r, in] and B [out, r] against its projection's shape.
Status CheckTargetShape(const peft::LoraAdapter& lora, int t) {
  const peft::LoraTarget& tg = lora.targets()[t];
  const auto [in, out] = peft::ProjectionShape(lora.base_config(), tg.proj);
  const Tensor& a = lora.a(t).weight;
  const Tensor& b = lora.b(t).weight;
  if (a.ndim() != 2 || b.ndim() != 2 || a.dim(1) != in || b.dim(0) != out || b.dim(1) != a.dim(0)) {
    return InvalidArgumentError(
        StrCat("AdapterWeights::FromLora: ", tg.module, " expected A [r, ", in, "] and B [", out,
               ", r], found A ", ShapeToString(a.shape()), " and B ", ShapeToString(b.shape())));
  }
  return Status::Ok();
}

// The joined weights of a fused site (see AdapterWeights); member[i]: target index of the site's
// i-th projection, or -1. At least one member is a target.
StatusOr<HostTarget> JoinSite(const peft::LoraAdapter& lora, LoraSite site,
                              const std::vector<int>& member) {
  const std::vector<model::Projection> projs = LoraSiteProjections(site);
  const auto [in, out] = LoraSiteShape(lora.base_config(), site);
  HostTarget h;
  h.site = site;
  int64_t rank = 0;
  bool have_scale = false;
  for (int t : member) {
    if (t < 0) continue;
    rank += lora.a(t).weight.dim(0);
    h.layer = lora.targets()[t].layer;
    // The common scale: the first nonzero one (a zero scale zeroes its block).
    if (!have_scale && lora.targets()[t].scale != 0.0f) {
      h.scale = lora.targets()[t].scale;
      have_scale = true;
    }
  }
  h.a = Tensor::Cpu({rank, in}, DType::kF32);        // [r, in]
  h.b = Tensor::CpuZeros({out, rank}, DType::kF32);  // [out, r]
  float* a = h.a.data<float>();
  float* b = h.b.data<float>();
  int64_t row = 0, col = 0;  // B block origin: output row, rank column
  for (size_t i = 0; i < projs.size(); ++i) {
    const int64_t out_p = peft::ProjectionShape(lora.base_config(), projs[i]).second;
    const int t = member[i];
    if (t >= 0) {
      TANDEM_ASSIGN_OR_RETURN(Tensor at, HostF32(lora.a(t).weight, lora.a(t).name));
      TANDEM_ASSIGN_OR_RETURN(Tensor bt, HostF32(lora.b(t).weight, lora.b(t).name));
      const int64_t r = at.dim(0);
      std::copy_n(at.data<float>(), r * in, a + col * in);
      const float ratio = have_scale ? lora.targets()[t].scale / h.scale : 0.0f;
      const float* src = bt.data<float>();
      for (int64_t o = 0; o < out_p; ++o) {
        float* dst = b + (row + o) * rank + col;
        for (int64_t j = 0; j < r; ++j) dst[j] = src[o * r + j] * ratio;  // ratio 1: exact
      }
      col += r;
    }
    row += out_p;
  }
  return h;
}

// The adapter's targets per (layer, site), in (layer, site) order.
StatusOr<std::vector<HostTarget>> SiteTargets(const peft::LoraAdapter& lora) {
  const int64_t L = lora.base_config().num_hidden_layers;
  for (size_t t = 0; t < lora.targets().size(); ++t) {
    TANDEM_RETURN_IF_ERROR(CheckTargetShape(lora, static_cast<int>(t)));
  }
  std::vector<HostTarget> out;
  for (int64_t l = 0; l < L; ++l) {
    for (int s = 0; s < kNumLoraSites; ++s) {
      const auto site = static_cast<LoraSite>(s);
      const std::vector<model::Projection> projs = LoraSiteProjections(site);
      std::vector<int> member;
      bool any = false;
      for (model::Projection p : projs) {
        member.push_back(lora.Find(l, p));
        any = any || member.back() >= 0;
      }
      if (!any) continue;
      if (projs.size() > 1) {
        TANDEM_ASSIGN_OR_RETURN(HostTarget h, JoinSite(lora, site, member));
        out.push_back(std::move(h));
        continue;
      }
      const int t = member[0];
      HostTarget h;
      h.a = lora.a(t).weight;
      h.b = lora.b(t).weight;
      h.scale = lora.targets()[t].scale;
      h.layer = l;
      h.site = site;
      out.push_back(std::move(h));
    }
  }
  return out;
}

}  // namespace

int64_t AdapterWeights::num_bytes() const {
  int64_t n = 0;
  for (const Target& t : targets) n += static_cast<int64_t>(t.a.num_bytes() + t.b.num_bytes());
  return n;
}

int64_t AdapterWeights::BytesFor(const peft::LoraAdapter& lora, DType dtype) {
  return BytesFor(lora.base_config(), lora.targets(), dtype);
}

int64_t AdapterWeights::BytesFor(const model::LlamaConfig& c,
                                 const std::vector<peft::LoraTarget>& targets, DType dtype) {
  std::vector<int64_t> rank(c.num_hidden_layers * model::kNumProjections, 0);
  for (const peft::LoraTarget& t : targets) {
    rank[t.layer * model::kNumProjections + static_cast<int>(t.proj)] = t.rank;
  }
  int64_t elems = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int s = 0; s < kNumLoraSites; ++s) {
      const auto site = static_cast<LoraSite>(s);
      int64_t site_rank = 0;
      for (model::Projection p : LoraSiteProjections(site)) {
        site_rank += rank[l * model::kNumProjections + static_cast<int>(p)];
      }
      const auto [in, out] = LoraSiteShape(c, site);
      elems += site_rank * (in + out);
    }
  }
  return elems * static_cast<int64_t>(DTypeSize(dtype));
}

StatusOr<AdapterWeights> AdapterWeights::FromLora(ops::Context& ctx, const peft::LoraAdapter& lora,
                                                  DType dtype) {
  const int64_t L = lora.base_config().num_hidden_layers;
  for (const model::Parameter& p : lora.parameters()) {
    if (!p.weight.device().is_cpu()) {
      return InvalidArgumentError(StrCat("AdapterWeights::FromLora: expected an adapter on the ",
                                         "host, found ", p.name, " on the device"));
    }
  }
  TANDEM_ASSIGN_OR_RETURN(std::vector<HostTarget> sites, SiteTargets(lora));
  const size_t n = sites.size();
  AdapterWeights w;
  w.index.assign(L * kNumLoraSites, -1);
  // CUDA: every A and B rounded to `dtype` into one host buffer (each at a 256-byte offset), one
  // device allocation, one copy; the targets are views of it. CPU: the host tensors are used.
  constexpr int64_t kAlign = 256;
  std::vector<int64_t> offset(2 * n);
  int64_t total = 0;
  for (size_t t = 0; t < n; ++t) {
    for (int k = 0; k < 2; ++k) {
      const Tensor& src = k == 0 ? sites[t].a : sites[t].b;
      offset[2 * t + k] = total;
      total +=
          (src.numel() * static_cast<int64_t>(DTypeSize(dtype)) + kAlign - 1) / kAlign * kAlign;
    }
  }
  Tensor host;
  if (ctx.is_cuda()) {
    host = Tensor::Cpu({std::max<int64_t>(total, 1)}, DType::kU8);
    TANDEM_ASSIGN_OR_RETURN(w.storage_, Tensor::Empty(host.shape(), DType::kU8, ctx.allocator()));
  }
  for (size_t t = 0; t < n; ++t) {
    Target out;
    for (int k = 0; k < 2; ++k) {
      const Tensor& src = k == 0 ? sites[t].a : sites[t].b;  // A [r, in], B [out, r]
      Tensor& dst = k == 0 ? out.a : out.b;
      if (!ctx.is_cuda()) {
        dst = src;
        continue;
      }
      TANDEM_ASSIGN_OR_RETURN(Tensor cast, CastCpu(src, dtype));
      std::memcpy(host.data<uint8_t>() + offset[2 * t + k], cast.raw_data(), cast.num_bytes());
      dst = Tensor::Wrap(static_cast<uint8_t*>(w.storage_.raw_data()) + offset[2 * t + k],
                         src.shape(), dtype, w.storage_.device());
    }
    out.scale = sites[t].scale;
    w.index[sites[t].layer * kNumLoraSites + static_cast<int>(sites[t].site)] =
        static_cast<int>(w.targets.size());
    w.targets.push_back(std::move(out));
  }
  if (ctx.is_cuda()) {
    TANDEM_RETURN_IF_ERROR(CopyTensor(w.storage_, host, ctx.stream()));
    TANDEM_RETURN_IF_ERROR(ctx.Synchronize());  // `host` is freed on return
  }
  return w;
}

}  // namespace tandem::serve

// AdapterSet (peft/adapter_set.h): batch segments, per-projection dispatch to plain GEMMs (one
// adapter serves every token) or the segmented multi-adapter kernels (ops/lora.h).
#include "peft/adapter_set.h"

#include <algorithm>

#include "core/rng.h"
#include "ops/ops.h"
#include "ops/profiler.h"
#include "ops/stream_sync.h"

namespace tandem::peft {

struct AdapterSet::Call {
  int64_t index = 0;  // layer * 7 + projection
  Tables* tables = nullptr;
  bool active = false;                      // some token of the batch is adapted here
  int single = -1;                          // the adapter serving every token, or -1
  int target = -1;                          // its target index
  const ops::LoraSegments* segs = nullptr;  // the segmented path
  uint64_t seed = 0;
};

struct AdapterSet::Group {
  std::vector<Call> calls;          // per member
  int adapter = -1;                 // serves every token
  std::vector<int64_t> rank_start;  // member m's columns of h: [rank_start[m], rank_start[m + 1])
  float scale = 1.0f;
  int64_t in = 0;
};

namespace {

// Ensures `t` holds `numel` elements of `dtype` on ctx's device (keeps it when it already does).
Status EnsureBuffer(ops::Context& ctx, Tensor& t, int64_t numel, DType dtype) {
  if (t.defined() && t.numel() == numel && t.dtype() == dtype) return Status::Ok();
  t = Tensor();
  TANDEM_ASSIGN_OR_RETURN(t, Tensor::Empty({numel}, dtype, ctx.allocator()));
  return Status::Ok();
}

bool SameArchitecture(const model::LlamaConfig& a, const model::LlamaConfig& b) {
  return a.num_hidden_layers == b.num_hidden_layers && a.hidden_size == b.hidden_size &&
         a.intermediate_size == b.intermediate_size &&
         a.num_attention_heads == b.num_attention_heads &&
         a.num_key_value_heads == b.num_key_value_heads && a.head_dim == b.head_dim;
}

// Both factors of a module train, or neither does.
StatusOr<bool> TargetTrainable(const LoraAdapter& ad, int target) {
  const bool a = ad.a(target).trainable, b = ad.b(target).trainable;
  if (a != b) {
    return FailedPreconditionError(StrCat(ad.a(target).name, " and ", ad.b(target).name,
                                          " must be both trainable or both frozen"));
  }
  return a;
}

}  // namespace

AdapterSet::AdapterSet(ops::Context& ctx, const model::LlamaConfig& base,
                       const LoraParallel& parallel)
    : ctx_(ctx), base_(base), parallel_(parallel), dropout_seed_(DeriveSeed(0, 0, "lora_dropout")) {
  if (base_.num_key_value_heads == 0) base_.num_key_value_heads = base_.num_attention_heads;
  if (base_.head_dim == 0 && base_.num_attention_heads > 0) {
    base_.head_dim = base_.hidden_size / base_.num_attention_heads;
  }
  tables_.resize(base_.num_hidden_layers * model::kNumProjections);
  h_.resize(tables_.size());
  group_a_.resize(tables_.size());
  group_fused_.assign(tables_.size(), false);
  wide_.resize(tables_.size());
  group_wide_.assign(tables_.size(), false);
}

AdapterSet::~AdapterSet() {
  if (side_ctx_ != nullptr) (void)side_ctx_->Synchronize();  // side_keep_ is read until then
}

Status AdapterSet::JoinSide() {
  if (!side_pending_) return Status::Ok();
  TANDEM_RETURN_IF_ERROR(ops::WaitForStream(ctx_, *side_ctx_));
  side_pending_ = false;
  side_keep_.clear();  // later allocations on the model's stream come after the side's reads
  return Status::Ok();
}

Status AdapterSet::EndBackward() { return JoinSide(); }

StatusOr<int> AdapterSet::Add(std::unique_ptr<LoraAdapter> adapter) {
  if (adapter == nullptr) return InvalidArgumentError("AdapterSet::Add: null adapter");
  model::LlamaConfig theirs = adapter->base_config();
  if (theirs.num_key_value_heads == 0) theirs.num_key_value_heads = theirs.num_attention_heads;
  if (theirs.head_dim == 0) theirs.head_dim = theirs.hidden_size / theirs.num_attention_heads;
  if (!SameArchitecture(theirs, base_)) {
    return InvalidArgumentError(
        StrCat("AdapterSet::Add: the adapter was made for a base with ", theirs.num_hidden_layers,
               " layers, hidden ", theirs.hidden_size, ", ffn ", theirs.intermediate_size,
               ", heads ", theirs.num_attention_heads, "/", theirs.num_key_value_heads,
               "; this set's base has ", base_.num_hidden_layers, " layers, hidden ",
               base_.hidden_size, ", ffn ", base_.intermediate_size, ", heads ",
               base_.num_attention_heads, "/", base_.num_key_value_heads));
  }
  if (&adapter->context() != &ctx_) {
    return InvalidArgumentError("AdapterSet::Add: the adapter lives on another ops::Context");
  }
  const LoraParallel& tp = adapter->parallel();
  if (tp.tp_size != parallel_.tp_size || tp.tp_rank != parallel_.tp_rank) {
    return InvalidArgumentError(StrCat(
        "AdapterSet::Add: the adapter is sliced for tp rank ", tp.tp_rank, " of ", tp.tp_size,
        "; this set runs on tp rank ", parallel_.tp_rank, " of ", parallel_.tp_size));
  }
  adapters_.push_back(std::move(adapter));
  for (Tables& t : tables_) t = Tables();  // rebuilt with the new adapter on first use
  segments_.clear();
  return size() - 1;
}

std::vector<model::Parameter> AdapterSet::parameters() const {
  std::vector<model::Parameter> out;
  for (const auto& a : adapters_) {
    out.insert(out.end(), a->parameters().begin(), a->parameters().end());
  }
  return out;
}

Status AdapterSet::ZeroGrads() {
  TANDEM_RETURN_IF_ERROR(JoinSide());
  for (auto& a : adapters_) TANDEM_RETURN_IF_ERROR(a->ZeroGrads());
  return Status::Ok();
}

Status AdapterSet::BeginBatch(const model::Batch& batch, bool training) {
  TANDEM_RETURN_IF_ERROR(JoinSide());  // an abandoned pass may have left side work queued
  const int64_t B = batch.tokens.dim(0), T = batch.tokens.dim(1);
  std::vector<int32_t> ids(B, default_adapter_);
  if (batch.adapter_ids.defined()) {
    const int32_t* p = batch.adapter_ids.data<int32_t>();
    ids.assign(p, p + B);
  }
  for (int64_t b = 0; b < B; ++b) {
    if (ids[b] >= -1 && ids[b] < size()) continue;
    return InvalidArgumentError(
        StrCat(batch.adapter_ids.defined() ? StrCat("batch.adapter_ids[", b, "] = ", ids[b])
                                           : StrCat("AdapterSet::default_adapter() = ", ids[b]),
               " is not -1 or the index of an adapter of this AdapterSet (it holds ", size(), ")"));
  }
  seg_start_.assign(1, 0);
  seg_adapter_.clear();
  for (int64_t b = 0; b < B; ++b) {
    if (b == 0 || ids[b] != ids[b - 1]) {
      if (b > 0) seg_start_.push_back(static_cast<int32_t>(b * T));
      seg_adapter_.push_back(ids[b]);
    }
  }
  seg_start_.push_back(static_cast<int32_t>(B * T));
  num_tokens_ = B * T;
  segments_.clear();
  std::fill(group_fused_.begin(), group_fused_.end(), false);
  std::fill(group_wide_.begin(), group_wide_.end(), false);
  training_ = training;
  if (training) {
    batch_seed_ = SplitMix64(dropout_seed_ ^ SplitMix64(batch_counter_));
    ++batch_counter_;
  }
  TANDEM_RETURN_IF_ERROR(BuildRowIds(B, T));
  // The tables' gradient entries follow the parameters' trainable flags: rebuild when they change.
  std::vector<bool> signature;
  for (const auto& a : adapters_) {
    for (const model::Parameter& p : a->parameters()) signature.push_back(p.trainable);
  }
  if (signature != trainable_signature_) {
    for (Tables& t : tables_) t = Tables();
    trainable_signature_ = std::move(signature);
  }
  return Status::Ok();
}

// Local token (b, t) is global token (dp_rank B + b, t_global) of a global batch of sequences of
// T cp tokens; under cp, local tokens [0, T/2) are zig-zag chunk cp_rank and [T/2, T) chunk
// 2 cp - 1 - cp_rank (parallel/ring_attention.h). Needed only for dropout in training.
Status AdapterSet::BuildRowIds(int64_t B, int64_t T) {
  row_ids_ = Tensor();
  bool dropout = false;
  for (const auto& a : adapters_) dropout = dropout || a->config().dropout > 0.0;
  const int64_t cp = parallel_.cp_size;
  if (!training_ || !dropout || (parallel_.dp_rank == 0 && cp == 1)) return Status::Ok();
  if (cp > 1 && T % 2 != 0) {
    return InvalidArgumentError(StrCat("AdapterSet: under context parallelism (cp ", cp,
                                       ") a rank's sequence holds two equal zig-zag chunks, ",
                                       "found ", T, " tokens"));
  }
  const int64_t tg = T * cp, tc = T / 2;
  Tensor host = Tensor::Cpu({B * T}, DType::kI64);
  int64_t* ids = host.data<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row0 = (parallel_.dp_rank * B + b) * tg;
    for (int64_t t = 0; t < T; ++t) {
      int64_t pos = t;
      if (cp > 1) {
        const int64_t chunk = t < tc ? parallel_.cp_rank : 2 * cp - 1 - parallel_.cp_rank;
        pos = chunk * tc + t % tc;
      }
      ids[b * T + t] = row0 + pos;
    }
  }
  TANDEM_ASSIGN_OR_RETURN(row_ids_, Tensor::Empty({B * T}, DType::kI64, ctx_.allocator()));
  TANDEM_RETURN_IF_ERROR(CopyTensor(row_ids_, host, ctx_.stream()));
  return ctx_.Synchronize();  // `host` dies here
}

uint64_t AdapterSet::CallSeed(int64_t layer, model::Projection proj) const {
  return SplitMix64(batch_seed_ ^ static_cast<uint64_t>(layer * model::kNumProjections +
                                                        static_cast<int>(proj) + 1));
}

Status AdapterSet::BuildTables(int64_t layer, model::Projection proj, Tables& t) {
  TANDEM_ASSIGN_OR_RETURN(const LoraSlice slice,
                          LoraSliceFor(base_, proj, parallel_.tp_rank, parallel_.tp_size));
  const int64_t in = slice.in, out = slice.out;  // this tp rank's
  std::vector<ops::LoraWeights::Entry> train, eval, grads;
  t.ranks.assign(size(), 0);
  for (int a = 0; a < size(); ++a) {
    const LoraAdapter& ad = *adapters_[a];
    const int ti = ad.Find(layer, proj);
    if (ti < 0) {
      train.emplace_back();
      eval.emplace_back();
      grads.emplace_back();
      continue;
    }
    const LoraTarget& target = ad.targets()[ti];
    t.ranks[a] = static_cast<int32_t>(target.rank);
    const float p = static_cast<float>(ad.config().dropout);
    train.push_back({ad.a(ti).weight, ad.b(ti).weight, target.scale, p});
    eval.push_back({ad.a(ti).weight, ad.b(ti).weight, target.scale, 0.0f});
    TANDEM_ASSIGN_OR_RETURN(const bool trainable, TargetTrainable(ad, ti));
    if (trainable) {
      grads.push_back({ad.a(ti).grad, ad.b(ti).grad});
    } else {
      grads.emplace_back();
    }
  }
  TANDEM_ASSIGN_OR_RETURN(t.train, ops::LoraWeights::Create(ctx_, in, out, std::move(train)));
  TANDEM_ASSIGN_OR_RETURN(t.eval, ops::LoraWeights::Create(ctx_, in, out, std::move(eval)));
  TANDEM_ASSIGN_OR_RETURN(t.grads, ops::LoraWeights::Create(ctx_, in, out, std::move(grads)));
  t.built = true;
  return Status::Ok();
}

StatusOr<const ops::LoraSegments*> AdapterSet::SegmentsFor(const std::vector<int32_t>& ranks) {
  auto it = segments_.find(ranks);
  if (it == segments_.end()) {
    TANDEM_ASSIGN_OR_RETURN(ops::LoraSegments segs,
                            ops::LoraSegments::Create(ctx_, seg_start_, seg_adapter_, ranks));
    it = segments_.emplace(ranks, std::move(segs)).first;
  }
  return &it->second;
}

StatusOr<AdapterSet::Call> AdapterSet::PrepareCall(int64_t layer, model::Projection proj) {
  if (layer < 0 || layer >= base_.num_hidden_layers || seg_adapter_.empty()) {
    return FailedPreconditionError(StrCat("AdapterSet: projection call for layer ", layer,
                                          " before BeginBatch or beyond the base's ",
                                          base_.num_hidden_layers, " layers"));
  }
  Call c;
  c.index = layer * model::kNumProjections + static_cast<int>(proj);
  c.tables = &tables_[c.index];
  if (!c.tables->built) TANDEM_RETURN_IF_ERROR(BuildTables(layer, proj, *c.tables));
  const std::vector<int32_t>& ranks = c.tables->ranks;
  for (int32_t a : seg_adapter_) c.active = c.active || (a >= 0 && ranks[a] > 0);
  if (!c.active) return c;
  c.seed = CallSeed(layer, proj);
  if (seg_adapter_.size() == 1) {
    c.single = seg_adapter_[0];
    c.target = adapters_[c.single]->Find(layer, proj);
    return c;
  }
  if (parallel_.tp_size > 1) {
    return UnimplementedError(
        StrCat("AdapterSet under tensor parallelism (tp ", parallel_.tp_size,
               "): one adapter "
               "(or the base) must serve every sequence of a batch; this batch has ",
               seg_adapter_.size(), " segments of different adapters"));
  }
  if (row_ids_.defined()) {
    return UnimplementedError(
        "AdapterSet: training a batch that mixes adapters with dropout on a dp rank > 0 or under "
        "context parallelism (the segmented kernels index dropout by local rows)");
  }
  TANDEM_ASSIGN_OR_RETURN(c.segs, SegmentsFor(ranks));
  return c;
}

Status AdapterSet::ProjectionForward(int64_t layer, model::Projection proj, const Tensor& x,
                                     Tensor& y) {
  TANDEM_ASSIGN_OR_RETURN(const Call c, PrepareCall(layer, proj));
  if (!c.active) return Status::Ok();
  if (c.single >= 0) return SingleForward(c, x, y);
  Tensor& h = h_[c.index];
  TANDEM_RETURN_IF_ERROR(EnsureBuffer(ctx_, h, c.segs->h_numel(), x.dtype()));
  const ops::LoraWeights& w = training_ ? c.tables->train : c.tables->eval;
  TANDEM_RETURN_IF_ERROR(ops::LoraShrink(ctx_, h, x, w, *c.segs, c.seed));
  return ops::LoraExpand(ctx_, y, h, w, *c.segs);
}

Status AdapterSet::ProjectionBackward(int64_t layer, model::Projection proj, const Tensor& x,
                                      const Tensor& dy, Tensor& dx) {
  TANDEM_ASSIGN_OR_RETURN(const Call c, PrepareCall(layer, proj));
  if (!c.active) return Status::Ok();
  if (c.single >= 0) return SingleBackward(c, x, dy, dx);
  const Tensor& h = h_[c.index];
  if (!h.defined() || h.numel() != c.segs->h_numel()) {
    return FailedPreconditionError("AdapterSet: ProjectionBackward without a matching forward");
  }
  TANDEM_ASSIGN_OR_RETURN(Tensor dh,
                          Tensor::Empty({c.segs->h_numel()}, x.dtype(), ctx_.allocator()));
  const ops::LoraWeights& w = training_ ? c.tables->train : c.tables->eval;
  TANDEM_RETURN_IF_ERROR(ops::LoraExpandBackward(ctx_, dh, &c.tables->grads, dy, h, w, *c.segs));
  return ops::LoraShrinkBackward(ctx_, dx, &c.tables->grads, dh, x, w, *c.segs, c.seed);
}

Status AdapterSet::Dropout(const Call& c, Tensor& y, const Tensor& x, float p, int64_t col_offset,
                           bool accumulate) {
  return ops::LoraDropoutAt(ctx_, y, x, c.seed, p, accumulate, row_ids_, col_offset);
}

Status AdapterSet::AddTpSum(Tensor& grad, int64_t rows, int64_t cols, int share) {
  const int64_t n = rows * cols, tp = parallel_.tp_size;
  Tensor partial = sum_scratch_.Slice(0, 0, n);
  TANDEM_RETURN_IF_ERROR(EnsureBuffer(
      ctx_, sum_gather_, std::max<int64_t>(sum_gather_.defined() ? sum_gather_.numel() : 0, tp * n),
      DType::kF32));
  Tensor all = sum_gather_.Slice(0, 0, tp * n);
  TANDEM_RETURN_IF_ERROR(parallel_.hooks->TpAllGather(all, partial));
  const int64_t first = parallel_.tp_rank / share * share;
  TANDEM_RETURN_IF_ERROR(
      CopyTensor(partial, all.Slice(0, first * n, (first + 1) * n), ctx_.stream()));
  for (int64_t r = first + 1; r < first + share; ++r) {  // tp rank order: the same bits everywhere
    TANDEM_RETURN_IF_ERROR(ops::Add(ctx_, partial, partial, all.Slice(0, r * n, (r + 1) * n)));
  }
  Tensor flat = grad.View({n});
  return ops::Add(ctx_, flat, flat, partial);
}

// One adapter serves every token: h = drop(x) A^T and y += s h B^T as GEMMs. Under tp the
// adapter's slices make this rank's column block of y (column parallel) or its partial sum
// (row parallel; the model all-reduces it).
Status AdapterSet::SingleForward(const Call& c, const Tensor& x, Tensor& y) {
  const LoraAdapter& ad = *adapters_[c.single];
  const LoraTarget& t = ad.targets()[c.target];
  const LoraSlice& sl = ad.slice(c.target);
  const float p = training_ ? static_cast<float>(ad.config().dropout) : 0.0f;
  const int64_t N = num_tokens_;
  Tensor& h = h_[c.index];
  TANDEM_RETURN_IF_ERROR(EnsureBuffer(ctx_, h, N * t.rank, x.dtype()));
  Tensor h2 = h.View({N, t.rank});
  Tensor x_in = x;
  if (p > 0.0f) {
    TANDEM_ASSIGN_OR_RETURN(x_in, Tensor::Empty({N, sl.in}, x.dtype(), ctx_.allocator()));
    TANDEM_RETURN_IF_ERROR(Dropout(c, x_in, x, p, sl.in_offset, false));
  }
  {
    ops::ProfileScope scope(ctx_, "lora_shrink");
    TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, h2, x_in, ad.a(c.target).weight, false, true));
  }
  ops::ProfileScope scope(ctx_, "lora_expand");
  return ops::Matmul(ctx_, y, h2, ad.b(c.target).weight, false, true, t.scale, 1.0f);
}

// dh = s dy B; dB += s dy^T h; dA += dh^T drop(x); dx += drop(dh A). Under tp the replicated
// factor's gradient (A column parallel, B row parallel) is a partial sum here: it is summed over
// the tp group; B rows of a kv head shared by several ranks are summed over those ranks.
Status AdapterSet::SingleBackward(const Call& c, const Tensor& x, const Tensor& dy, Tensor& dx) {
  const LoraAdapter& ad = *adapters_[c.single];
  const LoraTarget& t = ad.targets()[c.target];
  const LoraSlice& sl = ad.slice(c.target);
  const float p = training_ ? static_cast<float>(ad.config().dropout) : 0.0f;
  const int64_t N = num_tokens_, r = t.rank;
  const int tp = parallel_.tp_size;
  const Tensor& h = h_[c.index];
  if (!h.defined() || h.numel() != N * r) {
    return FailedPreconditionError("AdapterSet: ProjectionBackward without a matching forward");
  }
  const Tensor h2 = h.View({N, r});
  const Tensor& A = ad.a(c.target).weight;  // [r, in]
  const Tensor& B = ad.b(c.target).weight;  // [out, r]
  TANDEM_ASSIGN_OR_RETURN(Tensor dh, Tensor::Empty({N, r}, x.dtype(), ctx_.allocator()));
  {
    ops::ProfileScope scope(ctx_, "lora_dh");
    TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dh, dy, B, false, false, t.scale, 0.0f));
  }
  TANDEM_ASSIGN_OR_RETURN(const bool trainable, TargetTrainable(ad, c.target));
  Tensor x_in = x;
  if (p > 0.0f && (trainable || dx.defined())) {
    TANDEM_ASSIGN_OR_RETURN(x_in, Tensor::Empty({N, sl.in}, x.dtype(), ctx_.allocator()));
    if (trainable) TANDEM_RETURN_IF_ERROR(Dropout(c, x_in, x, p, sl.in_offset, false));
  }
  if (trainable) {
    Tensor dB = ad.b(c.target).grad, dA = ad.a(c.target).grad;
    const int b_share = sl.row_parallel ? tp : sl.out_copies;  // ranks whose dB partials add up
    const int a_share = sl.row_parallel ? 1 : tp;
    if (b_share > 1 || a_share > 1) {
      TANDEM_RETURN_IF_ERROR(EnsureBuffer(
          ctx_, sum_scratch_,
          std::max({sum_scratch_.defined() ? sum_scratch_.numel() : 0, sl.out * r, r * sl.in}),
          DType::kF32));
    }
    if (b_share > 1) {
      Tensor part = sum_scratch_.Slice(0, 0, sl.out * r).View({sl.out, r});
      TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, part, dy, h2, true, false, t.scale, 0.0f));
      TANDEM_RETURN_IF_ERROR(AddTpSum(dB, sl.out, r, b_share));
    } else {
      ops::ProfileScope scope(ctx_, "lora_dB");
      TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dB, dy, h2, true, false, t.scale, 1.0f));
    }
    if (a_share > 1) {
      Tensor part = sum_scratch_.Slice(0, 0, r * sl.in).View({r, sl.in});
      TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, part, dh, x_in, true, false, 1.0f, 0.0f));
      TANDEM_RETURN_IF_ERROR(AddTpSum(dA, r, sl.in, a_share));
    } else {
      ops::ProfileScope scope(ctx_, "lora_dA");
      TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dA, dh, x_in, true, false, 1.0f, 1.0f));
    }
  }
  if (!dx.defined()) return Status::Ok();
  ops::ProfileScope scope(ctx_, "lora_dx");
  if (p == 0.0f) return ops::Matmul(ctx_, dx, dh, A, false, false, 1.0f, 1.0f);
  Tensor& tmp = x_in;  // reuse: drop(x) is no longer needed
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, tmp, dh, A, false, false));
  return Dropout(c, dx, tmp, p, sl.in_offset, /*accumulate=*/true);
}

StatusOr<std::optional<AdapterSet::Group>> AdapterSet::PrepareGroup(
    int64_t layer, std::span<const model::Projection> projs) {
  if (!group_fast_path_ || parallel_.tp_size != 1 || projs.empty()) return std::nullopt;
  Group g;
  g.rank_start.push_back(0);
  for (model::Projection proj : projs) {
    TANDEM_ASSIGN_OR_RETURN(const Call c, PrepareCall(layer, proj));
    if (!c.active || c.single < 0 || c.target < 0) return std::nullopt;
    if (g.adapter >= 0 && c.single != g.adapter) return std::nullopt;
    g.adapter = c.single;
    const LoraAdapter& ad = *adapters_[g.adapter];
    const LoraTarget& t = ad.targets()[c.target];
    if (training_ && ad.config().dropout > 0.0) return std::nullopt;
    if (g.calls.empty()) {
      g.scale = t.scale;
      g.in = t.in;
    } else if (t.scale != g.scale || t.in != g.in) {
      return std::nullopt;
    }
    g.rank_start.push_back(g.rank_start.back() + t.rank);
    g.calls.push_back(c);
  }
  return g;
}

StatusOr<bool> AdapterSet::ProjectionsForwardFirst(int64_t layer,
                                                   std::span<const model::Projection> projs,
                                                   std::span<const int64_t> col_start,
                                                   const Tensor& x, Tensor& y) {
  TANDEM_ASSIGN_OR_RETURN(std::optional<Group> g, PrepareGroup(layer, projs));
  if (!g) return false;
  const LoraAdapter& ad = *adapters_[g->adapter];
  const int64_t N = num_tokens_, R = g->rank_start.back(), first = g->calls[0].index;
  Tensor& h = h_[first];
  TANDEM_RETURN_IF_ERROR(EnsureBuffer(ctx_, h, N * R, x.dtype()));
  const Tensor h2 = h.View({N, R});
  Tensor a = ad.a(g->calls[0].target).weight;  // one member: its A as it is
  if (projs.size() > 1) {  // stacked, so x is read once (the weights may have changed: copy)
    TANDEM_RETURN_IF_ERROR(EnsureBuffer(ctx_, group_a_[first], R * g->in, a.dtype()));
    for (size_t m = 0; m < projs.size(); ++m) {
      Tensor rows =
          group_a_[first].Slice(0, g->rank_start[m] * g->in, g->rank_start[m + 1] * g->in);
      TANDEM_RETURN_IF_ERROR(
          CopyTensor(rows, ad.a(g->calls[m].target).weight.View({rows.numel()}), ctx_.stream()));
    }
    a = group_a_[first].View({R, g->in});
  }
  {
    ops::ProfileScope scope(ctx_, "lora_shrink");
    Tensor out = h2;
    TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, out, x, a, false, true));
  }
  ops::ProfileScope scope(ctx_, "lora_expand");
  for (size_t m = 0; m < projs.size(); ++m) {  // written, not added: the base GEMM adds to it
    Tensor y_m = y.Slice(1, col_start[m], col_start[m + 1]);
    const Tensor h_m = h2.Slice(1, g->rank_start[m], g->rank_start[m + 1]);
    TANDEM_RETURN_IF_ERROR(
        ops::Matmul(ctx_, y_m, h_m, ad.b(g->calls[m].target).weight, false, true, g->scale, 0.0f));
  }
  group_fused_[first] = true;
  return true;
}

StatusOr<bool> AdapterSet::ProjectionsBackwardFirst(int64_t layer,
                                                    std::span<const model::Projection> projs,
                                                    std::span<const int64_t> col_start,
                                                    const Tensor& x, const Tensor& dy, Tensor& dx) {
  TANDEM_RETURN_IF_ERROR(JoinSide());  // the last group's side work read buffers reused from here
  TANDEM_ASSIGN_OR_RETURN(std::optional<Group> g, PrepareGroup(layer, projs));
  const int64_t first =
      g ? g->calls[0].index : layer * model::kNumProjections + static_cast<int>(projs[0]);
  if (group_wide_[first]) {
    return FailedPreconditionError(
        StrCat("AdapterSet: layer ", layer, " ", model::ProjectionName(projs[0]),
               ": the forward took the wide path, the backward did not"));
  }
  if (!g || !group_fused_[first]) {
    if (g || group_fused_[first]) {
      return FailedPreconditionError(
          StrCat("AdapterSet: layer ", layer, " ", model::ProjectionName(projs[0]),
                 ": the backward's fast path differs from the forward's"));
    }
    return false;
  }
  LoraAdapter& ad = *adapters_[g->adapter];
  const int64_t N = num_tokens_, R = g->rank_start.back();
  const Tensor& h = h_[first];
  if (!h.defined() || h.numel() != N * R) {
    return FailedPreconditionError("AdapterSet: ProjectionsBackwardFirst without its forward");
  }
  const Tensor h2 = h.View({N, R});
  TANDEM_ASSIGN_OR_RETURN(Tensor dh, Tensor::Empty({N, R}, x.dtype(), ctx_.allocator()));
  {
    ops::ProfileScope scope(ctx_, "lora_dh");
    for (size_t m = 0; m < projs.size(); ++m) {  // dh_m = s dy_m B_m
      Tensor dh_m = dh.Slice(1, g->rank_start[m], g->rank_start[m + 1]);
      const Tensor dy_m = dy.Slice(1, col_start[m], col_start[m + 1]);
      TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dh_m, dy_m, ad.b(g->calls[m].target).weight, false,
                                         false, g->scale, 0.0f));
    }
  }
  TANDEM_RETURN_IF_ERROR(GroupWeightGrads(*g, col_start, x, dy, h2, g->scale, dh, true));
  if (!dx.defined()) return true;
  ops::ProfileScope scope(ctx_, "lora_dx");  // dx = dh A, written: the base GEMM adds to it
  const Tensor a =
      projs.size() > 1 ? group_a_[first].View({R, g->in}) : ad.a(g->calls[0].target).weight;
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dx, dh, a, false, false, 1.0f, 0.0f));
  return true;
}

Status AdapterSet::GroupWeightGrads(const Group& g, std::span<const int64_t> col_start,
                                    const Tensor& x, const Tensor& dy, const Tensor& h,
                                    float b_alpha, const Tensor& dh, bool keep_dh) {
  LoraAdapter& ad = *adapters_[g.adapter];
  const size_t members = g.calls.size();
  const int64_t R = g.rank_start.back();
  std::vector<bool> trainable(members);
  bool any = false;
  for (size_t m = 0; m < members; ++m) {
    TANDEM_ASSIGN_OR_RETURN(const bool t, TargetTrainable(ad, g.calls[m].target));
    trainable[m] = t;
    any = any || t;
  }
  if (!any) return Status::Ok();
  // On the side stream when overlapping (after it waits for dh).
  ops::Context* wctx = &ctx_;
  if (overlap_weight_grads_ && ctx_.is_cuda()) {
    if (side_ctx_ == nullptr) {
      TANDEM_ASSIGN_OR_RETURN(side_ctx_, ops::Context::ForDevice(ctx_.device()));
    }
    TANDEM_RETURN_IF_ERROR(ops::WaitForStream(*side_ctx_, ctx_));
    wctx = side_ctx_.get();
    if (keep_dh) side_keep_.push_back(dh);
    side_pending_ = true;
  }
  {
    ops::ProfileScope scope(*wctx, "lora_dB");
    for (size_t m = 0; m < members; ++m) {  // dB_m += b_alpha dy_m^T h_m
      if (!trainable[m]) continue;
      Tensor dB = ad.b(g.calls[m].target).grad;
      const Tensor dy_m = dy.Slice(1, col_start[m], col_start[m + 1]);
      const Tensor h_m = h.Slice(1, g.rank_start[m], g.rank_start[m + 1]);
      TANDEM_RETURN_IF_ERROR(ops::Matmul(*wctx, dB, dy_m, h_m, true, false, b_alpha, 1.0f));
    }
  }
  ops::ProfileScope scope(*wctx, "lora_dA");
  if (members == 1) {  // dA += dh^T x
    Tensor dA = ad.a(g.calls[0].target).grad;
    return ops::Matmul(*wctx, dA, dh, x, true, false, 1.0f, 1.0f);
  }
  // The stacked dA in one GEMM over x, then each member's rows added to its grad.
  if (!group_grad_scratch_.defined() || group_grad_scratch_.numel() < R * g.in) {
    if (group_grad_scratch_.defined() && side_pending_) {
      side_keep_.push_back(group_grad_scratch_);  // queued side work may still use it
    }
    TANDEM_ASSIGN_OR_RETURN(group_grad_scratch_,
                            Tensor::Empty({R * g.in}, DType::kF32, ctx_.allocator()));
  }
  Tensor stacked = group_grad_scratch_.Slice(0, 0, R * g.in).View({R, g.in});
  TANDEM_RETURN_IF_ERROR(ops::Matmul(*wctx, stacked, dh, x, true, false, 1.0f, 0.0f));
  for (size_t m = 0; m < members; ++m) {
    if (!trainable[m]) continue;
    const Tensor& grad = ad.a(g.calls[m].target).grad;
    Tensor dA = grad.View({grad.numel()});
    const Tensor rows =
        group_grad_scratch_.Slice(0, g.rank_start[m] * g.in, g.rank_start[m + 1] * g.in);
    TANDEM_RETURN_IF_ERROR(ops::Add(*wctx, dA, dA, rows));
  }
  return Status::Ok();
}

int64_t AdapterSet::WideColumns(std::span<const model::Projection> projs) const {
  if (!group_fast_path_ || !wide_path_ || parallel_.tp_size != 1) return 0;
  int64_t most = 0;
  for (const auto& ad : adapters_) {
    for (int64_t l = 0; l < base_.num_hidden_layers; ++l) {
      int64_t r = 0;
      for (model::Projection p : projs) {
        const int t = ad->Find(l, p);
        if (t >= 0) r += ad->targets()[t].rank;
      }
      most = std::max(most, r);
    }
  }
  return most;
}

Status AdapterSet::RefreshWide(int64_t first, const Group& g, std::span<const int64_t> col_start,
                               const Tensor& w, uint64_t generation) {
  const LoraAdapter& ad = *adapters_[g.adapter];
  const int64_t out = w.dim(0), in = w.dim(1), R = g.rank_start.back();
  WideWeights& s = wide_[first];
  if (!s.m.defined() || s.out != out || s.in != in || s.rank_start != g.rank_start ||
      s.m.dtype() != w.dtype()) {
    s = WideWeights();
    TANDEM_ASSIGN_OR_RETURN(s.m, Tensor::Empty({out + R, in + R}, w.dtype(), ctx_.allocator()));
    TANDEM_RETURN_IF_ERROR(ops::Fill(ctx_, s.m, 0.0f));  // B's off-diagonal blocks stay zero
    s.out = out;
    s.in = in;
    s.rank_start = g.rank_start;
  }
  if (!s.has_w || s.w_data != w.raw_data() || s.generation != generation) {
    Tensor base = s.m.Slice(0, 0, out).Slice(1, 0, in);
    TANDEM_RETURN_IF_ERROR(ops::CopyMatrix(ctx_, base, w));
    s.has_w = true;
    s.w_data = w.raw_data();
    s.generation = generation;
    ++wide_refreshes_;
  }
  std::vector<Tensor> dst, src;  // every member's B and A, in one call
  for (size_t m = 0; m < g.calls.size(); ++m) {
    const int64_t r0 = g.rank_start[m], r1 = g.rank_start[m + 1];
    dst.push_back(s.m.Slice(0, col_start[m], col_start[m + 1]).Slice(1, in + r0, in + r1));
    src.push_back(ad.b(g.calls[m].target).weight);
    dst.push_back(s.m.Slice(0, out + r0, out + r1).Slice(1, 0, in));
    src.push_back(ad.a(g.calls[m].target).weight);
  }
  return ops::CopyMatrices(ctx_, dst, src);
}

StatusOr<bool> AdapterSet::ProjectionsForwardWide(int64_t layer,
                                                  std::span<const model::Projection> projs,
                                                  std::span<const int64_t> col_start,
                                                  const Tensor& x_wide, int64_t in, const Tensor& w,
                                                  uint64_t weights_generation, Tensor& y) {
  if (!wide_path_) return false;
  TANDEM_ASSIGN_OR_RETURN(std::optional<Group> g, PrepareGroup(layer, projs));
  if (!g) return false;
  const int64_t R = g->rank_start.back(), first = g->calls[0].index, out = w.dim(0);
  if (g->in != in || w.dim(1) != in || in + R > x_wide.dim(1) || col_start.back() != out) {
    return false;
  }
  TANDEM_RETURN_IF_ERROR(RefreshWide(first, *g, col_start, w, weights_generation));
  const Tensor& m = wide_[first].m;
  {
    ops::ProfileScope scope(ctx_, "lora_shrink");
    Tensor sh = x_wide.Slice(1, in, in + R);  // s h = s x A^T, beside x
    TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, sh, x_wide.Slice(1, 0, in),
                                       m.Slice(0, out, out + R).Slice(1, 0, in), false, true,
                                       g->scale, 0.0f));
  }
  // y = [x | s h] [W | B]^T: the base product and the deltas in one GEMM.
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, y, x_wide.Slice(1, 0, in + R), m.Slice(0, 0, out), false,
                                     true, 1.0f, 0.0f));
  group_wide_[first] = true;
  return true;
}

StatusOr<bool> AdapterSet::ProjectionsBackwardWide(int64_t layer,
                                                   std::span<const model::Projection> projs,
                                                   std::span<const int64_t> col_start,
                                                   const Tensor& x_wide, int64_t in,
                                                   const Tensor& dy_wide, const Tensor& w,
                                                   uint64_t weights_generation, Tensor& dx) {
  TANDEM_RETURN_IF_ERROR(JoinSide());  // the last group's side work read buffers reused from here
  if (layer < 0 || layer >= base_.num_hidden_layers || projs.empty()) {
    return InvalidArgumentError(
        StrCat("AdapterSet: wide backward for layer ", layer, " of ", base_.num_hidden_layers));
  }
  TANDEM_ASSIGN_OR_RETURN(std::optional<Group> g, PrepareGroup(layer, projs));
  const int64_t first = layer * model::kNumProjections + static_cast<int>(projs[0]);
  if (!group_wide_[first]) return false;
  const WideWeights& s = wide_[first];
  const int64_t out = w.dim(0);
  const int64_t R = g ? g->rank_start.back() : 0;
  if (!g || g->rank_start != s.rank_start || out + R > dy_wide.dim(1) || x_wide.dim(1) < in + R) {
    return FailedPreconditionError(
        StrCat("AdapterSet: layer ", layer, " ", model::ProjectionName(projs[0]),
               ": the backward cannot take the wide path its forward took"));
  }
  if (s.w_data != w.raw_data() || s.generation != weights_generation) {
    return FailedPreconditionError(
        StrCat("AdapterSet: layer ", layer, " ", model::ProjectionName(projs[0]),
               ": the base weights changed between the forward and the backward"));
  }
  LoraAdapter& ad = *adapters_[g->adapter];
  Tensor dh = dy_wide.Slice(1, out, out + R);  // s dy B, beside dy
  {
    ops::ProfileScope scope(ctx_, "lora_dh");
    for (size_t m = 0; m < projs.size(); ++m) {
      Tensor dh_m = dh.Slice(1, g->rank_start[m], g->rank_start[m + 1]);
      const Tensor dy_m = dy_wide.Slice(1, col_start[m], col_start[m + 1]);
      TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dh_m, dy_m, ad.b(g->calls[m].target).weight, false,
                                         false, g->scale, 0.0f));
    }
  }
  const Tensor x = x_wide.Slice(1, 0, in);
  // dB = dy^T (s h): the forward kept s h in x's spare columns, so b_alpha is 1.
  TANDEM_RETURN_IF_ERROR(GroupWeightGrads(*g, col_start, x, dy_wide.Slice(1, 0, out),
                                          x_wide.Slice(1, in, in + R), 1.0f, dh, false));
  if (!dx.defined()) return true;
  // dx = [dy | dh] [W ; A]: the base product and the adapter's part in one GEMM.
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dx, dy_wide.Slice(1, 0, out + R), s.m.Slice(1, 0, in),
                                     false, false, 1.0f, 0.0f));
  return true;
}

}  // namespace tandem::peft

// InferModel (serve/infer_model.h).
#include "serve/infer_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "core/cuda_allocator.h"
#include "core/logging.h"
#include "model/rope.h"
#include "ops/cuda_graph.h"
#include "ops/ops.h"
#include "ops/paged_attention.h"
#include "ops/sampling.h"

namespace tandem::serve {
namespace {

// The rows of a fused group: parameters `first` .. `first + count - 1` must be adjacent in memory
// (LlamaModel lays fused projections out that way); returns them as one [rows, cols] tensor.
StatusOr<Tensor> Fused(const std::vector<model::Parameter>& params, size_t first, size_t count) {
  const Tensor& w0 = params[first].weight;
  int64_t rows = 0;
  const char* expect = static_cast<const char*>(w0.raw_data());
  for (size_t i = first; i < first + count; ++i) {
    const Tensor& w = params[i].weight;
    if (w.raw_data() != expect || w.dim(1) != w0.dim(1)) {
      return InternalError(StrCat("InferModel: ", params[i].name,
                                  " does not follow the previous projection in memory"));
    }
    rows += w.dim(0);
    expect += w.num_bytes();
  }
  return Tensor::Wrap(w0.raw_data(), {rows, w0.dim(1)}, w0.dtype(), w0.device());
}

}  // namespace

struct InferModel::Buffers {
  int64_t n = 0, r = 0;
  Tensor x, ln, qkv, attn, proj, x_mid, gate_up, act;  // [N, ...]
  Tensor positions, req, slots, tables;                // device i32
  int64_t max_blocks = 0;
};

// One captured decode shape: the graph, its output in the graph's arena, the metadata buffer it
// reads (rewritten before every replay) and the LoRA segment records it reads.
struct InferModel::DecodeGraph {
  ops::CudaGraph graph;  // first, so it goes last: `logits` lives in its arena
  Tensor logits;         // [R, V]
  Tensor meta;           // device i32, UploadMetadata's layout for this shape
  std::vector<ops::LoraSegments> segs;
  uint64_t last_used = 0;
};

InferModel::InferModel(ops::Context& ctx, model::LlamaModel& model, int64_t block_tokens)
    : ctx_(ctx), model_(model), config_(model.config()), block_tokens_(block_tokens) {}

InferModel::~InferModel() = default;

StatusOr<std::unique_ptr<InferModel>> InferModel::Create(ops::Context& ctx,
                                                         model::LlamaModel& model,
                                                         int64_t block_tokens) {
  if (block_tokens <= 0) {
    return InvalidArgumentError(StrCat("block_tokens must be positive, found ", block_tokens));
  }
  std::unique_ptr<InferModel> m(new InferModel(ctx, model, block_tokens));
  TANDEM_RETURN_IF_ERROR(m->BindWeights());
  return m;
}

int64_t InferModel::kv_block_bytes() const {
  return 2 * block_tokens_ * config_.num_key_value_heads * config_.head_dim *
         static_cast<int64_t>(DTypeSize(compute_dtype()));
}

Status InferModel::BindWeights() {
  const std::vector<model::Parameter>& params = model_.parameters();
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < params.size(); ++i) index[params[i].name] = i;
  auto find = [&](const std::string& name) -> StatusOr<size_t> {
    auto it = index.find(name);
    if (it == index.end()) return NotFoundError(StrCat("InferModel: no parameter ", name));
    return it->second;
  };
  TANDEM_ASSIGN_OR_RETURN(size_t embed, find("model.embed_tokens.weight"));
  embed_ = params[embed].weight;
  TANDEM_ASSIGN_OR_RETURN(size_t norm, find("model.norm.weight"));
  final_norm_ = params[norm].weight;
  if (config_.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    TANDEM_ASSIGN_OR_RETURN(size_t lm, find("lm_head.weight"));
    lm_head_ = params[lm].weight;
  }
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    const std::string pre = StrCat("model.layers.", l, ".");
    LayerWeights w;
    TANDEM_ASSIGN_OR_RETURN(size_t q, find(pre + "self_attn.q_proj.weight"));
    TANDEM_ASSIGN_OR_RETURN(w.qkv, Fused(params, q, 3));
    TANDEM_ASSIGN_OR_RETURN(size_t o, find(pre + "self_attn.o_proj.weight"));
    w.o = params[o].weight;
    TANDEM_ASSIGN_OR_RETURN(size_t gate, find(pre + "mlp.gate_proj.weight"));
    TANDEM_ASSIGN_OR_RETURN(w.gate_up, Fused(params, gate, 2));
    TANDEM_ASSIGN_OR_RETURN(size_t down, find(pre + "mlp.down_proj.weight"));
    w.down = params[down].weight;
    TANDEM_ASSIGN_OR_RETURN(size_t n1, find(pre + "input_layernorm.weight"));
    TANDEM_ASSIGN_OR_RETURN(size_t n2, find(pre + "post_attention_layernorm.weight"));
    w.attn_norm = params[n1].weight;
    w.mlp_norm = params[n2].weight;
    layers_.push_back(w);
  }
  const std::vector<float> inv = model::RopeInvFreq(config_);
  Tensor host = Tensor::Cpu({static_cast<int64_t>(inv.size())}, DType::kF32);  // [D/2]
  std::copy(inv.begin(), inv.end(), host.data<float>());
  TANDEM_ASSIGN_OR_RETURN(inv_freq_, CopyToDeviceBlocking(host, ctx_.allocator()));
  return Status::Ok();
}

Status InferModel::BuildLoraTables(const std::vector<const AdapterWeights*>& adapters) {
  const int64_t L = config_.num_hidden_layers;
  DropGraphs();  // they read the tables replaced here
  lora_weights_.assign(L * kNumLoraSites, ops::LoraWeights());
  lora_group_.assign(L * kNumLoraSites, -1);
  lora_group_ranks_.clear();
  std::map<std::vector<int32_t>, int> by_ranks;
  for (int64_t l = 0; l < L; ++l) {
    for (int s = 0; s < kNumLoraSites; ++s) {
      const auto site = static_cast<LoraSite>(s);
      const auto [in, out] = LoraSiteShape(config_, site);
      std::vector<ops::LoraWeights::Entry> entries(adapters.size());
      std::vector<int32_t> ranks(adapters.size(), 0);
      bool any = false;
      for (size_t a = 0; a < adapters.size(); ++a) {
        const int t = adapters[a]->Find(l, site);
        if (t < 0) continue;
        const AdapterWeights::Target& tg = adapters[a]->targets[t];
        entries[a] = {tg.a, tg.b, tg.scale, 0.0f};
        ranks[a] = static_cast<int32_t>(tg.a.dim(0));
        any = true;
      }
      const int64_t i = l * kNumLoraSites + s;
      TANDEM_ASSIGN_OR_RETURN(lora_weights_[i],
                              ops::LoraWeights::Create(ctx_, in, out, std::move(entries)));
      if (!any) continue;
      auto [it, inserted] = by_ranks.emplace(ranks, static_cast<int>(lora_group_ranks_.size()));
      if (inserted) lora_group_ranks_.push_back(std::move(ranks));
      lora_group_[i] = it->second;
    }
  }
  lora_adapters_ = adapters;
  ++lora_table_builds_;
  return Status::Ok();
}

// The tables cover every adapter passed, used by a batch or not: they are rebuilt only when the
// list changes (the engine passes its resident adapters, so: when one is loaded or evicted).
Status InferModel::EnsureLoraTables(const std::vector<const AdapterWeights*>& adapters) {
  if (adapters == lora_adapters_ && !lora_weights_.empty()) return Status::Ok();
  return BuildLoraTables(adapters);
}

Status InferModel::PrepareLora(const std::vector<SeqChunk>& seqs,
                               const std::vector<const AdapterWeights*>& adapters) {
  const int64_t L = config_.num_hidden_layers;
  lora_segs_.clear();
  lora_segs_index_.clear();
  if (adapters.empty()) return Status::Ok();
  TANDEM_RETURN_IF_ERROR(EnsureLoraTables(adapters));
  // Segments: runs of equal adapter over the batch's tokens.
  std::vector<int32_t> seg_start{0}, seg_adapter;
  for (const SeqChunk& s : seqs) {
    const int32_t len = static_cast<int32_t>(s.tokens.size());
    if (!seg_adapter.empty() && seg_adapter.back() == s.adapter) {
      seg_start.back() += len;
    } else {
      seg_adapter.push_back(s.adapter);
      seg_start.push_back(seg_start.back() + len);
    }
  }
  // One LoraSegments per rank table that some segment of this batch uses.
  std::vector<int> group_segs(lora_group_ranks_.size(), -1);
  for (size_t g = 0; g < lora_group_ranks_.size(); ++g) {
    bool used = false;
    for (int32_t a : seg_adapter) used = used || (a >= 0 && lora_group_ranks_[g][a] > 0);
    if (!used) continue;
    TANDEM_ASSIGN_OR_RETURN(
        ops::LoraSegments segs,
        ops::LoraSegments::Create(ctx_, seg_start, seg_adapter, lora_group_ranks_[g]));
    group_segs[g] = static_cast<int>(lora_segs_.size());
    lora_segs_.push_back(std::move(segs));
  }
  lora_segs_index_.assign(L * kNumLoraSites, -1);
  for (int64_t i = 0; i < L * kNumLoraSites; ++i) {
    if (lora_group_[i] >= 0) lora_segs_index_[i] = group_segs[lora_group_[i]];
  }
  return Status::Ok();
}

Status InferModel::LoraDelta(int64_t l, LoraSite site, const Tensor& x, Tensor y) {
  const int64_t i = l * kNumLoraSites + static_cast<int>(site);
  if (lora_segs_index_.empty() || lora_segs_index_[i] < 0) return Status::Ok();
  const ops::LoraSegments& segs = lora_segs_[lora_segs_index_[i]];
  return ops::LoraDelta(ctx_, y, x, lora_weights_[i], segs);  // shrink + expand, no h pass
}

Status InferModel::Layer(int64_t l, Buffers& b, Tensor& kv_pages) {
  const LayerWeights& w = layers_[l];
  const int64_t N = b.n, Hq = config_.num_attention_heads, Hkv = config_.num_key_value_heads;
  const int64_t D = config_.head_dim, F = config_.intermediate_size, H3 = Hq + 2 * Hkv;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  // b.ln holds this layer's normed input (Compute, or the previous layer's fused add + norm).
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, b.qkv, b.ln, w.qkv, false, true));  // [N, H3 D]
  // q | k | v columns of qkv: one fused delta (AdapterWeights' joined weights).
  TANDEM_RETURN_IF_ERROR(LoraDelta(l, LoraSite::kQkv, b.ln, b.qkv));
  const Tensor heads = b.qkv.View({N, H3, D});
  const Tensor q = heads.Slice(1, 0, Hq);  // [N, Hq, D]
  const Tensor v = heads.Slice(1, Hq + Hkv, H3);
  // q and k are adjacent heads of qkv and rotate the same way: one kernel rotates both and writes
  // the rotated k and v to the layer's pages.
  Tensor qk = heads.Slice(1, 0, Hq + Hkv);
  const Tensor slots = b.slots.Slice(0, l, l + 1).View({N});
  TANDEM_RETURN_IF_ERROR(ops::RopePagedKvWrite(ctx_, qk, kv_pages, v, b.positions, inv_freq_, slots,
                                               Hkv, block_tokens_));
  const Tensor table = b.tables.Slice(0, l, l + 1).View({b.r, b.max_blocks});
  Tensor attn = b.attn.View({N, Hq, D});
  TANDEM_RETURN_IF_ERROR(ops::PagedAttention(ctx_, attn, q, kv_pages, table, b.req, b.positions,
                                             Hkv, block_tokens_, scale));
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, b.proj, b.attn, w.o, false, true));
  TANDEM_RETURN_IF_ERROR(LoraDelta(l, LoraSite::kO, b.attn, b.proj));
  // x_mid = x + proj and ln = norm(x_mid), one pass.
  TANDEM_RETURN_IF_ERROR(ops::AddRmsNormForward(ctx_, b.x_mid, b.ln, b.x, b.proj, w.mlp_norm, eps));
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, b.gate_up, b.ln, w.gate_up, false, true));
  // gate | up columns of gate_up [N, 2F]: one fused delta.
  TANDEM_RETURN_IF_ERROR(LoraDelta(l, LoraSite::kGateUp, b.ln, b.gate_up));
  TANDEM_RETURN_IF_ERROR(
      ops::SwigluForward(ctx_, b.act, b.gate_up.Slice(1, 0, F), b.gate_up.Slice(1, F, 2 * F)));
  TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, b.proj, b.act, w.down, false, true));
  TANDEM_RETURN_IF_ERROR(LoraDelta(l, LoraSite::kDown, b.act, b.proj));
  if (l + 1 == num_layers()) return ops::Add(ctx_, b.x, b.x_mid, b.proj);
  // x = x_mid + proj and the next layer's input norm, one pass.
  return ops::AddRmsNormForward(ctx_, b.x, b.ln, b.x_mid, b.proj, layers_[l + 1].attn_norm, eps);
}

Status InferModel::EnsureHost(Tensor* buffer, int64_t num_bytes) {
  if (buffer->defined() && buffer->numel() >= num_bytes) return Status::Ok();
  const int64_t size = std::max<int64_t>(num_bytes, buffer->defined() ? 2 * buffer->numel() : 4096);
  if (ctx_.is_cuda() && pinned_ == nullptr) {
    TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<CachingAllocator> pinned, CreatePinnedHostAllocator());
    pinned_ = std::move(pinned);
  }
  Allocator& alloc = ctx_.is_cuda() ? *pinned_ : HostAllocator();
  TANDEM_ASSIGN_OR_RETURN(*buffer, Tensor::Empty({size}, DType::kU8, alloc));
  return Status::Ok();
}

Status InferModel::UploadMetadata(const std::vector<SeqChunk>& seqs, Buffers& b, Tensor* tokens,
                                  Tensor* last, Tensor* device) {
  const int64_t L = config_.num_hidden_layers, R = b.r, N = b.n, B = b.max_blocks;
  // One i32 buffer: tokens [N], positions [N], req [N], last [R], slots [L, N], tables [L, R, B].
  const int64_t o_pos = N, o_req = 2 * N, o_last = 3 * N, o_slots = 3 * N + R;
  const int64_t o_tables = o_slots + L * N, total = o_tables + L * R * B;
  if (upload_pending_) TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());  // staging_ is still read
  TANDEM_RETURN_IF_ERROR(EnsureHost(&staging_, total * 4));
  int32_t* h = static_cast<int32_t*>(staging_.raw_data());
  std::fill(h + o_tables, h + total, 0);
  int64_t n = 0;
  for (int64_t r = 0; r < R; ++r) {
    const SeqChunk& s = seqs[r];
    for (int64_t l = 0; l < L; ++l) {
      const std::vector<int32_t>& pages = (*s.blocks)[l];
      TANDEM_CHECK(static_cast<int64_t>(pages.size()) * block_tokens_ >=
                   s.start + static_cast<int64_t>(s.tokens.size()));
      std::copy(pages.begin(), pages.end(), h + o_tables + (l * R + r) * B);
    }
    for (size_t t = 0; t < s.tokens.size(); ++t, ++n) {
      const int64_t p = s.start + static_cast<int64_t>(t);
      h[n] = s.tokens[t];
      h[o_pos + n] = static_cast<int32_t>(p);
      h[o_req + n] = static_cast<int32_t>(r);
      for (int64_t l = 0; l < L; ++l) {
        h[o_slots + l * N + n] = static_cast<int32_t>(
            (*s.blocks)[l][p / block_tokens_] * block_tokens_ + p % block_tokens_);
      }
    }
    h[o_last + r] = static_cast<int32_t>(n - 1);
  }
  // The CPU reads the staging buffer in place; CUDA gets it in one asynchronous copy.
  Tensor meta = Tensor::Wrap(h, {total}, DType::kI32, staging_.device());
  if (ctx_.is_cuda()) {
    Tensor dev;
    if (device != nullptr && device->defined()) {
      dev = *device;
      TANDEM_CHECK(dev.numel() == total);
    } else {
      TANDEM_ASSIGN_OR_RETURN(dev, Tensor::Empty({total}, DType::kI32, ctx_.allocator()));
      if (device != nullptr) *device = dev;
    }
    TANDEM_RETURN_IF_ERROR(CopyTensor(dev, meta, ctx_.stream()));
    upload_pending_ = true;
    meta = dev;
  }
  *tokens = meta.Slice(0, 0, N);
  b.positions = meta.Slice(0, o_pos, o_pos + N);
  b.req = meta.Slice(0, o_req, o_req + N);
  *last = meta.Slice(0, o_last, o_last + R);
  b.slots = meta.Slice(0, o_slots, o_tables).View({L, N});
  b.tables = meta.Slice(0, o_tables, total).View({L, R, B});
  return Status::Ok();
}

StatusOr<Tensor> InferModel::ForwardLogits(Tensor& kv_pages, const std::vector<SeqChunk>& seqs,
                                           const std::vector<const AdapterWeights*>& adapters) {
  const int64_t L = config_.num_hidden_layers, R = static_cast<int64_t>(seqs.size());
  Buffers b;
  b.r = R;
  for (const SeqChunk& s : seqs) {
    TANDEM_CHECK(s.blocks != nullptr && static_cast<int64_t>(s.blocks->size()) == L);
    TANDEM_CHECK(!s.tokens.empty());
    b.n += static_cast<int64_t>(s.tokens.size());
    b.max_blocks = std::max<int64_t>(b.max_blocks, (*s.blocks)[0].size());
  }
  if (R == 0) return Tensor::Empty({0, config_.vocab_size}, compute_dtype(), ctx_.allocator());
  Tensor logits;
  TANDEM_ASSIGN_OR_RETURN(bool replayed, GraphForward(kv_pages, seqs, adapters, b, &logits));
  if (replayed) return logits;
  Tensor d_tokens, d_last;
  TANDEM_RETURN_IF_ERROR(UploadMetadata(seqs, b, &d_tokens, &d_last, nullptr));
  TANDEM_RETURN_IF_ERROR(PrepareLora(seqs, adapters));
  TANDEM_RETURN_IF_ERROR(Compute(b, kv_pages, d_tokens, d_last, &logits));
  return logits;
}

Status InferModel::Compute(Buffers& b, Tensor& kv_pages, const Tensor& d_tokens,
                           const Tensor& d_last, Tensor* logits) {
  const int64_t L = config_.num_hidden_layers, R = b.r, N = b.n;
  const int64_t C = config_.hidden_size, V = config_.vocab_size;
  const DType A = compute_dtype();
  const int64_t Hq = config_.num_attention_heads, Hkv = config_.num_key_value_heads;
  const int64_t D = config_.head_dim, F = config_.intermediate_size;
  auto alloc = [&](Tensor* t, const Shape& shape) -> Status {
    TANDEM_ASSIGN_OR_RETURN(*t, Tensor::Empty(shape, A, ctx_.allocator()));
    return Status::Ok();
  };
  TANDEM_RETURN_IF_ERROR(alloc(&b.x, {N, C}));
  TANDEM_RETURN_IF_ERROR(alloc(&b.ln, {N, C}));
  TANDEM_RETURN_IF_ERROR(alloc(&b.qkv, {N, (Hq + 2 * Hkv) * D}));
  TANDEM_RETURN_IF_ERROR(alloc(&b.attn, {N, Hq * D}));
  TANDEM_RETURN_IF_ERROR(alloc(&b.proj, {N, C}));
  TANDEM_RETURN_IF_ERROR(alloc(&b.x_mid, {N, C}));
  TANDEM_RETURN_IF_ERROR(alloc(&b.gate_up, {N, 2 * F}));
  TANDEM_RETURN_IF_ERROR(alloc(&b.act, {N, F}));
  TANDEM_RETURN_IF_ERROR(ops::EmbeddingForward(ctx_, b.x, d_tokens, embed_));
  Tensor no_rstd;
  if (L > 0) {
    TANDEM_RETURN_IF_ERROR(ops::RmsNormForward(ctx_, b.ln, no_rstd, b.x, layers_[0].attn_norm,
                                               static_cast<float>(config_.rms_norm_eps)));
  }
  for (int64_t l = 0; l < L; ++l) TANDEM_RETURN_IF_ERROR(Layer(l, b, kv_pages));

  // Last token of each sequence: gather rows (an embedding lookup into x), norm, lm head.
  Tensor h, hn, none;
  TANDEM_RETURN_IF_ERROR(alloc(&h, {R, C}));
  TANDEM_RETURN_IF_ERROR(alloc(&hn, {R, C}));
  TANDEM_RETURN_IF_ERROR(alloc(logits, {R, V}));
  TANDEM_RETURN_IF_ERROR(ops::EmbeddingForward(ctx_, h, d_last, b.x));
  TANDEM_RETURN_IF_ERROR(ops::RmsNormForward(ctx_, hn, none, h, final_norm_,
                                             static_cast<float>(config_.rms_norm_eps)));
  return ops::Matmul(ctx_, *logits, hn, lm_head_, false, true);  // [R, V]
}

StatusOr<bool> InferModel::GraphForward(Tensor& kv_pages, const std::vector<SeqChunk>& seqs,
                                        const std::vector<const AdapterWeights*>& adapters,
                                        Buffers& b, Tensor* logits) {
  if (!graphs_on_ || graphs_broken_ || !ctx_.is_cuda() || ctx_.profiler() != nullptr) {
    return false;
  }
  for (const SeqChunk& s : seqs) {
    if (s.tokens.size() != 1) return false;  // prefill chunks: shapes vary too much to keep
  }
  // The LoRA tables over this list first: a new list drops the graphs that read the old tables.
  if (!adapters.empty()) TANDEM_RETURN_IF_ERROR(EnsureLoraTables(adapters));
  // Block tables rounded up to a power of two wide, so a growing context changes the shape
  // only when it doubles.
  int64_t width = 1;
  while (width < b.max_blocks) width *= 2;
  b.max_blocks = width;
  // The shape: the pool, R, the table width, and each sequence's adapter (with one token per
  // sequence these fix the LoRA segments; the adapter list itself is fixed while graphs live).
  std::vector<int64_t> key = {reinterpret_cast<int64_t>(kv_pages.raw_data()),
                              kv_pages.dim(0),
                              kv_pages.stride(0),
                              b.r,
                              width,
                              adapters.empty() ? 0 : 1};
  for (const SeqChunk& s : seqs) key.push_back(s.adapter);

  Tensor d_tokens, d_last;
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    if (graph_sightings_.size() > 4096) graph_sightings_.clear();
    if (++graph_sightings_[key] < 2) return false;  // once is not a pattern: run it eagerly
    graph_sightings_.erase(key);
    auto g = std::make_unique<DecodeGraph>();
    TANDEM_RETURN_IF_ERROR(UploadMetadata(seqs, b, &d_tokens, &d_last, &g->meta));
    TANDEM_RETURN_IF_ERROR(PrepareLora(seqs, adapters));
    // Activations of N = R tokens, the head's rows and the LoRA temporaries, with room to spare
    // (a capture that runs out is redone with twice the arena).
    const int64_t C = config_.hidden_size, F = config_.intermediate_size;
    const int64_t qkv =
        (config_.num_attention_heads + 2 * config_.num_key_value_heads) * config_.head_dim;
    const int64_t guess = 2 * b.r * (6 * C + qkv + 3 * F + config_.vocab_size) *
                              static_cast<int64_t>(DTypeSize(compute_dtype())) +
                          (int64_t{4} << 20);
    Tensor out;
    StatusOr<ops::CudaGraph> graph = ops::CudaGraph::Capture(
        ctx_, guess, [&] { return Compute(b, kv_pages, d_tokens, d_last, &out); });
    if (!graph.ok()) {
      graphs_broken_ = true;
      TANDEM_LOG(WARNING, "serve") << "decode CUDA graph capture failed; decoding without graphs "
                                      "from now on: "
                                   << graph.status().ToString();
      return false;
    }
    g->graph = std::move(*graph);
    g->logits = std::move(out);
    g->segs = std::move(lora_segs_);
    lora_segs_.clear();
    lora_segs_index_.clear();
    ++graph_stats_.captures;
    it = graphs_.emplace(std::move(key), std::move(g)).first;
    it->second->last_used = ++graph_clock_;
    // Least recently used first, down to kMaxGraphs graphs and kMaxGraphArenaBytes of arenas
    // (the new one stays). A replay still in flight finishes first: CUDA frees it after.
    int64_t bytes = 0;
    for (const auto& [k, held] : graphs_) bytes += held->graph.arena_bytes();
    while (graphs_.size() > 1 && (static_cast<int64_t>(graphs_.size()) > kMaxGraphs ||
                                  bytes > kMaxGraphArenaBytes)) {
      auto oldest = graphs_.begin();
      for (auto i = graphs_.begin(); i != graphs_.end(); ++i) {
        if (i->second->last_used < oldest->second->last_used) oldest = i;
      }
      bytes -= oldest->second->graph.arena_bytes();
      graphs_.erase(oldest);
    }
  } else {
    TANDEM_RETURN_IF_ERROR(UploadMetadata(seqs, b, &d_tokens, &d_last, &it->second->meta));
  }
  DecodeGraph& g = *it->second;
  g.last_used = ++graph_clock_;
  TANDEM_RETURN_IF_ERROR(g.graph.Launch(ctx_));
  ++graph_stats_.replays;
  // The caller gets logits of its own: the next replay rewrites the graph's.
  TANDEM_ASSIGN_OR_RETURN(*logits,
                          Tensor::Empty(g.logits.shape(), g.logits.dtype(), ctx_.allocator()));
  TANDEM_RETURN_IF_ERROR(CopyTensor(*logits, g.logits, ctx_.stream()));
  return true;
}

void InferModel::DropGraphs() {
  graphs_.clear();
  graph_sightings_.clear();
}

void InferModel::ForgetAdapters() {
  lora_adapters_.clear();
  lora_weights_.clear();
  DropGraphs();
}

void InferModel::set_cuda_graphs(bool on) {
  graphs_on_ = on;
  if (!on) DropGraphs();
}

InferModel::GraphStats InferModel::graph_stats() const {
  GraphStats s = graph_stats_;
  s.kept = static_cast<int64_t>(graphs_.size());
  for (const auto& [key, g] : graphs_) s.arena_bytes += g->graph.arena_bytes();
  return s;
}

StatusOr<Tensor> InferModel::Forward(Tensor& kv_pages, const std::vector<SeqChunk>& seqs,
                                     const std::vector<const AdapterWeights*>& adapters) {
  TANDEM_ASSIGN_OR_RETURN(Tensor logits, ForwardLogits(kv_pages, seqs, adapters));
  TANDEM_ASSIGN_OR_RETURN(Tensor host, CopyToHostBlocking(logits));  // waits for the forward
  upload_pending_ = false;
  if (host.dtype() == DType::kF32) return host;
  return CastCpu(host, DType::kF32);
}

StatusOr<InferModel::SamplerInputs> InferModel::FetchForSampling(
    const Tensor& logits, const std::vector<int64_t>& full_rows, int64_t valid) {
  const int64_t R = logits.dim(0), V = logits.dim(1), K = static_cast<int64_t>(full_rows.size());
  SamplerInputs out;
  out.argmax.resize(R);
  out.rows = Tensor::Cpu({K, V}, DType::kF32);
  if (R == 0) return out;
  TANDEM_ASSIGN_OR_RETURN(Tensor ids, Tensor::Empty({R}, DType::kI32, ctx_.allocator()));
  TANDEM_RETURN_IF_ERROR(ops::ArgmaxRows(ctx_, ids, logits, valid));
  if (!ctx_.is_cuda()) {  // host f32 already: no copies but the chosen rows
    std::copy(ids.data<int32_t>(), ids.data<int32_t>() + R, out.argmax.begin());
    for (int64_t k = 0; k < K; ++k) {
      std::copy(logits.data<float>() + full_rows[k] * V,
                logits.data<float>() + (full_rows[k] + 1) * V, out.rows.data<float>() + k * V);
    }
    return out;
  }
  // One pinned buffer: the ids, then the K rows in the compute dtype; one synchronization.
  const int64_t row_bytes = V * static_cast<int64_t>(DTypeSize(logits.dtype()));
  const int64_t ids_bytes = (R * 4 + 255) / 256 * 256;
  TANDEM_RETURN_IF_ERROR(EnsureHost(&fetch_, ids_bytes + K * row_bytes));
  uint8_t* base = static_cast<uint8_t*>(fetch_.raw_data());
  Tensor host_ids = Tensor::Wrap(base, {R}, DType::kI32, fetch_.device());
  TANDEM_RETURN_IF_ERROR(CopyTensor(host_ids, ids, ctx_.stream()));
  Tensor host_rows = Tensor::Wrap(base + ids_bytes, {K, V}, logits.dtype(), fetch_.device());
  for (int64_t k = 0; k < K; ++k) {
    Tensor dst = host_rows.Slice(0, k, k + 1);
    TANDEM_RETURN_IF_ERROR(
        CopyTensor(dst, logits.Slice(0, full_rows[k], full_rows[k] + 1), ctx_.stream()));
  }
  TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
  upload_pending_ = false;
  std::copy(base, base + R * 4, reinterpret_cast<uint8_t*>(out.argmax.data()));
  if (K > 0) {
    Tensor rows = Tensor::Wrap(base + ids_bytes, {K, V}, logits.dtype(), Device::Cpu());
    TANDEM_ASSIGN_OR_RETURN(out.rows, CastCpu(rows, DType::kF32));
  }
  return out;
}

}  // namespace tandem::serve

// LlamaModel: parameters (layout, init, gradients). Forward and loss: llama_forward.cc;
// backward: llama_backward.cc; safetensors I/O: llama_io.cc.
#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "core/parallel.h"
#include "core/rng.h"
#include "model/internal/layer_stream.h"
#include "model/internal/llama_state.h"
#include "model/rope.h"
#include "ops/ops.h"

namespace tandem::model {

namespace {

// Group starts are padded to this many elements so every fused matrix starts 256-byte aligned
// in f32 (128-byte in bf16), which GEMM libraries like.
constexpr int64_t kAlignElems = 64;

int64_t AlignUp(int64_t n) { return (n + kAlignElems - 1) / kAlignElems * kAlignElems; }

// h[j] = std * the j-th Normal() of Rng(seed, stream) for j < n. Normal() draws two words, so
// element j starts at position 2j: large tensors are split over threads with identical results.
void FillNormal(float* h, int64_t n, uint64_t seed, uint64_t stream, float std) {
  ParallelRanges(n, /*min_per_range=*/int64_t{1} << 18, [&](int64_t begin, int64_t end) {
    Rng rng(seed, stream, 2 * static_cast<uint64_t>(begin));
    for (int64_t j = begin; j < end; ++j) h[j] = std * rng.Normal();
  });
}

}  // namespace

LlamaModel::LlamaModel(ops::Context& ctx, const LlamaConfig& config, const ModelOptions& options)
    : ctx_(ctx),
      config_(config),
      options_(options),
      compute_dtype_(ctx.is_cuda() ? DType::kBF16 : DType::kF32) {}

LlamaModel::~LlamaModel() = default;

StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(ops::Context& ctx,
                                                         const LlamaConfig& config,
                                                         const ModelOptions& options) {
  LlamaConfig c = config;
  if (c.num_key_value_heads == 0) c.num_key_value_heads = c.num_attention_heads;
  TANDEM_RETURN_IF_ERROR(ValidateLlamaConfig(c, "LlamaModel::Create config"));
  if (c.head_dim == 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  if (options.loss_chunk_tokens <= 0) {
    return InvalidArgumentError(StrCat("ModelOptions::loss_chunk_tokens must be positive, found ",
                                       options.loss_chunk_tokens));
  }
  if (options.flat_numel_multiple <= 0) {
    return InvalidArgumentError(StrCat("ModelOptions::flat_numel_multiple must be positive, found ",
                                       options.flat_numel_multiple));
  }
  if (options.stream_reader != nullptr && !options.stream_layers) {
    return InvalidArgumentError(
        "ModelOptions::stream_reader is set but stream_layers is false: the reader only serves "
        "streamed layers");
  }
  std::unique_ptr<LlamaModel> m(new LlamaModel(ctx, c, options));
  TANDEM_RETURN_IF_ERROR(m->CheckParallel());
  TANDEM_RETURN_IF_ERROR(m->AllocateParameters());
  for (Parameter& p : m->params_) p.trainable = options.trainable;
  TANDEM_RETURN_IF_ERROR(m->ZeroGrads());

  const std::vector<float> inv = RopeInvFreq(c);
  Tensor host = Tensor::Cpu({static_cast<int64_t>(inv.size())}, DType::kF32);  // [D/2]
  std::copy(inv.begin(), inv.end(), host.data<float>());
  TANDEM_ASSIGN_OR_RETURN(m->inv_freq_, CopyToDeviceBlocking(host, ctx.allocator()));
  return m;
}

Status LlamaModel::CheckParallel() const {
  const ModelParallel& par = options_.parallel;
  if (par.tp_size < 1 || par.cp_size < 1 || par.tp_rank < 0 || par.tp_rank >= par.tp_size ||
      par.cp_rank < 0 || par.cp_rank >= par.cp_size) {
    return InvalidArgumentError(
        StrCat("ModelOptions::parallel: expected 0 <= rank < size, found tp ", par.tp_rank, "/",
               par.tp_size, ", cp ", par.cp_rank, "/", par.cp_size));
  }
  if ((par.tp_size > 1 || par.cp_size > 1) && par.hooks == nullptr) {
    return InvalidArgumentError("ModelOptions::parallel: tp or cp > 1 needs ParallelHooks");
  }
  const int64_t tp = par.tp_size, Hq = config_.num_attention_heads;
  const int64_t Hkv = config_.num_key_value_heads, F = config_.intermediate_size;
  if (Hq % tp != 0 || F % tp != 0 || (Hkv % tp != 0 && tp % Hkv != 0)) {
    return InvalidArgumentError(
        StrCat("tensor parallelism over ", tp, " ranks needs num_attention_heads (", Hq,
               ") and intermediate_size (", F, ") divisible by tp, and num_key_value_heads (", Hkv,
               ") a multiple or a divisor of tp"));
  }
  return Status::Ok();
}

int64_t LlamaModel::flat_offset(size_t i) const {
  const Group& g = groups_[group_of_[i]];
  for (size_t m = 0; m < g.members.size(); ++m) {
    if (g.members[m] == i) return g.offset + g.row_start[m] * g.cols;
  }
  TANDEM_CHECK_MSG(false, "parameter not in its group");
  return 0;
}

Status LlamaModel::AllocateParameters() {
  const int64_t C = config_.hidden_size, F = config_.intermediate_size;
  const int64_t V = config_.vocab_size, D = config_.head_dim;
  const int64_t Hq = config_.num_attention_heads, Hkv = config_.num_key_value_heads;
  const int64_t tp = options_.parallel.tp_size, r = options_.parallel.tp_rank;
  hq_ = Hq / tp;
  ffn_ = F / tp;
  kv_share_ = Hkv >= tp ? 1 : tp / Hkv;
  hkv_ = Hkv >= tp ? Hkv / tp : 1;
  kv_start_ = Hkv >= tp ? r * hkv_ : r / kv_share_;
  vocab_rows_ = (V + tp - 1) / tp;
  vocab_start_ = r * vocab_rows_;
  int64_t total = 0;
  // A member of a group: HF name, local rows, and how it is sliced from the logical tensor.
  struct Part {
    std::string name;
    int64_t rows;
    int tp_dim;
    int64_t tp_offset;
    Shape logical;
    int copies;
  };
  const int rep = static_cast<int>(tp);  // replicated on every tp rank
  // One group of parameters stacked as rows of a [sum rows, cols] matrix (+ extra zero rows).
  auto add_group = [&](const std::vector<Part>& parts, int64_t cols, bool one_dim,
                       int64_t extra_rows = 0) -> int {
    Group g;
    g.offset = total;
    g.cols = cols;
    g.one_dim = one_dim;
    g.row_start.push_back(0);
    for (const Part& part : parts) {
      Parameter p;
      p.name = part.name;
      p.weight_decay = !one_dim;
      p.tp_dim = tp > 1 ? part.tp_dim : -1;
      p.tp_offset = tp > 1 ? part.tp_offset : 0;
      p.logical_shape = part.logical;
      p.tp_copies = part.copies;
      g.members.push_back(params_.size());
      group_of_.push_back(static_cast<int>(groups_.size()));
      params_.push_back(std::move(p));
      g.rows += part.rows;
      g.row_start.push_back(g.rows);
    }
    g.rows += extra_rows;
    total = AlignUp(total + g.rows * g.cols);
    groups_.push_back(std::move(g));
    return static_cast<int>(groups_.size()) - 1;
  };
  auto first = [&](int group) { return groups_[group].members[0]; };
  const int64_t Vl = vocab_rows_, v0 = vocab_start_;
  // Under tp, one zero row after the embedding rows takes the lookups of other ranks' tokens.
  embed_ = first(
      add_group({{"model.embed_tokens.weight", Vl, 0, v0, {V, C}, 1}}, C, false, tp > 1 ? 1 : 0));
  const int kv_copies = static_cast<int>(kv_share_);
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    const std::string pre = StrCat("model.layers.", l, ".");
    Layer layer;
    layer.qkv_group = add_group(
        {{pre + "self_attn.q_proj.weight", hq_ * D, 0, r * hq_ * D, {Hq * D, C}, 1},
         {pre + "self_attn.k_proj.weight", hkv_ * D, 0, kv_start_ * D, {Hkv * D, C}, kv_copies},
         {pre + "self_attn.v_proj.weight", hkv_ * D, 0, kv_start_ * D, {Hkv * D, C}, kv_copies}},
        C, false);
    layer.q = groups_[layer.qkv_group].members[0];
    layer.k = groups_[layer.qkv_group].members[1];
    layer.v = groups_[layer.qkv_group].members[2];
    layer.o = first(add_group(
        {{pre + "self_attn.o_proj.weight", C, 1, r * hq_ * D, {C, Hq * D}, 1}}, hq_ * D, false));
    layer.gate_up_group = add_group({{pre + "mlp.gate_proj.weight", ffn_, 0, r * ffn_, {F, C}, 1},
                                     {pre + "mlp.up_proj.weight", ffn_, 0, r * ffn_, {F, C}, 1}},
                                    C, false);
    layer.gate = groups_[layer.gate_up_group].members[0];
    layer.up = groups_[layer.gate_up_group].members[1];
    layer.down =
        first(add_group({{pre + "mlp.down_proj.weight", C, 1, r * ffn_, {C, F}, 1}}, ffn_, false));
    layer.attn_norm =
        first(add_group({{pre + "input_layernorm.weight", 1, -1, 0, {C}, rep}}, C, true));
    layer.mlp_norm =
        first(add_group({{pre + "post_attention_layernorm.weight", 1, -1, 0, {C}, rep}}, C, true));
    layers_.push_back(layer);
  }
  final_norm_ = first(add_group({{"model.norm.weight", 1, -1, 0, {C}, rep}}, C, true));
  lm_head_ = config_.tie_word_embeddings
                 ? embed_
                 : first(add_group({{"lm_head.weight", Vl, 0, v0, {V, C}, 1}}, C, false));
  const int64_t mult = options_.flat_numel_multiple;
  total = (total + mult - 1) / mult * mult;

  // Where group g's weights live: the flat buffer, or (stream_layers) the host layer buffer and
  // the device buffer of the other groups.
  std::function<Tensor(const Group&)> home;
  if (options_.stream_layers) {
    TANDEM_ASSIGN_OR_RETURN(home, AllocateStreamedLayers(total));
  } else {
    TANDEM_ASSIGN_OR_RETURN(weights_flat_,
                            Tensor::Empty({total}, compute_dtype_, ctx_.allocator()));
    // Padding and sink rows stay zero (ZeRO all-gathers the whole buffer).
    TANDEM_RETURN_IF_ERROR(ops::Fill(ctx_, weights_flat_, 0.0f));
    home = [this](const Group& g) {
      return weights_flat_.Slice(0, g.offset, g.offset + g.rows * g.cols);
    };
  }
  for (Group& g : groups_) {
    g.weight = home(g).View({g.rows, g.cols});
    for (size_t m = 0; m < g.members.size(); ++m) {
      Parameter& p = params_[g.members[m]];
      const Tensor w = g.weight.Slice(0, g.row_start[m], g.row_start[m + 1]);  // [rows_m, cols]
      p.weight = g.one_dim ? w.View({g.cols}) : w;
      if (compute_dtype_ == DType::kF32) p.master = p.weight;
    }
  }
  return Status::Ok();
}

// [offload] Layers [0, L) are the groups between the embedding's and the final norm's, E
// elements apart; they go to a host buffer, the other groups to `resident_` on the device.
StatusOr<std::function<Tensor(const LlamaModel::Group&)>> LlamaModel::AllocateStreamedLayers(
    int64_t total) {
  const int64_t L = config_.num_hidden_layers;
  layer_begin_ = groups_[layers_[0].qkv_group].offset;
  const int64_t layer_end = groups_[group_of_[final_norm_]].offset;
  layer_elems_ = (layer_end - layer_begin_) / L;
  TANDEM_CHECK(layer_elems_ * L == layer_end - layer_begin_);
  TANDEM_CHECK(L == 1 || groups_[layers_[1].qkv_group].offset == layer_begin_ + layer_elems_);
  Allocator& memory =
      options_.stream_host_allocator != nullptr ? *options_.stream_host_allocator : HostAllocator();
  if (!memory.device().is_cpu()) {
    return InvalidArgumentError(
        StrCat("ModelOptions::stream_host_allocator must give host memory, it gives ",
               memory.device().ToString()));
  }
  TANDEM_ASSIGN_OR_RETURN(Tensor host, Tensor::Empty({L * layer_elems_}, compute_dtype_, memory));
  // First touch on every core; a given allocator places and touches its own pages.
  if (options_.stream_host_allocator == nullptr) {
    char* bytes = static_cast<char*>(host.raw_data());
    ParallelRanges(static_cast<int64_t>(host.num_bytes()), int64_t{1} << 24,
                   [bytes](int64_t begin, int64_t end) {
                     std::memset(bytes + begin, 0, static_cast<size_t>(end - begin));
                   });
  }
  TANDEM_ASSIGN_OR_RETURN(resident_, Tensor::Empty({total - (layer_end - layer_begin_)},
                                                   compute_dtype_, ctx_.allocator()));
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx_, resident_, 0.0f));
  TANDEM_ASSIGN_OR_RETURN(
      stream_, internal::LayerStream::Create(ctx_, host, L, layer_elems_, options_.stream_reader));
  return std::function<Tensor(const Group&)>([this, host, layer_end](const Group& g) {
    const int64_t n = g.rows * g.cols;
    if (g.offset < layer_begin_) return resident_.Slice(0, g.offset, g.offset + n);
    if (g.offset >= layer_end) {
      const int64_t at = g.offset - (layer_end - layer_begin_);
      return resident_.Slice(0, at, at + n);
    }
    return host.Slice(0, g.offset - layer_begin_, g.offset - layer_begin_ + n);
  });
}

int64_t LlamaModel::streamed_bytes() const { return stream_ ? stream_->bytes_copied() : 0; }

StatusOr<LlamaModel::LayerWeights> LlamaModel::WeightsOf(int64_t l, int64_t next) {
  const Layer& layer = layers_[l];
  const int qkv = layer.qkv_group, o = group_of_[layer.o], gate_up = layer.gate_up_group;
  const int down = group_of_[layer.down], n1 = group_of_[layer.attn_norm];
  const int n2 = group_of_[layer.mlp_norm];
  if (!stream_) {
    return LayerWeights{
        params_[layer.attn_norm].weight, groups_[qkv].weight,     groups_[o].weight,
        params_[layer.mlp_norm].weight,  groups_[gate_up].weight, groups_[down].weight};
  }
  TANDEM_ASSIGN_OR_RETURN(const Tensor slot, stream_->Get(l, next));  // [E]
  const int64_t base = layer_begin_ + l * layer_elems_;
  auto view = [&](int g) {
    const Group& gr = groups_[g];
    const int64_t at = gr.offset - base;
    const Tensor t = slot.Slice(0, at, at + gr.rows * gr.cols);
    return gr.one_dim ? t : t.View({gr.rows, gr.cols});
  };
  return LayerWeights{view(n1), view(qkv), view(o), view(n2), view(gate_up), view(down)};
}

Status LlamaModel::EnsureTrainingState(bool relayout_grads) {
  // f32 masters for trainable parameters (CUDA), made from the current compute-dtype weights.
  for (Parameter& p : params_) {
    if (!p.trainable || p.master.defined() || !options_.device_master) continue;
    if (stream_ && p.weight.device().is_cpu() && compute_dtype_ != DType::kF32) {
      return FailedPreconditionError(
          StrCat("parameter '", p.name, "' is trainable and its layer's weights are streamed from ",
                 "host memory (ModelOptions::stream_layers): its optimizer must keep the f32 ",
                 "master off the device (ModelOptions::device_master = false)"));
    }
    TANDEM_ASSIGN_OR_RETURN(p.master,
                            Tensor::Empty(p.weight.shape(), DType::kF32, ctx_.allocator()));
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx_, p.master, p.weight));
  }
  std::vector<bool> want(groups_.size(), false);
  for (size_t g = 0; g < groups_.size(); ++g) {
    for (size_t i : groups_[g].members) want[g] = want[g] || params_[i].trainable;
  }
  if (want == grad_layout_) return Status::Ok();
  if (!relayout_grads) {
    return FailedPreconditionError(
        "Parameter::trainable flags changed since the last ZeroGrads(): call ZeroGrads() before "
        "ForwardBackward() so gradients are laid out for the new set of trainable parameters");
  }
  int64_t total = 0;
  for (size_t g = 0; g < groups_.size(); ++g) {
    if (want[g]) total = AlignUp(total + groups_[g].rows * groups_[g].cols);
  }
  const int64_t mult = options_.flat_numel_multiple;
  total = (total + mult - 1) / mult * mult;
  grads_flat_ = Tensor();
  for (Group& g : groups_) g.grad = Tensor();
  for (Parameter& p : params_) p.grad = Tensor();  // frees the old buffer
  if (total > 0) {
    TANDEM_ASSIGN_OR_RETURN(grads_flat_, Tensor::Empty({total}, DType::kF32, ctx_.allocator()));
    // Once: the padding between and after groups is never written (ZeRO and the reducers read
    // it); the parameters' own ranges are zeroed lazily (ZeroGrads).
    TANDEM_RETURN_IF_ERROR(ops::Fill(ctx_, grads_flat_, 0.0f));
  }
  int64_t offset = 0;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    if (!want[gi]) continue;
    Group& g = groups_[gi];
    g.grad = grads_flat_.Slice(0, offset, offset + g.rows * g.cols).View({g.rows, g.cols});
    for (size_t m = 0; m < g.members.size(); ++m) {
      const Tensor d = g.grad.Slice(0, g.row_start[m], g.row_start[m + 1]);  // [rows_m, cols]
      params_[g.members[m]].grad = g.one_dim ? d.View({g.cols}) : d;
    }
    offset = AlignUp(offset + g.rows * g.cols);
  }
  grad_layout_ = want;
  return Status::Ok();
}

Status LlamaModel::ZeroGrads() {
  TANDEM_RETURN_IF_ERROR(EnsureTrainingState(/*relayout_grads=*/true));
  grad_unwritten_.assign(params_.size(), 0);
  for (size_t i = 0; i < params_.size(); ++i)
    grad_unwritten_[i] = params_[i].grad.defined() ? 1 : 0;
  if (adapter_ != nullptr) TANDEM_RETURN_IF_ERROR(adapter_->ZeroGrads());  // [adapter]
  return Status::Ok();
}

Status LlamaModel::TouchGrad(size_t i) {
  if (i >= grad_unwritten_.size() || !grad_unwritten_[i]) return Status::Ok();
  grad_unwritten_[i] = 0;
  return ops::Fill(ctx_, params_[i].grad, 0.0f);
}

float LlamaModel::TakeGradBeta(size_t i) {
  if (i >= grad_unwritten_.size() || !grad_unwritten_[i]) return 1.0f;
  grad_unwritten_[i] = 0;
  return 0.0f;
}

Status LlamaModel::SetFromHost(size_t param, const Tensor& host_f32) {
  ++weights_generation_;
  Parameter& p = params_[param];
  if (host_masters_ != nullptr) {  // [offload]
    TANDEM_RETURN_IF_ERROR(host_masters_->SetMaster(param, host_f32));
  }
  if (p.master.defined() && compute_dtype_ != DType::kF32) {
    TANDEM_RETURN_IF_ERROR(CopyTensor(p.master, host_f32, ctx_.stream()));
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx_, p.weight, p.master));
  } else if (compute_dtype_ == DType::kF32 || p.weight.device().is_cpu()) {
    // (A streamed layer's weights are host memory: CopyTensor casts host to host.)
    TANDEM_RETURN_IF_ERROR(CopyTensor(p.weight, host_f32, ctx_.stream()));
  } else {
    TANDEM_ASSIGN_OR_RETURN(Tensor h, CastCpu(host_f32, compute_dtype_));
    TANDEM_RETURN_IF_ERROR(CopyTensor(p.weight, h, ctx_.stream()));
    return ctx_.Synchronize();  // `h` dies here
  }
  return ctx_.Synchronize();  // the caller may reuse host_f32
}

StatusOr<Tensor> LlamaModel::ToHostF32(const Tensor& t) const {
  Tensor host = Tensor::Cpu(t.shape(), t.dtype());
  TANDEM_RETURN_IF_ERROR(CopyTensor(host, t, ctx_.stream()));
  TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
  if (host.dtype() == DType::kF32) return host;
  return CastCpu(host, DType::kF32);
}

Status LlamaModel::InitRandom(uint64_t seed, float std) {
  // One host buffer for every parameter (SetFromHost is synchronous): memory is touched once.
  int64_t most = 0;
  for (const Parameter& p : params_) most = std::max(most, ShapeNumel(p.logical_shape));
  Tensor buffer = Tensor::Cpu({most}, DType::kF32);
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter& p = params_[i];
    // The logical tensor, so every tp layout starts from the same weights.
    Tensor host = buffer.Slice(0, 0, ShapeNumel(p.logical_shape)).View(p.logical_shape);
    float* h = host.data<float>();
    if (groups_[group_of_[i]].one_dim) {
      std::fill(h, h + host.numel(), 1.0f);  // RMSNorm weights start at one
    } else {
      FillNormal(h, host.numel(), seed, /*stream=*/i, std);
    }
    TANDEM_RETURN_IF_ERROR(SetFromHost(i, SliceForRank(i, host)));
  }
  return Status::Ok();
}

Tensor LlamaModel::SliceForRank(size_t i, const Tensor& logical) const {
  const Parameter& p = params_[i];
  if (p.tp_dim < 0) return logical;
  Tensor out = Tensor::CpuZeros(p.weight.shape(), DType::kF32);
  const float* src = logical.data<float>();
  float* dst = out.data<float>();
  const int64_t rows = out.dim(0), cols = out.ndim() > 1 ? out.dim(1) : 1;
  const int64_t lrows = logical.dim(0), lcols = logical.ndim() > 1 ? logical.dim(1) : 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t sr = p.tp_dim == 0 ? p.tp_offset + r : r;
    if (sr >= lrows) break;  // vocabulary padding stays zero
    const int64_t c0 = p.tp_dim == 1 ? p.tp_offset : 0;
    std::copy(src + sr * lcols + c0, src + sr * lcols + c0 + cols, dst + r * cols);
  }
  return out;
}

}  // namespace tandem::model

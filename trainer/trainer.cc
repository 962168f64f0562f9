#include "trainer/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "checkpoint/universal_writer.h"
#include "core/logging.h"
#include "core/rng.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/tokenizer.h"
#include "offload/topology.h"
#include "ops/multi_tensor.h"
#include "ops/ops.h"
#include "peft/adapter_io.h"
#include "peft/adapter_set.h"
#include "peft/lora.h"
#include "peft/s2ft.h"
#include "peft/s2ft_io.h"
#include "trainer/data.h"
#include "trainer/internal/layer_file.h"
#include "trainer/internal/offload_step.h"
#include "trainer/internal/parallel_run.h"
#include "trainer/internal/run_dir.h"
#include "trainer/internal/snapshot.h"
#include "trainer/internal/step_profile.h"
#include "trainer/internal/train_state.h"
#include "trainer/metrics.h"
#include "trainer/schedule.h"

namespace tandem::trainer {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

std::string FormatFixed(double x, int digits) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, x);
  return buf;
}

StatusOr<model::LlamaConfig> BuildModelConfig(const ModelSection& m, int64_t tokenizer_vocab) {
  if (m.init == "pretrained") {
    TANDEM_ASSIGN_OR_RETURN(model::LlamaConfig cfg, model::LoadLlamaConfig(m.path + "/config.json"));
    if (tokenizer_vocab > cfg.vocab_size) {
      return InvalidArgumentError(StrCat("the tokenizer has ", tokenizer_vocab, " ids but the model in ", m.path,
                                         " has vocab_size ", cfg.vocab_size, ": they do not belong together"));
    }
    return cfg;
  }
  model::LlamaConfig cfg;
  cfg.vocab_size = m.vocab_size == 0 ? tokenizer_vocab : m.vocab_size;
  if (cfg.vocab_size < tokenizer_vocab) {
    return InvalidArgumentError(StrCat("model.vocab_size = ", m.vocab_size, " is smaller than the tokenizer's ",
                                       tokenizer_vocab, " ids"));
  }
  cfg.hidden_size = m.hidden_size;
  cfg.intermediate_size = m.intermediate_size;
  cfg.num_hidden_layers = m.num_layers;
  cfg.num_attention_heads = m.num_heads;
  cfg.num_key_value_heads = m.num_kv_heads;
  cfg.head_dim = m.head_dim == 0 ? m.hidden_size / m.num_heads : m.head_dim;
  cfg.rope_theta = m.rope_theta;
  cfg.rms_norm_eps = m.rms_norm_eps;
  cfg.tie_word_embeddings = m.tie_word_embeddings;
  cfg.max_position_embeddings = m.max_position_embeddings;
  return cfg;
}

// Adam moments of one trainable parameter.
struct OptimizerSlot {
  Tensor m;  // f32, like master (bf16 with optimizer.precision = "bf16")
  Tensor v;
};

StatusOr<Tensor> Zeros(ops::Context& ctx, const Shape& shape, DType dtype = DType::kF32) {
  TANDEM_ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(shape, dtype, ctx.allocator()));
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, t, 0.0f));
  return t;
}

int64_t CountTargets(const Tensor& targets) {
  int64_t n = 0;
  const int32_t* p = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) n += p[i] != ops::kIgnoreIndex;
  return n;
}

model::Batch ToModelBatch(const TokenBatch& b) {
  model::Batch mb;
  mb.tokens = b.tokens;
  mb.targets = b.targets;
  mb.positions = b.positions;
  mb.segment_ids = b.segment_ids;
  return mb;
}

// Mean loss over `batches` micro-batches of the held-out split, from its beginning.
StatusOr<double> Evaluate(model::LlamaModel& model, DataLoader& loader, int64_t batches) {
  TANDEM_RETURN_IF_ERROR(loader.Seek(DataPosition{}));
  model::LossSum total;
  for (int64_t i = 0; i < batches; ++i) {
    TANDEM_ASSIGN_OR_RETURN(TokenBatch b, loader.Next());
    TANDEM_ASSIGN_OR_RETURN(model::LossSum s, model.Loss(ToModelBatch(b)));
    total.sum += s.sum;
    total.count += s.count;
  }
  return total.count > 0 ? total.sum / static_cast<double>(total.count) : 0.0;
}

// Fraction of the held-out target tokens whose most likely next token (argmax of the logits) is
// the target: for SFT data, how often the model answers exactly, token by token.
StatusOr<double> EvaluateAccuracy(model::LlamaModel& model, DataLoader& loader, int64_t batches) {
  TANDEM_RETURN_IF_ERROR(loader.Seek(DataPosition{}));
  int64_t right = 0, total = 0;
  for (int64_t i = 0; i < batches; ++i) {
    TANDEM_ASSIGN_OR_RETURN(TokenBatch b, loader.Next());
    const model::Batch batch = ToModelBatch(b);
    TANDEM_ASSIGN_OR_RETURN(Tensor logits, model.Logits(batch));  // f32 host [B, T, V]
    const int64_t V = logits.dim(2), n = batch.targets.numel();
    const int32_t* targets = batch.targets.data<int32_t>();
    const float* l = logits.data<float>();
    for (int64_t j = 0; j < n; ++j) {
      if (targets[j] == ops::kIgnoreIndex) continue;
      const float* row = l + j * V;
      ++total;
      right += std::max_element(row, row + V) - row == targets[j];
    }
  }
  return total > 0 ? static_cast<double>(right) / static_cast<double>(total) : 0.0;
}

// A LoRA adapter over the frozen model, attached to it: PEFT's init from the seed, or the weights
// of c.peft.init_adapter.
// [parallel] Under tp each rank holds its slices; dp_rank places its rows for dropout.
StatusOr<std::unique_ptr<peft::AdapterSet>> CreateLoraAdapter(ops::Context& ctx, model::LlamaModel& model,
                                                               const TrainConfig& c, const model::LlamaConfig& mcfg,
                                                               int dp_rank) {
  const model::ModelParallel& mp = model.parallel();
  const peft::LoraParallel lp{mp.tp_rank, mp.tp_size, mp.hooks, dp_rank, mp.cp_rank, mp.cp_size};
  std::unique_ptr<peft::LoraAdapter> adapter;
  if (!c.peft.init_adapter.empty()) {
    TANDEM_ASSIGN_OR_RETURN(adapter, peft::LoadLoraAdapter(ctx, mcfg, c.peft.init_adapter, lp));
  } else {
    peft::LoraConfig lc;
    lc.r = c.peft.r;
    lc.alpha = c.peft.alpha;
    lc.dropout = c.peft.dropout;
    lc.target_modules = c.peft.target_modules;
    lc.use_rslora = c.peft.use_rslora;
    lc.init_seed = DeriveSeed(static_cast<uint64_t>(c.train.seed), 0, "lora-init");
    lc.base_model_name_or_path = c.model.path;
    TANDEM_ASSIGN_OR_RETURN(adapter, peft::LoraAdapter::Create(ctx, mcfg, lc, lp));
  }
  auto set = std::make_unique<peft::AdapterSet>(ctx, mcfg, lp);
  TANDEM_ASSIGN_OR_RETURN(int index, set->Add(std::move(adapter)));
  set->set_default_adapter(index);
  set->set_dropout_seed(DeriveSeed(static_cast<uint64_t>(c.train.seed), 0, "lora-dropout"));
  // The weight gradients beside the base model's backward (a side stream): every layer's inputs
  // stay alive until the backward ends unless blocks are recomputed.
  set->set_overlap_weight_grads(!c.model.recompute && c.model.offload == "none");
  set->set_wide_path(c.peft.lora_wide);
  model.SetAdapter(set.get());
  return set;
}

// [s2ft] An S²FT adapter (peft/s2ft.h) attached to the frozen model, whose weights it permutes: a
// fresh selection from the [peft] keys, or the adapter in c.peft.init_adapter.
StatusOr<std::unique_ptr<peft::S2ftAdapter>> CreateS2ftAdapter(ops::Context& ctx, model::LlamaModel& model,
                                                               const TrainConfig& c) {
  std::unique_ptr<peft::S2ftAdapter> adapter;
  if (!c.peft.init_adapter.empty()) {
    TANDEM_ASSIGN_OR_RETURN(adapter, peft::LoadS2ftAdapter(ctx, model.config(), c.peft.init_adapter));
    TANDEM_RETURN_IF_ERROR(peft::PermuteS2ftBase(ctx, model, adapter->selection()));
  } else {
    peft::S2ftConfig sc;
    sc.heads_fraction = c.peft.s2ft_heads_fraction;
    sc.ffn_fraction = c.peft.s2ft_ffn_fraction;
    sc.budget = c.peft.s2ft_budget;
    sc.selection = c.peft.s2ft_selection;
    sc.coupled = c.peft.s2ft_coupled;
    sc.seed = c.peft.s2ft_seed >= 0 ? static_cast<uint64_t>(c.peft.s2ft_seed)
                                     : DeriveSeed(static_cast<uint64_t>(c.train.seed), 0, "s2ft-select");
    sc.base_model_name_or_path = c.model.path;
    TANDEM_ASSIGN_OR_RETURN(adapter, peft::PrepareS2ft(ctx, model, sc));
  }
  model.SetAdapter(adapter.get());
  return adapter;
}

double MemoryGiB(ops::Context& ctx) {
  if (ctx.is_cuda()) return static_cast<double>(ctx.allocator().stats().peak_bytes_in_use) / (1ull << 30);
  return static_cast<double>(internal::PeakResidentBytes()) / (1ull << 30);
}

// [offload] The index of layer 0's first weight (the start of the streamed layers' buffer).
size_t FirstLayerParam(model::LlamaModel& m) {
  const std::vector<model::Parameter>& params = m.parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].name == "model.layers.0.self_attn.q_proj.weight") return i;
  }
  TANDEM_CHECK_MSG(false, "the model has no model.layers.0.self_attn.q_proj.weight");
  return 0;
}

// Everything one run holds. Members are destroyed in reverse order, so the context (whose
// allocator owns every tensor's bytes) goes last.
struct Session {
  std::unique_ptr<ops::Context> ctx;
  Device device;
  std::unique_ptr<model::Tokenizer> tokenizer;
  model::LlamaConfig mcfg;
  bool lora = false;
  // [offload] model.offload = host: the streamed layers' host memory, placed by the tier policy
  // (outlives the model).
  std::unique_ptr<offload::PlacedHostAllocator> layer_memory;
  // [offload] model.offload = nvme: the layer file, mapped and read with O_DIRECT (outlives the
  // model).
  std::unique_ptr<internal::LayerFile> layer_file;
  std::unique_ptr<model::LlamaModel> model;
  // [offload] optimizer.offload = host/nvme: the masters and moments (the model's HostMasters).
  std::unique_ptr<internal::OffloadedAdamW> offload;
  std::unique_ptr<peft::AdapterSet> adapters;
  std::unique_ptr<peft::S2ftAdapter> s2ft;  // [s2ft] peft.method = "s2ft"
  std::unique_ptr<DataLoader> train_loader;
  std::unique_ptr<DataLoader> val_loader;
  std::vector<model::Parameter> params;  // what the optimizer updates
  std::vector<OptimizerSlot> slots;      // one per params entry
  // [optimizer] optimizer.precision = "bf16": bf16 moments, no f32 masters on a device, and the
  // seed of the updates' rounding noise.
  bool bf16_state = false;
  uint64_t rounding_seed = 0;
  Tensor norm_acc;                       // f32 [1] on the device
  int64_t trainable = 0;
  // [parallel] under mpirun with more than one rank (destroyed late: the model refers to it).
  std::unique_ptr<internal::ParallelRun> par;
  // [universal] this rank's optimizer state and what of it it saves; the background writer and
  // its communicator (destroyed first: the writer's thread uses both).
  std::vector<internal::StatePiece> pieces;
  internal::StateOwner owner;
  std::unique_ptr<collectives::Communicator> ckpt_group;
  std::unique_ptr<checkpoint::CheckpointWriter> ckpt_writer;
  // [snapshot] in-memory snapshots in the node's agent (destroyed first: drains its commit).
  std::unique_ptr<internal::Snapshotter> snap;
};

// The tokenizer; the data prepared on first use when data.dir has no manifest.
Status OpenTokenizerAndData(const TrainConfig& c, Session& s) {
  if (c.data.tokenizer == "byte") {
    s.tokenizer = model::MakeByteTokenizer();
  } else {
    TANDEM_ASSIGN_OR_RETURN(s.tokenizer, model::LoadTokenizer(c.data.tokenizer));
  }
  if (fs::exists(fs::path(c.data.dir) / "manifest.json")) return Status::Ok();
  if (c.data.inputs.empty()) {
    return NotFoundError(StrCat("data.dir '", c.data.dir, "' has no manifest.json and data.inputs is empty: run ",
                                "`tandem data prepare` or list raw inputs in data.inputs"));
  }
  PrepareOptions prep;
  prep.inputs = c.data.inputs;
  prep.format = c.data.format;
  prep.out_dir = c.data.dir;
  prep.val_fraction = c.data.val_fraction;
  prep.seed = static_cast<uint64_t>(c.train.seed);
  TANDEM_LOG(INFO, "data") << "preparing " << c.data.inputs.size() << " input(s) into " << c.data.dir;
  return PrepareData(prep, *s.tokenizer).status();
}

// The model (frozen when an adapter is trained), its weights, and the adapter.
Status OpenModel(const TrainConfig& c, Session& s) {
  TANDEM_ASSIGN_OR_RETURN(s.mcfg, BuildModelConfig(c.model, s.tokenizer->vocab_size()));
  s.lora = c.peft.method == "lora";
  ops::SetAttentionKernel(c.model.attention_kernel == "mma_sync" ? ops::AttentionKernel::kMmaSync
                          : c.model.attention_kernel == "wgmma_split_dq"
                              ? ops::AttentionKernel::kWgmmaSplitDq
                              : ops::AttentionKernel::kAuto);
  model::ModelOptions mopt;
  mopt.recompute = c.model.recompute;
  mopt.trainable = !s.lora && c.peft.method != "s2ft";
  const bool offload = c.optimizer.offload != "none";
  // [offload] the f32 masters live in the offloaded optimizer; [bf16 state] there are none
  mopt.device_master = !offload && c.optimizer.precision == "f32";
  mopt.stream_layers = c.model.offload != "none";  // [offload] layer weights off the device
  if (c.model.offload == "nvme") {                 // a file, mapped; layers read with O_DIRECT
    s.layer_file = std::make_unique<internal::LayerFile>(c.model.nvme_path);
    mopt.stream_host_allocator = &s.layer_file->memory();
    mopt.stream_reader = s.layer_file.get();
  } else if (mopt.stream_layers) {  // bf16 weights: local DRAM, or CXL nodes interleaved
    const offload::Placement where = offload::PlaceOnThisMachine(offload::StateKind::kWeightsBf16);
    TANDEM_LOG(INFO, "train") << "streamed layer weights in host memory: " << where.reason;
    s.layer_memory = std::make_unique<offload::PlacedHostAllocator>(where);
    mopt.stream_host_allocator = s.layer_memory.get();
  }
  if (s.par) {  // [parallel]
    mopt.parallel = s.par->model_parallel();
    mopt.flat_numel_multiple = s.par->shape.dp * s.par->shape.cp;
  }
  TANDEM_ASSIGN_OR_RETURN(s.model, model::LlamaModel::Create(*s.ctx, s.mcfg, mopt));
  if (s.layer_file) {
    TANDEM_RETURN_IF_ERROR(
        s.layer_file->Open(s.model->parameters()[FirstLayerParam(*s.model)].weight.raw_data()));
    TANDEM_LOG(INFO, "train") << "model.offload = nvme: the weights of " << s.mcfg.num_hidden_layers
                              << " layers live in " << s.layer_file->path()
                              << (s.layer_file->direct_io() ? " (read with O_DIRECT)"
                                                            : " (buffered: no O_DIRECT here)")
                              << "; two are on the device at a time";
  } else if (mopt.stream_layers) {
    TANDEM_LOG(INFO, "train") << "model.offload = host: the weights of " << s.mcfg.num_hidden_layers
                              << " layers live in host memory; two are on the device at a time";
  }
  if (offload) {  // [offload] one rank, full fine-tuning (trainer/config.cc checks the config)
    if (s.par || !mopt.trainable) {
      return UnimplementedError(StrCat("optimizer.offload = \"", c.optimizer.offload,
                                       "\" runs on one rank with peft.method = \"none\" for now"));
    }
    TANDEM_ASSIGN_OR_RETURN(s.offload, internal::OffloadedAdamW::Create(*s.ctx, s.model->parameters(), c.optimizer));
    s.model->SetHostMasters(s.offload.get());  // the initial weights below land in it
    // [offload] The last backward names each parameter whose gradient is final (see TrainStep).
    s.model->SetGradReadyCallback(
        [o = s.offload.get()](const std::vector<size_t>& ready) { return o->GradientsFinal(ready); });
    s.model->SetWeightsNeededCallback(  // [delayed] weight uploads overlap the next forward
        [o = s.offload.get()](const std::vector<size_t>& params) {
          return o->WeightsNeeded(params);
        });
    s.offload->LogMode(c.train.grad_clip == 0);
  }
  if (c.model.init == "pretrained") {
    TANDEM_RETURN_IF_ERROR(s.model->LoadSafetensors(c.model.path));
  } else {
    TANDEM_RETURN_IF_ERROR(s.model->InitRandom(DeriveSeed(static_cast<uint64_t>(c.train.seed), 0, "model-init"),
                                               static_cast<float>(c.model.init_std)));
  }
  if (s.lora) {
    TANDEM_ASSIGN_OR_RETURN(s.adapters,
                            CreateLoraAdapter(*s.ctx, *s.model, c, s.mcfg, s.par ? s.par->groups.coords.dp : 0));
  }
  if (c.peft.method == "s2ft") {
    TANDEM_ASSIGN_OR_RETURN(s.s2ft, CreateS2ftAdapter(*s.ctx, *s.model, c));
  }
  return Status::Ok();
}

// Loaders: the training order derives from the seed; evaluation reads the held-out split in order.
Status OpenLoaders(const TrainConfig& c, Session& s) {
  LoaderOptions lo;
  lo.batch_size = c.train.micro_batch_size;
  lo.seq_len = c.data.seq_len;
  lo.seed = DeriveSeed(static_cast<uint64_t>(c.train.seed), 0, "data-order");
  lo.packing = c.data.packing;
  // [parallel] each dp rank reads its rows of the global batch; tp and cp ranks share them.
  const int data_rank = s.par ? s.par->groups.coords.dp : 0;
  const int data_world = s.par ? s.par->shape.dp : 1;
  TANDEM_ASSIGN_OR_RETURN(s.train_loader, DataLoader::Open(c.data.dir, "train", lo, data_rank, data_world));
  TANDEM_RETURN_IF_ERROR(CheckVocab(*s.train_loader, s.mcfg.vocab_size));
  if (c.train.eval_batches == 0) return Status::Ok();
  LoaderOptions vo = lo;
  vo.shuffle = false;
  auto opened = DataLoader::Open(c.data.dir, "val", vo, data_rank, data_world);
  if (opened.ok()) {
    s.val_loader = std::move(opened).value();
  } else {
    TANDEM_LOG(WARNING, "train") << "no evaluation: " << opened.status().message();
  }
  return Status::Ok();
}

// Adam moments for every trainable parameter (the adapter's, when one is trained).
Status InitOptimizer(const TrainConfig& c, Session& s) {
  s.bf16_state = c.optimizer.precision == "bf16";
  s.rounding_seed = DeriveSeed(static_cast<uint64_t>(c.train.seed), 0, "adamw-rounding");
  const DType moments = s.bf16_state ? DType::kBF16 : DType::kF32;
  s.params = s.lora ? s.adapters->parameters() : s.s2ft ? s.s2ft->parameters() : s.model->parameters();
  s.slots.resize(s.params.size());
  for (size_t i = 0; i < s.params.size(); ++i) {
    if (!s.params[i].trainable) continue;
    if (s.offload) {  // [offload] the moments live in the offloaded optimizer
      s.trainable += s.params[i].weight.numel();
      continue;
    }
    const Tensor& state = internal::StateTensor(s.params[i]);
    TANDEM_ASSIGN_OR_RETURN(s.slots[i].m, Zeros(*s.ctx, state.shape(), moments));
    TANDEM_ASSIGN_OR_RETURN(s.slots[i].v, Zeros(*s.ctx, state.shape(), moments));
    s.trainable += state.numel();
  }
  TANDEM_ASSIGN_OR_RETURN(s.norm_acc, Tensor::Empty({1}, DType::kF32, s.ctx->allocator()));
  return Status::Ok();
}

struct Update {
  model::LossSum loss;
  int64_t tokens = 0;
  double grad_norm = 0;
  double lr = 0;
};

// [offload] The AdamW parameters of update `step` before clipping (grad_scale 1); weight decay is
// off for norms inside the optimizer (Parameter::weight_decay).
ops::AdamWParams OffloadAdamWParams(const TrainSection& t, const ScheduleOptions& sched, int64_t step) {
  ops::AdamWParams ap;
  ap.lr = static_cast<float>(LearningRate(sched, step));
  ap.beta1 = static_cast<float>(t.beta1);
  ap.beta2 = static_cast<float>(t.beta2);
  ap.eps = static_cast<float>(t.eps);
  ap.weight_decay = static_cast<float>(t.weight_decay);
  ap.step = step;
  ap.grad_scale = 1.0f;
  return ap;
}

// [optimizer] The on-device AdamW of one update over every trainable tensor, in a few launches
// (ops/multi_tensor.h): f32 masters and moments, or with optimizer.precision = "bf16" the weights
// and bf16 moments in place, rounded with noise keyed by (seed, step, tensor).
Status AdamWUpdate(const TrainSection& t, int64_t step, double lr, double clip, Session& s) {
  ops::AdamWParams ap;
  ap.lr = static_cast<float>(lr);
  ap.beta1 = static_cast<float>(t.beta1);
  ap.beta2 = static_cast<float>(t.beta2);
  ap.eps = static_cast<float>(t.eps);
  ap.step = step;
  ap.grad_scale = static_cast<float>(clip);
  if (s.bf16_state) {
    std::vector<ops::AdamWBf16Tensors> entries;
    for (size_t i = 0; i < s.params.size(); ++i) {
      model::Parameter& p = s.params[i];
      if (!p.trainable) continue;
      entries.push_back({&internal::StateTensor(p), &s.slots[i].m, &s.slots[i].v, &p.grad,
                         p.weight_decay ? static_cast<float>(t.weight_decay) : 0.0f,
                         ops::AdamWNoiseKey(s.rounding_seed, step, i)});
    }
    return ops::AdamWBf16Multi(*s.ctx, entries, ap);
  }
  std::vector<Tensor> weights(s.params.size());
  std::vector<ops::AdamWTensors> entries;
  for (size_t i = 0; i < s.params.size(); ++i) {
    model::Parameter& p = s.params[i];
    if (!p.trainable) continue;
    if (p.weight.storage() != p.master.storage()) weights[i] = p.weight;
    entries.push_back({&p.master, &s.slots[i].m, &s.slots[i].v, &weights[i], &p.grad,
                       p.weight_decay ? static_cast<float>(t.weight_decay) : 0.0f});
  }
  return ops::AdamWMulti(*s.ctx, entries, ap);
}

// One optimizer update: grad_accum micro-batches (the loss is the mean over all their target
// tokens), the global gradient norm, clipping, AdamW.
StatusOr<Update> TrainStep(const TrainSection& t, const ScheduleOptions& sched, int64_t step, Session& s) {
  std::vector<TokenBatch> micro;
  int64_t targets = 0;
  Update u;
  for (int64_t a = 0; a < t.grad_accum; ++a) {
    TANDEM_ASSIGN_OR_RETURN(TokenBatch b, s.train_loader->Next());
    targets += CountTargets(b.targets);
    u.tokens += b.tokens.numel();
    micro.push_back(std::move(b));
  }
  TANDEM_RETURN_IF_ERROR(s.model->ZeroGrads());
  const float grad_scale = targets > 0 ? 1.0f / static_cast<float>(targets) : 0.0f;
  // [offload] Before the last backward: without clipping the update overlaps it (the AdamW
  // parameters are known now); with clipping only the gradient copies start early.
  ops::AdamWParams offload_ap;
  if (s.offload) {
    offload_ap = OffloadAdamWParams(t, sched, step);
    s.offload->StartStep(step);  // [delayed] whether this update waits for the next step
  }
  for (const TokenBatch& b : micro) {
    if (s.offload && &b == &micro.back()) {
      TANDEM_RETURN_IF_ERROR(s.offload->BeginLastBackward(s.params, t.grad_clip == 0 ? &offload_ap : nullptr));
    }
    TANDEM_ASSIGN_OR_RETURN(model::LossSum l, s.model->ForwardBackward(ToModelBatch(b), grad_scale));
    u.loss.sum += l.sum;
    u.loss.count += l.count;
  }
  TANDEM_RETURN_IF_ERROR(ops::Fill(*s.ctx, s.norm_acc, 0.0f));
  std::vector<Tensor> grads;  // one multi-tensor launch, the bits of per-tensor SumSquares
  for (const model::Parameter& p : s.params) {
    if (p.trainable) grads.push_back(p.grad);
  }
  TANDEM_RETURN_IF_ERROR(ops::SumSquaresMulti(*s.ctx, s.norm_acc, grads));
  TANDEM_ASSIGN_OR_RETURN(Tensor norm_host, CopyToHostBlocking(s.norm_acc));
  u.grad_norm = std::sqrt(static_cast<double>(norm_host.data<float>()[0]));
  if (!std::isfinite(u.grad_norm)) {
    return InternalError(StrCat("step ", step, ": the gradient norm is ", u.grad_norm, " (loss ",
                                u.loss.sum / std::max<int64_t>(1, u.loss.count), "); stopping"));
  }
  const double clip = (t.grad_clip > 0 && u.grad_norm > t.grad_clip) ? t.grad_clip / (u.grad_norm + 1e-6) : 1.0;
  u.lr = LearningRate(sched, step);
  if (s.snap) TANDEM_RETURN_IF_ERROR(s.snap->Fence());  // the previous snapshot's copy is done
  if (s.offload) {  // [offload] updated on CPU threads; the weights come back to the device
    offload_ap.grad_scale = static_cast<float>(clip);  // 1 without clipping, as BeginLastBackward's
    TANDEM_RETURN_IF_ERROR(s.offload->Update(s.params, offload_ap));
  }
  if (!s.offload) TANDEM_RETURN_IF_ERROR(AdamWUpdate(t, step, u.lr, clip, s));
  TANDEM_RETURN_IF_ERROR(s.ctx->Synchronize());
  return u;
}

// [parallel] The mesh, and the device of this rank (cuda:<local rank> on a GPU job).
Status OpenParallel(const TrainConfig& c, const TrainEnv& env, Session& s) {
  if (c.peft.method == "s2ft" || (c.peft.method == "lora" && c.parallel.zero == 1)) {
    return UnimplementedError(StrCat("peft.method = ", c.peft.method, " under mpirun with ", env.world->size(),
                                     " ranks is not supported", c.peft.method == "lora" ? " with parallel.zero = 1" : "",
                                     ": LoRA trains on dp x cp x tp meshes without ZeRO; S2FT on one rank"));
  }
  if (c.optimizer.precision != "f32") {  // (the config refuses explicit meshes; dp = 0 fills the world)
    return UnimplementedError(StrCat("optimizer.precision = \"", c.optimizer.precision, "\" runs on one rank for now; ",
                                     "this run has ", env.world->size(), " ranks (use \"f32\" on a mesh)"));
  }
  if (s.device.is_cuda()) s.device = Device::Cuda(env.local_rank);
  TANDEM_ASSIGN_OR_RETURN(s.ctx, ops::Context::ForDevice(s.device));
  TANDEM_ASSIGN_OR_RETURN(s.par, internal::OpenParallelRun(c.parallel, *env.world, *s.ctx, env.local_rank));
  if (s.par->writer()) {
    TANDEM_LOG(INFO, "train") << "mesh " << s.par->shape.ToString() << " over " << env.world->size() << " ranks";
  }
  return Status::Ok();
}

// [parallel] Rank 0 prepares the data (when needed) while the others wait; then all read it.
Status OpenTokenizerAndDataParallel(const TrainConfig& c, Session& s) {
  if (s.par->writer()) TANDEM_RETURN_IF_ERROR(OpenTokenizerAndData(c, s));
  TANDEM_RETURN_IF_ERROR(s.par->world->Barrier());
  if (!s.par->writer()) TANDEM_RETURN_IF_ERROR(OpenTokenizerAndData(c, s));
  return Status::Ok();
}

// [parallel] Gradient reduction, global norm and AdamW over the mesh (parallel/optimizer.h).
Status InitParallelOptimizer(const TrainConfig& c, Session& s) {
  parallel::ParallelOptimizerOptions o;
  o.beta1 = static_cast<float>(c.train.beta1);
  o.beta2 = static_cast<float>(c.train.beta2);
  o.eps = static_cast<float>(c.train.eps);
  o.weight_decay = static_cast<float>(c.train.weight_decay);
  o.zero = c.parallel.zero == 1;
  o.bucket_bytes = static_cast<int64_t>(c.parallel.bucket_mb * (1 << 20));
  if (s.lora) {  // the adapter's parameters, reduced after backward
    s.params = s.adapters->parameters();
    TANDEM_ASSIGN_OR_RETURN(s.par->optimizer,
                            parallel::ParallelOptimizer::Create(*s.ctx, *s.model, s.par->groups, o, &s.params));
    for (const model::Parameter& p : s.params) s.trainable += p.trainable ? ShapeNumel(p.logical_shape) : 0;
    return Status::Ok();
  }
  TANDEM_ASSIGN_OR_RETURN(s.par->optimizer, parallel::ParallelOptimizer::Create(*s.ctx, *s.model, s.par->groups, o));
  for (const model::Parameter& p : s.model->parameters()) {  // logical (unsliced) sizes
    int64_t n = 1;
    for (int64_t d : p.logical_shape) n *= d;
    s.trainable += p.trainable ? n : 0;
  }
  return Status::Ok();
}

// [parallel] Every rank takes rank 0's decision (wall clocks and signal arrival differ).
StatusOr<int32_t> AgreeOnRank0(Session& s, int32_t mine) {
  if (!s.par) return mine;
  Tensor flag = Tensor::Cpu({1}, DType::kI32);
  flag.data<int32_t>()[0] = mine;
  TANDEM_RETURN_IF_ERROR(s.par->world->Broadcast(flag, 0));
  return flag.data<int32_t>()[0];
}

// [universal] The parameters the optimizer updates (the model's, or the adapter's).
std::vector<model::Parameter>& TrainedParams(Session& s) {
  return s.par && !s.lora ? s.model->parameters() : s.params;
}

std::string UniversalDir(const TrainConfig& c) { return c.train.out_dir + "/checkpoints/universal"; }

// [universal] This rank's optimizer state, which part of it this rank saves, and the writer.
Status OpenUniversal(const TrainConfig& c, Session& s) {
  std::vector<model::Parameter>& params = TrainedParams(s);
  if (s.par) {
    for (const parallel::ParallelOptimizer::StateView& v : s.par->optimizer->StateViews()) {
      s.pieces.push_back({&params[v.param], v.begin, v.end, v.master, v.exp_avg, v.exp_avg_sq});
    }
    s.owner.sharded = s.par->optimizer->sharded();
    s.owner.first_replica = s.par->groups.coords.dp == 0 && s.par->groups.coords.cp == 0;
    s.owner.tp_rank = s.par->groups.coords.tp;
  } else if (!s.offload) {  // [offload] the pieces come from the optimizer at each save
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].trainable) continue;
      const int64_t n = internal::StateTensor(params[i]).numel();
      s.pieces.push_back({&params[i], 0, n, internal::StateTensor(params[i]).View({n}),
                          s.slots[i].m.View({n}), s.slots[i].v.View({n})});
    }
  }
  s.owner.adapter = s.lora ? "default" : s.s2ft ? "s2ft" : "";
  if (!c.train.universal_checkpoints) return Status::Ok();
  collectives::Communicator* group = nullptr;
  if (s.par) {  // the writer's thread needs a communicator of its own
    TANDEM_ASSIGN_OR_RETURN(s.ckpt_group, s.par->world->Split(0, s.par->world->rank(), "ckpt"));
    group = s.ckpt_group.get();
  }
  checkpoint::SaveOptions options;
  options.keep_last = static_cast<int>(c.train.keep_checkpoints);
  s.ckpt_writer = std::make_unique<checkpoint::CheckpointWriter>(UniversalDir(c), group, options);
  return Status::Ok();
}

checkpoint::UniversalMeta UniversalMetaOf(const TrainConfig& c, Session& s, int64_t step) {
  checkpoint::UniversalMeta meta;
  meta.step = step;
  meta.config_toml = TrainConfigToToml(c);
  meta.model_config_json = model::LlamaConfigToJson(s.mcfg);
  if (s.par) {
    meta.dp = s.par->shape.dp;
    meta.cp = s.par->shape.cp;
    meta.tp = s.par->shape.tp;
  }
  meta.data_position_json = DataPositionToJson(s.train_loader->position());
  nlohmann::json rng = {{"seed", c.train.seed}};
  if (s.adapters) rng["lora_batch_counter"] = s.adapters->batch_counter();
  meta.rng_state_json = rng.dump();
  if (s.lora) meta.adapter_configs["default"] = peft::LoraConfigToJson(s.adapters->adapter(0).config());
  return meta;
}

// [universal] Waits for the previous save (its error surfaces here), copies this rank's state to
// host memory (the trainer's stall) and hands it to the background writer.
Status SaveUniversalState(const TrainConfig& c, Session& s, int64_t step) {
  const auto start = Clock::now();
  TANDEM_RETURN_IF_ERROR(s.ckpt_writer->Wait());  // the previous save, whose buffers are reused
  const auto copy_start = Clock::now();
  std::vector<internal::StatePiece> offloaded;  // [offload] the optimizer's state now
  if (s.offload) {
    TANDEM_ASSIGN_OR_RETURN(offloaded, s.offload->StatePieces(TrainedParams(s)));
  }
  TANDEM_ASSIGN_OR_RETURN(std::vector<checkpoint::TensorShard> copies,
                          s.ckpt_writer->CopyToHost(internal::OwnedShards(s.offload ? offloaded : s.pieces,
                                                                          s.owner, step)));
  const double wait_s = Seconds(start, copy_start), copy_s = Seconds(copy_start, Clock::now());
  TANDEM_RETURN_IF_ERROR(s.ckpt_writer->Submit(UniversalMetaOf(c, s, step), std::move(copies)));
  if (!s.par || s.par->writer()) {
    TANDEM_LOG(INFO, "ckpt") << "step " << step << ": state copied to host in " << copy_s << " s (after "
                             << wait_s << " s waiting for the previous save); saving to " << UniversalDir(c)
                             << " in the background";
  }
  return Status::Ok();
}

// [universal, snapshot] Where the data and the RNG streams continue, from the JSON a universal
// checkpoint or a snapshot saved (UniversalMetaOf); `where` names the source in errors.
Status RestoreStreams(const TrainConfig& c, Session& s, const std::string& data_position_json,
                      const std::string& rng_json, const std::string& where) {
  TANDEM_ASSIGN_OR_RETURN(DataPosition position, DataPositionFromJson(data_position_json));
  TANDEM_RETURN_IF_ERROR(s.train_loader->Seek(position));
  const nlohmann::json rng = nlohmann::json::parse(rng_json, nullptr, false);
  if (rng.is_discarded() || !rng.is_object()) {
    return DataLossError(StrCat(where, ": the RNG state is not a JSON object: ", rng_json));
  }
  if (rng.value("seed", c.train.seed) != c.train.seed && (!s.par || s.par->writer())) {
    TANDEM_LOG(WARNING, "train") << where << " was written with train.seed = " << rng.value("seed", int64_t{0})
                                 << ", this run has " << c.train.seed << ": the data order differs";
  }
  if (s.adapters && rng.contains("lora_batch_counter")) {
    s.adapters->set_batch_counter(rng["lora_batch_counter"].get<uint64_t>());
  }
  return Status::Ok();
}

// [universal] Loads the checkpoint at `path` into this rank's state; returns its step.
StatusOr<int64_t> ResumeFrom(const TrainConfig& c, Session& s, const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(checkpoint::UniversalReader reader, checkpoint::UniversalReader::Open(path));
  const checkpoint::UniversalMeta& meta = reader.meta();
  TANDEM_RETURN_IF_ERROR(s.offload ? s.offload->Restore(reader, TrainedParams(s))  // [offload]
                                   : internal::RestoreState(*s.ctx, reader, TrainedParams(s), s.pieces, s.owner.adapter));
  if (s.par) TANDEM_RETURN_IF_ERROR(s.par->optimizer->ReloadMasters());
  TANDEM_RETURN_IF_ERROR(RestoreStreams(c, s, meta.data_position_json, meta.rng_state_json, path));
  if (!s.par || s.par->writer()) {
    TANDEM_LOG(INFO, "train") << "resumed from " << path << " at step " << meta.step << " (saved under dp "
                              << meta.dp << " x cp " << meta.cp << " x tp " << meta.tp << ")";
  }
  return meta.step;
}

// [snapshot] Connects this rank to its node's agent; it snapshots only unique bytes (see
// trainer/internal/snapshot.h).
Status OpenSnapshots(const TrainConfig& c, Session& s) {
  if (c.snapshot.agent_socket.empty()) return Status::Ok();
  std::vector<internal::StatePiece> mine;
  if (s.owner.sharded || s.owner.first_replica) mine = s.pieces;
  const int rank = s.par ? s.par->world->rank() : 0, size = s.par ? s.par->world->size() : 1;
  TANDEM_ASSIGN_OR_RETURN(s.snap, internal::Snapshotter::Open(c.snapshot, s.par ? s.par->world : nullptr, rank,
                                                              size, std::move(mine), *s.ctx));
  if (!s.par || s.par->writer()) {
    TANDEM_LOG(INFO, "snapshot") << "every " << c.snapshot.interval << " update(s) into the agent at "
                                 << s.snap->socket();
  }
  return Status::Ok();
}

std::string SnapshotMetaJson(const TrainConfig& c, Session& s) {
  const checkpoint::UniversalMeta m = UniversalMetaOf(c, s, 0);
  return nlohmann::json{{"data_position", m.data_position_json}, {"rng", m.rng_state_json}, {"run", c.train.out_dir}}
      .dump();
}

// [snapshot] Every rank restores version `version` from its agent: its own pieces, then (without
// ZeRO) the other replicas take the first replica's state. Returns the step, or 0 when some rank
// could not restore (every rank then says why and falls back together).
StatusOr<int64_t> RestoreFromSnapshot(const TrainConfig& c, Session& s, uint64_t version) {
  StatusOr<std::pair<int64_t, std::string>> got = s.snap->Restore(version);
  if (got.ok()) {  // an agent outlives jobs: a snapshot of another run must not be taken for ours
    const nlohmann::json m = nlohmann::json::parse(got->second, nullptr, false);
    const std::string run = m.is_object() ? m.value("run", std::string()) : std::string();
    if (run != c.train.out_dir) {
      got = FailedPreconditionError(StrCat("snapshot version ", version, " belongs to the run in '", run,
                                           "', not to train.out_dir = '", c.train.out_dir, "'"));
    }
  }
  if (!got.ok()) TANDEM_LOG(WARNING, "snapshot") << "cannot restore: " << got.status().message();
  TANDEM_ASSIGN_OR_RETURN(const bool all_ok, [&]() -> StatusOr<bool> {
    if (!s.par) return got.ok();
    Tensor flag = Tensor::Cpu({1}, DType::kI64);
    flag.data<int64_t>()[0] = got.ok() ? 1 : 0;
    TANDEM_RETURN_IF_ERROR(s.par->world->AllReduce(flag, collectives::ReduceOp::kMin));
    return flag.data<int64_t>()[0] > 0;
  }());
  if (!all_ok) return int64_t{0};
  TANDEM_RETURN_IF_ERROR(s.snap->ApplyRestore());  // only now that every rank has its copy
  if (s.par && !s.owner.sharded && s.par->groups.dp_cp && s.par->groups.dp_cp->size() > 1) {
    for (internal::StatePiece& p : s.pieces) {
      for (Tensor* t : {&p.master, &p.exp_avg, &p.exp_avg_sq}) {
        TANDEM_RETURN_IF_ERROR(s.par->groups.dp_cp->Broadcast(*t, 0));
      }
    }
    TANDEM_RETURN_IF_ERROR(s.par->groups.dp_cp->Synchronize());
  }
  if (s.par && s.owner.sharded) {
    TANDEM_RETURN_IF_ERROR(s.par->optimizer->RestoreFromShards());
  } else {
    for (model::Parameter& p : TrainedParams(s)) {
      if (!p.trainable || !p.master.defined() || p.weight.storage() == p.master.storage()) continue;
      TANDEM_RETURN_IF_ERROR(ops::Cast(*s.ctx, p.weight, p.master));
    }
  }
  TANDEM_RETURN_IF_ERROR(s.ctx->Synchronize());
  const nlohmann::json meta = nlohmann::json::parse(got->second, nullptr, false);
  if (meta.is_discarded() || !meta.contains("data_position") || !meta.contains("rng")) {
    return DataLossError(StrCat("snapshot version ", version, ": the meta is not the trainer's JSON"));
  }
  TANDEM_RETURN_IF_ERROR(RestoreStreams(c, s, meta["data_position"].get<std::string>(), meta["rng"].get<std::string>(),
                                        StrCat("snapshot version ", version)));
  if (!s.par || s.par->writer()) {
    TANDEM_LOG(INFO, "train") << "resumed from the in-memory snapshot of step " << got->first << " ("
                              << s.snap->socket() << ")";
  }
  return got->first;
}

// [universal, snapshot] Where the run starts: the newest of the agents' snapshot (with
// train.resume = "auto") and the universal checkpoint train.resume names; 0 = from scratch.
StatusOr<int64_t> ResumeRun(const TrainConfig& c, Session& s) {
  TANDEM_ASSIGN_OR_RETURN(const std::string path, internal::ResolveResume(c.train.resume, UniversalDir(c)));
  int64_t universal_step = 0;
  if (!path.empty()) {
    TANDEM_ASSIGN_OR_RETURN(checkpoint::UniversalReader reader, checkpoint::UniversalReader::Open(path));
    universal_step = reader.meta().step;
  }
  if (s.snap && c.train.resume == "auto") {
    TANDEM_ASSIGN_OR_RETURN(std::optional<uint64_t> version, s.snap->AgreedLatest());
    if (version && static_cast<int64_t>(*version) > universal_step) {
      TANDEM_ASSIGN_OR_RETURN(const int64_t step, RestoreFromSnapshot(c, s, *version));
      if (step > 0) return step;
    }
    if ((!s.par || s.par->writer()) && !version) {
      TANDEM_LOG(INFO, "train") << "no complete snapshot in the agents"
                                << (path.empty() ? "" : StrCat("; resuming from ", path));
    }
  }
  if (path.empty()) return int64_t{0};
  return ResumeFrom(c, s, path);
}

}  // namespace

StatusOr<TrainResult> RunTraining(const TrainConfig& c, const std::string& command_line) {
  return RunTraining(c, command_line, TrainEnv{});
}

StatusOr<TrainResult> RunTraining(const TrainConfig& c, const std::string& command_line, const TrainEnv& env) {
  const TrainSection& t = c.train;
  ScheduleOptions sched{t.schedule, t.lr, t.min_lr_ratio, t.warmup_steps, t.steps};
  TANDEM_RETURN_IF_ERROR(ValidateSchedule(sched));
  Session s;
  // Where startup time goes (it bounds how fast a relaunched job resumes), logged once.
  std::string startup_phases;
  auto phase_start = Clock::now();
  const auto startup_begin = phase_start;
  auto phase = [&](const char* name) {
    const auto now = Clock::now();
    startup_phases += StrCat(startup_phases.empty() ? "" : ", ", name, " ", FormatFixed(Seconds(phase_start, now), 2), " s");
    phase_start = now;
  };
  TANDEM_ASSIGN_OR_RETURN(s.device, ParseDevice(t.device));
  if (env.world != nullptr && env.world->size() > 1) {
    TANDEM_RETURN_IF_ERROR(OpenParallel(c, env, s));
    phase("mesh");
    TANDEM_RETURN_IF_ERROR(OpenTokenizerAndDataParallel(c, s));
  } else {
    TANDEM_ASSIGN_OR_RETURN(s.ctx, ops::Context::ForDevice(s.device));
    phase("device");
    TANDEM_RETURN_IF_ERROR(OpenTokenizerAndData(c, s));
  }
  phase("data");
  TANDEM_RETURN_IF_ERROR(OpenModel(c, s));
  phase("model");
  TANDEM_RETURN_IF_ERROR(OpenLoaders(c, s));
  TANDEM_RETURN_IF_ERROR(s.par ? InitParallelOptimizer(c, s) : InitOptimizer(c, s));
  TANDEM_RETURN_IF_ERROR(OpenUniversal(c, s));
  phase("optimizer");
  TANDEM_RETURN_IF_ERROR(OpenSnapshots(c, s));
  phase("snapshots");
  TANDEM_ASSIGN_OR_RETURN(const int64_t start_step, ResumeRun(c, s));
  phase("resume");

  const bool writer = !s.par || s.par->writer();  // [parallel] only world rank 0 writes
  if (writer) {
    TANDEM_LOG(INFO, "train") << "startup " << FormatFixed(Seconds(startup_begin, Clock::now()), 2) << " s: "
                              << startup_phases;
  }
  std::optional<internal::RunDir> run;
  std::optional<MetricsWriter> metrics;
  if (writer) {
    TANDEM_ASSIGN_OR_RETURN(run, internal::RunDir::Create(t.out_dir, c, command_line, s.device, s.mcfg));
    if (start_step > 0) TANDEM_RETURN_IF_ERROR(internal::TruncateMetricsAfter(run->path() + "/metrics.jsonl", start_step));
    TANDEM_ASSIGN_OR_RETURN(MetricsWriter opened, MetricsWriter::Open(run->path() + "/metrics.jsonl"));
    metrics.emplace(std::move(opened));
  }
  if (writer) TANDEM_LOG(INFO, "train") << "model: " << s.mcfg.NumParameters() / 1e6 << "M parameters (" << s.trainable / 1e6
                            << "M trainable), " << s.mcfg.num_hidden_layers << " layers, hidden " << s.mcfg.hidden_size
                            << ", vocab " << s.mcfg.vocab_size << " on " << DeviceName(s.device);
  if (writer) TANDEM_LOG(INFO, "train") << "run directory: " << run->path();

  const double flops_per_token = FlopsPerToken(s.mcfg, c.data.seq_len, /*frozen_base=*/s.lora || s.s2ft);
  // [parallel] tokens/s counts the whole job, so the peak is every rank's.
  const double peak = (t.peak_tflops > 0 ? t.peak_tflops * 1e12 : PeakFlopsForDevice(DeviceName(s.device))) *
                      (s.par ? s.par->world->size() : 1);
  if (t.eval_accuracy && s.par) {
    return InvalidArgumentError("train.eval_accuracy is measured in one process only (this job has " +
                                std::to_string(s.par->world->size()) + " ranks)");
  }
  double result_before_accuracy = -1;
  if (t.eval_accuracy && s.val_loader) {
    TANDEM_ASSIGN_OR_RETURN(result_before_accuracy, EvaluateAccuracy(*s.model, *s.val_loader, t.eval_batches));
    if (writer) TANDEM_LOG(INFO, "train") << "before training: held-out token accuracy " << result_before_accuracy;
  }
  const bool tty = isatty(STDERR_FILENO);
  const auto start = Clock::now();
  auto window_start = start;
  int64_t window_tokens = 0;
  TrainResult result;
  result.initial_eval_accuracy = result_before_accuracy;
  result.resumed_from_step = start_step;
  result.steps_done = start_step;
  for (int64_t step = start_step + 1; step <= t.steps; ++step) {
    const auto step_start = Clock::now();
    // [profile] train.profile_step: this update's ops timed by category (step_profile.h).
    TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<ops::Profiler> profile,
                            internal::StartStepProfile(*s.ctx, step, t.profile_step));
    Update u;
    if (s.par) {  // [parallel]
      u.lr = LearningRate(sched, step);
      TANDEM_ASSIGN_OR_RETURN(internal::ParallelUpdate pu,
                              internal::ParallelTrainStep(*s.par, *s.ctx, *s.model, *s.train_loader, t.grad_accum,
                                                          t.grad_clip, static_cast<float>(u.lr), step, [&] {
                                                            return s.snap ? s.snap->Fence() : Status::Ok();
                                                          }));
      u.loss = pu.loss;
      u.tokens = pu.tokens;
      u.grad_norm = pu.grad_norm;
    } else {
      TANDEM_ASSIGN_OR_RETURN(u, TrainStep(t, sched, step, s));
    }
    const auto now = Clock::now();
    if (profile) {
      TANDEM_RETURN_IF_ERROR(
          internal::FinishStepProfile(*profile, *s.ctx, step, u.tokens, writer ? run->path() : ""));
    }
    window_tokens += u.tokens;
    StepMetrics m;
    m.step = step;
    m.total_steps = t.steps;
    m.loss = u.loss.count > 0 ? u.loss.sum / static_cast<double>(u.loss.count) : 0.0;
    m.lr = u.lr;
    m.grad_norm = u.grad_norm;
    m.tokens = u.tokens;
    m.step_s = Seconds(step_start, now);
    m.elapsed_s = Seconds(start, now);
    m.tokens_per_s = window_tokens / std::max(1e-9, Seconds(window_start, now));
    m.mfu = peak > 0 ? m.tokens_per_s * flops_per_token / peak : -1;
    m.mem_gib = MemoryGiB(*s.ctx);
    m.eta_s = m.elapsed_s / static_cast<double>(step - start_step) * static_cast<double>(t.steps - step);
    const bool last = step == t.steps;
    // Stop early (and save) past train.max_minutes (-1) or on SIGTERM/SIGINT (its number).
    const int32_t signaled = env.stop_signal != nullptr ? env.stop_signal->load() : 0;
    TANDEM_ASSIGN_OR_RETURN(const int32_t stop,
                            AgreeOnRank0(s, signaled != 0                                            ? signaled
                                            : t.max_minutes > 0 && m.elapsed_s > t.max_minutes * 60 ? -1
                                                                                                     : 0));
    const bool stopping = stop != 0 && !last;
    if (s.val_loader && ((t.eval_interval > 0 && step % t.eval_interval == 0) || last || stopping)) {
      if (s.offload) TANDEM_RETURN_IF_ERROR(s.offload->Flush());  // [delayed] the newest weights
      TANDEM_ASSIGN_OR_RETURN(double eval, s.par ? internal::ParallelEvaluate(*s.par, *s.ctx, *s.model, *s.val_loader,
                                                                              t.eval_batches)
                                                 : Evaluate(*s.model, *s.val_loader, t.eval_batches));
      m.eval_loss = eval;
      result.final_eval_loss = eval;
      if (t.eval_accuracy && !s.par) {
        TANDEM_ASSIGN_OR_RETURN(m.eval_accuracy, EvaluateAccuracy(*s.model, *s.val_loader, t.eval_batches));
        result.final_eval_accuracy = *m.eval_accuracy;
      }
    }
    if (writer) TANDEM_RETURN_IF_ERROR(metrics->Write(m));
    if (step == start_step + 1) result.first_loss = m.loss;
    result.final_loss = m.loss;
    result.steps_done = step;
    if (writer && (step == 1 || step % t.log_interval == 0 || last || stopping || m.eval_loss)) {
      std::fprintf(stderr, "%s\n", FormatProgressLine(m, tty).c_str());
      window_start = Clock::now();
      window_tokens = 0;
    }
    if ((t.save_interval > 0 && step % t.save_interval == 0) || last || stopping) {
      auto write = [&](const std::string& dir) -> Status {
        if (s.lora) return peft::SaveLoraAdapter(s.adapters->adapter(0), dir, DType::kF32);
        if (s.s2ft) return peft::SaveS2ftAdapter(*s.s2ft, dir, DType::kF32);
        return s.model->SaveSafetensors(dir, DType::kF32);
      };
      if (s.par) TANDEM_RETURN_IF_ERROR(s.par->optimizer->SyncMasters());  // [parallel] ZeRO shards
      if (writer) {
        TANDEM_ASSIGN_OR_RETURN(result.last_checkpoint, run->SaveCheckpoint(write, step, *s.tokenizer, c.data.tokenizer));
      } else if (s.par->saver()) {  // [parallel] rank 0's tp group gathers the tp slices with it
        TANDEM_RETURN_IF_ERROR(s.lora ? peft::SaveLoraAdapter(s.adapters->adapter(0), "", DType::kF32)
                                      : s.model->SaveSafetensors("", DType::kF32));
      }
      if (s.ckpt_writer) TANDEM_RETURN_IF_ERROR(SaveUniversalState(c, s, step));
    }
    if (s.snap && step % c.snapshot.interval == 0) TANDEM_RETURN_IF_ERROR(s.snap->Start(step, SnapshotMetaJson(c, s)));
    if (writer && !t.heartbeat_file.empty()) TANDEM_RETURN_IF_ERROR(internal::WriteHeartbeat(t.heartbeat_file, step));
    if (stopping) {
      if (stop > 0) {
        result.stopped_by_signal = stop;
        if (writer) {
          TANDEM_LOG(WARNING, "train") << "stopping after update " << step << " on signal " << stop << " ("
                                       << strsignal(stop) << "); saved checkpoint " << result.last_checkpoint;
        }
      } else {
        TANDEM_LOG(WARNING, "train") << "stopping after " << FormatDuration(m.elapsed_s) << " (train.max_minutes = "
                                     << t.max_minutes << ")";
      }
      break;
    }
  }
  if (s.snap) {
    TANDEM_RETURN_IF_ERROR(s.snap->Drain());
    if (writer) {
      TANDEM_LOG(INFO, "snapshot") << s.snap->taken() << " snapshot(s) taken, " << s.snap->skipped()
                                   << " skipped while the agent was still committing the previous one"
                                   << (s.snap->taken() > 0 ? "; " + s.snap->TimingSummary() : "");
    }
  }
  if (s.ckpt_writer) {
    TANDEM_RETURN_IF_ERROR(s.ckpt_writer->Wait());
    result.last_universal_checkpoint = s.ckpt_writer->last_path();
  }
  if (s.par) TANDEM_RETURN_IF_ERROR(s.par->Close());
  if (writer) TANDEM_LOG(INFO, "train") << "done: " << result.steps_done << " steps, loss " << result.first_loss << " -> "
                            << result.final_loss
                            << (result.final_eval_loss >= 0 ? StrCat(", eval loss ", result.final_eval_loss) : "")
                            << (result.final_eval_accuracy >= 0
                                    ? StrCat(", held-out token accuracy ", result.initial_eval_accuracy, " -> ",
                                             result.final_eval_accuracy)
                                    : "")
                            << "; checkpoint " << result.last_checkpoint;
  return result;
}

}  // namespace tandem::trainer

// One fine-tuning job's training: micro-batches, AdamW steps and the state file
// (serve/internal/finetune_job.h).
#include "serve/internal/finetune_job.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "ops/multi_tensor.h"
#include "ops/ops.h"
#include "peft/adapter_io.h"
#include "peft/lora.h"
#include "peft/s2ft_io.h"

namespace tandem::serve::internal {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {
constexpr char kStateMagic[] = "tandem-finetune-state 1";
}  // namespace

FineTuneTrainer::~FineTuneTrainer() = default;

peft::S2ftConfig S2ftConfigOf(const FineTuneHyperparameters& h, const std::string& base_name) {
  peft::S2ftConfig c;
  c.heads_fraction = h.heads_fraction;
  c.ffn_fraction = h.ffn_fraction;
  c.selection = h.selection;
  c.coupled = h.coupled;
  c.seed = DeriveSeed(h.seed, 0, "ft-s2ft-select");
  c.base_model_name_or_path = base_name;
  return c;
}

StatusOr<std::unique_ptr<FineTuneTrainer>> FineTuneTrainer::Create(ops::Context& ctx,
                                                                   model::LlamaModel& model,
                                                                   const FineTuneJobSpec& spec,
                                                                   const std::string& base_name) {
  if (spec.examples.empty()) {
    return InvalidArgumentError(StrCat("fine-tuning job: no examples in ", spec.training_file));
  }
  const model::LlamaConfig& config = model.config();
  std::unique_ptr<FineTuneTrainer> t(new FineTuneTrainer(ctx, spec));
  std::unique_ptr<peft::LoraAdapter> lora;
  if (spec.method == "s2ft") {
    const peft::S2ftConfig sc = S2ftConfigOf(spec.hyper, base_name);
    TANDEM_ASSIGN_OR_RETURN(peft::S2ftSelection selection, peft::SelectS2ft(ctx, sc, model));
    TANDEM_ASSIGN_OR_RETURN(t->s2ft_,
                            peft::S2ftAdapter::Create(ctx, config, sc, std::move(selection)));
    TANDEM_ASSIGN_OR_RETURN(lora, peft::S2ftAsLora(ctx, *t->s2ft_));
    // Per block: the trained factor is the block (B for columns, A for rows), the other one-hot.
    t->frozen_.assign(lora->parameters().size(), false);
    for (const peft::S2ftBlock& b : t->s2ft_->blocks()) {
      const int target = lora->Find(b.layer, b.proj);
      if (target < 0) return InternalError(StrCat("S2FT job: no LoRA target for ", b.name));
      const bool columns = b.axis == peft::S2ftAxis::kColumns;
      t->s2ft_param_.push_back(2 * target + (columns ? 1 : 0));
      t->frozen_[2 * target + (columns ? 0 : 1)] = true;
    }
  } else {
    peft::LoraConfig lc;
    lc.r = spec.hyper.lora_r;
    lc.alpha = spec.hyper.lora_alpha;
    lc.target_modules = spec.hyper.target_modules;
    lc.init_seed = DeriveSeed(spec.hyper.seed, 0, "ft-lora-init");
    lc.base_model_name_or_path = base_name;
    TANDEM_ASSIGN_OR_RETURN(lora, peft::LoraAdapter::Create(ctx, config, lc));
    t->frozen_.assign(lora->parameters().size(), false);
  }
  t->set_ = std::make_unique<peft::AdapterSet>(ctx, config);
  TANDEM_ASSIGN_OR_RETURN(int index, t->set_->Add(std::move(lora)));
  t->set_->set_default_adapter(index);
  t->set_->set_dropout_seed(DeriveSeed(spec.hyper.seed, 0, "ft-lora-dropout"));
  for (const model::Parameter& p : t->set_->adapter(0).parameters()) {
    TANDEM_ASSIGN_OR_RETURN(Tensor m,
                            Tensor::Empty({p.master.numel()}, DType::kF32, ctx.allocator()));
    TANDEM_ASSIGN_OR_RETURN(Tensor v,
                            Tensor::Empty({p.master.numel()}, DType::kF32, ctx.allocator()));
    TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, m, 0.0f));
    TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, v, 0.0f));
    t->m_.push_back(std::move(m));
    t->v_.push_back(std::move(v));
  }
  return t;
}

int64_t FineTuneTrainer::steps_per_epoch() const {
  const int64_t n = static_cast<int64_t>(spec_.examples.size());
  return (n + spec_.hyper.batch_size - 1) / spec_.hyper.batch_size;
}

int64_t FineTuneTrainer::Order(int64_t epoch, int64_t k) const {
  if (order_epoch_ != epoch) {
    const int64_t n = static_cast<int64_t>(spec_.examples.size());
    order_.resize(n);
    for (int64_t i = 0; i < n; ++i) order_[i] = i;
    Rng rng(DeriveSeed(spec_.hyper.seed, epoch, "ft-order"));
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates
      std::swap(order_[i], order_[rng.UniformInt(static_cast<uint32_t>(i + 1))]);
    }
    order_epoch_ = epoch;
  }
  return order_[k];
}

int64_t FineTuneTrainer::StepSize() const {
  const int64_t n = static_cast<int64_t>(spec_.examples.size());
  return std::min(spec_.hyper.batch_size, n - progress_.pos);
}

int64_t FineTuneTrainer::NextRows(int64_t micro_batch_tokens, int64_t* max_len) const {
  const int64_t start = in_step_ ? cursor_ : 0;
  const int64_t left = StepSize() - start;
  int64_t rows = 0;
  *max_len = 0;
  while (rows < left) {
    const FineTuneExample& e = spec_.examples[Order(progress_.epoch, progress_.pos + start + rows)];
    const int64_t len = std::max<int64_t>(*max_len, static_cast<int64_t>(e.tokens.size()));
    if (rows > 0 && (rows + 1) * len > micro_batch_tokens) break;
    *max_len = len;
    ++rows;
  }
  return rows;
}

int64_t FineTuneTrainer::NextMicroTokens(int64_t micro_batch_tokens) const {
  if (done()) return 0;
  int64_t max_len = 0;
  const int64_t rows = NextRows(micro_batch_tokens, &max_len);
  return rows * max_len;
}

Status FineTuneTrainer::BeginStep() {
  TANDEM_RETURN_IF_ERROR(set_->ZeroGrads());
  step_targets_ = 0;
  for (int64_t k = 0; k < StepSize(); ++k) {
    const FineTuneExample& e = spec_.examples[Order(progress_.epoch, progress_.pos + k)];
    step_targets_ += static_cast<int64_t>(e.tokens.size()) - e.loss_from;
  }
  cursor_ = 0;
  step_loss_sum_ = 0;
  step_loss_count_ = 0;
  in_step_ = true;
  return Status::Ok();
}

StatusOr<MicroBatchResult> FineTuneTrainer::RunMicroBatch(model::LlamaModel& model,
                                                          int64_t micro_batch_tokens) {
  TANDEM_ASSIGN_OR_RETURN(std::optional<MicroBatchResult> r,
                          StepMicroBatch(model, micro_batch_tokens, INT64_MAX));
  TANDEM_CHECK(r.has_value());
  return *r;
}

void FineTuneTrainer::Abandon() {
  if (micro_model_ == nullptr) return;
  micro_model_->SetAdapter(nullptr);
  micro_model_ = nullptr;
  in_step_ = false;  // the step's gradients so far are incomplete: it starts over
}

StatusOr<std::optional<MicroBatchResult>> FineTuneTrainer::StepMicroBatch(
    model::LlamaModel& model, int64_t micro_batch_tokens, int64_t max_units) {
  if (micro_model_ == nullptr) {
    if (done()) return std::optional<MicroBatchResult>(MicroBatchResult{});
    const Status started = StartMicroBatch(model, micro_batch_tokens);
    if (!started.ok()) {
      Abandon();
      return started;
    }
  }
  StatusOr<bool> finished = model.ContinueForwardBackward(max_units);
  if (!finished.ok()) {
    Abandon();
    return finished.status();
  }
  if (!*finished) return std::optional<MicroBatchResult>();
  StatusOr<model::LossSum> loss = model.FinishForwardBackward();
  model.SetAdapter(nullptr);
  micro_model_ = nullptr;
  if (!loss.ok()) {
    in_step_ = false;
    return loss.status();
  }
  MicroBatchResult result;
  result.tokens = micro_tokens_;
  step_loss_sum_ += loss->sum;
  step_loss_count_ += loss->count;
  progress_.trained_tokens += result.tokens;
  cursor_ += micro_rows_;
  if (cursor_ >= StepSize()) TANDEM_RETURN_IF_ERROR(OptimizerStep(&result));
  return std::optional<MicroBatchResult>(result);
}

Status FineTuneTrainer::StartMicroBatch(model::LlamaModel& model, int64_t micro_batch_tokens) {
  if (!in_step_) TANDEM_RETURN_IF_ERROR(BeginStep());
  int64_t real_tokens = 0;
  int64_t T = 0;
  const int64_t B = NextRows(micro_batch_tokens, &T);
  model::Batch batch;
  batch.tokens = Tensor::CpuZeros({B, T}, DType::kI32);  // [B, T], padding 0 (no loss)
  batch.targets = Tensor::Cpu({B, T}, DType::kI32);      // [B, T]
  int32_t* tok = batch.tokens.data<int32_t>();
  int32_t* tgt = batch.targets.data<int32_t>();
  std::fill(tgt, tgt + B * T, ops::kIgnoreIndex);
  for (int64_t b = 0; b < B; ++b) {
    const FineTuneExample& e = spec_.examples[Order(progress_.epoch, progress_.pos + cursor_ + b)];
    const int64_t len = static_cast<int64_t>(e.tokens.size());
    for (int64_t t = 0; t < len; ++t) tok[b * T + t] = e.tokens[t];
    for (int64_t t = std::max<int64_t>(e.loss_from, 1); t < len; ++t) {
      tgt[b * T + t - 1] = e.tokens[t];  // position t - 1 predicts token t
    }
    real_tokens += len;
  }
  const float scale = step_targets_ > 0 ? 1.0f / static_cast<float>(step_targets_) : 0.0f;
  model.SetAdapter(set_.get());  // attached only while this micro-batch runs
  micro_model_ = &model;
  micro_tokens_ = real_tokens;
  micro_rows_ = B;
  return model.BeginForwardBackward(batch, scale);
}

Status FineTuneTrainer::OptimizerStep(MicroBatchResult* result) {
  const double loss = step_loss_sum_ / std::max<int64_t>(step_loss_count_, 1);
  if (!std::isfinite(loss)) {
    return InternalError(StrCat("step ", progress_.step + 1, ": the loss is ", loss));
  }
  std::vector<model::Parameter>& params = set_->adapter(0).parameters();
  ops::AdamWParams ap;
  ap.lr = static_cast<float>(spec_.hyper.learning_rate);
  ap.step = progress_.step + 1;
  std::vector<Tensor> weights(params.size());
  std::vector<ops::AdamWTensors> entries;  // one multi-tensor update, the per-tensor bits
  for (size_t i = 0; i < params.size(); ++i) {
    if (frozen_[i]) continue;
    model::Parameter& p = params[i];
    if (p.weight.storage() != p.master.storage()) weights[i] = p.weight;
    entries.push_back({&p.master, &m_[i], &v_[i], &weights[i], &p.grad, ap.weight_decay});
  }
  TANDEM_RETURN_IF_ERROR(ops::AdamWMulti(ctx_, entries, ap));
  TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
  in_step_ = false;
  ++progress_.step;
  progress_.pos += cursor_;
  progress_.loss = loss;
  progress_.step_losses.push_back(loss);
  result->step_done = true;
  if (progress_.pos >= static_cast<int64_t>(spec_.examples.size())) {
    progress_.pos = 0;
    ++progress_.epoch;
    result->epoch_done = true;
  }
  return Status::Ok();
}

// ---- State file ----

Status FineTuneTrainer::Save(const std::string& dir) const {
  if (s2ft_ == nullptr) return peft::SaveLoraAdapter(adapter(), dir);
  for (size_t i = 0; i < s2ft_param_.size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor block, adapter().ToHost(static_cast<size_t>(s2ft_param_[i])));
    TANDEM_RETURN_IF_ERROR(s2ft_->SetFromHost(i, block));
  }
  return peft::SaveS2ftAdapter(*s2ft_, dir);
}

Status FineTuneTrainer::WriteState(const std::string& path, const std::string& status,
                                   const std::string& error) const {
  const std::vector<model::Parameter>& params = set_->adapter(0).parameters();
  json meta = {{"status", status},
               {"error", error},
               {"step", progress_.step},
               {"epoch", progress_.epoch},
               {"pos", progress_.pos},
               {"trained_tokens", progress_.trained_tokens},
               {"loss", progress_.loss},
               {"step_losses", progress_.step_losses},
               {"published", progress_.published}};
  json plist = json::array();
  for (const model::Parameter& p : params)
    plist.push_back({{"name", p.name}, {"numel", p.master.numel()}});
  meta["params"] = plist;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return InternalError(StrCat("cannot write fine-tuning state ", tmp));
    out << kStateMagic << "\n" << meta.dump() << "\n";
    for (size_t i = 0; i < params.size(); ++i) {
      for (const Tensor* t : {&params[i].master, &m_[i], &v_[i]}) {
        TANDEM_ASSIGN_OR_RETURN(Tensor host, CopyToHostOn(*t, ctx_.stream()));
        out.write(reinterpret_cast<const char*>(host.data<float>()),
                  static_cast<std::streamsize>(host.numel() * sizeof(float)));
      }
    }
    out.flush();
    if (!out) return InternalError(StrCat("writing fine-tuning state ", tmp, " failed"));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return InternalError(StrCat("rename ", tmp, " -> ", path, ": ", ec.message()));
  return Status::Ok();
}

StatusOr<std::string> FineTuneTrainer::ReadState(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(StrCat("fine-tuning state ", path, " does not exist"));
  std::string magic, line;
  std::getline(in, magic);
  std::getline(in, line);
  if (magic != kStateMagic) {
    return InvalidArgumentError(StrCat(path, ": expected first line '", kStateMagic, "', found '",
                                       magic.substr(0, 40), "'"));
  }
  json meta = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object()) {
    return InvalidArgumentError(StrCat(path, ": line 2 is not a JSON object"));
  }
  std::vector<model::Parameter>& params = set_->adapter(0).parameters();
  const json& plist = meta.value("params", json::array());
  if (plist.size() != params.size()) {
    return InvalidArgumentError(
        StrCat(path, ": expected ", params.size(), " adapter parameters, found ", plist.size()));
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].master.numel();
    if (plist[i].value("name", "") != params[i].name || plist[i].value("numel", -1) != numel) {
      return InvalidArgumentError(StrCat(path, ": parameter ", i, " expected ", params[i].name,
                                         " [", numel, "], found ", plist[i].dump()));
    }
    for (int which = 0; which < 3; ++which) {
      Tensor host = Tensor::Cpu({numel}, DType::kF32);
      in.read(reinterpret_cast<char*>(host.data<float>()),
              static_cast<std::streamsize>(numel * sizeof(float)));
      if (!in) return InvalidArgumentError(StrCat(path, ": truncated at ", params[i].name));
      if (which == 0) {
        TANDEM_RETURN_IF_ERROR(
            set_->adapter(0).SetFromHost(i, host.View(params[i].master.shape())));
      } else {
        TANDEM_RETURN_IF_ERROR(CopyTensor(which == 1 ? m_[i] : v_[i], host, ctx_.stream()));
        TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
      }
    }
  }
  progress_ = ProgressFromJson(meta);
  in_step_ = false;
  return meta.value("status", std::string("running"));
}

}  // namespace tandem::serve::internal

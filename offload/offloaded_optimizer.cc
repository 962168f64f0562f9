// OffloadedOptimizer: worker threads that run CpuAdamWRange per chunk as gradients arrive.
#include "offload/offloaded_optimizer.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/parallel.h"

namespace tandem::offload {

namespace {

constexpr uint64_t kRecordAlign = 4096;
uint64_t RoundUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
// SetState's conversions and first touches of fresh host memory: a thread per 1M elements.
constexpr int64_t kMinPerRange = int64_t{1} << 20;
}  // namespace

StatusOr<std::unique_ptr<OffloadedOptimizer>> OffloadedOptimizer::Create(
    std::vector<OffloadedParam> params, const OffloadedOptimizerOptions& options,
    Storage* storage) {
  if (params.empty()) return InvalidArgumentError("OffloadedOptimizer: no parameters");
  for (const OffloadedParam& p : params) {
    if (p.numel <= 0) {
      return InvalidArgumentError(StrCat("OffloadedOptimizer: parameter '", p.name,
                                         "': expected numel > 0, found ", p.numel));
    }
  }
  if (options.chunk_elems < 1 || options.num_threads < 1) {
    return InvalidArgumentError(StrCat("OffloadedOptimizer: expected chunk_elems >= 1 and ",
                                       "num_threads >= 1, found ", options.chunk_elems, " and ",
                                       options.num_threads));
  }
  if (options.tier == OptimizerTier::kStorage && storage == nullptr) {
    return InvalidArgumentError("OffloadedOptimizer: the storage tier needs a Storage");
  }
  if (options.simd && !CpuSupports(*options.simd)) {
    return InvalidArgumentError(StrCat("OffloadedOptimizer: SIMD level ",
                                       SimdLevelName(*options.simd), " not run by this CPU"));
  }
  auto opt = std::unique_ptr<OffloadedOptimizer>(
      new OffloadedOptimizer(std::move(params), options, storage));
  for (const OffloadedParam& p : opt->params_) {  // zeroed by NumaBuffer::Allocate
    auto buf = NumaBuffer::Allocate(sizeof(Bf16) * static_cast<size_t>(p.numel),
                                    options.host_placement);
    if (!buf.ok()) return buf.status().WithContext(StrCat("bf16 weights of '", p.name, "'"));
    opt->weights_.push_back(std::move(buf).value());
  }
  if (options.tier == OptimizerTier::kHost) {
    for (const OffloadedParam& p : opt->params_) {  // zeroed by NumaBuffer::Allocate
      auto buf = NumaBuffer::Allocate(3 * sizeof(float) * static_cast<size_t>(p.numel),
                                      options.host_placement);
      if (!buf.ok()) return buf.status().WithContext(StrCat("optimizer state of '", p.name, "'"));
      opt->host_state_.push_back(std::move(buf).value());
    }
  }
  if (options.tier == OptimizerTier::kStorage && options.zero_storage) {
    // Fresh state is zeros, as in host memory: write every record once.
    std::vector<float> zeros(3 * static_cast<size_t>(options.chunk_elems), 0.0f);
    for (int p = 0; p < opt->num_params(); ++p) {
      for (int64_t c = 0; c < opt->num_chunks(p); ++c) {
        TANDEM_RETURN_IF_ERROR(storage->Write(opt->RecordOffset(p, c), zeros.data(),
                                              3 * opt->ChunkLen(p, c) * sizeof(float)));
      }
    }
  }
  return opt;
}

OffloadedOptimizer::OffloadedOptimizer(std::vector<OffloadedParam> params,
                                       const OffloadedOptimizerOptions& options, Storage* storage)
    : params_(std::move(params)),
      options_(options),
      simd_(options.simd.value_or(BestSimdLevel())),
      storage_(storage) {
  const uint64_t stride = RoundUp(12 * static_cast<uint64_t>(options_.chunk_elems), kRecordAlign);
  uint64_t offset = options_.storage_offset;
  for (const OffloadedParam& p : params_) {
    record_base_.push_back(offset);
    const int64_t chunks = (p.numel + options_.chunk_elems - 1) / options_.chunk_elems;
    offset += stride * static_cast<uint64_t>(chunks);
    given_.emplace_back(static_cast<size_t>(chunks), 0);
  }
  storage_bytes_ = offset - options_.storage_offset;
  for (int i = 0; i < options_.num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

OffloadedOptimizer::~OffloadedOptimizer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

bool OffloadedOptimizer::InStep() {
  std::lock_guard<std::mutex> lock(mu_);
  return in_step_;
}

int64_t OffloadedOptimizer::num_chunks(int param) const {
  return static_cast<int64_t>(given_.at(param).size());
}

int64_t OffloadedOptimizer::ChunkLen(int param, int64_t chunk) const {
  return std::min(options_.chunk_elems, params_[param].numel - chunk * options_.chunk_elems);
}

uint64_t OffloadedOptimizer::RecordOffset(int param, int64_t chunk) const {
  const uint64_t stride = RoundUp(12 * static_cast<uint64_t>(options_.chunk_elems), kRecordAlign);
  return record_base_[param] + stride * static_cast<uint64_t>(chunk);
}

Status OffloadedOptimizer::SetState(int param, const float* master, const float* m,
                                    const float* v) {
  if (param < 0 || param >= num_params() || master == nullptr) {
    return InvalidArgumentError(
        StrCat("OffloadedOptimizer::SetState: bad parameter ", param, " or null master"));
  }
  if (InStep()) return FailedPreconditionError("OffloadedOptimizer::SetState inside a step");
  const int64_t n = params_[param].numel;
  if (options_.tier == OptimizerTier::kHost) {
    const float* srcs[3] = {master, m, v};
    float* dsts[3] = {HostState(param, 0), HostState(param, 1), HostState(param, 2)};
    Bf16* w = Weights(param);
    ParallelRanges(n, kMinPerRange, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) w[i] = FloatToBf16(master[i]);
      for (int k = 0; k < 3; ++k) {
        if (srcs[k] != nullptr) {
          std::memcpy(dsts[k] + a, srcs[k] + a, (b - a) * sizeof(float));
        } else {
          std::fill(dsts[k] + a, dsts[k] + b, 0.0f);
        }
      }
    });
    return Status::Ok();
  }
  ParallelRanges(n, kMinPerRange, [&](int64_t a, int64_t b) {
    Bf16* w = Weights(param);
    for (int64_t i = a; i < b; ++i) w[i] = FloatToBf16(master[i]);
  });
  std::vector<float> record(3 * static_cast<size_t>(options_.chunk_elems));
  for (int64_t c = 0; c < num_chunks(param); ++c) {
    const int64_t first = c * options_.chunk_elems;
    const int64_t len = ChunkLen(param, c);
    std::memcpy(record.data(), master + first, len * sizeof(float));
    for (int k = 1; k <= 2; ++k) {
      const float* src = k == 1 ? m : v;
      float* dst = record.data() + k * len;
      if (src != nullptr)
        std::memcpy(dst, src + first, len * sizeof(float));
      else
        std::fill(dst, dst + len, 0.0f);
    }
    TANDEM_RETURN_IF_ERROR(
        storage_->Write(RecordOffset(param, c), record.data(), 3 * len * sizeof(float)));
  }
  return Status::Ok();
}

Status OffloadedOptimizer::GetState(int param, float* master, float* m, float* v) {
  if (param < 0 || param >= num_params()) {
    return InvalidArgumentError(StrCat("OffloadedOptimizer::GetState: bad parameter ", param));
  }
  if (InStep()) return FailedPreconditionError("OffloadedOptimizer::GetState inside a step");
  const int64_t n = params_[param].numel;
  if (options_.tier == OptimizerTier::kHost) {
    float* outs[3] = {master, m, v};
    for (int k = 0; k < 3; ++k) {
      if (outs[k] != nullptr) std::memcpy(outs[k], HostState(param, k), n * sizeof(float));
    }
    return Status::Ok();
  }
  std::vector<float> record(3 * static_cast<size_t>(options_.chunk_elems));
  for (int64_t c = 0; c < num_chunks(param); ++c) {
    const int64_t first = c * options_.chunk_elems;
    const int64_t len = ChunkLen(param, c);
    TANDEM_RETURN_IF_ERROR(
        storage_->Read(RecordOffset(param, c), record.data(), 3 * len * sizeof(float)));
    float* outs[3] = {master, m, v};
    for (int k = 0; k < 3; ++k) {
      if (outs[k]) std::memcpy(outs[k] + first, record.data() + k * len, len * sizeof(float));
    }
  }
  return Status::Ok();
}

Status OffloadedOptimizer::BeginStep(const ops::AdamWParams& params,
                                     ChunkUpdatedFn on_chunk_updated) {
  return BeginStep(params, std::move(on_chunk_updated), nullptr);
}

Status OffloadedOptimizer::BeginStep(const ops::AdamWParams& params,
                                     ChunkUpdatedFn on_chunk_updated,
                                     ChunkMasterFn on_master_updated) {
  std::lock_guard<std::mutex> lock(mu_);
  if (in_step_) return FailedPreconditionError("OffloadedOptimizer::BeginStep inside a step");
  for (auto& g : given_) std::fill(g.begin(), g.end(), 0);
  scalars_ = MakeAdamWScalars(params);
  ops::AdamWParams no_decay = params;
  no_decay.weight_decay = 0.0f;
  scalars_no_decay_ = MakeAdamWScalars(no_decay);
  on_chunk_updated_ = std::move(on_chunk_updated);
  on_master_updated_ = std::move(on_master_updated);
  first_error_ = Status::Ok();
  in_step_ = true;
  return Status::Ok();
}

Status OffloadedOptimizer::GradientsReady(int param, int64_t chunk, const float* grad_chunk) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!in_step_) return FailedPreconditionError("GradientsReady outside a step");
    if (param < 0 || param >= num_params() || chunk < 0 || chunk >= num_chunks(param) ||
        grad_chunk == nullptr) {
      return InvalidArgumentError(StrCat("GradientsReady: bad parameter ", param, " chunk ", chunk,
                                         " (", num_params(), " parameters) or null grad"));
    }
    uint8_t& given = given_[param][chunk];
    if (given) {
      return InvalidArgumentError(StrCat("GradientsReady: parameter '", params_[param].name,
                                         "' chunk ", chunk, " given twice in one step"));
    }
    given = 1;
    ++remaining_;
    queue_.push_back(Task{param, chunk, grad_chunk});
  }
  work_cv_.notify_one();
  return Status::Ok();
}

Status OffloadedOptimizer::GradientsReady(int param, const float* grad) {
  if (param < 0 || param >= num_params() || grad == nullptr) {
    return InvalidArgumentError(StrCat("GradientsReady: bad parameter ", param, " or null grad"));
  }
  for (int64_t c = 0; c < num_chunks(param); ++c) {
    TANDEM_RETURN_IF_ERROR(GradientsReady(param, c, grad + c * options_.chunk_elems));
  }
  return Status::Ok();
}

Status OffloadedOptimizer::FinishStep() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!in_step_) return FailedPreconditionError("FinishStep outside a step");
  done_cv_.wait(lock, [&] { return remaining_ == 0; });
  in_step_ = false;
  on_chunk_updated_ = nullptr;
  on_master_updated_ = nullptr;
  for (int p = 0; p < num_params(); ++p) {
    for (int64_t c = 0; c < num_chunks(p); ++c) {
      if (!given_[p][c]) {
        return FailedPreconditionError(StrCat("FinishStep: parameter '", params_[p].name,
                                              "' chunk ", c, " got no gradients this step"));
      }
    }
  }
  return first_error_;
}

Status OffloadedOptimizer::step_error() {
  std::lock_guard<std::mutex> lock(mu_);
  return first_error_;
}

void OffloadedOptimizer::WorkerLoop() {
  std::vector<float> scratch;
  if (options_.tier == OptimizerTier::kStorage) {
    scratch.resize(3 * static_cast<size_t>(options_.chunk_elems));
  }
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and nothing left
      task = queue_.front();
      queue_.pop_front();
    }
    const Status st = Update(task, scratch);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!st.ok() && first_error_.ok()) first_error_ = st;
      --remaining_;
    }
    done_cv_.notify_all();
  }
}

Status OffloadedOptimizer::Update(const Task& t, std::vector<float>& scratch) {
  const int64_t first = t.chunk * options_.chunk_elems;
  const int64_t len = ChunkLen(t.param, t.chunk);
  Bf16* w = Weights(t.param) + first;
  const AdamWScalars& scalars = params_[t.param].weight_decay ? scalars_ : scalars_no_decay_;
  const float* master = nullptr;
  if (options_.tier == OptimizerTier::kHost) {
    CpuAdamWRange(scalars, HostState(t.param, 0) + first, HostState(t.param, 1) + first,
                  HostState(t.param, 2) + first, w, t.grad, len, simd_);
    master = HostState(t.param, 0) + first;
  } else {
    const uint64_t offset = RecordOffset(t.param, t.chunk);
    const size_t bytes = 3 * len * sizeof(float);
    TANDEM_RETURN_IF_ERROR(storage_->Read(offset, scratch.data(), bytes));
    CpuAdamWRange(scalars, scratch.data(), scratch.data() + len, scratch.data() + 2 * len, w,
                  t.grad, len, simd_);
    TANDEM_RETURN_IF_ERROR(storage_->Write(offset, scratch.data(), bytes));
    master = scratch.data();
  }
  if (on_master_updated_) on_master_updated_(t.param, t.chunk, first, master, len);
  if (on_chunk_updated_) on_chunk_updated_(t.param, t.chunk, first, w, len);
  return Status::Ok();
}

}  // namespace tandem::offload

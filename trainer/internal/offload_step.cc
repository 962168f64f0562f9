// OffloadedAdamW: the offloaded optimizer step of `tandem train` (see offload_step.h).
#include "trainer/internal/offload_step.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <thread>

#include "core/logging.h"
#include "core/parallel.h"
#include "offload/topology.h"

#if defined(TANDEM_WITH_CUDA)
#include <cuda_runtime.h>

#include "core/cuda_check.h"
#endif

namespace tandem::trainer::internal {
namespace {

constexpr size_t kSlabAlign = 4096;

double GiB(double bytes) { return bytes / double(1ull << 30); }

// A parameter's tensor as a flat host f32 pointer, checked.
Status CheckHostF32(const Tensor& t, int64_t numel, const std::string& what) {
  if (!t.defined() || t.device().is_cuda() || t.dtype() != DType::kF32 || !t.is_contiguous() ||
      t.numel() != numel) {
    return InvalidArgumentError(StrCat(what, ": expected a contiguous host f32 tensor of ", numel,
                                       " elements, found ",
                                       t.defined() ? t.DebugString() : "undefined"));
  }
  return Status::Ok();
}

}  // namespace

OffloadedAdamW::OffloadedAdamW(ops::Context& ctx, std::vector<int> index)
    : ctx_(ctx), index_(std::move(index)) {}

StatusOr<std::unique_ptr<OffloadedAdamW>> OffloadedAdamW::Create(
    ops::Context& ctx, const std::vector<model::Parameter>& params,
    const OptimizerSection& options) {
  if (options.offload != "host" && options.offload != "nvme") {
    return InvalidArgumentError(StrCat("optimizer.offload: expected \"host\" or \"nvme\", found \"",
                                       options.offload, "\""));
  }
  std::vector<int> index(params.size(), -1);
  std::vector<offload::OffloadedParam> oparams;
  std::vector<size_t> param_of;
  int64_t numel = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const model::Parameter& p = params[i];
    if (!p.trainable) continue;
    if (!p.grad.defined() || !p.grad.is_contiguous() || !p.weight.is_contiguous()) {
      return FailedPreconditionError(StrCat("optimizer.offload: parameter '", p.name,
                                            "' needs contiguous weight and gradient tensors"));
    }
    index[i] = static_cast<int>(oparams.size());
    oparams.push_back({p.name, p.weight.numel(), p.weight_decay});
    param_of.push_back(i);
    numel += p.weight.numel();
  }
  if (oparams.empty()) return InvalidArgumentError("optimizer.offload: no trainable parameters");
  auto self = std::unique_ptr<OffloadedAdamW>(new OffloadedAdamW(ctx, std::move(index)));
  self->param_of_ = std::move(param_of);
  self->numel_ = numel;
  offload::OffloadedOptimizerOptions oo;
  oo.chunk_elems = std::max<int64_t>(1, std::llround(options.chunk_mib * (1 << 20) / 4.0));
  oo.num_threads = static_cast<int>(options.threads);
  oo.zero_storage = false;  // the model's initialisation (or a checkpoint) sets every parameter
  // Host tier: masters and moments in local DRAM (the tier rule), bound there.
  oo.host_placement = offload::PlaceOnThisMachine(offload::StateKind::kOptimizerState);
  if (options.offload == "nvme") {
    oo.tier = offload::OptimizerTier::kStorage;
    std::error_code ec;
    std::filesystem::create_directories(options.nvme_path, ec);
    if (ec) {
      return InternalError(StrCat("optimizer.nvme_path = '", options.nvme_path,
                                  "': cannot create the directory: ", ec.message()));
    }
    self->file_ = (std::filesystem::path(options.nvme_path) /
                   StrCat("tandem-optimizer-", getpid(), ".bin")).string();
    std::filesystem::remove(self->file_, ec);  // a stale file of a reused pid
    auto storage = offload::IoUringStorage::Open(self->file_, {});
    if (!storage.ok()) {
      return storage.status().WithContext(
          StrCat("optimizer.nvme_path = '", options.nvme_path, "'"));
    }
    self->storage_ = std::move(storage).value();
  }
  TANDEM_ASSIGN_OR_RETURN(self->opt_, offload::OffloadedOptimizer::Create(
                                          std::move(oparams), oo, self->storage_.get()));
  if (ctx.is_cuda()) TANDEM_RETURN_IF_ERROR(self->InitCuda(oo.chunk_elems, oo.num_threads));
  self->delayed_ = options.delayed_update;
  self->delay_after_ = options.delayed_update_after;
  self->delaying_ = self->delayed_ && self->delay_after_ == 0;
  if (self->delayed_) TANDEM_RETURN_IF_ERROR(self->InitDelayed());
  const std::string slabs =
      self->pool_ ? StrCat(", ", self->pool_->num_slabs(), " pinned slabs of ",
                           self->pool_->slab_bytes() >> 10, " KiB")
                  : std::string();
  TANDEM_LOG(INFO, "train") << "optimizer state (f32 master weights + Adam moments, "
                            << GiB(double(self->state_bytes())) << " GiB) in " << self->where()
                            << (self->file_.empty() ? " (" + oo.host_placement.reason + ")" : "")
                            << ", plus " << GiB(2.0 * double(numel)) << " GiB of bf16 weight "
                            << "copies in host memory; " << oo.num_threads << " CPU threads, "
                            << oo.chunk_elems << " elements per chunk" << slabs;
  return self;
}

OffloadedAdamW::~OffloadedAdamW() {
  // Every stream callback must have run before the slabs and the optimizer go.
  if (d2h_) (void)d2h_->Synchronize();
  if (upload_) (void)upload_->Synchronize();  // [delayed] the hand-over callback too
  // [overlap] A step abandoned mid-backward (an error): the chunks it queued finish first;
  // [delayed] so does an update still in flight.
  if (step_begun_ || pending_ != nullptr) (void)opt_->FinishStep();
  if (upload_) (void)upload_->Synchronize();
  if (pool_) ReleaseAllSlabs();  // copies made early for a step that never updated
  pinned_.clear();  // [delayed] unregistered before the optimizer frees its bf16 buffers
  opt_.reset();
  storage_.reset();
  if (!file_.empty()) {
    std::error_code ec;
    std::filesystem::remove(file_, ec);
  }
}

std::string OffloadedAdamW::where() const {
  return file_.empty() ? std::string("host memory") : StrCat("the file ", file_);
}

Status OffloadedAdamW::InitCuda(int64_t chunk_elems, int threads) {
  const int device = ctx_.device().index;
  TANDEM_ASSIGN_OR_RETURN(CudaStreamOwner d2h, CudaStreamOwner::Create(device));
  TANDEM_ASSIGN_OR_RETURN(CudaStreamOwner upload, CudaStreamOwner::Create(device));
  TANDEM_ASSIGN_OR_RETURN(CudaEventOwner grads, CudaEventOwner::Create(device, false));
  TANDEM_ASSIGN_OR_RETURN(CudaEventOwner uploads, CudaEventOwner::Create(device, false));
  TANDEM_ASSIGN_OR_RETURN(CudaEventOwner final_grads, CudaEventOwner::Create(device, false));
  grads_final_.emplace(std::move(final_grads));
  d2h_.emplace(std::move(d2h));
  upload_.emplace(std::move(upload));
  grads_done_.emplace(std::move(grads));
  uploads_done_.emplace(std::move(uploads));
  offload::StagingPoolOptions po;
  int64_t largest = 0;  // a slab holds one chunk's f32 gradients (then its bf16 weights)
  for (int k = 0; k < opt_->num_params(); ++k) largest = std::max(largest, opt_->param(k).numel);
  const size_t bytes = static_cast<size_t>(std::min(chunk_elems, largest)) * sizeof(float);
  po.slab_bytes = (bytes + kSlabAlign - 1) / kSlabAlign * kSlabAlign;
  po.num_slabs = std::max(4, 2 * threads + 2);  // chunks in flight: copying, updating, uploading
  TANDEM_ASSIGN_OR_RETURN(pool_, offload::StagingPool::Create(po));
  tickets_.resize(static_cast<size_t>(opt_->num_params()));
  for (int k = 0; k < opt_->num_params(); ++k) {
    tickets_[k].resize(static_cast<size_t>(opt_->num_chunks(k)));
    for (int64_t c = 0; c < opt_->num_chunks(k); ++c) tickets_[k][c] = Ticket{this, k, c, {}};
  }
  device_weights_.resize(static_cast<size_t>(opt_->num_params()), nullptr);
  host_weights_.resize(static_cast<size_t>(opt_->num_params()), 0);
  return Status::Ok();
}

Status OffloadedAdamW::SetMaster(size_t param, const Tensor& host_f32) {
  if (param >= index_.size() || index_[param] < 0) return Status::Ok();  // frozen: not ours
  const int k = index_[param];
  TANDEM_RETURN_IF_ERROR(CheckHostF32(host_f32, opt_->param(k).numel,
                                      StrCat("master of '", opt_->param(k).name, "'")));
  return opt_->SetState(k, host_f32.data<float>(), nullptr, nullptr);
}

Status OffloadedAdamW::GetMaster(size_t param, Tensor& host_f32) {
  if (param >= index_.size() || index_[param] < 0) {
    return FailedPreconditionError(StrCat("OffloadedAdamW::GetMaster: parameter ", param,
                                          " is not trained by the offloaded optimizer"));
  }
  const int k = index_[param];
  TANDEM_RETURN_IF_ERROR(CheckHostF32(host_f32, opt_->param(k).numel,
                                      StrCat("master of '", opt_->param(k).name, "'")));
  TANDEM_RETURN_IF_ERROR(FinishPending());  // [delayed]
  return opt_->GetState(k, host_f32.data<float>(), nullptr, nullptr);
}

namespace {

bool SameAdamW(const ops::AdamWParams& a, const ops::AdamWParams& b) {
  return a.lr == b.lr && a.beta1 == b.beta1 && a.beta2 == b.beta2 && a.eps == b.eps &&
         a.weight_decay == b.weight_decay && a.step == b.step && a.grad_scale == b.grad_scale;
}

}  // namespace

void OffloadedAdamW::LogMode(bool on) {
  if (mode_logged_) return;
  mode_logged_ = true;
  if (delayed_) {
    TANDEM_LOG(INFO, "train") << "optimizer update delayed by one step (optimizer.delayed_update)"
                              << (delay_after_ > 0 ? StrCat(" after step ", delay_after_) : "")
                              << ":"
                              << " step t's update runs on the CPU during step t + 1, whose "
                              << "gradients come from the weights of update t - 1";
    return;
  }
  if (on) {
    TANDEM_LOG(INFO, "train") << "optimizer update overlapped with backward (train.grad_clip = 0):"
                              << " each chunk is updated as soon as its gradient is final";
  } else {
    TANDEM_LOG(INFO, "train") << "optimizer update after backward (global-norm clipping needs "
                              << "every gradient)"
                              << (pool_ ? StrCat("; up to ", pool_->num_slabs(),
                                                 " gradient chunks are copied during backward")
                                        : std::string());
  }
}

Status OffloadedAdamW::BeginLastBackward(const std::vector<model::Parameter>& params,
                                         const ops::AdamWParams* adamw) {
  if (params_ != nullptr) {
    return InternalError("OffloadedAdamW::BeginLastBackward: a step is already in progress");
  }
  if (params.size() != index_.size()) {
    return InternalError(StrCat("OffloadedAdamW: ", params.size(), " parameters, created over ",
                                index_.size()));
  }
  params_ = &params;
  final_.assign(param_of_.size(), 0);
  order_.clear();
  issued_ = handed_ = 0;
  early_updates_ = 0;
  if (delaying_) {  // [delayed] GradientsFinal copies gradients; the update starts in Update()
    grad_copied_.assign(param_of_.size(), 0);
    return Status::Ok();
  }
  if (ctx_.is_cuda()) TANDEM_RETURN_IF_ERROR(ArmCuda());
  if (adamw == nullptr) return Status::Ok();
  in_backward_ = true;
  return BeginOptimizerStep(*adamw);
}

Status OffloadedAdamW::BeginOptimizerStep(const ops::AdamWParams& adamw) {
  auto counted = [this] {
    if (in_backward_.load()) early_updates_.fetch_add(1);
  };
  Status st;
  if (ctx_.is_cuda()) {
    st = opt_->BeginStep(adamw, [this, counted](int k, int64_t c, int64_t first, const Bf16* w,
                                                int64_t n) {
      UploadChunk(k, c, first, w, n);
      counted();
    });
  } else {  // the model's f32 weights take each chunk's new master
    std::vector<float*> weights(param_of_.size());
    for (size_t k = 0; k < param_of_.size(); ++k) {
      weights[k] = (*params_)[param_of_[k]].weight.data<float>();
    }
    st = opt_->BeginStep(adamw, nullptr,
                         [weights, counted](int k, int64_t, int64_t first, const float* master,
                                            int64_t n) {
                           std::memcpy(weights[k] + first, master,
                                       static_cast<size_t>(n) * sizeof(float));
                           counted();
                         });
  }
  TANDEM_RETURN_IF_ERROR(st);
  step_begun_ = true;
  begun_with_ = adamw;
  return Status::Ok();
}

Status OffloadedAdamW::GradientsFinal(const std::vector<size_t>& ready) {
  if (params_ == nullptr) return Status::Ok();  // not the last micro-batch
  if (ctx_.is_cuda()) {  // the copies below follow the backward kernels enqueued so far
    TANDEM_RETURN_IF_ERROR(grads_final_->Record(ctx_.stream()));
    TANDEM_RETURN_IF_ERROR(grads_final_->Wait(d2h_->get()));
  }
  if (delaying_) {  // [delayed] into the host gradient buffer (CUDA; on CPU Update copies)
    for (size_t i : ready) {
      if (i >= index_.size() || index_[i] < 0 || !ctx_.is_cuda()) continue;
      TANDEM_RETURN_IF_ERROR(CopyGradToHost(index_[i], (*params_)[i]));
    }
    return Status::Ok();
  }
  for (size_t i : ready) {
    if (i < index_.size() && index_[i] >= 0) TANDEM_RETURN_IF_ERROR(MarkFinal(index_[i]));
  }
  return ctx_.is_cuda() ? IssueCopies(/*block=*/false) : Status::Ok();
}

Status OffloadedAdamW::MarkFinal(int k) {
  if (final_[k]) return Status::Ok();
  if (!ctx_.is_cuda()) {
    if (!step_begun_) return Status::Ok();  // with clipping: read in place by Update
    final_[k] = 1;
    return opt_->GradientsReady(k, (*params_)[param_of_[k]].grad.data<float>());
  }
  final_[k] = 1;
  for (int64_t c = 0; c < opt_->num_chunks(k); ++c) order_.emplace_back(k, c);
  return Status::Ok();
}

Status OffloadedAdamW::Update(const std::vector<model::Parameter>& params,
                              const ops::AdamWParams& adamw) {
  if (params_ == nullptr) {
    TANDEM_RETURN_IF_ERROR(BeginLastBackward(params, nullptr));  // no early copies this step
  } else if (params_ != &params) {
    return InternalError("OffloadedAdamW::Update: other parameters than BeginLastBackward's");
  }
  if (delaying_) {
    const Status st = UpdateDelayed(params, adamw);
    params_ = nullptr;
    return st;
  }
  in_backward_ = false;
  if (step_begun_ && !SameAdamW(*begun_with_, adamw)) {
    return InternalError(StrCat("OffloadedAdamW::Update: step ", adamw.step, " lr ", adamw.lr,
                                " scale ", adamw.grad_scale, ", but the update that overlapped ",
                                "backward started with step ", begun_with_->step, " lr ",
                                begun_with_->lr, " scale ", begun_with_->grad_scale));
  }
  Status st = step_begun_ ? Status::Ok() : BeginOptimizerStep(adamw);
  if (st.ok()) st = ctx_.is_cuda() ? FinishCuda() : FinishCpu();
  params_ = nullptr;
  step_begun_ = false;
  return st;
}

Status OffloadedAdamW::FinishCpu() {
  Status given = Status::Ok();
  for (size_t k = 0; k < param_of_.size() && given.ok(); ++k) {
    given = MarkFinal(static_cast<int>(k));  // those the backward did not name
  }
  const Status finished = opt_->FinishStep();
  TANDEM_RETURN_IF_ERROR(given);
  return finished;
}

void OffloadedAdamW::RecordError(const Status& st) {
  if (st.ok()) return;
  std::lock_guard<std::mutex> lock(error_mu_);
  if (error_.ok()) error_ = st;
}

Status OffloadedAdamW::TakeError() {
  std::lock_guard<std::mutex> lock(error_mu_);
  Status st = error_;
  error_ = Status::Ok();
  return st;
}

StatusOr<offload::StagingPool::Slab> OffloadedAdamW::AcquireSlab() {
  while (true) {
    if (std::optional<offload::StagingPool::Slab> slab = pool_->TryAcquire()) return *slab;
    // A chunk whose update failed never gives its slab back: stop on the first error.
    TANDEM_RETURN_IF_ERROR(opt_->step_error());
    TANDEM_RETURN_IF_ERROR(TakeError());
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

void OffloadedAdamW::ReleaseSlab(Ticket& t) {
  std::lock_guard<std::mutex> lock(slab_mu_);
  if (!t.lent) return;
  t.lent = false;
  pool_->Release(t.slab);
}

void OffloadedAdamW::ReleaseAllSlabs() {
  for (std::vector<Ticket>& param : tickets_) {
    for (Ticket& t : param) ReleaseSlab(t);
  }
}

#if defined(TANDEM_WITH_CUDA)

void OffloadedAdamW::GradLanded(void* arg) {
  auto* t = static_cast<Ticket*>(arg);
  t->self->RecordError(t->self->opt_->GradientsReady(t->param, t->chunk,
                                                     reinterpret_cast<const float*>(t->slab.data)));
}

void OffloadedAdamW::UploadDone(void* arg) {
  auto* t = static_cast<Ticket*>(arg);
  t->self->ReleaseSlab(*t);
}

// On a worker thread: the chunk's gradients in its slab are consumed; the slab now carries the
// new bf16 weights to the device and is released when that copy is done.
void OffloadedAdamW::UploadChunk(int k, int64_t chunk, int64_t first, const Bf16* w, int64_t n) {
  Ticket& t = tickets_[k][chunk];
  const size_t bytes = static_cast<size_t>(n) * sizeof(Bf16);
  if (host_weights_[k]) {  // [model.offload] a streamed layer: its weights live in host memory
    std::memcpy(device_weights_[k] + first * sizeof(Bf16), w, bytes);
    ReleaseSlab(t);
    return;
  }
  std::memcpy(t.slab.data, w, bytes);
  auto upload = [&]() -> Status {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_.device().index));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_weights_[k] + first * sizeof(Bf16),
                                                t.slab.data, bytes, cudaMemcpyHostToDevice,
                                                upload_->get()));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaLaunchHostFunc(upload_->get(), &UploadDone, &t));
    return Status::Ok();
  };
  const Status st = upload();
  if (!st.ok()) {
    RecordError(st.WithContext(StrCat("uploading the weights of '", opt_->param(k).name, "'")));
  }
}

Status OffloadedAdamW::ArmCuda() {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_.device().index));
  // The previous update's uploads and their slab releases (long done: the forward waited for
  // them) must have run before the tickets are reused.
  TANDEM_RETURN_IF_ERROR(upload_->Synchronize());
  for (size_t k = 0; k < param_of_.size(); ++k) {
    const Tensor& w = (*params_)[param_of_[k]].weight;
    device_weights_[k] = static_cast<char*>(w.raw_data());
    host_weights_[k] = w.device().is_cpu();
  }
  return Status::Ok();
}

// Copies order_[issued_..] device -> slab on the copy stream (which waited for the gradients);
// `block`: waits for slabs, else stops at the first chunk with none free.
Status OffloadedAdamW::IssueCopies(bool block) {
  const int64_t chunk_elems = opt_->chunk_elems();
  while (issued_ < order_.size()) {
    const auto [k, c] = order_[issued_];
    Ticket& t = tickets_[k][c];
    if (block) {
      TANDEM_ASSIGN_OR_RETURN(t.slab, AcquireSlab());  // waits while every slab is in flight
    } else {
      std::optional<offload::StagingPool::Slab> slab = pool_->TryAcquire();
      if (!slab) return Status::Ok();
      t.slab = *slab;
    }
    {
      std::lock_guard<std::mutex> lock(slab_mu_);
      t.lent = true;
    }
    const int64_t first = c * chunk_elems;
    const int64_t n = std::min(chunk_elems, opt_->param(k).numel - first);
    const char* grad = static_cast<const char*>((*params_)[param_of_[k]].grad.raw_data());
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(t.slab.data, grad + first * sizeof(float),
                                                static_cast<size_t>(n) * sizeof(float),
                                                cudaMemcpyDeviceToHost, d2h_->get()));
    ++issued_;
    if (step_begun_) TANDEM_RETURN_IF_ERROR(HandOverNext());
  }
  return Status::Ok();
}

// The optimizer gets order_[handed_] when its copy (issued earlier on d2h_) lands.
Status OffloadedAdamW::HandOverNext() {
  const auto [k, c] = order_[handed_];
  TANDEM_CUDA_RETURN_IF_ERROR(cudaLaunchHostFunc(d2h_->get(), &GradLanded, &tickets_[k][c]));
  ++handed_;
  return Status::Ok();
}

Status OffloadedAdamW::FinishCuda() {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_.device().index));
  TANDEM_RETURN_IF_ERROR(grads_done_->Record(ctx_.stream()));  // backward's gradients
  TANDEM_RETURN_IF_ERROR(grads_done_->Wait(d2h_->get()));
  auto issue = [&]() -> Status {
    for (size_t k = 0; k < param_of_.size(); ++k) {
      TANDEM_RETURN_IF_ERROR(MarkFinal(static_cast<int>(k)));  // those the backward did not name
    }
    while (handed_ < issued_) TANDEM_RETURN_IF_ERROR(HandOverNext());  // copied during backward
    return IssueCopies(/*block=*/true);
  };
  const Status issued = issue();
  // Every GradLanded callback must have run before FinishStep: it waits only for the chunks
  // already handed to the optimizer and then reports any chunk not given as missing (and no
  // callback may come after the step). The wait costs nothing: FinishStep needs them all anyway.
  TANDEM_RETURN_IF_ERROR(d2h_->Synchronize());
  const Status finished = opt_->FinishStep();
  Status failed = !issued.ok() ? issued : !finished.ok() ? finished : TakeError();
  if (!failed.ok()) {  // slabs of chunks that never uploaded go back once the streams are idle
    TANDEM_RETURN_IF_ERROR(d2h_->Synchronize());
    TANDEM_RETURN_IF_ERROR(upload_->Synchronize());
    ReleaseAllSlabs();
    return failed;
  }
  // The next forward (on the context's stream) waits for every upload, on the device.
  TANDEM_RETURN_IF_ERROR(uploads_done_->Record(upload_->get()));
  return uploads_done_->Wait(ctx_.stream());
}

#else  // CPU-only build: the CUDA path is never reached.

void OffloadedAdamW::GradLanded(void*) {}
void OffloadedAdamW::UploadDone(void*) {}
void OffloadedAdamW::UploadChunk(int, int64_t, int64_t, const Bf16*, int64_t) {}
Status OffloadedAdamW::ArmCuda() {
  return UnimplementedError("OffloadedAdamW: a CUDA context in a CPU-only build");
}
Status OffloadedAdamW::IssueCopies(bool) { return ArmCuda(); }
Status OffloadedAdamW::HandOverNext() { return ArmCuda(); }
Status OffloadedAdamW::FinishCuda() { return ArmCuda(); }

#endif

StatusOr<std::vector<StatePiece>> OffloadedAdamW::StatePieces(
    const std::vector<model::Parameter>& params) {
  TANDEM_RETURN_IF_ERROR(FinishPending());  // [delayed]
  std::vector<StatePiece> pieces;
  for (size_t k = 0; k < param_of_.size(); ++k) {
    const int ki = static_cast<int>(k);
    const int64_t n = opt_->param(ki).numel;
    StatePiece piece;
    piece.param = &params[param_of_[k]];
    piece.begin = 0;
    piece.end = n;
    if (float* state = opt_->host_state(ki)) {  // host tier: [master | m | v], no copy
      piece.master = Tensor::Wrap(state, {n}, DType::kF32, Device::Cpu());
      piece.exp_avg = Tensor::Wrap(state + n, {n}, DType::kF32, Device::Cpu());
      piece.exp_avg_sq = Tensor::Wrap(state + 2 * n, {n}, DType::kF32, Device::Cpu());
    } else {
      piece.master = Tensor::Cpu({n}, DType::kF32);
      piece.exp_avg = Tensor::Cpu({n}, DType::kF32);
      piece.exp_avg_sq = Tensor::Cpu({n}, DType::kF32);
      TANDEM_RETURN_IF_ERROR(opt_->GetState(ki, piece.master.data<float>(),
                                            piece.exp_avg.data<float>(),
                                            piece.exp_avg_sq.data<float>()));
    }
    pieces.push_back(std::move(piece));
  }
  return pieces;
}

Status OffloadedAdamW::CopyWeightsToModel(int k, const model::Parameter& p) {
  Tensor weight = p.weight;
  if (!ctx_.is_cuda()) {
    TANDEM_RETURN_IF_ERROR(CheckHostF32(weight, opt_->param(k).numel, p.name));
    return opt_->GetState(k, weight.data<float>(), nullptr, nullptr);
  }
  const Tensor host = Tensor::Wrap(const_cast<Bf16*>(opt_->weights_bf16(k)), weight.shape(),
                                   DType::kBF16, Device::Cpu());
  TANDEM_RETURN_IF_ERROR(CopyTensor(weight, host, ctx_.stream()));
  return ctx_.Synchronize();
}

Status OffloadedAdamW::Restore(const checkpoint::UniversalReader& reader,
                               const std::vector<model::Parameter>& params) {
  for (size_t k = 0; k < param_of_.size(); ++k) {
    const int ki = static_cast<int>(k);
    const model::Parameter& p = params[param_of_[k]];
    const std::string where = StrCat(reader.path(), ": tensor '", p.name, "'");
    const checkpoint::TensorInfo* info = reader.Find(p.name);
    if (info == nullptr) {
      return InvalidArgumentError(StrCat(where, " is not in the checkpoint: it was written by a ",
                                         "run with another model or training method"));
    }
    if (info->shape != p.logical_shape || ShapeNumel(info->shape) != opt_->param(ki).numel) {
      return InvalidArgumentError(StrCat(where, " has shape ", ShapeToString(info->shape),
                                         ", this run's model needs ",
                                         ShapeToString(p.logical_shape)));
    }
    if (!info->has_moments) {
      return InvalidArgumentError(StrCat(where, " has no optimizer state (saved frozen)"));
    }
    TANDEM_ASSIGN_OR_RETURN(checkpoint::TensorShard s, reader.ReadAll(p.name, "", true));
    const std::string what = StrCat(where, " as read");
    TANDEM_RETURN_IF_ERROR(CheckHostF32(s.master, opt_->param(ki).numel, what));
    TANDEM_RETURN_IF_ERROR(CheckHostF32(s.exp_avg, opt_->param(ki).numel, what));
    TANDEM_RETURN_IF_ERROR(CheckHostF32(s.exp_avg_sq, opt_->param(ki).numel, what));
    TANDEM_RETURN_IF_ERROR(opt_->SetState(ki, s.master.data<float>(), s.exp_avg.data<float>(),
                                          s.exp_avg_sq.data<float>()));
    TANDEM_RETURN_IF_ERROR(CopyWeightsToModel(ki, p));
  }
  return Status::Ok();
}

// [delayed] ------------------------------------------------------------------------------------

Status OffloadedAdamW::InitDelayed() {
  grad_offset_.resize(param_of_.size());
  chunks_done_ = std::make_unique<std::atomic<int64_t>[]>(param_of_.size());
  int64_t at = 0;
  for (size_t k = 0; k < param_of_.size(); ++k) {
    grad_offset_[k] = at;
    at += opt_->param(static_cast<int>(k)).numel;
  }
  TANDEM_ASSIGN_OR_RETURN(host_grads_, Tensor::Empty({at}, DType::kF32, HostAllocator()));
  float* g = host_grads_.data<float>();
  ParallelRanges(at, int64_t{1} << 22, [g](int64_t begin, int64_t end) {  // first touch
    std::memset(g + begin, 0, static_cast<size_t>(end - begin) * sizeof(float));
  });
  if (!ctx_.is_cuda()) return Status::Ok();
  upload_pending_.assign(param_of_.size(), 0);
  for (size_t k = 0; k < param_of_.size(); ++k) {
    TANDEM_ASSIGN_OR_RETURN(CudaEventOwner ev, CudaEventOwner::Create(ctx_.device().index, false));
    uploaded_.push_back(std::move(ev));
  }
  // Page-locked, so the gradient copies and the weight uploads run asynchronously.
  TANDEM_ASSIGN_OR_RETURN(
      HostRegistration grads,
      HostRegistration::Create(host_grads_.raw_data(), host_grads_.num_bytes()));
  pinned_.push_back(std::move(grads));
  for (int k = 0; k < opt_->num_params(); ++k) {
    void* w = const_cast<Bf16*>(opt_->weights_bf16(k));
    TANDEM_ASSIGN_OR_RETURN(
        HostRegistration reg,
        HostRegistration::Create(w, static_cast<size_t>(opt_->param(k).numel) * sizeof(Bf16)));
    pinned_.push_back(std::move(reg));
  }
  return Status::Ok();
}

Status OffloadedAdamW::WaitGradsRead(int k) {
  if (pending_ == nullptr) return Status::Ok();
  while (chunks_done_[k].load() < opt_->num_chunks(k)) {
    TANDEM_RETURN_IF_ERROR(opt_->step_error());
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return Status::Ok();
}

Status OffloadedAdamW::CopyGradToHost(int k, const model::Parameter& p) {
  if (grad_copied_[k]) return Status::Ok();
  TANDEM_RETURN_IF_ERROR(WaitGradsRead(k));  // the buffer still holds the pending update's input
  grad_copied_[k] = 1;
  Tensor dst = host_grads_.Slice(0, grad_offset_[k], grad_offset_[k] + opt_->param(k).numel)
                   .View(p.grad.shape());
  return CopyTensor(dst, p.grad, ctx_.is_cuda() ? d2h_->get() : nullptr);
}

// Finishes the update in flight and gives its weights to the model. With `next`, the next update
// begins here too and takes its gradients from the buffer once the uploads that read the bf16
// buffers it rewrites are done (CUDA: a host callback at the end of the upload stream); the
// uploads go in forward order with an event per parameter, and the next forward waits for each
// parameter's own upload (WeightsNeeded), so they overlap its first layers.
Status OffloadedAdamW::FinishPending(const ops::AdamWParams* next,
                                     const std::vector<model::Parameter>* next_params) {
  if (pending_ == nullptr && next == nullptr) return Status::Ok();
  const std::vector<model::Parameter>* prev = pending_;
  pending_ = nullptr;
  if (prev != nullptr) {
    // Its gradients were handed over by the callback at the end of the previous uploads.
    if (ctx_.is_cuda()) TANDEM_RETURN_IF_ERROR(upload_->Synchronize());
    TANDEM_RETURN_IF_ERROR(opt_->FinishStep());
    TANDEM_RETURN_IF_ERROR(TakeError());
    if (!ctx_.is_cuda()) {  // f32 model weights: the masters (outside a step)
      for (size_t k = 0; k < param_of_.size(); ++k) {
        Tensor weight = (*prev)[param_of_[k]].weight;
        TANDEM_RETURN_IF_ERROR(
            opt_->GetState(static_cast<int>(k), weight.data<float>(), nullptr, nullptr));
      }
    }
  }
  if (next != nullptr) {
    for (size_t k = 0; k < param_of_.size(); ++k) chunks_done_[k] = 0;
    TANDEM_RETURN_IF_ERROR(opt_->BeginStep(
        *next,
        [this](int k, int64_t, int64_t, const Bf16*, int64_t) { chunks_done_[k].fetch_add(1); }));
    pending_ = next_params;
  }
  if (!ctx_.is_cuda()) return next != nullptr ? HandOverGradients() : Status::Ok();
  if (prev == nullptr) return HandOverGradients();  // nothing to upload
  // Uploads overwrite weights the queued compute may still read: they wait for it.
  TANDEM_RETURN_IF_ERROR(grads_done_->Record(ctx_.stream()));
  TANDEM_RETURN_IF_ERROR(grads_done_->Wait(upload_->get()));
  bool host_weights = false;
  for (size_t k = 0; k < param_of_.size(); ++k) {
    host_weights = host_weights || (*prev)[param_of_[k]].weight.device().is_cpu();
  }
  if (host_weights) TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());  // no pass still copies a layer in
  for (size_t k = 0; k < param_of_.size(); ++k) {  // forward order: the next forward's first needs
    const int ki = static_cast<int>(k);
    Tensor weight = (*prev)[param_of_[k]].weight;
    const Bf16* bf16 = opt_->weights_bf16(ki);
    if (weight.device().is_cpu()) {  // a streamed layer: its host weights, now
      const char* src = reinterpret_cast<const char*>(bf16);
      char* dst = static_cast<char*>(weight.raw_data());
      ParallelRanges(static_cast<int64_t>(weight.num_bytes()), int64_t{1} << 22,
                     [src, dst](int64_t begin, int64_t end) {
                       std::memcpy(dst + begin, src + begin, static_cast<size_t>(end - begin));
                     });
      continue;
    }
    const Tensor src =
        Tensor::Wrap(const_cast<Bf16*>(bf16), weight.shape(), DType::kBF16, Device::Cpu());
    TANDEM_RETURN_IF_ERROR(CopyTensor(weight, src, upload_->get()));
    TANDEM_RETURN_IF_ERROR(uploaded_[k].Record(upload_->get()));
    upload_pending_[k] = 1;
  }
  if (next == nullptr) {  // Flush, a save: everything in place before returning
    TANDEM_RETURN_IF_ERROR(upload_->Synchronize());
    std::fill(upload_pending_.begin(), upload_pending_.end(), 0);
    return Status::Ok();
  }
#if defined(TANDEM_WITH_CUDA)
  TANDEM_CUDA_RETURN_IF_ERROR(cudaLaunchHostFunc(upload_->get(), &UploadsDone, this));
  return Status::Ok();
#else
  return UnimplementedError("OffloadedAdamW: a CUDA context in a CPU-only build");
#endif
}

// The gradients of every parameter to the update in flight, in backward's order (the next
// backward copies over the last layers' first).
Status OffloadedAdamW::HandOverGradients() {
  for (size_t i = param_of_.size(); i-- > 0;) {
    const int k = static_cast<int>(i);
    TANDEM_RETURN_IF_ERROR(opt_->GradientsReady(k, host_grads_.data<float>() + grad_offset_[k]));
  }
  return Status::Ok();
}

void OffloadedAdamW::UploadsDone(void* arg) {  // CUDA host callback
  auto* self = static_cast<OffloadedAdamW*>(arg);
  self->RecordError(self->HandOverGradients());
}

Status OffloadedAdamW::WeightsNeeded(const std::vector<size_t>& params) {
  if (!delayed_ || !ctx_.is_cuda()) return Status::Ok();
  for (size_t i : params) {
    if (i >= index_.size() || index_[i] < 0 || !upload_pending_[index_[i]]) continue;
    TANDEM_RETURN_IF_ERROR(uploaded_[index_[i]].Wait(ctx_.stream()));
    upload_pending_[index_[i]] = 0;
  }
  return Status::Ok();
}

Status OffloadedAdamW::Flush() { return FinishPending(); }

void OffloadedAdamW::StartStep(int64_t step) {
  delaying_ = delayed_ && step > delay_after_;  // a pending update stays pending until Update
}

Status OffloadedAdamW::UpdateDelayed(const std::vector<model::Parameter>& params,
                                     const ops::AdamWParams& adamw) {
  // Gradients the last backward did not name (CUDA), or all of them (CPU), go to the buffer.
  if (ctx_.is_cuda()) {
    TANDEM_RETURN_IF_ERROR(grads_final_->Record(ctx_.stream()));
    TANDEM_RETURN_IF_ERROR(grads_final_->Wait(d2h_->get()));
  }
  for (size_t k = 0; k < param_of_.size(); ++k) {
    TANDEM_RETURN_IF_ERROR(CopyGradToHost(static_cast<int>(k), params[param_of_[k]]));
  }
  if (ctx_.is_cuda()) TANDEM_RETURN_IF_ERROR(d2h_->Synchronize());
  grad_copied_.assign(param_of_.size(), 0);
  // The previous update (it ran during this step's micro-batches) reaches the model; this one
  // starts.
  const Status st = FinishPending(&adamw, &params);
  if (!st.ok() && pending_ != nullptr) {
    if (ctx_.is_cuda()) (void)upload_->Synchronize();  // its callback hands the chunks over
    pending_ = nullptr;
    (void)opt_->FinishStep();
  }
  return st;
}

}  // namespace tandem::trainer::internal

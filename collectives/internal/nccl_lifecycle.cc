// The NCCL backend's life cycle: CreateNcclWorld, Split, Abort, Close (collectives/nccl.h).
#include "collectives/internal/nccl_communicator.h"
#include "collectives/nccl.h"

#if defined(TANDEM_WITH_NCCL)

#include <algorithm>
#include <cstring>
#include <map>

#include "collectives/internal/mpi_communicator.h"
#include "collectives/internal/nccl_check.h"
#include "core/cuda_check.h"
#include "core/logging.h"

namespace tandem::collectives {
namespace internal {

StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(ncclComm_t comm, Setup setup) {
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator(comm, std::move(setup)));
  Status s = c->AllocateResources();
  if (!s.ok()) {
    c->Fail(s, /*notify=*/true).IgnoreError();
    c->Close().IgnoreError();
    return s;
  }
  return c;
}

Status NcclCommunicator::AllocateResources() {
  DeviceGuard guard(s_.device);
  if (s_.options.stream) {
    stream_ = s_.options.stream;
  } else {
    TANDEM_ASSIGN_OR_RETURN(CudaStreamOwner owned, CudaStreamOwner::Create(s_.device));
    owned_stream_ = std::make_unique<CudaStreamOwner>(std::move(owned));
    stream_ = owned_stream_->get();
  }
  const size_t scratch_bytes = sizeof(int32_t) * (1 + 3 * static_cast<size_t>(s_.size) + 3);
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&scratch_), scratch_bytes));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(scratch_, 0, scratch_bytes));
  return Status::Ok();
}

NcclCommunicator::~NcclCommunicator() {
  // Never calls NCCL (it may be torn down already at exit): Close() or Abort() first.
  TANDEM_LOG_IF(WARNING, "collectives", comm_ != nullptr)
      << Label() << ": destroyed without Close() or Abort(); the NCCL communicator is leaked";
}

Status NcclCommunicator::Fail(const Status& status, bool notify) {
  if (broken_.ok()) broken_ = status;
  AbortNccl();
  if (notify && s_.ctl) s_.ctl->NotifyAbort(status);
  return broken_;
}

void NcclCommunicator::AbortNccl() {
  if (!comm_) return;
  DeviceGuard guard(s_.device);
  ncclCommAbort(comm_);  // stops kernels in flight; the communicator is gone afterwards
  comm_ = nullptr;
}

Status NcclCommunicator::CheckUsable() {
  if (closed_) return FailedPreconditionError(StrCat(Label(), ": used after Close()"));
  if (!broken_.ok()) {
    return Status(broken_.code(),
                  StrCat(Label(), " is broken by an earlier failure: ", broken_.message()));
  }
  if (s_.ctl) {
    Status notice = s_.ctl->Service();
    if (!notice.ok()) {
      return Fail(Status(notice.code(), StrCat(Label(), ": ", notice.message())), false);
    }
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<Communicator>> NcclCommunicator::Split(int color, int key,
                                                                std::string name) {
  if (color < 0 && color != kNoColor) {
    return InvalidArgumentError(StrCat("Split: color ", color, " must be >= 0 or kNoColor"));
  }
  // 1. Every rank's (color, key, world rank), by a timed NCCL all-gather: a missing rank is
  //    reported here rather than hanging ncclCommSplit.
  int32_t* table_dev = scratch_ + 1;               // [size, 3]
  int32_t* mine_dev = scratch_ + 1 + 3 * s_.size;  // [3]
  const int32_t mine[3] = {color, key, s_.world_ranks[s_.rank]};
  {
    DeviceGuard guard(s_.device);
    TANDEM_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(mine_dev, mine, sizeof(mine), cudaMemcpyHostToDevice, stream_));
  }
  TANDEM_RETURN_IF_ERROR(Enqueue(OpKind::kSplit, StrCat("'", name, "'"), {}, {}, [&] {
    return ncclAllGather(mine_dev, table_dev, 3, ncclInt32, comm_, stream_);
  }));
  TANDEM_RETURN_IF_ERROR(Progress(/*block=*/true));
  std::vector<int32_t> table(3 * s_.size);
  {
    DeviceGuard guard(s_.device);
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(table.data(), table_dev, table.size() * sizeof(int32_t),
                                           cudaMemcpyDeviceToHost));
  }
  // 2. The new group: same color, ordered by (key, rank), as ncclCommSplit and MPI_Comm_split.
  std::vector<int> members;
  for (int r = 0; r < s_.size; ++r) {
    if (color != kNoColor && table[3 * r] == color) members.push_back(r);
  }
  std::stable_sort(members.begin(), members.end(),
                   [&](int a, int b) { return table[3 * a + 1] < table[3 * b + 1]; });
  std::vector<int> child_world;
  int child_rank = -1;
  for (int i = 0; i < static_cast<int>(members.size()); ++i) {
    child_world.push_back(table[3 * members[i] + 2]);
    if (members[i] == s_.rank) child_rank = i;
  }
  // 3. Its control channel (every rank just answered, so the blocking MPI split cannot hang).
  std::unique_ptr<ControlChannel> child_ctl;
  if (s_.ctl) {
    auto split = s_.ctl->Split(color, key, child_world);
    if (!split.ok()) return Fail(split.status(), true);
    child_ctl = std::move(*split);
  }
  // 4. The NCCL communicator, polled with the timeout.
  DeviceGuard guard(s_.device);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.commName = name.c_str();
  ncclComm_t child = nullptr;
  const ncclResult_t r =
      ncclCommSplit(comm_, color == kNoColor ? NCCL_SPLIT_NOCOLOR : color, key, &child, &config);
  Status ready = (r == ncclSuccess || r == ncclInProgress)
                     ? Status::Ok()
                     : InternalError(StrCat(Label(), ": ncclCommSplit: ", ncclGetErrorString(r),
                                            " (", ncclGetLastError(comm_), ")"));
  const Deadline deadline(s_.options.timeout_s);
  if (ready.ok()) ready = WaitReady(comm_, deadline, StrCat(Label(), ": ncclCommSplit"));
  if (ready.ok() && child) ready = WaitReady(child, deadline, StrCat(Label(), ": ncclCommSplit"));
  if (!ready.ok()) {
    if (child) ncclCommAbort(child);
    return Fail(ready, true);
  }
  if (color == kNoColor) return std::unique_ptr<Communicator>();
  int nccl_rank = -1;
  ncclCommUserRank(child, &nccl_rank);
  if (!child || nccl_rank != child_rank) {
    if (child) ncclCommAbort(child);
    return Fail(InternalError(StrCat(Label(), ": ncclCommSplit gave rank ", nccl_rank,
                                     ", expected ", child_rank)),
                true);
  }
  Setup setup;
  setup.name = std::move(name);
  setup.device = s_.device;
  setup.rank = child_rank;
  setup.size = static_cast<int>(members.size());
  setup.world_ranks = std::move(child_world);
  setup.options = s_.options;
  setup.ctl = std::move(child_ctl);
  TANDEM_ASSIGN_OR_RETURN(auto c, NcclCommunicator::Create(child, std::move(setup)));
  return std::unique_ptr<Communicator>(std::move(c));
}

Status NcclCommunicator::Abort(std::string reason) {
  if (closed_ || !broken_.ok()) return Status::Ok();
  Fail(AbortedError(StrCat(Label(), ": rank ", s_.rank, " aborted the group: ", reason)), true)
      .IgnoreError();
  return Status::Ok();
}

void NcclCommunicator::ReleaseHeld() {
  for (Pending& p : pending_) {
    // Buffers of operations that never finished may still be touched: keep them for good.
    if (cudaEventQuery(p.done.get()) != cudaSuccess) new std::vector<Tensor>(std::move(p.hold));
  }
  pending_.clear();
}

Status NcclCommunicator::Close() {
  if (closed_) return Status::Ok();
  Status result;
  if (broken_.ok()) result = Progress(/*block=*/true);
  if (comm_) {
    DeviceGuard guard(s_.device);
    const ncclResult_t r = ncclCommFinalize(comm_);
    Status s = (r == ncclSuccess || r == ncclInProgress)
                   ? WaitReady(comm_, Deadline(s_.options.timeout_s),
                               StrCat(Label(), ": ncclCommFinalize"))
                   : InternalError(StrCat(Label(), ": ncclCommFinalize: ", ncclGetErrorString(r)));
    if (s.ok()) {
      ncclCommDestroy(comm_);
      comm_ = nullptr;
    } else {
      AbortNccl();
      if (result.ok()) result = s;
    }
  }
  closed_ = true;
  ReleaseHeld();
  if (scratch_) {
    DeviceGuard guard(s_.device);
    cudaFree(scratch_);
    scratch_ = nullptr;
  }
  owned_stream_.reset();
  if (s_.ctl) {
    s_.ctl->Release(broken_.ok() && result.ok(), Deadline(std::min(s_.options.timeout_s, 10.0)));
  }
  return result;
}

}  // namespace internal

bool BuiltWithNccl() { return true; }

StatusOr<std::unique_ptr<Communicator>> CreateNcclWorld(Communicator& bootstrap, int device,
                                                        const CollectiveOptions& options) {
  using internal::Deadline;
  TANDEM_RETURN_IF_ERROR(internal::ValidateOptions(options));
  if (!bootstrap.device().is_cpu()) {
    return InvalidArgumentError(
        StrCat("CreateNcclWorld: the bootstrap must be a host communicator "
               "(mpi or threads), found '",
               bootstrap.backend(), "'"));
  }
  int count = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return InvalidArgumentError(StrCat("CreateNcclWorld: device ", device, " outside the ", count,
                                       " visible CUDA devices (rank ", bootstrap.rank(), ")"));
  }
  const int rank = bootstrap.rank(), size = bootstrap.size();
  // Rank 0's unique id reaches everyone through the bootstrap group (timed there).
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  Tensor id_bytes = Tensor::CpuZeros({static_cast<int64_t>(sizeof(id))}, DType::kU8);
  if (rank == 0) {
    TANDEM_NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id), nullptr);
    std::memcpy(id_bytes.raw_data(), &id, sizeof(id));
  }
  TANDEM_RETURN_IF_ERROR(bootstrap.Broadcast(id_bytes, 0));
  std::memcpy(&id, id_bytes.raw_data(), sizeof(id));
  internal::NcclCommunicator::Setup setup;
  setup.name = "world";
  setup.device = device;
  setup.rank = rank;
  setup.size = size;
  for (int r = 0; r < size; ++r) setup.world_ranks.push_back(bootstrap.WorldRank(r));
  setup.options = options;
  if (auto* mpi = dynamic_cast<internal::MpiCommunicator*>(&bootstrap)) {
    TANDEM_ASSIGN_OR_RETURN(setup.ctl, mpi->DupControlChannel(options.track_arrivals));
  }
  internal::DeviceGuard guard(device);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.commName = "world";
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  Status ready = (r == ncclSuccess || r == ncclInProgress)
                     ? internal::WaitReady(comm, Deadline(options.timeout_s),
                                           StrCat("group 'world' (nccl, rank ", rank, " of ", size,
                                                  "): ncclCommInitRankConfig on cuda:", device))
                     : InternalError(StrCat("ncclCommInitRankConfig: ", ncclGetErrorString(r), " (",
                                            ncclGetLastError(nullptr), ")"));
  if (!ready.ok()) {
    if (comm) ncclCommAbort(comm);
    if (setup.ctl) setup.ctl->NotifyAbort(ready);
    return ready;
  }
  TANDEM_ASSIGN_OR_RETURN(auto world, internal::NcclCommunicator::Create(comm, std::move(setup)));
  return std::unique_ptr<Communicator>(std::move(world));
}

}  // namespace tandem::collectives

#else  // !TANDEM_WITH_NCCL

namespace tandem::collectives {

bool BuiltWithNccl() { return false; }

StatusOr<std::unique_ptr<Communicator>> CreateNcclWorld(Communicator& bootstrap, int device,
                                                        const CollectiveOptions& options) {
  return UnimplementedError(
      "CreateNcclWorld: this build has no NCCL (CPU-only build, or nccl.h/libnccl not found)");
}

}  // namespace tandem::collectives

#endif  // TANDEM_WITH_NCCL

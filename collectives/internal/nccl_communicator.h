// The NCCL backend's communicator class, shared by nccl_communicator.cc (operations) and
// nccl_lifecycle.cc (creation, Split, Abort, Close). NCCL builds only.
#pragma once

#if defined(TANDEM_WITH_NCCL)

#include <cuda_runtime.h>
#include <nccl.h>

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "collectives/internal/common.h"
#include "collectives/internal/control_channel.h"
#include "core/stream.h"

namespace tandem::collectives::internal {

ncclDataType_t NcclType(DType d);
ncclRedOp_t NcclOp(ReduceOp op);
// Seconds a timed-out rank waits for rank 0's answer about who is missing.
double GraceSeconds(double timeout_s);
// Polls a nonblocking NCCL communicator until its pending host-side work (init, split, enqueue,
// finalize) is done. On timeout the caller aborts the communicator.
Status WaitReady(ncclComm_t comm, const Deadline& deadline, const std::string& what);

// Makes `device` current for the scope and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&saved_);
    if (saved_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(saved_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int saved_ = 0;
};

class NcclCommunicator final : public Communicator {
 public:
  struct Setup {
    std::string name;
    int device = 0;
    int rank = 0;
    int size = 1;
    std::vector<int> world_ranks;
    CollectiveOptions options;
    std::unique_ptr<ControlChannel> ctl;  // null: no arrival tracking
  };
  // Takes `comm` (ready) and everything else; allocates the stream (unless given) and scratch.
  static StatusOr<std::unique_ptr<NcclCommunicator>> Create(ncclComm_t comm, Setup setup);
  ~NcclCommunicator() override;

  int rank() const override { return s_.rank; }
  int size() const override { return s_.size; }
  std::string name() const override { return s_.name; }
  const char* backend() const override { return "nccl"; }
  Device device() const override { return Device::Cuda(s_.device); }
  int WorldRank(int group_rank) const override {
    TANDEM_CHECK(group_rank >= 0 && group_rank < s_.size);
    return s_.world_ranks[group_rank];
  }
  CudaStream stream() const override { return stream_; }

  Status AllReduce(Tensor& inout, ReduceOp op) override;
  Status ReduceScatter(Tensor& out, const Tensor& in, ReduceOp op) override;
  Status AllGather(Tensor& out, const Tensor& in) override;
  Status Broadcast(Tensor& inout, int root) override;
  Status Send(const Tensor& t, int peer, int tag) override;
  Status Recv(Tensor& t, int peer, int tag) override;
  Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src, int tag) override;
  Status Barrier() override;
  StatusOr<std::unique_ptr<Communicator>> Split(int color, int key, std::string name) override;
  Status Synchronize() override;
  Status Abort(std::string reason) override;
  Status Close() override;

 private:
  NcclCommunicator(ncclComm_t comm, Setup setup) : comm_(comm), s_(std::move(setup)) {}
  Status AllocateResources();  // the stream (unless given) and the scratch words

  struct Pending {
    CudaEventOwner done;
    std::vector<Tensor> hold;  // buffers the operation uses, alive until it completes
    std::string what;
    int64_t seq;  // collective number; 0 for point to point
    std::vector<int> peers;
    Deadline deadline;
  };
  std::string Label() const { return GroupLabel(s_.name, "nccl", s_.rank, s_.size); }
  Status CheckUsable();
  // Enqueues one operation made by `issue` (NCCL calls on comm_/stream_).
  Status Enqueue(OpKind kind, std::string what, std::vector<int> peers, std::vector<Tensor> hold,
                 const std::function<ncclResult_t()>& issue);
  // Retires finished operations; with `block`, waits for all of them. Checks deadlines, NCCL's
  // asynchronous errors and peers' abort notices; aborts the communicator on any failure.
  Status Progress(bool block);
  // The DeadlineExceeded error of operation `what` (collective #seq, or point to point with
  // `peers`), naming the missing ranks where the control channel knows them; OK when
  // `completed()` turns true while asking.
  Status TimedOut(const std::string& what, int64_t seq, const std::vector<int>& peers,
                  const std::function<bool()>& completed);
  // Aborts the NCCL communicator, tells the peers, and breaks the group with `status`.
  Status Fail(const Status& status, bool notify);
  void AbortNccl();
  void ReleaseHeld();

  ncclComm_t comm_;
  Setup s_;
  CudaStream stream_ = nullptr;
  std::unique_ptr<CudaStreamOwner> owned_stream_;
  int32_t* scratch_ = nullptr;  // device: [0] barrier word, then Split's exchange area
  std::deque<Pending> pending_;
  int64_t num_collectives_ = 0;
  Status broken_;
  bool closed_ = false;
};

}  // namespace tandem::collectives::internal

#endif  // TANDEM_WITH_NCCL

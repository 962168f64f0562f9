// The MPI backend: a Communicator over host tensors on one MPI communicator (see
// collectives/mpi.h for the contract). Visible inside the module so the NCCL backend can borrow
// an MPI group's control channel.
#pragma once

#include <mpi.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "collectives/internal/common.h"
#include "collectives/internal/control_channel.h"

namespace tandem::collectives::internal {

// MPI_Comm_idup of `comm`, polled until `deadline`.
StatusOr<MPI_Comm> DupComm(MPI_Comm comm, const Deadline& deadline, const std::string& what);

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm`; makes the control channel (a timed duplicate). Collective.
  static StatusOr<std::unique_ptr<MpiCommunicator>> Create(MPI_Comm comm, std::string name,
                                                           const CollectiveOptions& options);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return name_; }
  const char* backend() const override { return "mpi"; }
  Device device() const override { return Device::Cpu(); }
  int WorldRank(int group_rank) const override;

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

  // A new control channel over a timed duplicate of this group (for an NCCL group over the
  // same ranks). Collective.
  StatusOr<std::unique_ptr<ControlChannel>> DupControlChannel(bool track_arrivals);
  const std::vector<int>& world_ranks() const { return world_ranks_; }

 private:
  MpiCommunicator(MPI_Comm comm, std::string name, const CollectiveOptions& options);

  // What one operation is, for errors and the wait loop.
  struct Op {
    OpKind kind;
    std::string what;          // "AllReduce #3 of f32[7], sum"
    bool collective = true;    // tracked by the control channel
    std::vector<int> peers;    // point to point: the peers (named on timeout)
    std::vector<Tensor> hold;  // buffers MPI may still use if the op is abandoned
  };
  // Fails fast when closed or broken; handles pending abort notices.
  Status CheckUsable();
  // Starts an operation with `start` (fills up to 2 requests, returns an MPI error code) and
  // polls it to completion or the deadline. `statuses` (optional, 2 entries) receive the
  // requests' statuses.
  Status Run(Op op, const std::function<int(MPI_Request*, int*)>& start,
             MPI_Status* statuses = nullptr);
  Status Wait(Op& op, MPI_Request* reqs, int n, MPI_Status* statuses, int64_t seq,
              const Deadline& deadline);
  // Breaks the group with `status` (first failure wins) and returns the group's error.
  Status Break(const Status& status);
  std::string Label() const;
  Status CheckReceived(const MPI_Status& st, const Tensor& t, int peer) const;

  MPI_Comm comm_;
  std::unique_ptr<ControlChannel> ctl_;
  std::string name_;
  CollectiveOptions options_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<int> world_ranks_;
  int64_t num_collectives_ = 0;
  Status broken_;
  bool closed_ = false;
  // Buffers of operations abandoned after a failure (MPI may still touch them).
  std::vector<Tensor> orphan_buffers_;
};

}  // namespace tandem::collectives::internal

// The side channel of an MPI (or NCCL-over-MPI) group: arrival reports, "who is missing"
// queries and abort notices, on a private duplicate of the group's MPI communicator so that it
// never matches the group's own messages.
//
// Protocol (all messages small, sent with MPI_Isend and never waited for):
//   ARRIVE(seq)        every rank but 0 -> rank 0, at the start of collective #seq;
//   QUERY(seq)         rank r -> rank 0, after r timed out in collective #seq;
//   STATUS(seq, s0, missing...)  rank 0 -> r: rank 0's latest collective s0 and the ranks whose
//                      latest arrival is before seq; sent as the answer to a QUERY, and to
//                      every rank when rank 0 itself times out (so ranks whose deadline comes
//                      later need not ask);
//   PING(seq) / PONG(seq, s)  a rank that timed out in collective #seq -> every other rank, and
//                      the answer: the responder's latest collective s (a liveness check);
//   ABORT(code, text)  any rank -> every other rank, when it breaks the group.
// Every rank handles these whenever it is inside a call of this group (Service()): ranks waiting
// in the same collective answer, a dead rank (or one busy elsewhere) does not. So on a timeout
// a rank can tell "did not arrive" (rank 0's arrivals) from "arrived but does not answer" (died
// or hung inside the operation), and name the ranks either way. The first rank to time out
// breaks the group and its ABORT carries that diagnosis to the others.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "collectives/internal/common.h"
#include "core/status.h"

namespace tandem::collectives::internal {

class ControlChannel {
 public:
  // Owns `ctl`. `world_ranks[r]`: world rank of group rank r (for messages).
  ControlChannel(MPI_Comm ctl, std::vector<int> world_ranks, bool track_arrivals);
  ~ControlChannel();  // Release(false, ...): never frees a channel that was not drained
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  // Start of collective #seq on this rank.
  void Arrive(int64_t seq);
  // Handles pending control messages. Once an abort notice has arrived (and from then on)
  // returns the peer's error (its code, "rank r broke the group: " + its message); else OK.
  Status Service();

  struct Diagnosis {
    bool completed = false;  // the operation finished while we asked
    std::string text;        // "rank 3 (world 7) did not arrive" or why it is unknown
  };
  // After collective #seq timed out: which ranks did not arrive. Waits up to grace_s for rank
  // 0's answer, returning early when `completed()` becomes true.
  Diagnosis DiagnoseMissing(int64_t seq, double grace_s, const std::function<bool()>& completed);
  // Tells every other rank the group is broken by `error`. Best effort; never waits.
  void NotifyAbort(const Status& error);
  // Gives up the MPI communicator (idempotent). A communicator freed while messages are still on
  // their way can break a later one: Open MPI reuses its context id and matches the late
  // fragments there, which can stall it for good. So the channel is freed only when `healthy`
  // and drained (rank 0 has every arrival report of the collectives so far, and this rank's own
  // sends are done, waiting up to `deadline`); otherwise it is kept, unused, until exit.
  void Release(bool healthy, const Deadline& deadline);
  // The control channel of a subgroup: MPI_Comm_split of this one (blocking: call it only once
  // every rank is known to be here, e.g. right after a completed collective). nullptr for
  // kNoColor. Collective.
  StatusOr<std::unique_ptr<ControlChannel>> Split(int color, int key,
                                                  std::vector<int> child_world_ranks);
  bool tracking() const { return track_; }

 private:
  enum Tag : int { kArrive = 1, kQuery = 2, kStatus = 3, kAbort = 4, kPing = 5, kPong = 6 };
  struct PendingSend {
    MPI_Request request = MPI_REQUEST_NULL;
    std::vector<int64_t> words;
    std::string text;
  };
  void SendWords(int dst, Tag tag, std::vector<int64_t> words);
  void ReapSends();
  void Handle(const MPI_Status& st);
  std::vector<int> MissingAt(int64_t seq) const;  // rank 0 only
  // The diagnosis text from what arrived by now (arrivals, liveness answers).
  std::string Describe(int64_t seq);

  MPI_Comm ctl_;
  std::vector<int> world_ranks_;
  int rank_ = 0;
  int size_ = 1;
  bool track_;
  int64_t my_seq_ = 0;
  std::vector<int64_t> last_arrived_;                // rank 0: per rank, latest seq reported
  std::map<int64_t, std::vector<int64_t>> replies_;  // STATUS answers by seq
  std::map<int64_t, std::map<int, int64_t>> pongs_;  // by seq: responder -> its collective
  Status abort_notice_;
  std::list<PendingSend> sends_;
};

}  // namespace tandem::collectives::internal

// In-memory snapshots of a rank's training state in its node's agent (`tandem agent`,
// checkpoint/agent.h): after an update the rank begins version = step in its shared-memory slot
// and copies its state there (on CUDA: asynchronously on a side stream straight into the
// page-locked slot, overlapped with the next forward and backward); the copy is fenced before the
// next optimizer update changes the state, and committed to the agent on a background thread as
// soon as it lands (the agent publishes a version once every rank of the node committed it and its
// parity is on the other nodes).
//
// What a rank snapshots: the StatePieces it is given (the caller passes only unique bytes: every
// piece of a ZeRO-1 shard; the first dp x cp replica's pieces without ZeRO, nothing on the other
// replicas) after a header:
//   u64 header length | header JSON {"step", "meta", "pieces": [[name, begin, end, master dtype,
//   exp_avg dtype, exp_avg_sq dtype], ...]} | zero padding to 4096 | per piece: master, exp_avg,
//   exp_avg_sq (little-endian, each in its dtype: "f32", or "bf16" with optimizer.precision =
//   "bf16")
// Restore checks the pieces are the same (same mesh, model and state dtypes), else refuses.
//
// Consistency across nodes: before beginning version v the ranks agree (a world all-reduce) that
// every node published the previous one, so the newest version all nodes hold is never older than
// what any node has overwritten: restoring min over ranks of LatestComplete always finds it (the
// agent keeps the previous complete version until the next is published). A snapshot is skipped
// (and said) when a node is behind.
//
// Thread-safety: the trainer's thread; the background commit is internal.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/agent.h"
#include "collectives/communicator.h"
#include "core/status.h"
#include "core/stream.h"
#include "ops/context.h"
#include "trainer/config.h"
#include "trainer/internal/train_state.h"

namespace tandem::trainer::internal {

class Snapshotter {
 public:
  // Connects to the agent of this rank's node (cfg.agent_socket with "{node}" replaced) and
  // registers `world_rank` with room for `pieces`. `world` (null: one process) is used for the
  // version agreement; it must outlive the snapshotter.
  static StatusOr<std::unique_ptr<Snapshotter>> Open(const SnapshotSection& cfg,
                                                     collectives::Communicator* world,
                                                     int world_rank, int world_size,
                                                     std::vector<StatePiece> pieces,
                                                     ops::Context& ctx);
  ~Snapshotter();

  // After update `step`: begins the next version and starts copying (host state: copied now).
  // While the previous commit is still running (CRCs and parity of a large state can take longer
  // than an update), snapshot.when_busy = "wait" waits for it; "skip" skips this snapshot on
  // every rank alike, so snapshots are as frequent as the agent can take them and never stall
  // training; skipped() counts them.
  // Versions count up from the newest any agent of the job holds, so an agent that outlived an
  // older run never sees a version go back; the header carries the step.
  // `meta_json` goes into the header (data position, RNG state). Collective over `world`.
  Status Start(int64_t step, const std::string& meta_json);
  // Before the next optimizer update: waits for the copy (its commit already runs in the
  // background from the moment the copy lands).
  Status Fence();
  // Fence, then waits for the commit; its error, if any.
  Status Drain();

  // The newest version every rank's agent holds complete (collective); nullopt when some rank's
  // agent holds none.
  StatusOr<std::optional<uint64_t>> AgreedLatest();
  // Fetches version `version` from the agent and checks it, changing nothing yet; returns its step
  // and meta JSON. InvalidArgument when the snapshot's pieces differ from this rank's (another
  // mesh or model).
  StatusOr<std::pair<int64_t, std::string>> Restore(uint64_t version);
  // Copies what Restore fetched into the pieces. Called only once every rank's Restore succeeded,
  // so that a restore failing on one rank leaves every rank's state as it was (all fall back).
  Status ApplyRestore();

  const std::string& socket() const { return socket_; }
  int64_t taken() const { return taken_; }
  int64_t skipped() const { return skipped_; }
  // Where the snapshots' time went: "copy X ms, commit Y ms, updates waited Z ms per snapshot"
  // (empty before any snapshot; see Timings).
  std::string TimingSummary() const;

 private:
  Snapshotter() = default;
  StatusOr<uint8_t*> Begin(uint64_t version);
  std::string Header(int64_t step, const std::string& meta_json) const;

  collectives::Communicator* world_ = nullptr;
  int rank_ = 0;
  std::string socket_;
  ops::Context* ctx_ = nullptr;
  std::vector<StatePiece> pieces_;
  uint64_t capacity_ = 0;
  std::optional<checkpoint::AgentClient> client_;
  // CUDA: the side stream, its events and the page-locked slots.
  std::optional<CudaStreamOwner> stream_;
  std::optional<CudaEventOwner> ready_, copied_;
  // [pipelined CRC] Recorded after each group of the copy; reused across versions (the commit
  // thread that waits on them is joined before the next Start records them again).
  std::vector<CudaEventOwner> group_events_;
  std::map<uint8_t*, HostRegistration> registered_;
  // The version being copied (fence pending) and the background commit.
  std::optional<uint64_t> copying_;
  std::thread commit_;
  std::atomic<bool> committing_{false};
  int64_t taken_ = 0, skipped_ = 0;
  // Where the time of the snapshots taken went, in seconds summed over them: the copy (from its
  // enqueueing, after the slot was page-locked on first use, to its landing; on CUDA each 512 MB
  // group is checksummed as it lands, so this includes all but the last group's CRC), the commit
  // (the rest of the checksum and the agent's COMMIT, which publishes the version: its own check
  // of the CRC and, across nodes, the parity), and how long the training thread waited in Fence
  // and for a previous commit (the overhead an update sees).
  struct Timings {
    double copy_s = 0, commit_s = 0, waited_s = 0;
  };
  // copy_s and commit_s are written by the commit thread (read after joining it).
  Timings timings_;
  std::chrono::steady_clock::time_point started_at_;
  bool skip_when_busy_ = false;
  Status commit_status_;
  // What Restore fetched, applied by ApplyRestore: the bytes and where the data begins.
  std::optional<checkpoint::MappedShard> fetched_;
  uint64_t fetched_data_ = 0;
  uint64_t last_started_ = 0;  // 0: none yet
  uint64_t next_version_ = 1;
};

}  // namespace tandem::trainer::internal

// ops::Profiler: where the time of one window of work on a context goes (issue #4), per op
// category ("gemm", "attention_fwd", "norm", "optimizer", ...), plus the gap the categories do not
// explain (the stream idle while the host prepares the next op, host<->device copies,
// collectives, anything unlabelled).
//
// Every public op in ops/*.cc opens a ProfileScope named by its category. With no profiler
// attached to the context (the default) a scope costs one pointer test. While a window is open,
// a CUDA context records a pair of CUDA events on its stream around each op (events come from a
// pool the profiler keeps: 4096 made by Begin before the window starts, more only for a window
// of over 2047 ops, all reused by later windows); a CPU context reads the steady clock instead.
// Times are therefore the device's: the time the stream spent between the op's first and last
// kernel, idle moments inside an op included.
// Regions nest (an op that calls another op): only the outermost counts, so the categories never
// add up to more than the window.
//
//   ops::Profiler prof;
//   TANDEM_RETURN_IF_ERROR(prof.Begin(ctx));   // waits for ctx's earlier work, attaches
//   ... forward, backward, optimizer on ctx ...
//   TANDEM_RETURN_IF_ERROR(prof.End());        // detaches; does not wait
//   TANDEM_ASSIGN_OR_RETURN(ops::ProfileReport r, prof.Collect());  // waits once
//   std::fprintf(stderr, "%s", r.ToTable().c_str());
//
// Ownership: the profiler owns its events (released by its destructor); the context only points
// to it between Begin and End, so the profiler must outlive End. Thread-safety: like the
// Context, one thread at a time.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "ops/context.h"

namespace tandem::ops {

// One category's share of the window.
struct ProfileEntry {
  std::string name;
  int64_t calls = 0;    // outermost regions of this name
  double total_ms = 0;  // their summed time
  double flops = 0;     // floating-point operations the ops reported (ProfileScope::AddFlops)
  // Achieved TFLOP/s over this category's time; 0 when no flops were reported.
  double Tflops() const { return total_ms > 0 ? flops / (total_ms * 1e9) : 0.0; }
};

struct ProfileReport {
  std::vector<ProfileEntry> entries;  // by total_ms, largest first (ties: by name)
  double wall_ms = 0;     // Begin to End on the device's timeline (the stream's events on CUDA)
  double host_ms = 0;     // Begin to End on the host's steady clock
  double regions_ms = 0;  // sum of entries' total_ms
  double gap_ms = 0;      // wall_ms - regions_ms (never negative: clamped at timer resolution)
  bool cuda = false;      // timed with CUDA events

  // The entry called `name`, or null.
  const ProfileEntry* Find(std::string_view name) const;
  // A fixed-width table: category, calls, ms, % of the window, TFLOP/s where known; then the
  // gap and the window itself. Lines end with '\n'.
  std::string ToTable() const;
};

class Profiler {
 public:
  Profiler();
  ~Profiler();
  Profiler(const Profiler&) = delete;
  Profiler& operator=(const Profiler&) = delete;

  // Opens a window on `ctx`: waits for the work already queued on it (so it does not count),
  // attaches this profiler (ctx.set_profiler(this)) and records the start. FailedPrecondition
  // when a window is open or ended but not collected, or when ctx has another profiler.
  Status Begin(Context& ctx);
  // Records the end of the window and detaches from the context. Does not wait.
  Status End();
  // Waits once for the window's work and returns the report; the profiler may then Begin
  // again. FailedPrecondition unless a window was ended; the first CUDA error any region met.
  StatusOr<ProfileReport> Collect();

  // For ProfileScope. `name` must outlive Collect() (a string literal).
  void Enter(const char* name);
  void Exit();
  void AddFlops(double flops);

 private:
  struct Region {
    const char* name;
    int64_t start_ns;  // host clock (CPU contexts)
    int64_t end_ns;
    int start_event;  // indices into events_ (CUDA contexts)
    int end_event;
    double flops;
  };
  enum class State { kIdle, kOpen, kEnded };

  int64_t NowNs() const;
  // Records a pooled event on the context's stream; returns its index, or -1 (error noted).
  int RecordEvent();
  // Creates events until the pool holds `count` (CUDA builds; a no-op otherwise).
  Status GrowEvents(size_t count);
  void NoteError(const std::string& what);
  void ReleaseEvents();
  StatusOr<double> EventMs(int from, int to);

  State state_ = State::kIdle;
  Context* ctx_ = nullptr;
  bool cuda_ = false;
  int depth_ = 0;  // open scopes; only depth 0 -> 1 starts a region
  std::vector<Region> regions_;
  std::vector<void*> events_;  // cudaEvent_t pool, reused across windows
  int events_used_ = 0;
  int events_device_ = -1;  // the device the pool's events belong to
  int begin_event_ = -1, end_event_ = -1;
  int64_t begin_ns_ = 0, end_ns_ = 0;
  Status error_;
};

// Times the enclosing op as one region of category `name` (a string literal) when the context
// has a profiler; otherwise does nothing beyond one pointer test.
class ProfileScope {
 public:
  ProfileScope(Context& ctx, const char* name) : profiler_(ctx.profiler()) {
    if (profiler_ != nullptr) [[unlikely]]
      profiler_->Enter(name);
  }
  ~ProfileScope() {
    if (profiler_ != nullptr) [[unlikely]]
      profiler_->Exit();
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

  // Whether a profiler is timing this op (guard work done only to report flops).
  bool active() const { return profiler_ != nullptr; }
  // Adds the op's floating-point operations (e.g. 2*M*N*K for a GEMM) to the open region.
  void AddFlops(double flops) {
    if (profiler_ != nullptr) profiler_->AddFlops(flops);
  }

 private:
  Profiler* profiler_;
};

}  // namespace tandem::ops

#include "ops/profiler.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem::ops {
namespace {

// Events created up front by Begin: two per op, enough for a 1.1B Llama update (~1,000 ops).
constexpr size_t kPreparedEvents = 4096;

#ifdef TANDEM_WITH_CUDA
cudaEvent_t AsEvent(void* e) { return static_cast<cudaEvent_t>(e); }
#endif

std::string FormatRow(const char* name, const std::string& calls, double ms, double wall_ms,
                      const std::string& tflops) {
  char line[160];
  const double pct = wall_ms > 0 ? 100.0 * ms / wall_ms : 0.0;
  std::snprintf(line, sizeof(line), "%-16s %8s %12.3f %7.1f%% %9s", name, calls.c_str(), ms, pct,
                tflops.c_str());
  std::string row = line;
  row.erase(row.find_last_not_of(' ') + 1);  // no trailing blanks where TFLOP/s is unknown
  return row + "\n";
}

}  // namespace

const ProfileEntry* ProfileReport::Find(std::string_view name) const {
  for (const ProfileEntry& e : entries) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

std::string ProfileReport::ToTable() const {
  char head[160];
  std::snprintf(head, sizeof(head), "%-16s %8s %12s %8s %9s\n", "category", "calls", "ms", "% step",
                "TFLOP/s");
  std::string out = head;
  for (const ProfileEntry& e : entries) {
    char tf[32] = "";
    if (e.flops > 0) std::snprintf(tf, sizeof(tf), "%.1f", e.Tflops());
    out += FormatRow(e.name.c_str(), std::to_string(e.calls), e.total_ms, wall_ms, tf);
  }
  out += FormatRow("(gap)", "", gap_ms, wall_ms, "");
  out += FormatRow(cuda ? "step (stream)" : "step (wall)", "", wall_ms, wall_ms, "");
  return out;
}

Profiler::Profiler() = default;

Profiler::~Profiler() {
  if (state_ == State::kOpen) ctx_->set_profiler(nullptr);  // never left dangling
  ReleaseEvents();
}

void Profiler::ReleaseEvents() {
#ifdef TANDEM_WITH_CUDA
  for (void* e : events_) cudaEventDestroy(AsEvent(e));
#endif
  events_.clear();
  events_used_ = 0;
}

int64_t Profiler::NowNs() const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Profiler::NoteError(const std::string& what) {
  if (error_.ok()) error_ = InternalError(StrCat("ops::Profiler: ", what));
}

Status Profiler::GrowEvents(size_t count) {
#ifdef TANDEM_WITH_CUDA
  while (events_.size() < count) {
    cudaEvent_t e = nullptr;
    const cudaError_t err = cudaEventCreate(&e);
    if (err != cudaSuccess) {
      return InternalError(StrCat("ops::Profiler: cudaEventCreate on ", ctx_->device().ToString(),
                                  ": ", cudaGetErrorString(err)));
    }
    events_.push_back(e);
  }
#endif
  return Status::Ok();
}

int Profiler::RecordEvent() {
#ifdef TANDEM_WITH_CUDA
  if (events_used_ == static_cast<int>(events_.size())) {
    const Status grown = GrowEvents(events_.size() + 1);
    if (!grown.ok()) {
      if (error_.ok()) error_ = grown;
      return -1;
    }
  }
  const int index = events_used_++;
  const cudaError_t err =
      cudaEventRecord(AsEvent(events_[index]), reinterpret_cast<cudaStream_t>(ctx_->stream()));
  if (err != cudaSuccess) {
    NoteError(
        StrCat("cudaEventRecord on ", ctx_->device().ToString(), ": ", cudaGetErrorString(err)));
    return -1;
  }
  return index;
#else
  return -1;
#endif
}

Status Profiler::Begin(Context& ctx) {
  if (state_ != State::kIdle) {
    return FailedPreconditionError(
        StrCat("ops::Profiler::Begin on ", ctx.device().ToString(), ": expected no open window, ",
               "found one ", state_ == State::kOpen ? "open" : "ended but not collected"));
  }
  if (ctx.profiler() != nullptr) {
    return FailedPreconditionError(StrCat("ops::Profiler::Begin: the context on ",
                                          ctx.device().ToString(), " already has a profiler"));
  }
  TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
  ctx_ = &ctx;
  cuda_ = ctx.is_cuda();
  if (cuda_) {
    if (events_device_ != ctx.device().index) {
      ReleaseEvents();  // events belong to the device they were made on
      events_device_ = ctx.device().index;
    }
    // Made before the window so that creating them costs the window nothing; a window with
    // more ops grows the pool as it goes.
    TANDEM_RETURN_IF_ERROR(GrowEvents(kPreparedEvents));
  }
  regions_.clear();
  regions_.reserve(kPreparedEvents / 2);  // kept by later windows
  events_used_ = 0;
  depth_ = 0;
  error_ = Status::Ok();
  begin_ns_ = NowNs();
  begin_event_ = cuda_ ? RecordEvent() : -1;
  ctx.set_profiler(this);
  state_ = State::kOpen;
  return error_;
}

Status Profiler::End() {
  if (state_ != State::kOpen) {
    return FailedPreconditionError(
        "ops::Profiler::End: expected an open window (Begin), found none");
  }
  TANDEM_CHECK_MSG(depth_ == 0, "ops::Profiler::End inside an op's ProfileScope");
  end_event_ = cuda_ ? RecordEvent() : -1;
  end_ns_ = NowNs();
  ctx_->set_profiler(nullptr);
  state_ = State::kEnded;
  return error_;
}

void Profiler::Enter(const char* name) {
  if (depth_++ > 0) return;  // nested: the outermost region covers it
  Region r{name, 0, 0, -1, -1, 0.0};
  if (cuda_) {
    r.start_event = RecordEvent();
  } else {
    r.start_ns = NowNs();
  }
  regions_.push_back(r);
}

void Profiler::Exit() {
  TANDEM_CHECK_MSG(depth_ > 0, "ops::Profiler::Exit without Enter");
  if (--depth_ > 0) return;
  Region& r = regions_.back();
  if (cuda_) {
    r.end_event = RecordEvent();
  } else {
    r.end_ns = NowNs();
  }
}

void Profiler::AddFlops(double flops) {
  if (depth_ > 0) regions_.back().flops += flops;
}

StatusOr<double> Profiler::EventMs(int from, int to) {
#ifdef TANDEM_WITH_CUDA
  if (from < 0 || to < 0) return 0.0;  // the record failed; error_ says why
  float ms = 0;
  const cudaError_t err = cudaEventElapsedTime(&ms, AsEvent(events_[from]), AsEvent(events_[to]));
  if (err != cudaSuccess) {
    return InternalError(StrCat("ops::Profiler: cudaEventElapsedTime on ",
                                ctx_->device().ToString(), ": ", cudaGetErrorString(err)));
  }
  return static_cast<double>(ms);
#else
  return 0.0;
#endif
}

StatusOr<ProfileReport> Profiler::Collect() {
  if (state_ != State::kEnded) {
    return FailedPreconditionError(
        StrCat("ops::Profiler::Collect: expected an ended window, found ",
               state_ == State::kOpen ? "one still open" : "none"));
  }
  state_ = State::kIdle;
  TANDEM_RETURN_IF_ERROR(error_);
  TANDEM_RETURN_IF_ERROR(ctx_->Synchronize());  // every event of the window has completed
  ProfileReport report;
  report.cuda = cuda_;
  report.host_ms = static_cast<double>(end_ns_ - begin_ns_) * 1e-6;
  if (cuda_) {
    TANDEM_ASSIGN_OR_RETURN(report.wall_ms, EventMs(begin_event_, end_event_));
  } else {
    report.wall_ms = report.host_ms;
  }
  std::map<std::string_view, ProfileEntry> by_name;
  for (const Region& r : regions_) {
    double ms = static_cast<double>(r.end_ns - r.start_ns) * 1e-6;
    if (cuda_) {
      TANDEM_ASSIGN_OR_RETURN(ms, EventMs(r.start_event, r.end_event));
    }
    ProfileEntry& e = by_name[r.name];
    ++e.calls;
    e.total_ms += ms;
    e.flops += r.flops;
  }
  for (auto& [name, entry] : by_name) {
    entry.name = std::string(name);
    report.regions_ms += entry.total_ms;
    report.entries.push_back(std::move(entry));
  }
  std::sort(report.entries.begin(), report.entries.end(),
            [](const ProfileEntry& a, const ProfileEntry& b) {
              return a.total_ms != b.total_ms ? a.total_ms > b.total_ms : a.name < b.name;
            });
  // Disjoint regions inside the window: the sum exceeds the wall only by event resolution.
  report.gap_ms = std::max(0.0, report.wall_ms - report.regions_ms);
  return report;
}

}  // namespace tandem::ops

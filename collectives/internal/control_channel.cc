#include "collectives/internal/control_channel.h"

#include <algorithm>
#include <cstdlib>

#include "collectives/internal/common.h"
#include "collectives/internal/mpi_check.h"
#include "collectives/communicator.h"

namespace tandem::collectives::internal {

std::string MpiErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return StrCat("MPI error ", code);
  return std::string(text, len);
}

bool MpiActive() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

ControlChannel::ControlChannel(MPI_Comm ctl, std::vector<int> world_ranks, bool track_arrivals)
    : ctl_(ctl), world_ranks_(std::move(world_ranks)), track_(track_arrivals) {
  MPI_Comm_rank(ctl_, &rank_);
  MPI_Comm_size(ctl_, &size_);
  MPI_Comm_set_errhandler(ctl_, MPI_ERRORS_RETURN);
  last_arrived_.assign(size_, 0);
}

ControlChannel::~ControlChannel() { Release(/*healthy=*/false, Deadline(0)); }

void ControlChannel::Release(bool healthy, const Deadline& deadline) {
  if (ctl_ == MPI_COMM_NULL) return;
  if (!MpiActive()) {
    ctl_ = MPI_COMM_NULL;
    return;
  }
  Backoff backoff;
  bool drained = healthy;
  while (drained) {
    Service().IgnoreError();
    bool done = sends_.empty();
    if (rank_ == 0 && track_) {
      for (int r = 0; r < size_; ++r) done = done && last_arrived_[r] >= my_seq_;
    }
    if (done) break;
    if (deadline.Expired()) drained = false;
    backoff.Pause();
  }
  if (drained) {
    MPI_Comm_free(&ctl_);
  } else if (!sends_.empty()) {
    // MPI may still read the buffers of unfinished sends: keep them (nodes are not moved).
    auto* kept = new std::list<PendingSend>;
    kept->splice(kept->end(), sends_);
  }
  ctl_ = MPI_COMM_NULL;
}

void ControlChannel::SendWords(int dst, Tag tag, std::vector<int64_t> words) {
  PendingSend& p = sends_.emplace_back();
  p.words = std::move(words);
  if (MPI_Isend(p.words.data(), static_cast<int>(p.words.size()), MPI_INT64_T, dst, tag, ctl_,
                &p.request) != MPI_SUCCESS) {
    sends_.pop_back();  // best effort: a failed report only makes a later diagnosis vaguer
  }
}

void ControlChannel::ReapSends() {
  for (auto it = sends_.begin(); it != sends_.end();) {
    int done = 0;
    MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
    it = done ? sends_.erase(it) : std::next(it);
  }
}

void ControlChannel::Arrive(int64_t seq) {
  my_seq_ = seq;
  if (rank_ == 0) {
    last_arrived_[0] = seq;
  } else if (track_ && ctl_ != MPI_COMM_NULL) {
    SendWords(0, kArrive, {seq});
  }
}

void ControlChannel::Handle(const MPI_Status& st) {
  const int src = st.MPI_SOURCE;
  if (st.MPI_TAG == kAbort) {
    int len = 0;
    MPI_Get_count(&st, MPI_CHAR, &len);
    std::string text(std::max(len, 0), '\0');
    MPI_Recv(text.data(), len, MPI_CHAR, src, kAbort, ctl_, MPI_STATUS_IGNORE);
    // "<code>|<message>"; the peer's status code travels so a timeout stays a timeout.
    const size_t bar = text.find('|');
    int code = static_cast<int>(StatusCode::kAborted);
    if (bar != std::string::npos) code = std::atoi(text.substr(0, bar).c_str());
    if (code <= 0 || code > static_cast<int>(StatusCode::kInternal)) {
      code = static_cast<int>(StatusCode::kAborted);
    }
    if (abort_notice_.ok()) {
      abort_notice_ = Status(static_cast<StatusCode>(code),
                             StrCat("rank ", RankList({src}, world_ranks_), " broke the group: ",
                                    bar == std::string::npos ? text : text.substr(bar + 1)));
    }
    return;
  }
  int count = 0;
  MPI_Get_count(&st, MPI_INT64_T, &count);
  std::vector<int64_t> words(std::max(count, 0));
  MPI_Recv(words.data(), count, MPI_INT64_T, src, st.MPI_TAG, ctl_, MPI_STATUS_IGNORE);
  if (words.empty()) return;
  if (st.MPI_TAG == kArrive && rank_ == 0) {
    last_arrived_[src] = std::max(last_arrived_[src], words[0]);
  } else if (st.MPI_TAG == kQuery && rank_ == 0) {
    std::vector<int64_t> reply = {words[0], my_seq_};
    for (int r : MissingAt(words[0])) reply.push_back(r);
    SendWords(src, kStatus, std::move(reply));
  } else if (st.MPI_TAG == kStatus) {
    replies_[words[0]] = std::move(words);
  }
}

Status ControlChannel::Service() {
  if (ctl_ == MPI_COMM_NULL) return abort_notice_;
  ReapSends();
  // A message already delivered may match only on the probe after the one that progressed it
  // (ob1), so stop after two empty probes: a notice sent before this call is seen by it.
  for (int empty = 0; empty < 2;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, ctl_, &flag, &st) != MPI_SUCCESS) break;
    if (!flag) {
      ++empty;
      continue;
    }
    Handle(st);
  }
  return abort_notice_;
}

std::vector<int> ControlChannel::MissingAt(int64_t seq) const {
  std::vector<int> missing;
  for (int r = 0; r < size_; ++r) {
    if (last_arrived_[r] < seq) missing.push_back(r);
  }
  return missing;
}

ControlChannel::Diagnosis ControlChannel::DiagnoseMissing(
    int64_t seq, double grace_s, const std::function<bool()>& completed) {
  Diagnosis d;
  if (!track_ || ctl_ == MPI_COMM_NULL) {
    d.text = "arrival tracking is off, so the missing ranks are unknown";
    return d;
  }
  auto phrase = [&](const std::vector<int>& missing) {
    if (missing.empty()) {
      return std::string("every rank arrived (a rank died inside the operation, or ranks "
                         "called different operations)");
    }
    return StrCat(missing.size() > 1 ? "ranks " : "rank ", RankList(missing, world_ranks_),
                  " did not arrive");
  };
  if (rank_ == 0) {
    Service().IgnoreError();
    const std::vector<int> missing = MissingAt(seq);
    d.text = phrase(missing);
    std::vector<int64_t> status = {seq, my_seq_};
    status.insert(status.end(), missing.begin(), missing.end());
    for (int r = 1; r < size_; ++r) SendWords(r, kStatus, status);
    return d;
  }
  Service().IgnoreError();
  if (!replies_.count(seq)) SendWords(0, kQuery, {seq});
  Deadline deadline(grace_s);
  Backoff backoff;
  while (!deadline.Expired()) {
    Service().IgnoreError();
    auto it = replies_.find(seq);
    if (it != replies_.end()) {
      const std::vector<int64_t>& w = it->second;
      std::vector<int> missing(w.begin() + 2, w.end());  // includes 0 when rank 0 is behind
      d.text = phrase(missing);
      if (w[1] < seq) d.text += StrCat(" (rank 0 is at collective #", w[1], ")");
      return d;
    }
    if (completed()) {
      d.completed = true;
      return d;
    }
    backoff.Pause();
  }
  d.text = StrCat("rank ", RankList({0}, world_ranks_), " (which tracks arrivals) did not answer within ",
                  grace_s, " s, so it is missing or stuck outside this group; other ranks unknown");
  return d;
}

void ControlChannel::NotifyAbort(const Status& error) {
  if (ctl_ == MPI_COMM_NULL) return;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    PendingSend& p = sends_.emplace_back();
    p.text = StrCat(static_cast<int>(error.code()), "|", error.message());
    if (MPI_Isend(p.text.data(), static_cast<int>(p.text.size()), MPI_CHAR, r, kAbort, ctl_,
                  &p.request) != MPI_SUCCESS) {
      sends_.pop_back();
    }
  }
}

StatusOr<std::unique_ptr<ControlChannel>> ControlChannel::Split(
    int color, int key, std::vector<int> child_world_ranks) {
  MPI_Comm child = MPI_COMM_NULL;
  TANDEM_MPI_RETURN_IF_ERROR(
      MPI_Comm_split(ctl_, color == kNoColor ? MPI_UNDEFINED : color, key, &child));
  if (child == MPI_COMM_NULL) return std::unique_ptr<ControlChannel>();
  return std::make_unique<ControlChannel>(child, std::move(child_world_ranks), track_);
}

}  // namespace tandem::collectives::internal

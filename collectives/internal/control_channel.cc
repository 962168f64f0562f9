#include "collectives/internal/control_channel.h"

#include <algorithm>
#include <cstdlib>

#include "collectives/communicator.h"
#include "collectives/internal/common.h"
#include "collectives/internal/mpi_check.h"

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
  } else if (st.MPI_TAG == kPing) {
    SendWords(src, kPong, {words[0], my_seq_});
  } else if (st.MPI_TAG == kPong && words.size() == 2) {
    pongs_[words[0]][src] = words[1];
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

ControlChannel::Diagnosis ControlChannel::DiagnoseMissing(int64_t seq, double grace_s,
                                                          const std::function<bool()>& completed) {
  Diagnosis d;
  if (ctl_ == MPI_COMM_NULL) {
    d.text = "the missing ranks are unknown (no control channel)";
    return d;
  }
  Service().IgnoreError();
  for (int r = 0; r < size_; ++r) {
    if (r != rank_) SendWords(r, kPing, {seq});
  }
  if (track_ && rank_ == 0) {
    // Rank 0 knows the arrivals: tell everyone, so ranks timing out later need not ask.
    std::vector<int64_t> status = {seq, my_seq_};
    for (int r : MissingAt(seq)) status.push_back(r);
    for (int r = 1; r < size_; ++r) SendWords(r, kStatus, status);
  } else if (track_ && !replies_.count(seq)) {
    SendWords(0, kQuery, {seq});
  }
  auto answered = [&] {
    return static_cast<int>(pongs_[seq].size()) == size_ - 1 &&
           (!track_ || rank_ == 0 || replies_.count(seq) > 0);
  };
  Deadline deadline(grace_s);
  Backoff backoff;
  while (!answered() && !deadline.Expired()) {
    if (completed()) {
      d.completed = true;
      return d;
    }
    backoff.Pause();
    Service().IgnoreError();
  }
  d.text = Describe(seq);
  return d;
}

std::string ControlChannel::Describe(int64_t seq) {
  const std::map<int, int64_t>& pong = pongs_[seq];
  auto answers = [&](int r) { return r == rank_ || pong.count(r) > 0; };
  auto ranks = [&](const std::vector<int>& rs) {
    return StrCat(rs.size() > 1 ? "ranks " : "rank ", RankList(rs, world_ranks_));
  };
  std::vector<std::string> parts;
  std::vector<int> missing;
  bool known = false;
  if (track_ && rank_ == 0) {
    missing = MissingAt(seq);
    known = true;
  } else if (auto it = replies_.find(seq); track_ && it != replies_.end()) {
    missing.assign(it->second.begin() + 2, it->second.end());  // includes 0 if it is behind
    known = true;
  }
  std::vector<int> silent_inside, silent, behind;
  for (int r = 0; r < size_; ++r) {
    const bool is_missing = std::find(missing.begin(), missing.end(), r) != missing.end();
    if (known && is_missing) {
      parts.push_back(StrCat(ranks({r}), " did not arrive",
                             answers(r) ? StrCat(" (it answers, at collective #", pong.at(r), ")")
                                        : std::string(" (no answer: dead, or busy outside this "
                                                      "group)")));
    } else if (!answers(r)) {
      (known ? silent_inside : silent).push_back(r);
    } else if (!known && r != rank_ && pong.at(r) < seq) {
      behind.push_back(r);
    }
  }
  if (!silent_inside.empty()) {
    parts.push_back(StrCat(ranks(silent_inside), " arrived but ",
                           silent_inside.size() > 1 ? "do" : "does",
                           " not answer: died or hung inside the operation"));
  }
  if (!known && track_) {
    parts.push_back(StrCat("which ranks arrived is unknown (rank ", RankList({0}, world_ranks_),
                           ", which tracks arrivals, did not answer)"));
  }
  if (!silent.empty()) {
    parts.push_back(StrCat(ranks(silent), silent.size() > 1 ? " do" : " does",
                           " not answer: dead, or busy outside this group"));
  }
  for (int r : behind) {
    parts.push_back(StrCat(ranks({r}), " answers but is at collective #", pong.at(r)));
  }
  if (parts.empty()) {
    parts.push_back(known ? "every rank arrived and answers (ranks called different operations?)"
                          : "every rank answers (arrival tracking is off)");
  }
  std::string text;
  for (size_t i = 0; i < parts.size(); ++i) text += (i ? "; " : "") + parts[i];
  return text;
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

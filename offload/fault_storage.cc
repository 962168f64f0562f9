// FaultInjectingStorage: deterministic short transfers, EIO and ENOSPC in front of any Storage.
#include <cerrno>

#include "core/rng.h"
#include "offload/internal/io_error.h"
#include "offload/storage.h"

namespace tandem::offload {

struct FaultInjectingStorage::Pending {
  IoTicket ticket = 0;
  IoTicket inner_ticket = 0;
  std::vector<int> inner_index;      // per outer request: index in the inner batch, or -1
  std::vector<IoResult> injected;    // per outer request: the injected status (OK: none)
  std::vector<bool> short_injected;  // per outer request: forwarded only a prefix
};

FaultInjectingStorage::FaultInjectingStorage(Storage* inner, const FaultOptions& options)
    : inner_(inner), options_(options) {
  TANDEM_CHECK(inner_ != nullptr);
}

FaultInjectingStorage::~FaultInjectingStorage() = default;

StatusOr<IoTicket> FaultInjectingStorage::Submit(std::span<const IoRequest> requests) {
  std::lock_guard<std::mutex> lock(mu_);
  auto pending = std::make_unique<Pending>();
  pending->inner_index.assign(requests.size(), -1);
  pending->injected.resize(requests.size());
  pending->short_injected.assign(requests.size(), false);
  std::vector<IoRequest> forward;
  for (size_t i = 0; i < requests.size(); ++i) {
    IoRequest r = requests[i];
    const bool is_write = r.kind == IoKind::kWrite;
    const std::string what = StrCat("injected fault: ", is_write ? "write" : "read", " of ",
                                    r.num_bytes, " bytes at offset ", r.offset, " of ", path());
    // Draws depend only on (seed, sequence number): the same requests give the same faults.
    Rng rng(options_.seed, sequence_++);
    const float u_eio = rng.Uniform();
    const float u_short = rng.Uniform();
    const uint32_t cut = rng.NextU32();
    if (u_eio < options_.eio_probability) {
      pending->injected[i].status = internal::ErrnoStatus(EIO, what);
      ++stats_.eio;
      continue;
    }
    if (is_write && options_.enospc_after_bytes >= 0) {
      const int64_t room = options_.enospc_after_bytes - bytes_written_;
      if (room < static_cast<int64_t>(r.num_bytes)) {
        pending->injected[i].status = internal::ErrnoStatus(ENOSPC, what);
        ++stats_.enospc;
        if (room <= 0) continue;
        r.num_bytes = static_cast<size_t>(room);  // the bytes that fit are stored
      }
    }
    const double p_short =
        is_write ? options_.short_write_probability : options_.short_read_probability;
    if (r.num_bytes > 1 && u_short < p_short && pending->injected[i].status.ok()) {
      r.num_bytes = 1 + cut % (r.num_bytes - 1);  // 1 .. n-1 bytes
      pending->short_injected[i] = true;
      ++(is_write ? stats_.short_writes : stats_.short_reads);
    }
    if (is_write) bytes_written_ += static_cast<int64_t>(r.num_bytes);
    pending->inner_index[i] = static_cast<int>(forward.size());
    forward.push_back(r);
  }
  TANDEM_ASSIGN_OR_RETURN(pending->inner_ticket, inner_->Submit(forward));
  pending->ticket = next_ticket_++;
  const IoTicket ticket = pending->ticket;
  pending_.push_back(std::move(pending));
  return ticket;
}

StatusOr<std::vector<IoResult>> FaultInjectingStorage::Wait(IoTicket ticket) {
  std::unique_ptr<Pending> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = pending_.begin(); it != pending_.end(); ++it) {
      if ((*it)->ticket != ticket) continue;
      pending = std::move(*it);
      pending_.erase(it);
      break;
    }
  }
  if (pending == nullptr) return NotFoundError(StrCat(path(), ": no pending ticket ", ticket));
  TANDEM_ASSIGN_OR_RETURN(std::vector<IoResult> inner, inner_->Wait(pending->inner_ticket));
  std::vector<IoResult> results(pending->injected.size());
  for (size_t i = 0; i < results.size(); ++i) {
    const int k = pending->inner_index[i];
    if (k >= 0) {
      results[i] = inner[k];
      if (results[i].status.ok()) results[i].status = pending->injected[i].status;
    } else {
      results[i] = pending->injected[i];
    }
  }
  return results;
}

FaultStats FaultInjectingStorage::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace tandem::offload

// AdapterLoader: one thread that reads LoRA adapters from disk into host f32 copies for the
// serving engine (serve/internal/engine_impl.h), so the engine thread never waits on a disk read:
// it asks for an adapter (Request), goes on batching the requests whose adapters are ready, and
// picks the copies up at its next iteration (TakeDone).
//
// Ownership: the loader owns its thread and the copies until they are taken; it keeps a
// reference to each requested AdapterEntry but never touches its fields (the engine thread
// installs the copy). `read` and `on_done` must stay valid until the destructor returns.
// Thread-safety: Request, TakeDone and pending are for one thread (the engine's); `read` and
// `on_done` run on the loader's thread.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "ops/context.h"
#include "peft/lora.h"

namespace tandem::serve::internal {

struct AdapterEntry;

// An adapter read from disk: f32 on the host, in its own CPU context.
struct HostAdapter {
  std::unique_ptr<ops::Context> ctx;
  std::unique_ptr<peft::LoraAdapter> lora;
};

class AdapterLoader {
 public:
  using ReadFn = std::function<StatusOr<HostAdapter>(const AdapterEntry& entry)>;
  struct Done {
    std::shared_ptr<AdapterEntry> entry;
    StatusOr<HostAdapter> result;
  };

  // `read` reads one adapter (it may only read the entry's name and path, which never change);
  // `on_done` is called after each read (e.g. to wake the engine thread).
  AdapterLoader(ReadFn read, std::function<void()> on_done);
  ~AdapterLoader();  // finishes the read in flight, drops the queue, joins
  AdapterLoader(const AdapterLoader&) = delete;
  AdapterLoader& operator=(const AdapterLoader&) = delete;

  // Queues a read of `entry` unless one is queued, in flight or done and not yet taken.
  void Request(const std::shared_ptr<AdapterEntry>& entry);
  // Whether a read of `entry` is queued, in flight or done and not yet taken.
  bool Pending(const AdapterEntry* entry) const;
  // The finished reads since the last call, in completion order.
  std::vector<Done> TakeDone();

 private:
  void Run();

  ReadFn read_;
  std::function<void()> on_done_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::deque<std::shared_ptr<AdapterEntry>> queue_;  // guarded by mu_
  const AdapterEntry* in_flight_ = nullptr;          // guarded by mu_
  std::vector<Done> done_;                           // guarded by mu_
  std::thread thread_;
};

}  // namespace tandem::serve::internal

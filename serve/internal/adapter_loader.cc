// AdapterLoader (serve/internal/adapter_loader.h).
#include "serve/internal/adapter_loader.h"

#include <algorithm>

namespace tandem::serve::internal {

AdapterLoader::AdapterLoader(ReadFn read, std::function<void()> on_done)
    : read_(std::move(read)), on_done_(std::move(on_done)) {
  thread_ = std::thread([this] { Run(); });
}

AdapterLoader::~AdapterLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  thread_.join();
}

bool AdapterLoader::Pending(const AdapterEntry* entry) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (in_flight_ == entry) return true;
  for (const auto& e : queue_) {
    if (e.get() == entry) return true;
  }
  for (const Done& d : done_) {
    if (d.entry.get() == entry) return true;
  }
  return false;
}

void AdapterLoader::Request(const std::shared_ptr<AdapterEntry>& entry) {
  if (Pending(entry.get())) return;
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_back(entry);
  cv_.notify_all();
}

std::vector<AdapterLoader::Done> AdapterLoader::TakeDone() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Done> out;
  out.swap(done_);
  return out;
}

void AdapterLoader::Run() {
  while (true) {
    std::shared_ptr<AdapterEntry> entry;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      entry = std::move(queue_.front());
      queue_.pop_front();
      in_flight_ = entry.get();
    }
    StatusOr<HostAdapter> result = read_(*entry);  // the disk read, outside the lock
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_ = nullptr;
      done_.push_back({std::move(entry), std::move(result)});
    }
    on_done_();
  }
}

}  // namespace tandem::serve::internal

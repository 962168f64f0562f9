// InProcessFabric: Transport endpoints that hand messages to each other through queues in one
// process (unit tests of code built on Transport, without sockets).
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>

#include "collectives/fabric.h"
#include "collectives/internal/fabric_common.h"

namespace tandem::collectives {

struct InProcessFabric::Hub {
  std::mutex mu;
  std::condition_variable cv;
  std::map<int, std::deque<FabricMessage>> queues;  // by endpoint number
  int next_endpoint = 0;
};

namespace {

class InProcessTransport final : public Transport {
 public:
  InProcessTransport(std::shared_ptr<InProcessFabric::Hub> hub, int number,
                     const FabricOptions& options)
      : hub_(std::move(hub)), number_(number), options_(options),
        rate_(options.rate_limit_bytes_per_s) {}
  ~InProcessTransport() override {
    std::lock_guard<std::mutex> lock(hub_->mu);
    hub_->queues.erase(number_);
  }

  std::string address() const override { return StrCat("inproc:", number_); }
  std::string host_port() const override { return ""; }
  std::string provider() const override { return "inproc"; }

  StatusOr<int> AddPeer(const std::string& address) override {
    int n = -1;
    if (address.rfind("inproc:", 0) == 0) n = std::atoi(address.c_str() + 7);
    std::lock_guard<std::mutex> lock(hub_->mu);
    if (n < 0 || !hub_->queues.count(n)) {
      return InvalidArgumentError(StrCat("in-process fabric: no endpoint at '", address, "'"));
    }
    peers_.push_back(n);
    return static_cast<int>(peers_.size() - 1);
  }

  Status Send(int peer, uint64_t tag, std::span<const uint8_t> bytes, double timeout_s) override {
    if (peer < 0 || peer >= static_cast<int>(peers_.size())) {
      return InvalidArgumentError(StrCat("in-process fabric: send to unknown peer ", peer));
    }
    for (size_t off = 0; off < bytes.size(); off += options_.chunk_bytes) {
      rate_.Acquire(std::min(options_.chunk_bytes, bytes.size() - off));
    }
    std::lock_guard<std::mutex> lock(hub_->mu);
    auto it = hub_->queues.find(peers_[peer]);
    if (it == hub_->queues.end()) {
      return UnavailableError(StrCat("in-process fabric: endpoint ", peers_[peer], " is closed"));
    }
    it->second.push_back({options_.self_id, tag, {bytes.begin(), bytes.end()}});
    hub_->cv.notify_all();
    return Status::Ok();
  }

  StatusOr<FabricMessage> Recv(double timeout_s) override {
    std::unique_lock<std::mutex> lock(hub_->mu);
    auto& q = hub_->queues[number_];
    if (!hub_->cv.wait_for(lock, std::chrono::duration<double>(timeout_s),
                           [&] { return !q.empty(); })) {
      return DeadlineExceededError(StrCat("in-process fabric: no message within ", timeout_s,
                                          " s"));
    }
    FabricMessage m = std::move(q.front());
    q.pop_front();
    return m;
  }

 private:
  std::shared_ptr<InProcessFabric::Hub> hub_;
  int number_;
  FabricOptions options_;
  internal::RateLimiter rate_;
  std::vector<int> peers_;
};

}  // namespace

InProcessFabric::InProcessFabric() : hub_(std::make_shared<Hub>()) {}
InProcessFabric::~InProcessFabric() = default;

std::unique_ptr<Transport> InProcessFabric::CreateEndpoint(const FabricOptions& options) {
  std::lock_guard<std::mutex> lock(hub_->mu);
  int n = hub_->next_endpoint++;
  hub_->queues[n];
  return std::make_unique<InProcessTransport>(hub_, n, options);
}

}  // namespace tandem::collectives

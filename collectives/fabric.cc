// The libfabric Transport: one FI_EP_RDM endpoint with tagged sends, a transmit and a receive
// completion queue, an address vector of peers. Wire protocol (docs/formats.md): a 32-byte
// WireHeader on tag 0, then the payload in chunks on tags DataTag(sender, seq, chunk).
#include "collectives/fabric.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_tagged.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#include "collectives/internal/fabric_common.h"

namespace tandem::collectives {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kWireMagic = 0x57464e54;  // "TNFW"
constexpr uint64_t kHeaderTag = 0;
constexpr uint64_t kDataBit = uint64_t{1} << 63;
constexpr size_t kWindow = 8;  // chunks in flight per message

struct WireHeader {
  uint32_t magic;
  uint32_t source_id;
  uint64_t tag;
  uint64_t num_bytes;
  uint32_t seq;
  uint32_t chunk_bytes;
};
static_assert(sizeof(WireHeader) == 32);

uint64_t DataTag(uint32_t source, uint32_t seq, uint64_t chunk) {
  return kDataBit | (uint64_t{source & 0x7fff} << 48) | (uint64_t{seq & 0xffffff} << 24) |
         (chunk & 0xffffff);
}

// One posted operation; its address is the libfabric context.
struct Op {
  fi_context2 ctx;
  std::atomic<int> state{0};  // 0 pending, 1 done, -1 failed
  int error = 0;              // positive FI_* error code when failed
};

// What one Send owns until every chunk completes (kept alive past a timeout: see Abandon).
struct SendState {
  WireHeader header;
  std::vector<uint8_t> data;
  std::vector<std::unique_ptr<Op>> ops;
};

struct RecvState {
  std::vector<uint8_t> data;
  std::vector<std::unique_ptr<Op>> ops;
};

class FabricTransport final : public Transport {
 public:
  explicit FabricTransport(const FabricOptions& o) : options_(o), rate_(o.rate_limit_bytes_per_s) {}
  ~FabricTransport() override;

  Status Init(const std::string& provider);
  std::string address() const override { return address_; }
  std::string host_port() const override { return host_port_; }
  std::string provider() const override { return provider_; }
  StatusOr<int> AddPeer(const std::string& address) override;
  Status Send(int peer, uint64_t tag, std::span<const uint8_t> bytes, double timeout_s) override;
  StatusOr<FabricMessage> Recv(double timeout_s) override;

 private:
  Status Post(bool send, void* buf, size_t len, fi_addr_t addr, uint64_t tag, Op* op,
              Clock::time_point deadline);
  Status PollCq(fid_cq* cq);
  Status Wait(fid_cq* cq, const std::vector<Op*>& ops, Clock::time_point deadline,
              const char* what);
  Status PostHeaderRecv();
  Status Broken() const;
  Status Break(Status s);

  FabricOptions options_;
  internal::RateLimiter rate_;
  std::string provider_, address_, host_port_;
  fi_info* info_ = nullptr;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  fid_av* av_ = nullptr;
  fid_cq* tx_cq_ = nullptr;
  fid_cq* rx_cq_ = nullptr;
  fid_ep* ep_ = nullptr;

  mutable std::mutex mu_;  // serializes every fi_* call (FI_THREAD_DOMAIN) and the fields below
  std::vector<fi_addr_t> peers_;
  Status broken_;
  std::vector<std::unique_ptr<SendState>> abandoned_sends_;
  std::vector<std::unique_ptr<RecvState>> abandoned_recvs_;
  std::atomic<uint32_t> seq_{0};

  std::mutex recv_mu_;  // one Recv at a time
  WireHeader header_buf_{};
  Op header_op_;
};

FabricTransport::~FabricTransport() {
  if (ep_) fi_close(&ep_->fid);
  if (av_) fi_close(&av_->fid);
  if (tx_cq_) fi_close(&tx_cq_->fid);
  if (rx_cq_) fi_close(&rx_cq_->fid);
  if (domain_) fi_close(&domain_->fid);
  if (fabric_) fi_close(&fabric_->fid);
  if (info_) fi_freeinfo(info_);
}

std::string Hex(const uint8_t* p, size_t n) {
  static const char* kDigits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += kDigits[p[i] >> 4];
    s += kDigits[p[i] & 15];
  }
  return s;
}

Status FabricTransport::Init(const std::string& provider) {
  fi_info* hints = fi_allocinfo();
  TANDEM_CHECK(hints != nullptr);
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = FI_TAGGED;
  hints->mode = FI_CONTEXT | FI_CONTEXT2;
  hints->domain_attr->threading = FI_THREAD_DOMAIN;
  hints->domain_attr->mr_mode = 0;
  hints->fabric_attr->prov_name = strdup(provider.c_str());
  const std::string port = std::to_string(options_.bind_port);
  int rc = fi_getinfo(FI_VERSION(1, 9), options_.bind_host.c_str(), port.c_str(), FI_SOURCE,
                      hints, &info_);
  fi_freeinfo(hints);
  if (rc != 0) {
    info_ = nullptr;
    return UnavailableError(StrCat("libfabric: no provider '", provider, "' for an RDM endpoint",
                                   " on ", options_.bind_host, ":", port, ": ", fi_strerror(-rc)));
  }
  provider_ = info_->fabric_attr->prov_name;
  TANDEM_FI_RETURN_IF_ERROR(fi_fabric(info_->fabric_attr, &fabric_, nullptr), provider_);
  TANDEM_FI_RETURN_IF_ERROR(fi_domain(fabric_, info_, &domain_, nullptr), provider_);
  fi_cq_attr cq_attr{};
  cq_attr.format = FI_CQ_FORMAT_CONTEXT;
  cq_attr.size = 256;
  cq_attr.wait_obj = FI_WAIT_NONE;
  TANDEM_FI_RETURN_IF_ERROR(fi_cq_open(domain_, &cq_attr, &tx_cq_, nullptr), "tx cq");
  TANDEM_FI_RETURN_IF_ERROR(fi_cq_open(domain_, &cq_attr, &rx_cq_, nullptr), "rx cq");
  fi_av_attr av_attr{};
  av_attr.type = FI_AV_UNSPEC;
  TANDEM_FI_RETURN_IF_ERROR(fi_av_open(domain_, &av_attr, &av_, nullptr), provider_);
  TANDEM_FI_RETURN_IF_ERROR(fi_endpoint(domain_, info_, &ep_, nullptr), provider_);
  TANDEM_FI_RETURN_IF_ERROR(fi_ep_bind(ep_, &tx_cq_->fid, FI_TRANSMIT), "tx cq");
  TANDEM_FI_RETURN_IF_ERROR(fi_ep_bind(ep_, &rx_cq_->fid, FI_RECV), "rx cq");
  TANDEM_FI_RETURN_IF_ERROR(fi_ep_bind(ep_, &av_->fid, 0), "av");
  TANDEM_FI_RETURN_IF_ERROR(fi_enable(ep_), provider_);
  uint8_t name[256];
  size_t len = sizeof(name);
  TANDEM_FI_RETURN_IF_ERROR(fi_getname(&ep_->fid, name, &len), provider_);
  address_ = "fi:" + Hex(name, len);
  if (len == sizeof(sockaddr_in) && reinterpret_cast<sockaddr_in*>(name)->sin_family == AF_INET) {
    const auto* sin = reinterpret_cast<sockaddr_in*>(name);
    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
    host_port_ = StrCat(host, ":", ntohs(sin->sin_port));
  }
  std::lock_guard<std::mutex> lock(mu_);
  return PostHeaderRecv();
}

StatusOr<int> FabricTransport::AddPeer(const std::string& address) {
  std::vector<uint8_t> raw;
  if (address.rfind("fi:", 0) == 0) {
    const std::string hex = address.substr(3);
    if (hex.empty() || hex.size() % 2 || hex.find_first_not_of("0123456789abcdef") != std::string::npos) {
      return InvalidArgumentError(StrCat("fabric: bad address '", address, "'"));
    }
    for (size_t i = 0; i < hex.size(); i += 2) {
      raw.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    }
  } else {
    size_t colon = address.rfind(':');
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    int port = colon == std::string::npos ? -1 : std::atoi(address.c_str() + colon + 1);
    if (port <= 0 || port > 65535 ||
        inet_pton(AF_INET, address.substr(0, colon).c_str(), &sin.sin_addr) != 1) {
      return InvalidArgumentError(StrCat("fabric: expected 'fi:<hex>' or 'ipv4:port', found '",
                                         address, "'"));
    }
    sin.sin_port = htons(static_cast<uint16_t>(port));
    raw.assign(reinterpret_cast<uint8_t*>(&sin), reinterpret_cast<uint8_t*>(&sin) + sizeof(sin));
  }
  std::lock_guard<std::mutex> lock(mu_);
  fi_addr_t addr = FI_ADDR_UNSPEC;
  int n = fi_av_insert(av_, raw.data(), 1, &addr, 0, nullptr);
  if (n != 1) {
    return InvalidArgumentError(StrCat("fabric (", provider_, "): fi_av_insert of '", address,
                                       "' failed: ", n < 0 ? fi_strerror(-n) : "not inserted"));
  }
  peers_.push_back(addr);
  return static_cast<int>(peers_.size() - 1);
}

Status FabricTransport::Broken() const {
  std::lock_guard<std::mutex> lock(mu_);
  return broken_;
}

Status FabricTransport::Break(Status s) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_.ok()) broken_ = s;
  return s;
}

Status FabricTransport::PostHeaderRecv() {  // caller holds mu_
  header_op_.state = 0;
  ssize_t rc = fi_trecv(ep_, &header_buf_, sizeof(header_buf_), nullptr, FI_ADDR_UNSPEC,
                        kHeaderTag, 0, &header_op_.ctx);
  TANDEM_FI_RETURN_IF_ERROR(rc, "posting the message-header receive");
  return Status::Ok();
}

Status FabricTransport::Post(bool send, void* buf, size_t len, fi_addr_t addr, uint64_t tag,
                             Op* op, Clock::time_point deadline) {
  for (;;) {
    ssize_t rc;
    {
      std::lock_guard<std::mutex> lock(mu_);
      rc = send ? fi_tsend(ep_, buf, len, nullptr, addr, tag, &op->ctx)
                : fi_trecv(ep_, buf, len, nullptr, FI_ADDR_UNSPEC, tag, 0, &op->ctx);
    }
    if (rc == 0) return Status::Ok();
    if (rc != -FI_EAGAIN) {
      return UnavailableError(StrCat("fabric (", provider_, "): ", send ? "fi_tsend" : "fi_trecv",
                                     " of ", len, " bytes failed: ", fi_strerror(-rc)));
    }
    TANDEM_RETURN_IF_ERROR(PollCq(send ? tx_cq_ : rx_cq_));  // progress, then retry
    if (Clock::now() > deadline) {
      return DeadlineExceededError(StrCat("fabric: could not post a ", len, "-byte ",
                                          send ? "send" : "receive", " before the deadline"));
    }
    std::this_thread::yield();
  }
}

Status FabricTransport::PollCq(fid_cq* cq) {
  fi_cq_entry entries[16];
  std::lock_guard<std::mutex> lock(mu_);
  for (;;) {
    ssize_t n = fi_cq_read(cq, entries, 16);
    if (n == -FI_EAGAIN) return Status::Ok();
    if (n == -FI_EAVAIL) {
      fi_cq_err_entry err{};
      if (fi_cq_readerr(cq, &err, 0) == 1 && err.op_context) {
        Op* op = static_cast<Op*>(err.op_context);
        op->error = err.err;
        op->state = -1;
      }
      continue;
    }
    if (n < 0) return InternalError(StrCat("fabric: fi_cq_read: ", fi_strerror(-n)));
    for (ssize_t i = 0; i < n; ++i) static_cast<Op*>(entries[i].op_context)->state = 1;
  }
}

Status FabricTransport::Wait(fid_cq* cq, const std::vector<Op*>& ops, Clock::time_point deadline,
                             const char* what) {
  for (int round = 0;; ++round) {
    TANDEM_RETURN_IF_ERROR(PollCq(cq));
    bool all = true;
    for (Op* op : ops) {
      if (op->state < 0) {
        return UnavailableError(StrCat("fabric (", provider_, "): ", what, " failed: ",
                                       fi_strerror(op->error)));
      }
      all = all && op->state == 1;
    }
    if (all) return Status::Ok();
    if (Clock::now() > deadline) {
      return DeadlineExceededError(StrCat("fabric (", provider_, "): ", what,
                                          " did not complete before the deadline"));
    }
    if (round > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

Status FabricTransport::Send(int peer, uint64_t tag, std::span<const uint8_t> bytes,
                             double timeout_s) {
  TANDEM_RETURN_IF_ERROR(Broken());
  fi_addr_t addr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (peer < 0 || peer >= static_cast<int>(peers_.size())) {
      return InvalidArgumentError(StrCat("fabric: send to peer ", peer, ", expected 0..",
                                         peers_.size() - 1));
    }
    addr = peers_[peer];
  }
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeout_s));
  auto st = std::make_unique<SendState>();
  st->data.assign(bytes.begin(), bytes.end());
  const uint32_t seq = seq_++;
  const size_t chunk = options_.chunk_bytes;
  st->header = {kWireMagic, options_.self_id, tag, bytes.size(), seq, static_cast<uint32_t>(chunk)};
  const size_t num_chunks = (bytes.size() + chunk - 1) / chunk;
  st->ops.push_back(std::make_unique<Op>());
  Status s = Post(true, &st->header, sizeof(WireHeader), addr, kHeaderTag, st->ops[0].get(),
                  deadline);
  std::vector<Op*> inflight = {st->ops[0].get()};
  for (size_t c = 0; s.ok() && c < num_chunks; ++c) {
    if (inflight.size() >= kWindow) {  // keep at most kWindow chunks posted
      s = Wait(tx_cq_, {inflight.front()}, deadline, "send");
      inflight.erase(inflight.begin());
      if (!s.ok()) break;
    }
    const size_t len = std::min(chunk, bytes.size() - c * chunk);
    rate_.Acquire(len);
    st->ops.push_back(std::make_unique<Op>());
    s = Post(true, st->data.data() + c * chunk, len, addr,
             DataTag(options_.self_id, seq, c), st->ops.back().get(), deadline);
    inflight.push_back(st->ops.back().get());
  }
  if (s.ok()) s = Wait(tx_cq_, inflight, deadline, "send");
  if (s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& op : st->ops) {
    if (op->state == 0) fi_cancel(&ep_->fid, &op->ctx);
  }
  abandoned_sends_.push_back(std::move(st));  // the provider may still touch it
  return s.WithContext(StrCat("send of ", bytes.size(), " bytes to peer ", peer));
}

StatusOr<FabricMessage> FabricTransport::Recv(double timeout_s) {
  std::lock_guard<std::mutex> recv_lock(recv_mu_);
  TANDEM_RETURN_IF_ERROR(Broken());
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeout_s));
  Status s = Wait(rx_cq_, {&header_op_}, deadline, "receive of a message header");
  if (s.code() == StatusCode::kDeadlineExceeded) return s;  // nothing arrived: still usable
  if (!s.ok()) return Break(s);
  const WireHeader h = header_buf_;
  // The message has started: its chunks get their own deadline, however little of timeout_s is
  // left (an idle poll with a short timeout must not drop a message that begins at its end).
  const auto chunk_deadline = std::max(
      deadline, Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(options_.message_timeout_s)));
  {
    std::lock_guard<std::mutex> lock(mu_);
    TANDEM_RETURN_IF_ERROR(PostHeaderRecv());
  }
  if (h.magic != kWireMagic || h.chunk_bytes == 0) {
    return Break(DataLossError(StrCat("fabric: message header with bad magic 0x", std::hex,
                                      h.magic, " or chunk size 0")));
  }
  auto st = std::make_unique<RecvState>();
  st->data.resize(h.num_bytes);
  const size_t chunk = h.chunk_bytes, num_chunks = (h.num_bytes + chunk - 1) / chunk;
  std::vector<Op*> inflight;
  for (size_t c = 0; s.ok() && c < num_chunks; ++c) {
    if (inflight.size() >= kWindow) {
      s = Wait(rx_cq_, {inflight.front()}, chunk_deadline, "receive");
      inflight.erase(inflight.begin());
      if (!s.ok()) break;
    }
    st->ops.push_back(std::make_unique<Op>());
    s = Post(false, st->data.data() + c * chunk, std::min(chunk, h.num_bytes - c * chunk),
             FI_ADDR_UNSPEC, DataTag(h.source_id, h.seq, c), st->ops.back().get(), chunk_deadline);
    inflight.push_back(st->ops.back().get());
  }
  if (s.ok()) s = Wait(rx_cq_, inflight, chunk_deadline, "receive");
  if (!s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& op : st->ops) {
      if (op->state == 0) fi_cancel(&ep_->fid, &op->ctx);
    }
    abandoned_recvs_.push_back(std::move(st));
    // Not DeadlineExceeded: that code means "nothing arrived", this message was lost midway.
    return AbortedError(StrCat("message of ", h.num_bytes, " bytes from endpoint ", h.source_id,
                               " lost midway: ", s.message()));
  }
  return FabricMessage{h.source_id, h.tag, std::move(st->data)};
}

}  // namespace

namespace internal {

void RateLimiter::Acquire(size_t num_bytes) {
  if (bytes_per_s_ <= 0) return;
  Clock::time_point start;
  {
    std::lock_guard<std::mutex> lock(mu_);
    start = std::max(next_, Clock::now());
    next_ = start + std::chrono::duration_cast<Clock::duration>(
                        std::chrono::duration<double>(num_bytes / bytes_per_s_));
  }
  std::this_thread::sleep_until(start);
}

}  // namespace internal

StatusOr<std::unique_ptr<Transport>> CreateFabricTransport(const FabricOptions& options) {
  if (options.self_id >= 32768 || options.chunk_bytes == 0 || options.chunk_bytes > (1u << 30)) {
    return InvalidArgumentError(StrCat("fabric: expected self_id < 32768 and 0 < chunk_bytes <= ",
                                       "1 GiB, found ", options.self_id, " and ",
                                       options.chunk_bytes));
  }
  std::vector<std::string> tried = {options.provider};
  if (options.provider == "tcp") tried.push_back("sockets");
  Status last;
  for (const std::string& p : tried) {
    auto t = std::make_unique<FabricTransport>(options);
    last = t->Init(p);
    if (last.ok()) return std::unique_ptr<Transport>(std::move(t));
    if (last.code() != StatusCode::kUnavailable) return last;
  }
  return last;
}

}  // namespace tandem::collectives

#include "checkpoint/internal/agent_peers.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <set>

#include "core/logging.h"

namespace tandem::checkpoint::internal {
namespace {

using Clock = std::chrono::steady_clock;

enum Tag : uint64_t { kFragment = 1, kAck = 2, kFetch = 3, kFetchReply = 4 };
constexpr int kVersionsHeld = 2;  // per owner: the newest and the one before

template <typename T>
void Put(std::vector<uint8_t>* out, const T& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out->insert(out->end(), p, p + sizeof(T));
}
template <typename T>
bool Get(std::span<const uint8_t> in, size_t* off, T* v) {
  if (*off + sizeof(T) > in.size()) return false;
  std::memcpy(v, in.data() + *off, sizeof(T));
  *off += sizeof(T);
  return true;
}

// The version in a fragment's header when the header itself is intact and names `owner` (its
// payload may still be corrupt); 0 otherwise. For messages only.
uint64_t HeaderVersionIfIntact(std::span<const uint8_t> fragment, int owner) {
  FragmentHeader h;
  if (fragment.size() < sizeof(h)) return 0;
  std::memcpy(&h, fragment.data(), sizeof(h));
  const bool intact = h.magic == kFragmentMagic &&
                      Crc32(0, &h, offsetof(FragmentHeader, header_crc32)) == h.header_crc32;
  return intact && h.owner_node == static_cast<uint32_t>(owner) ? h.snapshot_version : 0;
}

}  // namespace

StatusOr<std::unique_ptr<PeerGroup>> PeerGroup::Create(const PeerGroupOptions& o) {
  const int n = static_cast<int>(o.group.size());
  const int k = o.k > 0 ? o.k : n - o.m;
  if (n < 2 || k + o.m != n || o.node < 0 || o.node >= n) {
    return InvalidArgumentError(StrCat("agent group: expected k + m == group size and node < ",
                                       "group size, found k=", k, " m=", o.m, " group of ", n,
                                       " node ", o.node));
  }
  TANDEM_ASSIGN_OR_RETURN(ErasureCoder coder, ErasureCoder::Create(k, o.m));
  std::unique_ptr<PeerGroup> g(new PeerGroup(o, std::move(coder)));
  const std::string& self = o.group[o.node];
  const size_t colon = self.rfind(':');
  collectives::FabricOptions fo;
  fo.provider = o.provider;
  fo.bind_host = self.substr(0, colon);
  fo.bind_port = colon == std::string::npos ? 0 : std::atoi(self.c_str() + colon + 1);
  fo.self_id = static_cast<uint32_t>(o.node);
  fo.rate_limit_bytes_per_s = o.rate_limit_bytes_per_s;
  TANDEM_ASSIGN_OR_RETURN(g->transport_, collectives::CreateFabricTransport(fo));
  for (int i = 0; i < n; ++i) {
    if (i == o.node) {
      g->handle_.push_back(-1);
      continue;
    }
    TANDEM_ASSIGN_OR_RETURN(int h, g->transport_->AddPeer(o.group[i]));
    g->handle_.push_back(h);
  }
  g->thread_ = std::thread([p = g.get()] { p->ReceiveLoop(); });
  return g;
}

PeerGroup::~PeerGroup() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void PeerGroup::ReceiveLoop() {
  while (!stop_) {
    StatusOr<collectives::FabricMessage> m = transport_->Recv(0.1);
    if (m.ok()) {
      Handle(std::move(*m));
    } else if (m.status().code() != StatusCode::kDeadlineExceeded) {
      TANDEM_LOG(WARNING, "agent") << "peer receive: " << m.status().ToString();
    }
  }
}

void PeerGroup::Handle(collectives::FabricMessage msg) {
  const int from = static_cast<int>(msg.source_id);
  if (from < 0 || from >= static_cast<int>(handle_.size()) || handle_[from] < 0) return;
  const double t = options_.timeout_s;
  if (msg.tag == kFragment) {
    StatusOr<FragmentHeader> h = ParseFragment(msg.bytes);
    uint8_t ok = h.ok() ? 1 : 0;
    std::vector<uint8_t> ack;
    Put(&ack, h.ok() ? h->snapshot_version : uint64_t{0});
    Put(&ack, ok);
    if (h.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      auto& versions = held_[h->owner_node];
      versions[h->snapshot_version] = std::move(msg.bytes);
      while (versions.size() > kVersionsHeld) versions.erase(versions.begin());
    } else {
      TANDEM_LOG(WARNING, "agent") << "fragment from node " << from << " refused: "
                                   << h.status().ToString();
    }
    transport_->Send(handle_[from], kAck, ack, t).IgnoreError();
  } else if (msg.tag == kAck) {
    uint64_t version = 0;
    uint8_t ok = 0;
    size_t off = 0;
    if (Get(msg.bytes, &off, &version) && Get(msg.bytes, &off, &ok)) {
      std::lock_guard<std::mutex> lock(mu_);
      acks_[{version, from}] = ok != 0;
      cv_.notify_all();
    }
  } else if (msg.tag == kFetch) {
    uint64_t request = 0;
    size_t off = 0;
    if (!Get(msg.bytes, &off, &request)) return;
    std::vector<uint8_t> reply;
    Put(&reply, request);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [version, frag] : held_[static_cast<uint32_t>(from)]) {
        Put(&reply, static_cast<uint64_t>(frag.size()));
        reply.insert(reply.end(), frag.begin(), frag.end());
      }
    }
    TANDEM_LOG(INFO, "agent") << "rebuild request " << request << " from node " << from
                              << ": replying with " << reply.size() << " bytes";
    Status sent = transport_->Send(handle_[from], kFetchReply, reply, t);
    if (!sent.ok()) {
      TANDEM_LOG(WARNING, "agent") << "reply to node " << from << "'s rebuild request " << request
                                   << " not sent: " << sent.message();
    }
  } else if (msg.tag == kFetchReply) {
    uint64_t request = 0, len = 0;
    size_t off = 0;
    if (!Get(msg.bytes, &off, &request)) return;
    std::vector<std::vector<uint8_t>> frags;
    while (Get(msg.bytes, &off, &len) && off + len <= msg.bytes.size()) {
      frags.emplace_back(msg.bytes.begin() + off, msg.bytes.begin() + off + len);
      off += len;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (replies_.count(request)) replies_[request][from] = std::move(frags);
    cv_.notify_all();
  }
}

Status PeerGroup::Distribute(uint64_t version, std::span<const uint8_t> image) {
  const int n = coder_.n();
  TANDEM_ASSIGN_OR_RETURN(auto frags, EncodeFragments(coder_, image, version,
                                                      static_cast<uint32_t>(options_.node)));
  for (int j = 1; j < n; ++j) {
    const int dest = (options_.node + j) % n;
    Status s = transport_->Send(handle_[dest], kFragment, frags[j], options_.timeout_s);
    if (!s.ok()) {
      return UnavailableError(StrCat("agent node ", options_.node, ": fragment ", j, " of version ",
                                     version, " to node ", dest, " (", options_.group[dest],
                                     "): ", s.message()));
    }
  }
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(options_.timeout_s));
  std::unique_lock<std::mutex> lock(mu_);
  for (int j = 1; j < n; ++j) {
    const int dest = (options_.node + j) % n;
    if (!cv_.wait_until(lock, deadline, [&] { return acks_.count({version, dest}) > 0; })) {
      return DeadlineExceededError(StrCat("agent node ", options_.node, ": node ", dest,
                                          " did not acknowledge its fragment of version ", version,
                                          " within ", options_.timeout_s, " s"));
    }
    if (!acks_[{version, dest}]) {
      return DataLossError(StrCat("agent node ", options_.node, ": node ", dest,
                                  " received a corrupt fragment of version ", version));
    }
  }
  std::erase_if(acks_, [&](const auto& e) { return e.first.first <= version; });
  return Status::Ok();
}

StatusOr<std::vector<std::pair<uint64_t, std::vector<uint8_t>>>> PeerGroup::Rebuild() {
  uint64_t request;
  {
    std::lock_guard<std::mutex> lock(mu_);
    request = next_request_++;
    replies_[request];
  }
  std::vector<uint8_t> ask;
  Put(&ask, request);
  // Asks every peer, and asks again each second those that have not answered (under load a
  // freshly restarted agent's first request once went unanswered within the timeout; why is not
  // known). A peer that answers twice overwrites its own reply.
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(options_.timeout_s));
  std::set<int> asked;
  std::map<int, std::vector<std::vector<uint8_t>>> got;
  for (int round = 0;; ++round) {
    for (int i = 0; i < static_cast<int>(handle_.size()); ++i) {
      if (handle_[i] < 0) continue;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (replies_[request].count(i) > 0) continue;
      }
      Status s = transport_->Send(handle_[i], kFetch, ask, options_.timeout_s);
      if (s.ok()) {
        asked.insert(i);
      } else if (round == 0) {
        TANDEM_LOG(WARNING, "agent") << "rebuild: node " << i << " unreachable: " << s.message();
      }
    }
    const auto wake = std::min(deadline, Clock::now() + std::chrono::seconds(1));
    std::unique_lock<std::mutex> lock(mu_);
    const bool all =
        cv_.wait_until(lock, wake, [&] { return replies_[request].size() >= asked.size(); });
    if (all || asked.empty() || Clock::now() >= deadline) {
      got = std::move(replies_[request]);
      replies_.erase(request);
      break;
    }
  }
  // Group the valid fragments by version, newest first. A fragment whose checksum fails is
  // refused here, loudly: it is never decoded, so corrupted bytes are never installed.
  std::map<uint64_t, std::vector<std::span<const uint8_t>>, std::greater<>> by_version;
  uint64_t newest_held = 0;  // including refused fragments whose header still checks out
  int refused = 0;
  for (const auto& [node, frags] : got) {
    for (const auto& f : frags) {
      StatusOr<FragmentHeader> h = ParseFragment(f);
      if (!h.ok()) {
        TANDEM_LOG(WARNING, "agent") << "rebuild of node " << options_.node << ": refused a "
                                     << "fragment held by node " << node << ": "
                                     << h.status().message();
        newest_held = std::max(newest_held, HeaderVersionIfIntact(f, options_.node));
        ++refused;
        continue;
      }
      if (h->owner_node == static_cast<uint32_t>(options_.node)) {
        by_version[h->snapshot_version].emplace_back(f);
        newest_held = std::max(newest_held, h->snapshot_version);
      }
    }
  }
  Status last = DataLossError(StrCat("agent node ", options_.node, ": no peer holds valid ",
                                     "fragments of this node (", got.size(), " of ", asked.size(),
                                     " peers answered; ", refused, " fragments refused)"));
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> images;
  for (const auto& [v, frags] : by_version) {
    StatusOr<std::vector<uint8_t>> image = DecodeFragments(frags);
    if (image.ok()) {
      images.emplace(images.begin(), v, std::move(image).value());
      continue;
    }
    last = image.status();
    TANDEM_LOG(WARNING, "agent") << "rebuild of node " << options_.node << ": version " << v
                                 << " cannot be rebuilt: " << image.status().message();
  }
  if (images.empty()) return last;
  if (images.back().first != newest_held) {
    TANDEM_LOG(WARNING, "agent") << "rebuild of node " << options_.node << ": falling back to "
                                 << "version " << images.back().first << ", the newest with "
                                 << coder_.k() << " valid fragments (newest held by peers: "
                                 << newest_held << ")";
  }
  return images;
}

std::vector<std::pair<uint64_t, int>> PeerGroup::CorruptHeldFragmentsForTest(
    int owner, std::optional<uint64_t> version) {
  std::vector<std::pair<uint64_t, int>> hit;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [v, frag] : held_[static_cast<uint32_t>(owner)]) {
    if (version && *version != v) continue;
    if (frag.size() <= sizeof(FragmentHeader)) continue;
    const size_t payload = frag.size() - sizeof(FragmentHeader);
    frag[sizeof(FragmentHeader) + payload / 2] ^= 0x5a;
    FragmentHeader h;
    std::memcpy(&h, frag.data(), sizeof(h));
    hit.emplace_back(v, static_cast<int>(h.index));
  }
  return hit;
}

}  // namespace tandem::checkpoint::internal

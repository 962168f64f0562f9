// The fabric transport: libfabric (tcp provider) endpoints in one process and in two processes,
// and the in-process transport, exchanging random buffers checked by CRC; timeouts; pacing.
#include "collectives/fabric.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <chrono>
#include <random>
#include <thread>

namespace tandem::collectives {
namespace {

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(gen());
  return v;
}

uint32_t Crc(const std::vector<uint8_t>& v) { return crc32(0, v.data(), v.size()); }

// Sizes around the chunk boundaries (chunk_bytes = 64 KiB in these tests), including empty.
const std::vector<size_t> kSizes = {0, 1, 4095, 65536, 65537, 3 * 65536 + 17, 1 << 20};

FabricOptions Options(uint32_t id) {
  FabricOptions o;
  o.self_id = id;
  o.chunk_bytes = 64 << 10;
  return o;
}

// a sends every size to b (on a thread) while b sends every size to a: both directions at once.
void ExchangeBothWays(Transport& a, Transport& b) {
  auto pa = b.AddPeer(a.address());
  auto pb = a.AddPeer(b.address());
  ASSERT_TRUE(pa.ok() && pb.ok()) << pa.status().ToString() << pb.status().ToString();
  // Each side sends RandomBytes(size, my_seed ^ i) and expects RandomBytes(size, other_seed ^ i).
  auto run = [&](Transport& self, int peer, uint64_t my_seed, uint64_t other_seed,
                 uint32_t other_id, std::vector<std::string>* errors) {
    std::thread receiver([&] {
      for (size_t i = 0; i < kSizes.size(); ++i) {
        auto m = self.Recv(30);
        if (!m.ok()) return errors->push_back(m.status().ToString());
        auto expect = RandomBytes(kSizes[i], other_seed ^ i);
        if (m->source_id != other_id || m->tag != 1000 + i || Crc(m->bytes) != Crc(expect) ||
            m->bytes != expect) {
          errors->push_back(StrCat("message ", i, ": source ", m->source_id, " tag ", m->tag,
                                   " bytes ", m->bytes.size(), " (expected ", kSizes[i], ")"));
        }
      }
    });
    for (size_t i = 0; i < kSizes.size(); ++i) {
      Status s = self.Send(peer, 1000 + i, RandomBytes(kSizes[i], my_seed ^ i), 30);
      if (!s.ok()) errors->push_back(s.ToString());
    }
    receiver.join();
  };
  std::vector<std::string> ea, eb;
  std::thread tb([&] { run(b, *pa, 200, 100, 0, &eb); });
  run(a, *pb, 100, 200, 1, &ea);
  tb.join();
  for (const auto& e : ea) ADD_FAILURE() << "a: " << e;
  for (const auto& e : eb) ADD_FAILURE() << "b: " << e;
}

TEST(Fabric, TwoEndpointsInOneProcess) {
  auto a = CreateFabricTransport(Options(0));
  auto b = CreateFabricTransport(Options(1));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_NE((*a)->provider().find("tcp"), std::string::npos) << (*a)->provider();
  ExchangeBothWays(**a, **b);
}

TEST(Fabric, InProcessTransportSameContract) {
  InProcessFabric fabric;
  auto a = fabric.CreateEndpoint(Options(0));
  auto b = fabric.CreateEndpoint(Options(1));
  ExchangeBothWays(*a, *b);
}

TEST(Fabric, HostPortAddressTimeoutsAndErrors) {
  auto a = CreateFabricTransport(Options(3));
  auto b = CreateFabricTransport(Options(4));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_FALSE((*b)->host_port().empty());
  auto peer = (*a)->AddPeer((*b)->host_port());  // "127.0.0.1:<port>"
  ASSERT_TRUE(peer.ok()) << peer.status().ToString();
  std::vector<uint8_t> bytes = RandomBytes(5000, 5);
  // Progress is manual: a send (even the connection set-up) completes while the peer receives.
  std::thread sender([&] {
    Status s = (*a)->Send(*peer, 9, bytes, 10);
    EXPECT_TRUE(s.ok()) << s.ToString();
  });
  auto m = (*b)->Recv(10);
  sender.join();
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->source_id, 3u);
  EXPECT_EQ(m->bytes, bytes);

  auto t0 = std::chrono::steady_clock::now();
  auto none = (*b)->Recv(0.2);
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(none.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_GE(waited, 0.19);
  EXPECT_LT(waited, 5.0);
  // Still usable after an idle timeout.
  std::thread again([&] { EXPECT_TRUE((*a)->Send(*peer, 10, bytes, 10).ok()); });
  EXPECT_TRUE((*b)->Recv(10).ok());
  again.join();

  EXPECT_EQ((*a)->Send(5, 1, bytes, 1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*a)->AddPeer("nonsense").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*a)->AddPeer("fi:zz").status().code(), StatusCode::kInvalidArgument);
  FabricOptions bad = Options(1);
  bad.provider = "no-such-provider";
  EXPECT_EQ(CreateFabricTransport(bad).status().code(), StatusCode::kUnavailable);
}

TEST(Fabric, RateLimitPacesSends) {
  InProcessFabric fabric;
  FabricOptions o = Options(0);
  o.rate_limit_bytes_per_s = 4 << 20;  // 4 MiB/s: 1 MiB takes >= 0.25 s
  auto a = fabric.CreateEndpoint(o);
  auto b = fabric.CreateEndpoint(Options(1));
  auto peer = a->AddPeer(b->address());
  ASSERT_TRUE(peer.ok());
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(a->Send(*peer, 1, RandomBytes(1 << 20, 1), 10).ok());
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(s, 0.2) << "1 MiB at 4 MiB/s went out in " << s << " s";
  EXPECT_TRUE(b->Recv(1).ok());
}

// A receiver polling with short timeouts must not drop a message that starts near the end of one
// poll and needs longer than the poll to finish (regression: chunks shared the poll's deadline).
TEST(Fabric, ShortPollsDoNotDropLongMessages) {
  FabricOptions o = Options(0);
  o.rate_limit_bytes_per_s = 16 << 20;  // 1 MiB in 16 chunks over ~60 ms
  auto a = CreateFabricTransport(o);
  auto b = CreateFabricTransport(Options(1));
  ASSERT_TRUE(a.ok() && b.ok());
  auto peer = (*a)->AddPeer((*b)->address());
  ASSERT_TRUE(peer.ok());
  std::vector<uint8_t> bytes = RandomBytes(1 << 20, 42);
  std::thread sender([&] {
    for (int i = 0; i < 3; ++i) EXPECT_TRUE((*a)->Send(*peer, i, bytes, 30).ok());
  });
  int got = 0;
  for (int polls = 0; got < 3 && polls < 3000; ++polls) {
    auto m = (*b)->Recv(0.005);
    if (m.ok()) {
      EXPECT_EQ(m->tag, static_cast<uint64_t>(got));
      EXPECT_EQ(Crc(m->bytes), Crc(bytes));
      ++got;
    } else {
      ASSERT_EQ(m.status().code(), StatusCode::kDeadlineExceeded) << m.status().ToString();
    }
  }
  sender.join();
  EXPECT_EQ(got, 3);
}

// A child process echoes every message back (libfabric tcp across processes).
TEST(Fabric, TwoProcessesEcho) {
  int to_child[2], to_parent[2];
  ASSERT_EQ(pipe(to_child), 0);
  ASSERT_EQ(pipe(to_parent), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto t = CreateFabricTransport(Options(7));
    if (!t.ok()) _exit(2);
    std::string addr = (*t)->address() + "\n";
    if (write(to_parent[1], addr.data(), addr.size()) != static_cast<ssize_t>(addr.size())) _exit(3);
    char buf[512] = {};
    if (read(to_child[0], buf, sizeof(buf) - 1) <= 0) _exit(4);
    auto peer = (*t)->AddPeer(std::string(buf, strcspn(buf, "\n")));
    if (!peer.ok()) _exit(5);
    for (size_t i = 0; i < kSizes.size(); ++i) {
      auto m = (*t)->Recv(30);
      if (!m.ok()) _exit(6);
      // Echo on another thread's time: Send needs the parent inside Recv, which it is.
      if (!(*t)->Send(*peer, m->tag + 1, m->bytes, 30).ok()) _exit(7);
    }
    _exit(0);
  }
  auto t = CreateFabricTransport(Options(8));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::string addr = (*t)->address() + "\n";
  ASSERT_EQ(write(to_child[1], addr.data(), addr.size()), static_cast<ssize_t>(addr.size()));
  char buf[512] = {};
  ASSERT_GT(read(to_parent[0], buf, sizeof(buf) - 1), 0);
  auto peer = (*t)->AddPeer(std::string(buf, strcspn(buf, "\n")));
  ASSERT_TRUE(peer.ok()) << peer.status().ToString();
  for (size_t i = 0; i < kSizes.size(); ++i) {
    std::vector<uint8_t> bytes = RandomBytes(kSizes[i], 100 + i);
    std::thread sender([&] { EXPECT_TRUE((*t)->Send(*peer, 2 * i, bytes, 30).ok()); });
    auto m = (*t)->Recv(30);
    sender.join();
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    EXPECT_EQ(m->source_id, 7u);
    EXPECT_EQ(m->tag, 2 * i + 1);
    EXPECT_EQ(Crc(m->bytes), Crc(bytes)) << "size " << kSizes[i];
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "child status " << wstatus;
}

}  // namespace
}  // namespace tandem::collectives

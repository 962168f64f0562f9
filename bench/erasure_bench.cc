// Erasure-coding throughput (ISA-L) on one core: encode of a node image into k+m fragments and
// rebuild with m fragments lost, for the k+m shapes agents use. One JSON object per result with
// GB/s of object bytes per core, the CPU, the commit and the date. Not a test.
//
//   tandem-erasure_bench [--bytes 256M] [--reps 5] [--shapes 2+1,3+1,4+2,8+2]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/erasure.h"
#include "core/version.h"

namespace {

using tandem::checkpoint::DecodeFragments;
using tandem::checkpoint::EncodeFragments;
using tandem::checkpoint::ErasureCoder;

std::string Today() {
  std::time_t now = std::time(nullptr);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

std::string CpuName() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown cpu";
}

int64_t ParseBytes(const std::string& s) {
  int64_t n = std::atoll(s.c_str());
  switch (s.empty() ? ' ' : s.back()) {
    case 'K': return n << 10;
    case 'M': return n << 20;
    case 'G': return n << 30;
    default: return n;
  }
}

template <typename F>
double BestSeconds(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Raw kernels (no framing or copies): parity from k aligned fragments, and a rebuild of m lost.
void BenchShape(int k, int m, int64_t bytes, int reps) {
  auto coder = ErasureCoder::Create(k, m);
  if (!coder.ok()) {
    std::fprintf(stderr, "%s\n", coder.status().ToString().c_str());
    return;
  }
  const size_t per = ((bytes / k + 63) / 64) * 64;
  std::vector<uint8_t> storage(per * (k + m) + 64);
  uint8_t* base = storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64;
  std::mt19937_64 gen(1);
  for (size_t i = 0; i < per * k; i += 8) {
    uint64_t v = gen();
    std::memcpy(base + i, &v, std::min<size_t>(8, per * k - i));
  }
  std::vector<uint8_t*> frags(k + m);
  for (int i = 0; i < k + m; ++i) frags[i] = base + per * i;
  double enc = BestSeconds(reps, [&] { coder->Encode(frags.data(), frags.data() + k, per); });
  std::vector<char> present(k + m, 1);
  for (int i = 0; i < m; ++i) present[i] = 0;  // lose the first m data fragments
  double dec = BestSeconds(reps, [&] {
    tandem::Status s = coder->Reconstruct(frags.data(), reinterpret_cast<bool*>(present.data()), per);
    if (!s.ok()) std::fprintf(stderr, "%s\n", s.ToString().c_str());
  });
  // End to end with framing and CRCs (what an agent does per version).
  std::span<const uint8_t> object(base, per * k);
  std::vector<std::vector<uint8_t>> framed;
  double framed_enc = BestSeconds(reps, [&] { framed = *EncodeFragments(*coder, object, 1, 0); });
  std::vector<std::span<const uint8_t>> kept;
  for (int i = m; i < k + m; ++i) kept.emplace_back(framed[i]);
  double framed_dec = BestSeconds(reps, [&] { (void)DecodeFragments(kept); });
  const double gb = static_cast<double>(per * k) / 1e9;
  nlohmann::json j = {{"bench", "erasure"}, {"device", CpuName()}, {"threads", 1},
                      {"k", k}, {"m", m}, {"code", m == 1 ? "xor" : "reed-solomon-cauchy"},
                      {"object_bytes", per * k}, {"fragment_bytes", per},
                      {"encode_gbps", gb / enc}, {"rebuild_m_lost_gbps", gb / dec},
                      {"framed_encode_gbps", gb / framed_enc},
                      {"framed_decode_gbps", gb / framed_dec},
                      {"commit", tandem::GitCommit()}, {"date", Today()}};
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t bytes = 256 << 20;
  int reps = 5;
  std::string shapes = "2+1,3+1,4+2,8+2";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--bytes") bytes = ParseBytes(argv[i + 1]);
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--shapes") shapes = argv[i + 1];
    else {
      std::fprintf(stderr, "usage: %s [--bytes 256M] [--reps 5] [--shapes 2+1,4+2]\n", argv[0]);
      return 2;
    }
  }
  std::stringstream in(shapes);
  for (std::string s; std::getline(in, s, ',');) {
    int k = 0, m = 0;
    if (std::sscanf(s.c_str(), "%d+%d", &k, &m) != 2) {
      std::fprintf(stderr, "bad shape '%s' (expected k+m)\n", s.c_str());
      return 2;
    }
    BenchShape(k, m, bytes, reps);
  }
  return 0;
}

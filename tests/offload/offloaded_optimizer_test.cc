// OffloadedOptimizer: chunks arriving in random order from several threads give state and bf16
// weights bitwise equal to ops::AdamW over whole parameters, for the host tier and the storage
// tier (io_uring and posix files), over several steps; the callback sees every chunk once with
// the final weights; misuse and I/O errors surface as errors from the step.
#include "offload/offloaded_optimizer.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "ops/context.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::offload {
namespace {

using tandem::testing::RandomUniform;
using tandem::testing::TempDir;

bool SameBits(const void* a, const void* b, size_t n) { return std::memcmp(a, b, n) == 0; }

enum class Setup { kHost, kUring, kPosix };

class OffloadedOptimizerTest : public ::testing::TestWithParam<Setup> {
 protected:
  void SetUp() override {
    if (GetParam() == Setup::kUring) {
      IoUringStorageOptions o;
      o.slab_bytes = 64 << 10;
      storage_ = std::move(IoUringStorage::Open(dir_.Join("opt.bin"), o).value());
    } else if (GetParam() == Setup::kPosix) {
      storage_ = std::move(PosixStorage::Open(dir_.Join("opt.bin")).value());
    }
  }
  OffloadedOptimizerOptions Options() const {
    OffloadedOptimizerOptions o;
    o.tier = GetParam() == Setup::kHost ? OptimizerTier::kHost : OptimizerTier::kStorage;
    o.chunk_elems = 1000;  // not a multiple of any vector width: tails everywhere
    o.num_threads = 3;
    o.storage_offset = 8192;
    auto topo = Topology::ReadFromSysfs();  // host tier: state bound to the local DRAM node
    if (topo.ok()) o.host_placement = PlacementPolicy(*topo, {}).Place(StateKind::kOptimizerState);
    return o;
  }
  TempDir dir_;
  std::unique_ptr<Storage> storage_;
};

TEST_P(OffloadedOptimizerTest, RandomOrderFromThreadsEqualsInMemoryAdamW) {
  const std::vector<OffloadedParam> params = {{"wq", 4321}, {"norm", 17}, {"w_down", 3000}};
  auto created = OffloadedOptimizer::Create(params, Options(), storage_.get());
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  OffloadedOptimizer& opt = **created;
  auto ctx = ops::Context::Cpu();
  struct Ref {
    Tensor master, m, v, w;
  };
  std::vector<Ref> ref;
  for (int p = 0; p < 3; ++p) {
    const int64_t n = params[p].numel;
    Ref r{RandomUniform({n}, 10 + p), RandomUniform({n}, 20 + p, -0.1f, 0.1f),
          RandomUniform({n}, 30 + p, 0.0f, 0.01f), Tensor::Cpu({n}, DType::kBF16)};
    ASSERT_TRUE(opt.SetState(p, r.master.data<float>(), r.m.data<float>(), r.v.data<float>()).ok());
    ref.push_back(r);
  }
  for (int step = 1; step <= 3; ++step) {
    ops::AdamWParams ap;
    ap.lr = 1e-3f * step;
    ap.weight_decay = step == 2 ? 0.0f : 0.1f;
    ap.step = step;
    ap.grad_scale = 0.8f;
    std::vector<Tensor> grads;
    for (int p = 0; p < 3; ++p) grads.push_back(RandomUniform({params[p].numel}, 100 * step + p));
    for (int p = 0; p < 3; ++p) {
      ASSERT_TRUE(ops::AdamW(*ctx, ref[p].master, ref[p].m, ref[p].v, ref[p].w, grads[p], ap).ok());
    }
    std::mutex mu;
    std::vector<std::vector<int>> seen(3);
    std::atomic<int> bad_callbacks{0};
    ASSERT_TRUE(opt.BeginStep(ap,
                              [&](int p, int64_t c, int64_t first, const Bf16* w, int64_t n) {
                                if (first != c * 1000 ||
                                    !SameBits(w, ref[p].w.data<Bf16>() + first, n * sizeof(Bf16))) {
                                  ++bad_callbacks;
                                }
                                std::lock_guard<std::mutex> lock(mu);
                                seen[p].push_back(static_cast<int>(c));
                              })
                    .ok());
    // Every (param, chunk) once, shuffled, spread over 4 producer threads.
    std::vector<std::pair<int, int64_t>> work;
    for (int p = 0; p < 3; ++p) {
      for (int64_t c = 0; c < opt.num_chunks(p); ++c) work.emplace_back(p, c);
    }
    std::shuffle(work.begin(), work.end(), std::mt19937(step));
    std::vector<std::thread> producers;
    std::atomic<int> failures{0};
    for (int t = 0; t < 4; ++t) {
      producers.emplace_back([&, t] {
        for (size_t i = t; i < work.size(); i += 4) {
          const auto [p, c] = work[i];
          if (!opt.GradientsReady(p, c, grads[p].data<float>() + c * 1000).ok()) ++failures;
        }
      });
    }
    for (std::thread& th : producers) th.join();
    const Status st = opt.FinishStep();
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(failures.load(), 0);
    EXPECT_EQ(bad_callbacks.load(), 0);
    for (int p = 0; p < 3; ++p) {
      const int64_t n = params[p].numel;
      std::sort(seen[p].begin(), seen[p].end());
      EXPECT_EQ(static_cast<int64_t>(seen[p].size()), opt.num_chunks(p));
      EXPECT_EQ(std::unique(seen[p].begin(), seen[p].end()), seen[p].end());
      std::vector<float> master(n), m(n), v(n);
      ASSERT_TRUE(opt.GetState(p, master.data(), m.data(), v.data()).ok());
      SCOPED_TRACE(StrCat("step ", step, " param ", params[p].name));
      EXPECT_TRUE(SameBits(master.data(), ref[p].master.data<float>(), n * 4));
      EXPECT_TRUE(SameBits(m.data(), ref[p].m.data<float>(), n * 4));
      EXPECT_TRUE(SameBits(v.data(), ref[p].v.data<float>(), n * 4));
      EXPECT_TRUE(SameBits(opt.weights_bf16(p), ref[p].w.data<Bf16>(), n * 2));
    }
  }
}

TEST_P(OffloadedOptimizerTest, MisuseIsReported) {
  auto created = OffloadedOptimizer::Create({{"a", 2500}}, Options(), storage_.get());
  ASSERT_TRUE(created.ok());
  OffloadedOptimizer& opt = **created;
  std::vector<float> grad(2500, 0.5f);
  EXPECT_EQ(opt.GradientsReady(0, 0, grad.data()).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(opt.BeginStep({}, nullptr).ok());
  EXPECT_EQ(opt.BeginStep({}, nullptr).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(opt.GradientsReady(1, 0, grad.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(opt.GradientsReady(0, 3, grad.data()).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(opt.GradientsReady(0, 0, grad.data()).ok());
  const Status twice = opt.GradientsReady(0, 0, grad.data());
  EXPECT_EQ(twice.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(twice.message().find("given twice"), std::string::npos) << twice.message();
  ASSERT_TRUE(opt.GradientsReady(0, 2, grad.data()).ok());
  const Status missing = opt.FinishStep();  // chunk 1 never given: an error, not a hang
  EXPECT_EQ(missing.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(missing.message().find("'a' chunk 1"), std::string::npos) << missing.message();
  EXPECT_EQ(OffloadedOptimizer::Create({}, Options(), storage_.get()).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(OffloadedOptimizer::Create({{"z", 0}}, Options(), storage_.get()).status().code(),
            StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Tiers, OffloadedOptimizerTest,
                         ::testing::Values(Setup::kHost, Setup::kUring, Setup::kPosix),
                         [](const auto& info) {
                           return info.param == Setup::kHost    ? "Host"
                                  : info.param == Setup::kUring ? "IoUring"
                                                                : "Posix";
                         });

// I/O failures surface from Create (initial state) and from FinishStep (a worker's update).
TEST(OffloadedOptimizerStorageTest, IoErrorsFailCreateOrTheStep) {
  TempDir dir;
  auto inner = PosixStorage::Open(dir.Join("o.bin")).value();
  OffloadedOptimizerOptions o;
  o.tier = OptimizerTier::kStorage;
  o.chunk_elems = 256;
  auto opt = OffloadedOptimizer::Create({{"p", 1000}}, o, inner.get());
  ASSERT_TRUE(opt.ok());
  FaultOptions f;
  f.eio_probability = 1.0;
  FaultInjectingStorage faulty(inner.get(), f);
  auto broken = OffloadedOptimizer::Create({{"p", 1000}}, o, &faulty);
  EXPECT_EQ(broken.status().code(), StatusCode::kDataLoss);  // initial zero state cannot be written
  // The disk fills up right after the initial state (3 floats x 1000 elements): the first
  // update's write-back fails and FinishStep reports it.
  FaultOptions full;
  full.enospc_after_bytes = 12000;
  FaultInjectingStorage tiny_disk(inner.get(), full);
  auto filled = OffloadedOptimizer::Create({{"p", 1000}}, o, &tiny_disk);
  ASSERT_TRUE(filled.ok()) << filled.status().ToString();
  std::vector<float> g(1000, 0.5f);
  ASSERT_TRUE((*filled)->BeginStep({}, nullptr).ok());
  ASSERT_TRUE((*filled)->GradientsReady(0, g.data()).ok());
  const Status st = (*filled)->FinishStep();
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  // Short transfers, on the other hand, are retried and the update succeeds.
  FaultOptions s;
  s.short_read_probability = 0.7;
  s.short_write_probability = 0.7;
  FaultInjectingStorage flaky(inner.get(), s);
  auto ok = OffloadedOptimizer::Create({{"p", 1000}}, o, &flaky);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  std::vector<float> grad(1000, 0.25f);
  ASSERT_TRUE((*ok)->BeginStep({}, nullptr).ok());
  ASSERT_TRUE((*ok)->GradientsReady(0, grad.data()).ok());
  EXPECT_TRUE((*ok)->FinishStep().ok());
  EXPECT_GT(flaky.stats().short_reads, 0);
}

}  // namespace
}  // namespace tandem::offload

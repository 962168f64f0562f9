// [overlap] OffloadedAdamW fed by the model's gradient-ready hook during the last backward (CPU):
// with the AdamW parameters given up front (no clipping) some chunk is updated before
// ForwardBackward returns (the hook holds backward until the optimizer reports one), and after
// three updates of two micro-batches each the model weights, f32 masters and both moments equal,
// every element bitwise, those of the update run after backward, for the host and the nvme tier.
// The clipping path (BeginLastBackward without parameters) updates nothing early and matches too;
// an Update whose parameters differ from the overlapped step's is refused. The delayed update is
// ops::AdamW applied one step late.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

#include "model/llama.h"
#include "ops/context.h"
#include "tests/common/testing.h"
#include "trainer/internal/offload_step.h"

namespace tandem::trainer::internal {
namespace {

enum class Mode { kAfterBackward, kCopiesEarly, kOverlapped };

model::LlamaConfig TinyConfig() {
  model::LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rope_theta = 100.0;
  c.rms_norm_eps = 1e-5;
  return c;
}

model::Batch MakeBatch(uint64_t seed) {
  model::Batch b;
  b.tokens = testing::RandomInts({2, 8}, seed, 37);
  b.targets = testing::RandomInts({2, 8}, seed + 1, 37);
  return b;
}

ops::AdamWParams Params(int64_t step) {
  ops::AdamWParams ap;
  ap.lr = 3e-3f * static_cast<float>(step);
  ap.beta1 = 0.9f;
  ap.beta2 = 0.95f;
  ap.eps = 1e-8f;
  ap.weight_decay = 0.1f;
  ap.step = step;
  return ap;
}

struct OffRun {
  std::unique_ptr<ops::Context> ctx = ops::Context::Cpu();
  std::unique_ptr<model::LlamaModel> model;
  std::unique_ptr<OffloadedAdamW> opt;
  int64_t max_early = 0;  // chunks updated while a last backward was still running (at most)
};

// A model (same init for every run) over an OffloadedAdamW of `tier` (state file under
// `nvme_dir`, one per run); 131 elements per chunk, so every parameter but the norms spans several
// chunks.
std::unique_ptr<OffRun> MakeRun(const std::string& tier, const std::string& nvme_dir,
                                bool delayed = false) {
  auto run = std::make_unique<OffRun>();
  model::ModelOptions mo;
  mo.device_master = false;
  auto m = model::LlamaModel::Create(*run->ctx, TinyConfig(), mo);
  TANDEM_CHECK_OK(m);
  run->model = std::move(m).value();
  OptimizerSection os;
  os.offload = tier;
  os.nvme_path = nvme_dir;
  os.chunk_mib = 0.0005;
  os.threads = 3;
  os.delayed_update = delayed;
  auto opt = OffloadedAdamW::Create(*run->ctx, run->model->parameters(), os);
  TANDEM_CHECK_OK(opt);
  run->opt = std::move(opt).value();
  run->model->SetHostMasters(run->opt.get());
  TANDEM_CHECK_OK(run->model->InitRandom(5, 0.05f));
  return run;
}

// Three updates of two micro-batches; with kOverlapped the hook waits (up to 10 s) on its first
// call of each last backward until the optimizer has updated a chunk, and notes how many were.
void Train(OffRun& run, Mode mode) {
  OffloadedAdamW* opt = run.opt.get();
  bool waiting = false;
  run.model->SetGradReadyCallback([&](const std::vector<size_t>& ready) -> Status {
    TANDEM_RETURN_IF_ERROR(opt->GradientsFinal(ready));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (waiting && opt->chunks_updated_in_backward() == 0 &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (waiting) run.max_early = std::max(run.max_early, opt->chunks_updated_in_backward());
    waiting = false;
    return Status::Ok();
  });
  std::vector<model::Parameter>& params = run.model->parameters();
  for (int64_t step = 1; step <= 3; ++step) {
    TANDEM_CHECK_OK(run.model->ZeroGrads());
    const ops::AdamWParams ap = Params(step);
    for (int micro = 0; micro < 2; ++micro) {
      if (micro == 1 && mode != Mode::kAfterBackward) {
        TANDEM_CHECK_OK(opt->BeginLastBackward(params, mode == Mode::kOverlapped ? &ap : nullptr));
        waiting = mode == Mode::kOverlapped;
      }
      TANDEM_CHECK_OK(run.model->ForwardBackward(MakeBatch(100 * step + micro), 1.0f / 32));
    }
    TANDEM_CHECK_OK(opt->Update(params, ap));
  }
  run.model->SetGradReadyCallback(nullptr);
}

// Weights, masters and moments of every parameter equal bitwise.
void ExpectSameState(OffRun& a, OffRun& b, const std::string& what) {
  auto pa = a.opt->StatePieces(a.model->parameters());
  auto pb = b.opt->StatePieces(b.model->parameters());
  ASSERT_TRUE(pa.ok() && pb.ok());
  ASSERT_EQ(pa->size(), pb->size());
  for (size_t i = 0; i < pa->size(); ++i) {
    const StatePiece& x = (*pa)[i];
    const StatePiece& y = (*pb)[i];
    const std::string& name = x.param->name;
    ASSERT_EQ(x.param->weight.numel(), y.param->weight.numel()) << name;
    const size_t bytes = static_cast<size_t>(x.param->weight.numel()) * sizeof(float);
    EXPECT_EQ(0, std::memcmp(x.param->weight.data<float>(), y.param->weight.data<float>(), bytes))
        << what << ": weight of " << name;
    EXPECT_EQ(0, std::memcmp(x.master.data<float>(), y.master.data<float>(), bytes))
        << what << ": master of " << name;
    EXPECT_EQ(0, std::memcmp(x.exp_avg.data<float>(), y.exp_avg.data<float>(), bytes))
        << what << ": exp_avg of " << name;
    EXPECT_EQ(0, std::memcmp(x.exp_avg_sq.data<float>(), y.exp_avg_sq.data<float>(), bytes))
        << what << ": exp_avg_sq of " << name;
  }
}

TEST(OffloadOverlapTest, UpdateDuringBackwardIsBitwiseTheUpdateAfterIt) {
  testing::TempDir dir;
  for (const std::string tier : {"host", "nvme"}) {
    SCOPED_TRACE(tier);
    std::unique_ptr<OffRun> after = MakeRun(tier, dir.Join(tier + "-after"));
    std::unique_ptr<OffRun> overlapped = MakeRun(tier, dir.Join(tier + "-overlapped"));
    Train(*after, Mode::kAfterBackward);
    Train(*overlapped, Mode::kOverlapped);
    EXPECT_EQ(after->max_early, 0);
    EXPECT_GT(overlapped->max_early, 0) << "no chunk was updated before backward ended";
    ExpectSameState(*after, *overlapped, tier + " overlapped");
    // The update changed the weights (an update that did nothing would also match).
    std::unique_ptr<OffRun> fresh = MakeRun(tier, dir.Join(tier + "-fresh"));
    const Tensor& w0 = fresh->model->parameters()[0].weight;
    const Tensor& w1 = overlapped->model->parameters()[0].weight;
    EXPECT_NE(0, std::memcmp(w0.data<float>(), w1.data<float>(), w0.numel() * sizeof(float)));
  }
}

TEST(OffloadOverlapTest, ClippingPathStartsNothingEarlyAndMatches) {
  testing::TempDir dir;
  std::unique_ptr<OffRun> after = MakeRun("host", dir.Join("after"));
  std::unique_ptr<OffRun> early = MakeRun("host", dir.Join("early"));
  Train(*after, Mode::kAfterBackward);
  Train(*early, Mode::kCopiesEarly);
  EXPECT_EQ(early->max_early, 0);
  ExpectSameState(*after, *early, "copies early");
}

TEST(OffloadOverlapTest, UpdateWithOtherParametersThanTheOverlappedStepIsRefused) {
  testing::TempDir dir;
  std::unique_ptr<OffRun> run = MakeRun("host", dir.Join("run"));
  std::vector<model::Parameter>& params = run->model->parameters();
  run->model->SetGradReadyCallback(
      [&](const std::vector<size_t>& ready) { return run->opt->GradientsFinal(ready); });
  ASSERT_TRUE(run->model->ZeroGrads().ok());
  const ops::AdamWParams ap = Params(1);
  ASSERT_TRUE(run->opt->BeginLastBackward(params, &ap).ok());
  ASSERT_TRUE(run->model->ForwardBackward(MakeBatch(7), 1.0f / 16).ok());
  ops::AdamWParams clipped = ap;
  clipped.grad_scale = 0.5f;
  const Status st = run->opt->Update(params, clipped);
  EXPECT_EQ(st.code(), StatusCode::kInternal) << st.ToString();
  EXPECT_NE(st.message().find("scale 0.5"), std::string::npos) << st.ToString();
  run->model->SetGradReadyCallback(nullptr);
}

// [delayed] optimizer.delayed_update against a plain reference: ops::AdamW applied one step late
// (update t, from the gradients of step t, reaches the weights at the end of step t + 1), on a
// model without offload. Four steps of two micro-batches, then Flush: every weight, master and
// moment bitwise equal; the losses of each micro-batch too.
TEST(OffloadOverlapTest, DelayedUpdateIsAdamWAppliedOneStepLate) {
  testing::TempDir dir;
  for (const std::string tier : {"host", "nvme"}) {
    SCOPED_TRACE(tier);
    std::unique_ptr<OffRun> run = MakeRun(tier, dir.Join(tier), /*delayed=*/true);
    // The reference: a plain CPU model (master == weight) with the same initial weights.
    auto ctx = ops::Context::Cpu();
    auto ref_or = model::LlamaModel::Create(*ctx, TinyConfig(), {});
    ASSERT_TRUE(ref_or.ok());
    model::LlamaModel& ref = **ref_or;
    ASSERT_TRUE(ref.InitRandom(5, 0.05f).ok());
    std::vector<model::Parameter>& rp = ref.parameters();
    std::vector<Tensor> master, m, v, pending;
    for (const model::Parameter& p : rp) {
      master.push_back(Tensor::Cpu(p.weight.shape(), DType::kF32));
      std::memcpy(master.back().raw_data(), p.weight.raw_data(), p.weight.num_bytes());
      m.push_back(Tensor::CpuZeros(p.weight.shape(), DType::kF32));
      v.push_back(Tensor::CpuZeros(p.weight.shape(), DType::kF32));
    }
    auto apply = [&](int64_t step) {  // update `step` from `pending`; weights := masters
      for (size_t i = 0; i < rp.size(); ++i) {
        ops::AdamWParams ap = Params(step);
        if (!rp[i].weight_decay) ap.weight_decay = 0;
        Tensor none;
        ASSERT_TRUE(ops::AdamW(*ctx, master[i], m[i], v[i], none, pending[i], ap).ok());
        std::memcpy(rp[i].weight.raw_data(), master[i].raw_data(), master[i].num_bytes());
      }
    };
    OffloadedAdamW* opt = run->opt.get();
    run->model->SetGradReadyCallback(
        [&](const std::vector<size_t>& ready) { return opt->GradientsFinal(ready); });
    std::vector<model::Parameter>& params = run->model->parameters();
    for (int64_t step = 1; step <= 4; ++step) {
      ASSERT_TRUE(run->model->ZeroGrads().ok());
      ASSERT_TRUE(ref.ZeroGrads().ok());
      for (int micro = 0; micro < 2; ++micro) {
        if (micro == 1) {
          ASSERT_TRUE(opt->BeginLastBackward(params, nullptr).ok());
        }
        const model::Batch b = MakeBatch(100 * step + micro);
        StatusOr<model::LossSum> got = run->model->ForwardBackward(b, 1.0f / 32);
        StatusOr<model::LossSum> want = ref.ForwardBackward(b, 1.0f / 32);
        ASSERT_TRUE(got.ok() && want.ok());
        EXPECT_EQ(got->sum, want->sum) << "step " << step << " micro-batch " << micro;
      }
      ASSERT_TRUE(opt->Update(params, Params(step)).ok());
      if (step > 1) apply(step - 1);
      pending.clear();
      for (const model::Parameter& p : rp) {
        pending.push_back(Tensor::Cpu(p.grad.shape(), DType::kF32));
        std::memcpy(pending.back().raw_data(), p.grad.raw_data(), p.grad.num_bytes());
      }
    }
    ASSERT_TRUE(opt->Flush().ok());
    apply(4);
    run->model->SetGradReadyCallback(nullptr);
    auto pieces = opt->StatePieces(params);
    ASSERT_TRUE(pieces.ok());
    for (size_t i = 0; i < pieces->size(); ++i) {
      const StatePiece& x = (*pieces)[i];
      const size_t bytes = static_cast<size_t>(x.param->weight.numel()) * sizeof(float);
      EXPECT_EQ(0, std::memcmp(x.param->weight.raw_data(), rp[i].weight.raw_data(), bytes))
          << "weight of " << x.param->name;
      EXPECT_EQ(0, std::memcmp(x.master.raw_data(), master[i].raw_data(), bytes)) << x.param->name;
      EXPECT_EQ(0, std::memcmp(x.exp_avg.raw_data(), m[i].raw_data(), bytes)) << x.param->name;
      EXPECT_EQ(0, std::memcmp(x.exp_avg_sq.raw_data(), v[i].raw_data(), bytes)) << x.param->name;
    }
  }
}

}  // namespace
}  // namespace tandem::trainer::internal

// The parity harness of the parallel tests: a small random Llama trained on one rank (the
// reference, plain code: full batch, per-parameter AdamW) and on a dp x cp x tp mesh through
// parallel/ (any world communicator: MPI or a thread group). Each rank of the mesh rebuilds the
// reference itself, so every rank checks every gathered tensor.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "model/llama.h"
#include "ops/ops.h"
#include "parallel/mesh.h"
#include "parallel/model_hooks.h"
#include "parallel/optimizer.h"
#include "parallel/ring_attention.h"
#include "tests/common/testing.h"

namespace tandem::parallel::testing {

// Odd sizes on purpose: vocabulary 301 (padded under tp), ffn 96, GQA 4:2 (kv heads replicated
// under tp4).
inline model::LlamaConfig SmallConfig(bool tied) {
  model::LlamaConfig c;
  c.vocab_size = 301;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.rope_theta = 1000.0;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tied;
  return c;
}

inline constexpr int64_t kBatch = 4, kSeq = 16, kSteps = 5;
inline constexpr uint64_t kInitSeed = 77;
inline constexpr float kInitStd = 0.2f;

struct GlobalBatch {
  Tensor tokens;   // i32 [B, T]
  Tensor targets;  // i32 [B, T], some ignored
};

inline GlobalBatch MakeBatch(int64_t step, int64_t vocab) {
  GlobalBatch b;
  b.tokens = tandem::testing::RandomInts({kBatch, kSeq}, 1000 + step, static_cast<int32_t>(vocab));
  b.targets = tandem::testing::RandomInts({kBatch, kSeq}, 2000 + step, static_cast<int32_t>(vocab));
  const Tensor mask = tandem::testing::RandomInts({kBatch, kSeq}, 3000 + step, 5);
  for (int64_t i = 0; i < b.targets.numel(); ++i) {
    if (mask.data<int32_t>()[i] == 0) b.targets.data<int32_t>()[i] = ops::kIgnoreIndex;
  }
  return b;
}

inline int64_t CountTargets(const Tensor& t) {
  int64_t n = 0;
  for (int64_t i = 0; i < t.numel(); ++i) n += t.data<int32_t>()[i] != ops::kIgnoreIndex;
  return n;
}

// This rank's part: rows of its dp rank, the zig-zag tokens of its cp rank, global positions.
inline model::Batch LocalBatch(const GlobalBatch& g, const MeshShape& s, const MeshCoords& c) {
  const int64_t rows = kBatch / s.dp, r0 = c.dp * rows;
  const std::vector<int64_t> idx = s.cp > 1 ? ZigZagIndices(kSeq, s.cp, c.cp) : [] {
    std::vector<int64_t> all(kSeq);
    for (int64_t i = 0; i < kSeq; ++i) all[i] = i;
    return all;
  }();
  const int64_t Tl = static_cast<int64_t>(idx.size());
  model::Batch b;
  b.tokens = Tensor::Cpu({rows, Tl}, DType::kI32);
  b.targets = Tensor::Cpu({rows, Tl}, DType::kI32);
  b.positions = Tensor::Cpu({rows, Tl}, DType::kI32);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < Tl; ++i) {
      const int64_t src = (r0 + r) * kSeq + idx[i];
      b.tokens.data<int32_t>()[r * Tl + i] = g.tokens.data<int32_t>()[src];
      b.targets.data<int32_t>()[r * Tl + i] = g.targets.data<int32_t>()[src];
      b.positions.data<int32_t>()[r * Tl + i] = static_cast<int32_t>(idx[i]);
    }
  }
  return b;
}

// Adam's first steps move every weight by about +-lr whatever the size of its gradient, so with a
// tiny eps a gradient at rounding-noise level (a sum that nearly cancels) flips sign between two
// summation orders and its weight lands 2 lr away. eps = 1e-5 damps updates of such gradients
// (|g| << eps) while typical gradients (~1e-3) still take Adam's normalised step.
struct StepOptions {
  float eps = 1e-5f;
  float lr = 1e-2f;
  float weight_decay = 0.1f;
  float grad_clip = 1.0f;
};

inline float ClipScale(double norm, float clip) {
  return (clip > 0 && norm > clip) ? static_cast<float>(clip / (norm + 1e-6)) : 1.0f;
}

// What a run produces: loss and gradients of step 1 (logical shapes), weights after kSteps.
struct RunResult {
  double loss1 = 0;
  double norm1 = 0;
  std::vector<Tensor> grads1;
  std::vector<Tensor> weights;
};

inline RunResult ReferenceRun(const model::LlamaConfig& config, float init_std,
                              const StepOptions& so) {
  auto ctx = ops::Context::Cpu();
  auto made = model::LlamaModel::Create(*ctx, config, {});
  TANDEM_CHECK_OK(made.status());
  model::LlamaModel& m = **made;
  TANDEM_CHECK_OK(m.InitRandom(kInitSeed, init_std));
  auto& params = m.parameters();
  std::vector<Tensor> mom(params.size()), vel(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    mom[i] = Tensor::CpuZeros(params[i].weight.shape(), DType::kF32);
    vel[i] = Tensor::CpuZeros(params[i].weight.shape(), DType::kF32);
  }
  RunResult out;
  for (int64_t step = 1; step <= kSteps; ++step) {
    const GlobalBatch g = MakeBatch(step, m.config().vocab_size);
    model::Batch b;
    b.tokens = g.tokens;
    b.targets = g.targets;
    TANDEM_CHECK_OK(m.ZeroGrads());
    auto loss = m.ForwardBackward(b, 1.0f / static_cast<float>(CountTargets(g.targets)));
    TANDEM_CHECK_OK(loss.status());
    double sq = 0;
    for (const model::Parameter& p : params) {
      for (int64_t j = 0; j < p.grad.numel(); ++j) {
        const double x = p.grad.data<float>()[j];
        sq += x * x;
      }
    }
    if (step == 1) {
      out.loss1 = loss->sum / static_cast<double>(loss->count);
      out.norm1 = std::sqrt(sq);
      for (size_t i = 0; i < params.size(); ++i) out.grads1.push_back(*m.GatherParameter(i, true));
    }
    for (size_t i = 0; i < params.size(); ++i) {
      ops::AdamWParams ap;
      ap.lr = so.lr;
      ap.eps = so.eps;
      ap.weight_decay = params[i].weight_decay ? so.weight_decay : 0.0f;
      ap.step = step;
      ap.grad_scale = ClipScale(std::sqrt(sq), so.grad_clip);
      Tensor none;
      TANDEM_CHECK_OK(ops::AdamW(*ctx, params[i].master, mom[i], vel[i], none, params[i].grad, ap));
    }
  }
  for (size_t i = 0; i < params.size(); ++i) out.weights.push_back(*m.GatherParameter(i, false));
  return out;
}

inline RunResult ReferenceRun(bool tied, const StepOptions& so) {
  return ReferenceRun(SmallConfig(tied), kInitStd, so);
}

// The same run on the mesh `shape` over `world` (every rank of world calls it).
inline StatusOr<RunResult> MeshRun(collectives::Communicator& world, const MeshShape& shape,
                                   bool tied, bool zero, const StepOptions& so,
                                   CpAttention attention = CpAttention::kRing) {
  TANDEM_ASSIGN_OR_RETURN(MeshGroups groups, CreateMeshGroups(world, shape));
  auto ctx = ops::Context::Cpu();
  MeshModelHooks hooks(*ctx, groups.tp.get(), groups.cp.get(), attention);
  model::ModelOptions mo;
  mo.parallel = {groups.coords.tp, shape.tp, groups.coords.cp, shape.cp, &hooks};
  mo.flat_numel_multiple = shape.dp * shape.cp;
  TANDEM_ASSIGN_OR_RETURN(auto m, model::LlamaModel::Create(*ctx, SmallConfig(tied), mo));
  TANDEM_RETURN_IF_ERROR(m->InitRandom(kInitSeed, kInitStd));
  ParallelOptimizerOptions po;
  po.weight_decay = so.weight_decay;
  po.eps = so.eps;
  po.zero = zero;
  po.bucket_bytes = 40000;  // several buckets in this small model
  TANDEM_ASSIGN_OR_RETURN(auto opt, ParallelOptimizer::Create(*ctx, *m, groups, po));
  RunResult out;
  for (int64_t step = 1; step <= kSteps; ++step) {
    const GlobalBatch g = MakeBatch(step, m->config().vocab_size);
    const float scale = 1.0f / static_cast<float>(CountTargets(g.targets));
    TANDEM_RETURN_IF_ERROR(m->ZeroGrads());
    opt->BeginBackward(true);
    TANDEM_ASSIGN_OR_RETURN(model::LossSum l,
                            m->ForwardBackward(LocalBatch(g, shape, groups.coords), scale));
    TANDEM_RETURN_IF_ERROR(opt->FinishBackward());
    TANDEM_ASSIGN_OR_RETURN(double norm, opt->GradNorm());
    if (step == 1) {
      Tensor sums = Tensor::Cpu({2}, DType::kF32);
      sums.data<float>()[0] = static_cast<float>(l.sum);
      sums.data<float>()[1] = static_cast<float>(l.count);
      TANDEM_RETURN_IF_ERROR(groups.dp_cp->AllReduce(sums, collectives::ReduceOp::kSum));
      out.loss1 = sums.data<float>()[0] / sums.data<float>()[1];
      out.norm1 = norm;
      for (size_t i = 0; !zero && i < m->parameters().size(); ++i) {
        TANDEM_ASSIGN_OR_RETURN(Tensor gi, m->GatherParameter(i, true));
        out.grads1.push_back(gi);
      }
    }
    TANDEM_RETURN_IF_ERROR(opt->Step(so.lr, step, ClipScale(norm, so.grad_clip)));
  }
  TANDEM_RETURN_IF_ERROR(opt->SyncMasters());
  for (size_t i = 0; i < m->parameters().size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor w, m->GatherParameter(i, false));
    out.weights.push_back(w);
  }
  TANDEM_RETURN_IF_ERROR(groups.Close());
  return out;
}

// f32 tolerances: a mesh changes the order of sums (tp all-reduces, split GEMMs, the loss head in
// f64), so results agree to rounding, not bit for bit. Gradients: max |a - e| / max |e| <= 2e-5
// per tensor (scale-free: gradients are small); weights after 5 steps: every element
// |a - e| <= 3e-4 + 1e-4 |e|, i.e. 3% of one lr step (Adam turns rounding differences of small
// gradients, e.g. of rare tokens' embedding rows, into update differences of that order: 1.1% was
// seen on a CPU whose BLAS sums in another order; a wrong gradient or a sign flip moves a weight
// by ~lr = 1e-2); loss 1e-5 relative, gradient norm 1e-4 relative.
inline constexpr double kGradRelTol = 2e-5;
inline constexpr tandem::testing::Tolerance kWeightTol{3e-4, 1e-4};

inline void ExpectMatches(const RunResult& got, const RunResult& ref, bool check_grads) {
  EXPECT_NEAR(got.loss1, ref.loss1, 1e-5 * std::abs(ref.loss1));
  EXPECT_NEAR(got.norm1, ref.norm1, 1e-4 * ref.norm1);
  if (check_grads) {
    ASSERT_EQ(got.grads1.size(), ref.grads1.size());
    for (size_t i = 0; i < ref.grads1.size(); ++i) {
      EXPECT_LE(tandem::testing::MaxRelativeError(got.grads1[i], ref.grads1[i]), kGradRelTol)
          << "gradient of parameter " << i;
    }
  }
  ASSERT_EQ(got.weights.size(), ref.weights.size());
  for (size_t i = 0; i < ref.weights.size(); ++i) {
    EXPECT_TRUE(tandem::testing::AllClose(got.weights[i], ref.weights[i], kWeightTol))
        << "weight of parameter " << i << " after " << kSteps << " steps";
  }
}

// One mesh of a parity test: dp x cp x tp, tied embeddings or not; MeshCaseName names it for
// INSTANTIATE_TEST_SUITE_P ("dp2cp1tp2", "dp1cp1tp4tied").
struct MeshCase {
  int dp, cp, tp;
  bool tied;
};

inline std::string MeshCaseName(const ::testing::TestParamInfo<MeshCase>& info) {
  const MeshCase& c = info.param;
  return "dp" + std::to_string(c.dp) + "cp" + std::to_string(c.cp) + "tp" + std::to_string(c.tp) +
         (c.tied ? "tied" : "");
}

}  // namespace tandem::parallel::testing

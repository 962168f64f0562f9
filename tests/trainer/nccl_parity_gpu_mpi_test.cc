// mpi-ranks: 2 4
// The mesh parity of tests/parallel/parallel_mpi_test on GPUs: bf16 weights, f32 masters and
// gradients, NCCL communicators built exactly as `tandem train` builds them
// (trainer/internal/parallel_run.h, hence a trainer test: an NCCL world on the compute stream,
// a second one for the dp x cp gradient buckets), with and without ZeRO-1. Skips on every rank
// where the host has fewer GPUs than ranks (CI: no GPU).
//
// bf16 rounds every GEMM output and activation, and a mesh rounds at other places than one GPU
// (split GEMMs, partial sums all-reduced), so the mesh cannot match one GPU bit for bit, and over
// 5 Adam steps rounding differences grow. The test therefore measures both against the f32 CPU
// reference of the same global batch (parallel_test_util.h) and requires the mesh to be about as
// accurate as one GPU: error(mesh) <= 3 x error(one GPU) + a floor, for the step-1 loss
// (floor 2e-4 relative) and gradient norm (1e-3 relative), every step-1 gradient (max |a - e| /
// max |e|, floor 2e-3) and the weights after 5 steps (mean |a - e|, floor 0.02 lr). A wrong or
// missing reduction is off by O(1) and fails all of them.
#include <gtest/gtest.h>

#include <cmath>

#include "collectives/mpi.h"
#include "core/cuda_allocator.h"
#include "tests/collectives/mpi_test_main.h"
#include "tests/parallel/parallel_test_util.h"
#include "trainer/internal/parallel_run.h"

namespace tandem::parallel::testing {
namespace {

// The CUDA attention kernels take head_dim 64 and 128: a small model with head_dim 64, GQA 4:2,
// an ffn and a vocabulary that tp pads or splits unevenly.
model::LlamaConfig GpuConfig(bool tied) {
  model::LlamaConfig c = SmallConfig(tied);
  c.hidden_size = 256;
  c.intermediate_size = 352;
  c.head_dim = 64;
  return c;
}

constexpr float kGpuInitStd = 0.02f;  // HF's init: a well-conditioned start in bf16

StepOptions GpuStepOptions() {
  StepOptions so;
  so.lr = 1e-3f;
  return so;
}

struct GpuResult {
  RunResult r;
  std::vector<double> losses;  // every step's mean loss
};

StatusOr<Tensor> DeviceZeros(ops::Context& ctx, const Shape& shape) {
  TANDEM_ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(shape, DType::kF32, ctx.allocator()));
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, t, 0.0f));
  return t;
}

ops::AdamWParams Adam(const StepOptions& so, bool decay, int64_t step, float grad_scale) {
  ops::AdamWParams ap;
  ap.lr = so.lr;
  ap.eps = so.eps;
  ap.weight_decay = decay ? so.weight_decay : 0.0f;
  ap.step = step;
  ap.grad_scale = grad_scale;
  return ap;
}

// One GPU, the whole global batch, plain per-parameter AdamW on the device.
StatusOr<GpuResult> GpuReference(int device, bool tied, const StepOptions& so) {
  TANDEM_ASSIGN_OR_RETURN(auto ctx, ops::Context::Cuda(device));
  TANDEM_ASSIGN_OR_RETURN(auto m, model::LlamaModel::Create(*ctx, GpuConfig(tied), {}));
  TANDEM_RETURN_IF_ERROR(m->InitRandom(kInitSeed, kGpuInitStd));
  auto& params = m->parameters();
  std::vector<Tensor> mom(params.size()), vel(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(mom[i], DeviceZeros(*ctx, params[i].master.shape()));
    TANDEM_ASSIGN_OR_RETURN(vel[i], DeviceZeros(*ctx, params[i].master.shape()));
  }
  GpuResult out;
  for (int64_t step = 1; step <= kSteps; ++step) {
    const GlobalBatch g = MakeBatch(step, m->config().vocab_size);
    model::Batch b;
    b.tokens = g.tokens;
    b.targets = g.targets;
    TANDEM_RETURN_IF_ERROR(m->ZeroGrads());
    const float scale = 1.0f / static_cast<float>(CountTargets(g.targets));
    TANDEM_ASSIGN_OR_RETURN(model::LossSum l, m->ForwardBackward(b, scale));
    out.losses.push_back(l.sum / static_cast<double>(l.count));
    double sq = 0;
    std::vector<Tensor> grads;
    for (size_t i = 0; i < params.size(); ++i) {
      TANDEM_ASSIGN_OR_RETURN(Tensor gi, m->GatherParameter(i, true));
      for (int64_t j = 0; j < gi.numel(); ++j) {
        const double x = gi.data<float>()[j];
        sq += x * x;
      }
      grads.push_back(gi);
    }
    if (step == 1) {
      out.r.loss1 = out.losses.back();
      out.r.norm1 = std::sqrt(sq);
      out.r.grads1 = grads;
    }
    for (size_t i = 0; i < params.size(); ++i) {
      const ops::AdamWParams ap =
          Adam(so, params[i].weight_decay, step, ClipScale(std::sqrt(sq), so.grad_clip));
      TANDEM_RETURN_IF_ERROR(
          ops::AdamW(*ctx, params[i].master, mom[i], vel[i], params[i].weight, params[i].grad, ap));
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor w, m->GatherParameter(i, false));
    out.r.weights.push_back(w);
  }
  return out;
}

// The mesh run, with the trainer's communicators and the parallel optimizer.
StatusOr<GpuResult> GpuMeshRun(collectives::Communicator& world, int device,
                               const MeshShape& shape, bool tied, bool zero,
                               const StepOptions& so) {
  TANDEM_ASSIGN_OR_RETURN(auto ctx, ops::Context::Cuda(device));
  trainer::ParallelSection ps;
  ps.dp = shape.dp;
  ps.cp = shape.cp;
  ps.tp = shape.tp;
  ps.timeout_s = 60;
  TANDEM_ASSIGN_OR_RETURN(auto run, trainer::internal::OpenParallelRun(ps, world, *ctx, device));
  model::ModelOptions mo;
  mo.parallel = run->model_parallel();
  mo.flat_numel_multiple = shape.dp * shape.cp;
  TANDEM_ASSIGN_OR_RETURN(auto m, model::LlamaModel::Create(*ctx, GpuConfig(tied), mo));
  TANDEM_RETURN_IF_ERROR(m->InitRandom(kInitSeed, kGpuInitStd));
  ParallelOptimizerOptions po;
  po.weight_decay = so.weight_decay;
  po.eps = so.eps;
  po.zero = zero;
  po.bucket_bytes = 200000;  // several buckets in this small model
  TANDEM_ASSIGN_OR_RETURN(run->optimizer, ParallelOptimizer::Create(*ctx, *m, run->groups, po));
  GpuResult out;
  for (int64_t step = 1; step <= kSteps; ++step) {
    const GlobalBatch g = MakeBatch(step, m->config().vocab_size);
    const float scale = 1.0f / static_cast<float>(CountTargets(g.targets));
    TANDEM_RETURN_IF_ERROR(m->ZeroGrads());
    run->optimizer->BeginBackward(true);
    TANDEM_ASSIGN_OR_RETURN(model::LossSum l,
                            m->ForwardBackward(LocalBatch(g, shape, run->groups.coords), scale));
    TANDEM_RETURN_IF_ERROR(run->optimizer->FinishBackward());
    TANDEM_ASSIGN_OR_RETURN(double norm, run->optimizer->GradNorm());
    std::vector<double> sums = {l.sum, static_cast<double>(l.count)};
    TANDEM_RETURN_IF_ERROR(trainer::internal::SumOverReplicas(*run, *ctx, sums));
    out.losses.push_back(sums[0] / sums[1]);
    if (step == 1) {
      out.r.loss1 = out.losses.back();
      out.r.norm1 = norm;
      for (size_t i = 0; !zero && i < m->parameters().size(); ++i) {
        TANDEM_ASSIGN_OR_RETURN(Tensor gi, m->GatherParameter(i, true));
        out.r.grads1.push_back(gi);
      }
    }
    TANDEM_RETURN_IF_ERROR(run->optimizer->Step(so.lr, step, ClipScale(norm, so.grad_clip)));
  }
  TANDEM_RETURN_IF_ERROR(run->optimizer->SyncMasters());
  for (size_t i = 0; i < m->parameters().size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor w, m->GatherParameter(i, false));
    out.r.weights.push_back(w);
  }
  TANDEM_RETURN_IF_ERROR(run->Close());
  return out;
}

// Largest |a - e| over max |e|, and the mean and max |a - e|.
struct Diff {
  double rel_to_max = 0, mean_abs = 0, max_abs = 0;
};
Diff Compare(const Tensor& a, const Tensor& e) {
  Diff d;
  double emax = 0;
  for (int64_t j = 0; j < e.numel(); ++j) {
    const double x = a.data<float>()[j], y = e.data<float>()[j];
    d.max_abs = std::max(d.max_abs, std::abs(x - y));
    d.mean_abs += std::abs(x - y);
    emax = std::max(emax, std::abs(y));
  }
  d.mean_abs /= static_cast<double>(std::max<int64_t>(1, e.numel()));
  d.rel_to_max = emax > 0 ? d.max_abs / emax : d.max_abs;
  return d;
}

// err(x) <= 3 err(one GPU) + floor, where err is against the f32 reference.
void ExpectAsAccurate(double mesh_err, double gpu_err, double floor, const std::string& what) {
  EXPECT_LE(mesh_err, 3 * gpu_err + floor)
      << what << ": the mesh is off the f32 reference by " << mesh_err << ", one GPU by "
      << gpu_err;
}

void ExpectGpuMatches(const GpuResult& got, const GpuResult& one, const RunResult& f32,
                      bool check_grads, const StepOptions& so, int rank) {
  ExpectAsAccurate(std::abs(got.r.loss1 - f32.loss1), std::abs(one.r.loss1 - f32.loss1),
                   2e-4 * std::abs(f32.loss1), "step-1 loss");
  ExpectAsAccurate(std::abs(got.r.norm1 - f32.norm1), std::abs(one.r.norm1 - f32.norm1),
                   1e-3 * f32.norm1, "step-1 gradient norm");
  double worst_grad = 0, worst_weight = 0;  // largest mesh error over the one-GPU error
  if (check_grads) {
    ASSERT_EQ(got.r.grads1.size(), f32.grads1.size());
    for (size_t i = 0; i < f32.grads1.size(); ++i) {
      const double m = Compare(got.r.grads1[i], f32.grads1[i]).rel_to_max;
      const double g = Compare(one.r.grads1[i], f32.grads1[i]).rel_to_max;
      worst_grad = std::max(worst_grad, m / std::max(g, 1e-12));
      ExpectAsAccurate(m, g, 2e-3, "gradient of parameter " + std::to_string(i));
    }
  }
  ASSERT_EQ(got.r.weights.size(), f32.weights.size());
  for (size_t i = 0; i < f32.weights.size(); ++i) {
    const double m = Compare(got.r.weights[i], f32.weights[i]).mean_abs;
    const double g = Compare(one.r.weights[i], f32.weights[i]).mean_abs;
    worst_weight = std::max(worst_weight, m / std::max(g, 1e-12));
    ExpectAsAccurate(m, g, 0.02 * so.lr,
                     "weight of parameter " + std::to_string(i) + " after " +
                         std::to_string(kSteps) + " steps");
  }
  if (rank == 0) {
    std::printf("  loss1 f32 %.6f, one GPU %.6f, mesh %.6f; loss5 one GPU %.6f, mesh %.6f; "
                "worst mesh/one-GPU error ratio: gradients %.2f, weights %.2f\n",
                f32.loss1, one.r.loss1, got.r.loss1, one.losses.back(), got.losses.back(),
                worst_grad, worst_weight);
  }
}

using Case = MeshCase;

void RunCase(const Case& c, bool zero) {
  const auto& mpi = collectives::testing::Mpi();
  if (!CudaAvailable() || CudaDeviceCount() < mpi.local_size()) {
    GTEST_SKIP() << "needs one GPU per rank (" << mpi.local_size() << "): GPU test skipped";
  }
  auto world = collectives::CreateMpiWorld({.timeout_s = 60});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  if ((*world)->size() != c.dp * c.cp * c.tp) {
    EXPECT_TRUE((*world)->Close().ok());
    GTEST_SKIP() << "mesh for " << c.dp * c.cp * c.tp << " ranks";
  }
  const StepOptions so = GpuStepOptions();
  const RunResult f32 = ReferenceRun(GpuConfig(c.tied), kGpuInitStd, so);
  auto ref = GpuReference(mpi.local_rank(), c.tied, so);
  ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  auto got = GpuMeshRun(**world, mpi.local_rank(), MeshShape{c.dp, c.cp, c.tp}, c.tied, zero, so);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectGpuMatches(*got, *ref, f32, /*check_grads=*/!zero, so, (*world)->rank());
  EXPECT_TRUE((*world)->Close().ok());
}

class NcclMeshParity : public ::testing::TestWithParam<Case> {};

TEST_P(NcclMeshParity, MatchesOneGpu) { RunCase(GetParam(), /*zero=*/false); }
TEST_P(NcclMeshParity, MatchesOneGpuWithZero1) { RunCase(GetParam(), /*zero=*/true); }

INSTANTIATE_TEST_SUITE_P(Meshes, NcclMeshParity,
                         ::testing::Values(Case{2, 1, 1, false}, Case{1, 1, 2, false},
                                           Case{1, 2, 1, false}, Case{1, 1, 2, true},
                                           Case{4, 1, 1, false}, Case{2, 1, 2, false},
                                           Case{2, 2, 1, false}, Case{1, 2, 2, false},
                                           Case{1, 1, 4, false}, Case{1, 4, 1, false},
                                           Case{1, 1, 4, true}),
                         MeshCaseName);

}  // namespace
}  // namespace tandem::parallel::testing

TANDEM_MPI_TEST_MAIN()

// mpi-ranks: 2 4
// LoRA under tensor parallelism (peft/lora.h, peft/adapter_set.h) under mpirun, CPU f32: a frozen
// tiny Llama (Hq 4, Hkv 2: tp4 replicates kv heads) with an all-linear LoRA (r 4, a rank_pattern
// entry on a row-parallel projection, dropout 0.1, random A and B so every gradient is non-zero)
// trains on tp2 (2 ranks), and tp4, dp2 x tp2, cp2 x tp2 (4 ranks), tp2 and tp4 also with
// activation recompute. Against a one-rank run of the same global batches (every rank runs it
// itself):
//   - step 1: the loss (1e-5 relative) and every adapter gradient gathered to PEFT shape
//     (max |a - e| / max |e| <= 2e-5 per tensor); gradients of the tp-replicated factors
//     (column-parallel A, row-parallel B) are bitwise equal on every tp rank;
//   - after 5 AdamW steps (clipping on): every adapter weight within 1e-5 + 1e-5 |w|;
//   - merging each rank's slices into its base slices gives the adapter's logits (1e-4);
//   - the PEFT directory saved on the mesh (tp rank 0 writes the gathered tensors) holds exactly
//     (bitwise, f32) the gathered weights, the one-rank run's tensor names and shapes, its values
//     within the weight tolerance, and the same adapter_config.json.
// Then `tandem train` (trainer::RunTraining) with peft.method = "lora" (dropout 0.1) on tp2 (2
// ranks) or dp2 x tp2 (4 ranks): per-step losses within 1e-5 relative of a one-process run and
// the final PEFT adapter within 1e-4 + 1e-4 |w| (Adam over 6 steps, as tests/parallel/
// train_mpi_test.cc); and the universal checkpoint it saved at step 3 resumes on one rank, whose
// steps 4-6 match the mesh run's (losses 1e-5 relative, adapter 1e-4 + 1e-4 |w|). And an adapter
// that does not declare tp support (as S2FT) is refused by the model under tp. The same mesh run
// with model.offload = "host" (the base's layers streamed) gives bitwise its losses and adapter.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "collectives/mpi.h"
#include "model/safetensors.h"
#include "peft/adapter_io.h"
#include "peft/adapter_set.h"
#include "peft/lora.h"
#include "tests/collectives/mpi_test_main.h"
#include "tests/parallel/parallel_test_util.h"
#include "tests/parallel/mpi_run_util.h"
#include "trainer/trainer.h"

namespace tandem::parallel::testing {
namespace {

constexpr uint64_t kDropoutSeed = 4242;
// Adapter weights after kSteps AdamW steps at lr 1e-2, eps 1e-5: where an element's gradient is
// about eps in size, an update moves with the gradient's last bits (d update / d m = lr / eps),
// so the meshes' different summation orders may move it by a thousandth of a step per step.
constexpr tandem::testing::Tolerance kLoraWeightTol{5e-5, 1e-5};

peft::LoraConfig TestLoraConfig() {
  peft::LoraConfig c;
  c.r = 4;
  c.alpha = 8.0;
  c.dropout = 0.1;
  c.target_modules = {"all-linear"};
  c.rank_pattern = {{"layers.1.mlp.down_proj", 6}};
  c.init_seed = 5;
  return c;
}

struct LoraRun {
  double loss1 = 0;
  std::vector<Tensor> grads1;   // logical shapes
  std::vector<Tensor> weights;  // logical shapes, after kSteps
  std::vector<std::string> names;
};

// Random A and B (PEFT shapes), the same on every rank: B != 0 so that dA is not zero at step 1.
Status SetRandomWeights(peft::LoraAdapter& ad) {
  for (size_t i = 0; i < ad.parameters().size(); ++i) {
    const Shape& shape = ad.parameters()[i].logical_shape;
    TANDEM_RETURN_IF_ERROR(
        ad.SetFromLogicalHost(i, tandem::testing::RandomUniform(shape, 900 + i, -0.3f, 0.3f)));
  }
  return Status::Ok();
}

ops::AdamWParams Adam(const StepOptions& so, int64_t step, float clip_scale) {
  ops::AdamWParams ap;
  ap.lr = so.lr;
  ap.eps = so.eps;
  ap.weight_decay = so.weight_decay;
  ap.step = step;
  ap.grad_scale = clip_scale;
  return ap;
}

// One rank, the whole global batch, plain per-parameter AdamW; saves the adapter into `dir`.
LoraRun ReferenceLoraRun(const StepOptions& so, const std::string& dir) {
  auto ctx = ops::Context::Cpu();
  model::ModelOptions mo;
  mo.trainable = false;
  auto m = std::move(model::LlamaModel::Create(*ctx, SmallConfig(false), mo)).value();
  TANDEM_CHECK_OK(m->InitRandom(kInitSeed, kInitStd));
  auto ad = std::move(peft::LoraAdapter::Create(*ctx, m->config(), TestLoraConfig())).value();
  TANDEM_CHECK_OK(SetRandomWeights(*ad));
  peft::AdapterSet set(*ctx, m->config());
  TANDEM_CHECK_OK(set.Add(std::move(ad)).status());
  set.set_dropout_seed(kDropoutSeed);
  m->SetAdapter(&set);
  peft::LoraAdapter& a = set.adapter(0);
  auto& params = a.parameters();
  std::vector<Tensor> mom, vel;
  for (const model::Parameter& p : params) {
    mom.push_back(Tensor::CpuZeros(p.master.shape(), DType::kF32));
    vel.push_back(Tensor::CpuZeros(p.master.shape(), DType::kF32));
  }
  LoraRun out;
  for (int64_t step = 1; step <= kSteps; ++step) {
    const GlobalBatch g = MakeBatch(step, m->config().vocab_size);
    model::Batch b;
    b.tokens = g.tokens;
    b.targets = g.targets;
    TANDEM_CHECK_OK(m->ZeroGrads());
    auto loss = m->ForwardBackward(b, 1.0f / static_cast<float>(CountTargets(g.targets)));
    TANDEM_CHECK_OK(loss.status());
    double sq = 0;
    for (const model::Parameter& p : params) {
      for (int64_t j = 0; j < p.grad.numel(); ++j)
        sq += double{p.grad.data<float>()[j]} * p.grad.data<float>()[j];
    }
    if (step == 1) {
      out.loss1 = loss->sum / static_cast<double>(loss->count);
      for (size_t i = 0; i < params.size(); ++i) out.grads1.push_back(*a.GatherToHost(i, true));
    }
    const float clip = ClipScale(std::sqrt(sq), so.grad_clip);
    for (size_t i = 0; i < params.size(); ++i) {
      Tensor none;
      TANDEM_CHECK_OK(ops::AdamW(*ctx, params[i].master, mom[i], vel[i], none, params[i].grad,
                                 Adam(so, step, clip)));
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    out.weights.push_back(*a.GatherToHost(i));
    out.names.push_back(params[i].name);
  }
  TANDEM_CHECK_OK(peft::SaveLoraAdapter(a, dir));
  m->SetAdapter(nullptr);
  return out;
}

// Gradients of parameters held whole by every tp rank must be the same bits everywhere.
Status ExpectReplicatedGradsEqual(const std::vector<model::Parameter>& params,
                                  collectives::Communicator* tp) {
  for (const model::Parameter& p : params) {
    if (p.tp_dim >= 0 || tp == nullptr) continue;
    TANDEM_ASSIGN_OR_RETURN(Tensor mine, CopyToHostBlocking(p.grad));
    TANDEM_ASSIGN_OR_RETURN(Tensor max, CopyToHostBlocking(p.grad));
    TANDEM_RETURN_IF_ERROR(tp->AllReduce(max, collectives::ReduceOp::kMax));
    const int64_t n = mine.numel();
    int64_t differ = 0;
    for (int64_t j = 0; j < n; ++j) differ += mine.data<float>()[j] != max.data<float>()[j];
    EXPECT_EQ(differ, 0) << p.name << ": the replicated gradient differs between tp ranks";
  }
  return Status::Ok();
}

// The same training on `shape`; tp rank 0 of each dp x cp replica saves into `dir`.
StatusOr<LoraRun> MeshLoraRun(collectives::Communicator& world, const MeshShape& shape,
                              const StepOptions& so, const std::string& dir, bool recompute) {
  TANDEM_ASSIGN_OR_RETURN(MeshGroups groups, CreateMeshGroups(world, shape));
  auto ctx = ops::Context::Cpu();
  MeshModelHooks hooks(*ctx, groups.tp.get(), groups.cp.get());
  model::ModelOptions mo;
  mo.trainable = false;
  mo.recompute = recompute;  // the adapter's forward hooks run twice per block
  mo.parallel = {groups.coords.tp, shape.tp, groups.coords.cp, shape.cp, &hooks};
  TANDEM_ASSIGN_OR_RETURN(auto m, model::LlamaModel::Create(*ctx, SmallConfig(false), mo));
  TANDEM_RETURN_IF_ERROR(m->InitRandom(kInitSeed, kInitStd));
  const peft::LoraParallel lp{groups.coords.tp, shape.tp,         &hooks,
                              groups.coords.dp, groups.coords.cp, shape.cp};
  TANDEM_ASSIGN_OR_RETURN(auto ad,
                          peft::LoraAdapter::Create(*ctx, m->config(), TestLoraConfig(), lp));
  TANDEM_RETURN_IF_ERROR(SetRandomWeights(*ad));
  peft::AdapterSet set(*ctx, m->config(), lp);
  TANDEM_RETURN_IF_ERROR(set.Add(std::move(ad)).status());
  set.set_dropout_seed(kDropoutSeed);
  m->SetAdapter(&set);
  peft::LoraAdapter& a = set.adapter(0);
  std::vector<model::Parameter> params = set.parameters();
  ParallelOptimizerOptions po;
  po.weight_decay = so.weight_decay;
  po.eps = so.eps;
  TANDEM_ASSIGN_OR_RETURN(auto opt, ParallelOptimizer::Create(*ctx, *m, groups, po, &params));
  LoraRun out;
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
      if (groups.dp_cp) {
        TANDEM_RETURN_IF_ERROR(groups.dp_cp->AllReduce(sums, collectives::ReduceOp::kSum));
      }
      out.loss1 = sums.data<float>()[0] / sums.data<float>()[1];
      TANDEM_RETURN_IF_ERROR(ExpectReplicatedGradsEqual(params, groups.tp.get()));
      for (size_t i = 0; i < params.size(); ++i) {
        TANDEM_ASSIGN_OR_RETURN(Tensor gi, a.GatherToHost(i, true));
        out.grads1.push_back(gi);
      }
    }
    TANDEM_RETURN_IF_ERROR(opt->Step(so.lr, step, ClipScale(norm, so.grad_clip)));
  }
  for (size_t i = 0; i < params.size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor w, a.GatherToHost(i));
    out.weights.push_back(w);
    out.names.push_back(params[i].name);
  }
  TANDEM_RETURN_IF_ERROR(peft::SaveLoraAdapter(a, dir));
  // Merging each rank's slice (W_local += s B_local A or s B A_local) gives the adapter's logits.
  const model::Batch eval = LocalBatch(MakeBatch(99, m->config().vocab_size), shape, groups.coords);
  TANDEM_ASSIGN_OR_RETURN(Tensor with_adapter, m->Logits(eval));
  m->SetAdapter(nullptr);
  TANDEM_RETURN_IF_ERROR(a.Merge(*m));
  TANDEM_ASSIGN_OR_RETURN(Tensor merged, m->Logits(eval));
  EXPECT_TRUE(tandem::testing::AllClose(merged, with_adapter, {1e-4, 1e-4})) << "merged logits";
  TANDEM_RETURN_IF_ERROR(groups.Close());
  return out;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The mesh's saved files: exactly its gathered weights, and the reference's within tolerance.
void ExpectSavedMatches(const std::string& got_dir, const std::string& ref_dir,
                        const LoraRun& got) {
  auto a = model::SafetensorsCheckpoint::Open(ref_dir + "/" + peft::kAdapterWeightsFile);
  auto b = model::SafetensorsCheckpoint::Open(got_dir + "/" + peft::kAdapterWeightsFile);
  ASSERT_TRUE(a.ok() && b.ok()) << (a.ok() ? b.status() : a.status()).ToString();
  ASSERT_EQ(a->names(), b->names());
  for (size_t i = 0; i < got.names.size(); ++i) {
    const std::string& name = got.names[i];
    ASSERT_NE(a->Find(name), nullptr) << name;
    auto wa = a->GetFloat(name, a->Find(name)->shape);
    auto wb = b->GetFloat(name, got.weights[i].shape());
    ASSERT_TRUE(wa.ok() && wb.ok()) << name;
    EXPECT_TRUE(tandem::testing::AllClose(*wb, got.weights[i], {0.0, 0.0})) << name;
    EXPECT_TRUE(tandem::testing::AllClose(*wb, *wa, kLoraWeightTol)) << name;
  }
  EXPECT_EQ(ReadText(got_dir + "/" + peft::kAdapterConfigFile),
            ReadText(ref_dir + "/" + peft::kAdapterConfigFile));
}

struct Case {
  int dp, cp, tp;
  bool recompute = false;
};

class LoraTpParity : public ::testing::TestWithParam<Case> {};

TEST_P(LoraTpParity, MatchesOneRank) {
  const Case& c = GetParam();
  auto world = collectives::CreateMpiWorld({.timeout_s = 60});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  if ((*world)->size() != c.dp * c.cp * c.tp) {
    EXPECT_TRUE((*world)->Close().ok());
    GTEST_SKIP() << "mesh for " << c.dp * c.cp * c.tp << " ranks";
  }
  tandem::testing::TempDir tmp;  // this rank's own
  const StepOptions so;
  const LoraRun ref = ReferenceLoraRun(so, tmp.Join("ref"));
  const MeshShape shape{c.dp, c.cp, c.tp};
  auto got = MeshLoraRun(**world, shape, so, tmp.Join("mesh"), c.recompute);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_NEAR(got->loss1, ref.loss1, 1e-5 * std::abs(ref.loss1));
  ASSERT_EQ(got->grads1.size(), ref.grads1.size());
  for (size_t i = 0; i < ref.grads1.size(); ++i) {
    EXPECT_LE(tandem::testing::MaxRelativeError(got->grads1[i], ref.grads1[i]), kGradRelTol)
        << "step-1 gradient of " << ref.names[i];
  }
  for (size_t i = 0; i < ref.weights.size(); ++i) {
    EXPECT_TRUE(tandem::testing::AllClose(got->weights[i], ref.weights[i], kLoraWeightTol))
        << ref.names[i] << " after " << kSteps << " steps";
  }
  const MeshCoords me = CoordsOf(shape, (*world)->rank());
  if (me.tp == 0) ExpectSavedMatches(tmp.Join("mesh"), tmp.Join("ref"), *got);
  EXPECT_TRUE((*world)->Close().ok());
}

INSTANTIATE_TEST_SUITE_P(Meshes, LoraTpParity,
                         ::testing::Values(Case{1, 1, 2}, Case{1, 1, 2, true}, Case{1, 1, 4},
                                           Case{2, 1, 2}, Case{1, 2, 2}, Case{1, 1, 4, true}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           const Case& c = info.param;
                           return "dp" + std::to_string(c.dp) + "cp" + std::to_string(c.cp) + "tp" +
                                  std::to_string(c.tp) + (c.recompute ? "recompute" : "");
                         });

// An adapter that does not declare tensor-parallel support (as S2FT): the model refuses it.
class PlainHooks final : public model::AdapterHooks {
 public:
  Status BeginBatch(const model::Batch&, bool) override { return Status::Ok(); }
  Status ProjectionForward(int64_t, model::Projection, const Tensor&, Tensor&) override {
    return Status::Ok();
  }
  Status ProjectionBackward(int64_t, model::Projection, const Tensor&, const Tensor&,
                            Tensor&) override {
    return Status::Ok();
  }
  Status ZeroGrads() override { return Status::Ok(); }
};

TEST(LoraTp, OtherAdaptersAreRefusedUnderTp) {
  auto world = collectives::CreateMpiWorld({.timeout_s = 60});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  const MeshShape shape{1, 1, (*world)->size()};
  auto groups = CreateMeshGroups(**world, shape);
  ASSERT_TRUE(groups.ok()) << groups.status().ToString();
  auto ctx = ops::Context::Cpu();
  MeshModelHooks hooks(*ctx, groups->tp.get(), nullptr);
  model::ModelOptions mo;
  mo.trainable = false;
  mo.parallel = {groups->coords.tp, shape.tp, 0, 1, &hooks};
  auto m = model::LlamaModel::Create(*ctx, SmallConfig(false), mo);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  PlainHooks plain;
  (*m)->SetAdapter(&plain);
  const GlobalBatch g = MakeBatch(1, (*m)->config().vocab_size);
  model::Batch b;
  b.tokens = g.tokens;
  b.targets = g.targets;
  const Status st = (*m)->Loss(b).status();  // refused before any collective
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented) << st.ToString();
  EXPECT_NE(st.message().find("tensor parallelism"), std::string::npos) << st.ToString();
  (*m)->SetAdapter(nullptr);
  EXPECT_TRUE(groups->Close().ok());
  EXPECT_TRUE((*world)->Close().ok());
}

// --- trainer level ---------------------------------------------------------------------------

std::vector<std::string> TrainOverrides(const std::string& dir, const std::string& run,
                                        const MeshShape& m) {
  return {"model.hidden_size=32",
          "model.intermediate_size=48",
          "model.num_layers=2",
          "model.num_heads=4",
          "model.num_kv_heads=2",
          "model.max_position_embeddings=64",
          "data.dir=\"" + dir + "/data\"",
          "data.inputs=[\"" + dir + "/corpus.jsonl\"]",
          "data.seq_len=32",
          StrCat("train.micro_batch_size=", 4 / m.dp),
          "train.steps=6",
          "train.save_interval=3",
          "train.lr=1e-2",
          "train.warmup_steps=2",
          "train.log_interval=100",
          "train.eval_interval=0",
          "train.eval_batches=1",
          "train.out_dir=\"" + dir + "/" + run + "\"",
          "peft.method=\"lora\"",
          "peft.r=4",
          "peft.dropout=0.1",
          StrCat("parallel.dp=", m.dp),
          StrCat("parallel.cp=", m.cp),
          StrCat("parallel.tp=", m.tp)};
}

std::vector<double> Losses(const std::string& run_dir) {
  std::vector<double> losses;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    losses.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  }
  return losses;
}

void ExpectSameAdapter(const std::string& want_dir, const std::string& got_dir,
                       const std::string& what) {
  const std::string file = std::string("/checkpoints/step-6/") + peft::kAdapterWeightsFile;
  auto a = model::SafetensorsCheckpoint::Open(want_dir + file);
  auto b = model::SafetensorsCheckpoint::Open(got_dir + file);
  ASSERT_TRUE(a.ok() && b.ok()) << what << ": " << (a.ok() ? b.status() : a.status()).ToString();
  ASSERT_EQ(a->names(), b->names()) << what;
  for (const std::string& name : a->names()) {
    auto wa = a->GetFloat(name, a->Find(name)->shape);
    auto wb = b->GetFloat(name, a->Find(name)->shape);
    ASSERT_TRUE(wa.ok() && wb.ok()) << what << " " << name;
    EXPECT_TRUE(tandem::testing::AllClose(*wb, *wa, {1e-4, 1e-4})) << what << " " << name;
  }
}

void ExpectLosses(const std::vector<double>& got, const std::vector<double>& want, size_t first,
                  const std::string& what) {
  ASSERT_EQ(got.size() + first, want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[first + i], 1e-5 * want[first + i])
        << what << " step " << first + i + 1;
  }
}

TEST(LoraTpTrainer, MatchesOneProcessAndResumesOnOneRank) {
  auto world_or = collectives::CreateMpiWorld({.timeout_s = 120});
  ASSERT_TRUE(world_or.ok()) << world_or.status().ToString();
  collectives::Communicator& world = **world_or;
  const MeshShape mesh = world.size() == 4 ? MeshShape{2, 1, 2} : MeshShape{1, 1, world.size()};
  tandem::testing::TempDir tmp;
  const std::string dir = tandem::testing::SharedDir(world, tmp);
  if (world.rank() == 0) {
    tandem::testing::WriteWordCorpus(dir + "/corpus.jsonl", 13);
    auto cfg = trainer::LoadTrainConfig("", TrainOverrides(dir, "single", MeshShape{}));
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    auto single = trainer::RunTraining(*cfg, "test");
    ASSERT_TRUE(single.ok()) << single.status().ToString();
  }
  ASSERT_TRUE(world.Barrier().ok());
  {
    auto cfg = trainer::LoadTrainConfig("", TrainOverrides(dir, "mesh", mesh));
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    trainer::TrainEnv env;
    env.world = &world;
    auto r = trainer::RunTraining(*cfg, "test", env);
    ASSERT_TRUE(r.ok()) << mesh.ToString() << ": " << r.status().ToString();
  }
  {  // the same mesh with the frozen base's layers streamed from host memory
    std::vector<std::string> o = TrainOverrides(dir, "mesh-streamed", mesh);
    o.push_back("model.offload=\"host\"");
    auto cfg = trainer::LoadTrainConfig("", o);
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    trainer::TrainEnv env;
    env.world = &world;
    auto r = trainer::RunTraining(*cfg, "test", env);
    ASSERT_TRUE(r.ok()) << mesh.ToString() << " streamed: " << r.status().ToString();
  }
  ASSERT_TRUE(world.Barrier().ok());
  if (world.rank() == 0) {  // bitwise: the same mesh and math, only where the base weights live
    EXPECT_EQ(Losses(dir + "/mesh-streamed"), Losses(dir + "/mesh"));
    const std::string file = std::string("/checkpoints/step-6/") + peft::kAdapterWeightsFile;
    std::ifstream a(dir + "/mesh" + file, std::ios::binary), b(dir + "/mesh-streamed" + file,
                                                                std::ios::binary);
    const std::string wa((std::istreambuf_iterator<char>(a)), {});
    const std::string wb((std::istreambuf_iterator<char>(b)), {});
    EXPECT_FALSE(wa.empty());
    EXPECT_TRUE(wa == wb) << "the streamed mesh run's adapter differs";
  }
  ASSERT_TRUE(world.Barrier().ok());
  if (world.rank() == 0) {
    ExpectLosses(Losses(dir + "/mesh"), Losses(dir + "/single"), 0, mesh.ToString());
    ExpectSameAdapter(dir + "/single", dir + "/mesh", mesh.ToString());
    // The mesh's step-3 universal checkpoint, resumed by one process.
    std::vector<std::string> o = TrainOverrides(dir, "resumed", MeshShape{});
    o.push_back("train.resume=\"" + dir + "/mesh/checkpoints/universal/step-3.h5\"");
    auto cfg = trainer::LoadTrainConfig("", o);
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    auto r = trainer::RunTraining(*cfg, "test");
    ASSERT_TRUE(r.ok()) << "resumed: " << r.status().ToString();
    EXPECT_EQ(r->resumed_from_step, 3);
    ExpectLosses(Losses(dir + "/resumed"), Losses(dir + "/mesh"), 3, "resumed on one rank");
    ExpectSameAdapter(dir + "/mesh", dir + "/resumed", "resumed on one rank");
  }
  ASSERT_TRUE(world.Barrier().ok());
  EXPECT_TRUE(world.Close().ok());
}

}  // namespace
}  // namespace tandem::parallel::testing

TANDEM_MPI_TEST_MAIN()

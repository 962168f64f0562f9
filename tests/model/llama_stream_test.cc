// ModelOptions::stream_layers on the CPU: layer weights in a host buffer copied a layer ahead into
// two slots give bitwise the results of the plain model (logits, losses, gradients, with and
// without recompute, tied or not), read weights changed between passes, save and load the same
// files, and copy exactly the layers the schedule says. With a LayerReader (the NVMe tier: the
// buffer maps a file that the reader reads with io_uring) the same holds, and reader errors fail
// the pass naming the layer.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "model/llama.h"
#include "offload/mapped_file.h"
#include "offload/storage.h"
#include "offload/topology.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::model {
namespace {

LlamaConfig Config(bool tied, int64_t layers) {
  LlamaConfig c;
  c.vocab_size = 41;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rope_theta = 100.0;
  c.tie_word_embeddings = tied;
  return c;
}

std::unique_ptr<LlamaModel> Make(ops::Context& ctx, const LlamaConfig& c, ModelOptions o) {
  StatusOr<std::unique_ptr<LlamaModel>> m = LlamaModel::Create(ctx, c, o);
  TANDEM_CHECK_OK(m);
  TANDEM_CHECK_OK((*m)->InitRandom(7, 0.2f));
  return std::move(m).value();
}

Batch MakeBatch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  Batch b;
  b.tokens = testing::RandomInts({B, T}, seed, static_cast<int32_t>(V));
  b.targets = testing::RandomInts({B, T}, seed + 1, static_cast<int32_t>(V));
  b.targets.data<int32_t>()[1] = ops::kIgnoreIndex;
  return b;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

bool SameBits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

void ExpectSameGrads(LlamaModel& a, LlamaModel& b) {
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    EXPECT_TRUE(SameBits(a.parameters()[i].grad, b.parameters()[i].grad)) << a.parameters()[i].name;
  }
}

// Bytes of one layer's weights (f32 on the CPU), padding between groups included.
int64_t LayerBytes(const LlamaModel& m) {
  int64_t numel = 0;
  for (const Parameter& q : m.parameters()) {
    if (q.name.rfind("model.layers.0.", 0) == 0) numel += q.weight.numel();
  }
  return numel * 4;
}

TEST(LlamaStreamTest, GivesBitwiseThePlainModelsResults) {
  for (bool tied : {false, true}) {
    for (bool recompute : {false, true}) {
      for (int64_t layers : {1, 2, 5}) {
        SCOPED_TRACE(StrCat("tied ", tied, " recompute ", recompute, " layers ", layers));
        const LlamaConfig c = Config(tied, layers);
        auto ctx = ops::Context::Cpu();
        auto plain = Make(*ctx, c, {.recompute = recompute});
        auto streamed = Make(*ctx, c, {.recompute = recompute, .stream_layers = true});
        EXPECT_FALSE(streamed->weights_flat().defined());
        EXPECT_TRUE(plain->weights_flat().defined());
        const Batch batch = MakeBatch(2, 9, c.vocab_size, 3 + layers);
        for (LlamaModel* m : {plain.get(), streamed.get()}) {
          ASSERT_TRUE(m->ZeroGrads().ok());
          ASSERT_TRUE(m->ForwardBackward(batch, 0.1f).ok());
          ASSERT_TRUE(m->ForwardBackward(MakeBatch(1, 4, c.vocab_size, 8), 0.2f).ok());
        }
        ExpectSameGrads(*plain, *streamed);
        const LossSum a = *plain->Loss(batch), b = *streamed->Loss(batch);
        EXPECT_EQ(a.sum, b.sum);
        EXPECT_EQ(a.count, b.count);
        StatusOr<Tensor> la = plain->Logits(batch), lb = streamed->Logits(batch);
        ASSERT_TRUE(la.ok() && lb.ok());
        EXPECT_TRUE(SameBits(*la, *lb));
        EXPECT_EQ(plain->streamed_bytes(), 0);
        EXPECT_GT(streamed->streamed_bytes(), 0);
      }
    }
  }
}

// Forward copies every layer; backward starts on the two layers forward left in the slots.
TEST(LlamaStreamTest, CopiesEachLayerOnceAPassButTheTwoLeftResident) {
  const LlamaConfig c = Config(false, 5);
  auto ctx = ops::Context::Cpu();
  auto m = Make(*ctx, c, {.stream_layers = true});
  const int64_t E = LayerBytes(*m);
  ASSERT_TRUE(m->ZeroGrads().ok());
  const Batch batch = MakeBatch(2, 6, c.vocab_size, 1);
  int64_t before = m->streamed_bytes();
  ASSERT_TRUE(m->Loss(batch).ok());
  const int64_t forward = m->streamed_bytes() - before;
  EXPECT_GE(forward, 5 * E);
  EXPECT_LT(forward, 5 * E + 5 * 64 * 6 * 4);  // at most the alignment padding of 6 groups
  before = m->streamed_bytes();
  ASSERT_TRUE(m->ForwardBackward(batch, 1.0f).ok());
  EXPECT_EQ(m->streamed_bytes() - before, forward / 5 * (5 + 3));
}

// Weights written into Parameter::weight (the host buffer) between passes are read by the next
// pass, as an offloaded optimizer's updates must be.
TEST(LlamaStreamTest, ReadsWeightsChangedBetweenPasses) {
  const LlamaConfig c = Config(false, 3);
  auto ctx = ops::Context::Cpu();
  auto plain = Make(*ctx, c, {});
  auto streamed = Make(*ctx, c, {.stream_layers = true});
  const Batch batch = MakeBatch(2, 7, c.vocab_size, 5);
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE(StrCat("step ", step));
    for (LlamaModel* m : {plain.get(), streamed.get()}) {
      ASSERT_TRUE(m->ZeroGrads().ok());
      ASSERT_TRUE(m->ForwardBackward(batch, 0.05f).ok());
      for (Parameter& p : m->parameters()) {  // plain SGD, in place
        EXPECT_TRUE(p.weight.device().is_cpu());
        float* w = p.weight.data<float>();
        const float* g = p.grad.data<float>();
        for (int64_t i = 0; i < p.weight.numel(); ++i) w[i] -= 0.5f * g[i];
      }
    }
    ExpectSameGrads(*plain, *streamed);
  }
  EXPECT_EQ(plain->Loss(batch)->sum, streamed->Loss(batch)->sum);
}

TEST(LlamaStreamTest, SavesAndLoadsTheSameFiles) {
  const LlamaConfig c = Config(false, 2);
  auto ctx = ops::Context::Cpu();
  auto plain = Make(*ctx, c, {});
  auto streamed = Make(*ctx, c, {.stream_layers = true});
  testing::TempDir tmp;
  const std::string dir = tmp.path();
  ASSERT_TRUE(streamed->SaveSafetensors(dir + "/s", DType::kF32).ok());
  ASSERT_TRUE(plain->SaveSafetensors(dir + "/p", DType::kF32).ok());
  EXPECT_EQ(ReadBytes(dir + "/s/model.safetensors"), ReadBytes(dir + "/p/model.safetensors"));
  auto loaded = Make(*ctx, c, {.stream_layers = true});
  ASSERT_TRUE(loaded->InitRandom(99, 0.3f).ok());  // different weights first
  ASSERT_TRUE(loaded->LoadSafetensors(dir + "/p").ok());
  const Batch batch = MakeBatch(1, 8, c.vocab_size, 2);
  StatusOr<Tensor> a = plain->Logits(batch), b = loaded->Logits(batch);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(SameBits(*a, *b));
}

// The host buffer comes from ModelOptions::stream_host_allocator when one is given (the trainer
// passes memory placed by the offload tier policy); a device allocator there is refused.
TEST(LlamaStreamTest, TakesTheLayerBufferFromTheGivenAllocator) {
  const LlamaConfig c = Config(false, 3);
  auto ctx = ops::Context::Cpu();
  offload::PlacedHostAllocator placed(
      offload::PlaceOnThisMachine(offload::StateKind::kWeightsBf16));
  {
    auto plain = Make(*ctx, c, {});
    auto m = Make(*ctx, c, {.stream_layers = true, .stream_host_allocator = &placed});
    EXPECT_GE(placed.stats().bytes_in_use, static_cast<size_t>(3 * LayerBytes(*m)));
    const Batch batch = MakeBatch(2, 5, c.vocab_size, 4);
    EXPECT_EQ(plain->Loss(batch)->sum, m->Loss(batch)->sum);
  }
  EXPECT_EQ(placed.stats().bytes_in_use, 0u);  // given back with the model

  class DeviceAllocator : public Allocator {
   public:
    StatusOr<void*> Allocate(size_t n) override { return HostAllocator().Allocate(n); }
    void Deallocate(void* p, size_t n) override { HostAllocator().Deallocate(p, n); }
    Device device() const override { return Device::Cuda(0); }
  } device;
  StatusOr<std::unique_ptr<LlamaModel>> bad =
      LlamaModel::Create(*ctx, c, {.stream_layers = true, .stream_host_allocator = &device});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("stream_host_allocator"), std::string::npos)
      << bad.status().ToString();
}

// The NVMe tier as the trainer builds it: the layer buffer maps a file; layers are read from that
// file through the io_uring engine (buffered where the filesystem refuses O_DIRECT).
class FileReader : public LayerReader {
 public:
  Status Open(const std::string& path, const offload::FaultOptions* faults = nullptr) {
    TANDEM_ASSIGN_OR_RETURN(
        file_, offload::IoUringStorage::Open(path, {.create = false, .verify_checksums = false}));
    if (faults != nullptr)
      faulty_ = std::make_unique<offload::FaultInjectingStorage>(file_.get(), *faults);
    return Status::Ok();
  }
  Status Read(uint64_t offset, void* dst, size_t n) override {
    ++reads;
    return faulty_ ? faulty_->Read(offset, dst, n) : file_->Read(offset, dst, n);
  }
  int reads = 0;

 private:
  std::unique_ptr<offload::IoUringStorage> file_;
  std::unique_ptr<offload::FaultInjectingStorage> faulty_;
};

TEST(LlamaStreamTest, ReadsLayersThroughAReaderOfTheMappedFile) {
  testing::TempDir tmp;
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(StrCat("recompute ", recompute));
    const LlamaConfig c = Config(false, 4);
    auto ctx = ops::Context::Cpu();
    auto plain = Make(*ctx, c, {.recompute = recompute});
    offload::MappedFileAllocator files(tmp.path());
    FileReader reader;
    {
      auto m = Make(*ctx, c,
                    {.recompute = recompute,
                     .stream_layers = true,
                     .stream_host_allocator = &files,
                     .stream_reader = &reader});
      const Parameter& first = m->parameters()[1];  // model.layers.0's q_proj: the buffer's start
      ASSERT_EQ(first.name, "model.layers.0.self_attn.q_proj.weight");
      StatusOr<std::string> path = files.PathOf(first.weight.raw_data());
      ASSERT_TRUE(path.ok()) << path.status().ToString();
      EXPECT_TRUE(std::filesystem::exists(*path));
      ASSERT_TRUE(reader.Open(*path).ok());
      const Batch batch = MakeBatch(2, 7, c.vocab_size, 5);
      for (int step = 0; step < 3; ++step) {  // SGD in place, through the mapping
        for (LlamaModel* x : {plain.get(), m.get()}) {
          ASSERT_TRUE(x->ZeroGrads().ok());
          StatusOr<LossSum> l = x->ForwardBackward(batch, 0.05f);
          ASSERT_TRUE(l.ok()) << l.status().ToString();
          for (Parameter& p : x->parameters()) {
            float* w = p.weight.data<float>();
            const float* g = p.grad.data<float>();
            for (int64_t i = 0; i < p.weight.numel(); ++i) w[i] -= 0.5f * g[i];
          }
        }
        ExpectSameGrads(*plain, *m);
      }
      EXPECT_EQ(plain->Loss(batch)->sum, m->Loss(batch)->sum);
      EXPECT_GT(reader.reads, 0);
      // One read per layer load, each of one layer's bytes (alignment padding included).
      EXPECT_EQ(m->streamed_bytes() % reader.reads, 0);
      EXPECT_GE(m->streamed_bytes() / reader.reads, LayerBytes(*m));
      EXPECT_LT(m->streamed_bytes() / reader.reads, LayerBytes(*m) + 6 * 64 * 4);
    }
    EXPECT_EQ(files.stats().bytes_in_use, 0u);  // the file went with the model
    int left = 0;
    for (const auto& e : std::filesystem::directory_iterator(tmp.path()))
      left += e.is_regular_file();
    EXPECT_EQ(left, 0);
  }
}

TEST(LlamaStreamTest, ReaderErrorsFailThePassNamingTheLayer) {
  testing::TempDir tmp;
  const LlamaConfig c = Config(false, 3);
  auto ctx = ops::Context::Cpu();
  offload::MappedFileAllocator files(tmp.path());
  FileReader reader;
  auto m = Make(*ctx, c,
                {.stream_layers = true, .stream_host_allocator = &files, .stream_reader = &reader});
  const offload::FaultOptions eio{.eio_probability = 1.0};
  ASSERT_TRUE(reader.Open(*files.PathOf(m->parameters()[1].weight.raw_data()), &eio).ok());
  StatusOr<LossSum> l = m->Loss(MakeBatch(1, 5, c.vocab_size, 1));
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kDataLoss) << l.status().ToString();
  EXPECT_NE(l.status().message().find("streamed layer 0"), std::string::npos)
      << l.status().ToString();

  // A reader without streamed layers is a configuration error.
  StatusOr<std::unique_ptr<LlamaModel>> bad =
      LlamaModel::Create(*ctx, c, {.stream_reader = &reader});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("stream_layers"), std::string::npos);
}

}  // namespace
}  // namespace tandem::model

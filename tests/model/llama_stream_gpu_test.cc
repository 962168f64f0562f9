// ModelOptions::stream_layers on CUDA: bf16 layer weights in page-locked host memory, two layers
// on the device, the next copied on a side stream while the current one computes. The same
// kernels read the same bits, so logits, losses and gradients are bitwise those of the resident
// model; device memory drops by all but two layers. The same with the layers read from a mapped
// file through the io_uring engine (the NVMe tier), weights changed between passes included.
// Skipped without a GPU.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>

#include "model/llama.h"
#include "offload/mapped_file.h"
#include "offload/storage.h"
#include "tests/common/testing.h"

namespace tandem::model {
namespace {

LlamaConfig Config() {
  LlamaConfig c;
  c.vocab_size = 301;
  c.hidden_size = 256;
  c.intermediate_size = 704;
  c.num_hidden_layers = 7;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;  // the CUDA attention kernels take D 64 or 128
  c.rope_theta = 10000.0;
  return c;
}

std::unique_ptr<ops::Context> Gpu() {
  StatusOr<std::unique_ptr<ops::Context>> ctx = ops::Context::Cuda(0);
  TANDEM_CHECK_OK(ctx);
  return std::move(ctx).value();
}

std::unique_ptr<LlamaModel> Make(ops::Context& ctx, ModelOptions o) {
  StatusOr<std::unique_ptr<LlamaModel>> m = LlamaModel::Create(ctx, Config(), o);
  TANDEM_CHECK_OK(m);
  TANDEM_CHECK_OK((*m)->InitRandom(11, 0.05f));
  return std::move(m).value();
}

Batch MakeBatch(int64_t B, int64_t T, uint64_t seed) {
  Batch b;
  b.tokens = testing::RandomInts({B, T}, seed, 301);
  b.targets = testing::RandomInts({B, T}, seed + 1, 301);
  return b;
}

Tensor Host(const Tensor& t) {
  StatusOr<Tensor> h = CopyToHostBlocking(t);
  TANDEM_CHECK_OK(h);
  return *h;
}

bool SameBits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

TEST(LlamaStreamGpuTest, FrozenBaseGivesBitwiseTheResidentLogitsInLessMemory) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = Gpu();
  const size_t before = ctx->allocator().stats().bytes_in_use;
  auto plain = Make(*ctx, {.trainable = false});
  const size_t plain_bytes = ctx->allocator().stats().bytes_in_use - before;
  auto streamed = Make(*ctx, {.trainable = false, .stream_layers = true});
  const size_t streamed_bytes = ctx->allocator().stats().bytes_in_use - before - plain_bytes;
  // 7 layers of bf16 weights on the device against 2 slots.
  int64_t layer_numel = 0;
  for (const Parameter& p : plain->parameters()) {
    if (p.name.rfind("model.layers.0.", 0) == 0) layer_numel += p.weight.numel();
  }
  EXPECT_GE(plain_bytes - streamed_bytes, static_cast<size_t>(5 * layer_numel * 2));
  EXPECT_TRUE(streamed->parameters()[1].weight.device().is_cpu());   // layer 0's q_proj
  EXPECT_TRUE(streamed->parameters()[0].weight.device().is_cuda());  // the embedding
  for (bool recompute : {false, true}) {
    const Batch batch = MakeBatch(3, 130, recompute ? 5 : 6);
    StatusOr<Tensor> a = plain->Logits(batch), b = streamed->Logits(batch);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_TRUE(SameBits(*a, *b));
    StatusOr<LossSum> la = plain->Loss(batch), lb = streamed->Loss(batch);
    ASSERT_TRUE(la.ok() && lb.ok());
    EXPECT_EQ(la->sum, lb->sum);
  }
}

TEST(LlamaStreamGpuTest, GradientsAreBitwiseTheResidentOnes) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = Gpu();
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(StrCat("recompute ", recompute));
    auto plain = Make(*ctx, {.recompute = recompute, .device_master = false});
    auto streamed =
        Make(*ctx, {.recompute = recompute, .device_master = false, .stream_layers = true});
    for (LlamaModel* m : {plain.get(), streamed.get()}) {
      ASSERT_TRUE(m->ZeroGrads().ok());
      ASSERT_TRUE(m->ForwardBackward(MakeBatch(2, 200, 1), 0.01f).ok());
      ASSERT_TRUE(m->ForwardBackward(MakeBatch(1, 77, 3), 0.02f).ok());
    }
    for (size_t i = 0; i < plain->parameters().size(); ++i) {
      EXPECT_TRUE(SameBits(Host(plain->parameters()[i].grad), Host(streamed->parameters()[i].grad)))
          << plain->parameters()[i].name;
    }
    EXPECT_GT(streamed->streamed_bytes(), 0);
  }
}

// New host weights (what an offloaded optimizer writes) are read by the next pass.
TEST(LlamaStreamGpuTest, ReadsHostWeightsChangedBetweenPasses) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = Gpu();
  auto plain = Make(*ctx, {.trainable = false});
  auto streamed = Make(*ctx, {.trainable = false, .stream_layers = true});
  const Batch batch = MakeBatch(2, 64, 9);
  ASSERT_TRUE(streamed->Loss(batch).ok());                        // slots now hold layers 5 and 6
  for (size_t i : {size_t{1}, plain->parameters().size() - 5}) {  // q_proj 0, down_proj 6
    Parameter& s = streamed->parameters()[i];
    Tensor fresh = testing::RandomInts(s.weight.shape(), 40 + i, 100);
    Tensor bf = Tensor::Cpu(s.weight.shape(), DType::kBF16);
    for (int64_t j = 0; j < bf.numel(); ++j) {
      bf.data<Bf16>()[j] = FloatToBf16(0.001f * static_cast<float>(fresh.data<int32_t>()[j] - 50));
    }
    ASSERT_TRUE(CopyTensor(s.weight, bf).ok());
    ASSERT_TRUE(CopyTensor(plain->parameters()[i].weight, bf, ctx->stream()).ok());
    ASSERT_TRUE(ctx->Synchronize().ok());
  }
  StatusOr<LossSum> a = plain->Loss(batch), b = streamed->Loss(batch);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->sum, b->sum);
}

TEST(LlamaStreamGpuTest, RefusesADeviceMasterForStreamedLayers) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = Gpu();
  StatusOr<std::unique_ptr<LlamaModel>> m =
      LlamaModel::Create(*ctx, Config(), {.stream_layers = true});
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("model.layers.0.self_attn.q_proj.weight"), std::string::npos)
      << m.status().ToString();
  EXPECT_NE(m.status().message().find("device_master = false"), std::string::npos);
}

class FileReader : public LayerReader {
 public:
  Status Open(const std::string& path) {
    TANDEM_ASSIGN_OR_RETURN(
        file_, offload::IoUringStorage::Open(path, {.create = false, .verify_checksums = false}));
    return Status::Ok();
  }
  Status Read(uint64_t offset, void* dst, size_t n) override {
    ++reads;
    return file_->Read(offset, dst, n);
  }
  std::atomic<int> reads{0};

 private:
  std::unique_ptr<offload::IoUringStorage> file_;
};

TEST(LlamaStreamGpuTest, LayersReadFromAMappedFileGiveBitwiseTheResidentResults) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = Gpu();
  testing::TempDir tmp;
  offload::MappedFileAllocator files(tmp.path());
  FileReader reader;
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(StrCat("recompute ", recompute));
    auto plain = Make(*ctx, {.recompute = recompute, .device_master = false});
    auto streamed = Make(*ctx, {.recompute = recompute,
                                .device_master = false,
                                .stream_layers = true,
                                .stream_host_allocator = &files,
                                .stream_reader = &reader});
    ASSERT_TRUE(reader.Open(*files.PathOf(streamed->parameters()[1].weight.raw_data())).ok());
    for (int pass = 0; pass < 2; ++pass) {
      for (LlamaModel* m : {plain.get(), streamed.get()}) {
        ASSERT_TRUE(m->ZeroGrads().ok());
        ASSERT_TRUE(m->ForwardBackward(MakeBatch(2, 200, 1 + pass), 0.01f).ok());
      }
      for (size_t i = 0; i < plain->parameters().size(); ++i) {
        EXPECT_TRUE(
            SameBits(Host(plain->parameters()[i].grad), Host(streamed->parameters()[i].grad)))
            << plain->parameters()[i].name;
      }
      // New weights for layer 3's down_proj, written through the mapping and into the plain model.
      const size_t down3 = 1 + 3 * 9 + 6;
      Parameter& p = streamed->parameters()[down3];
      ASSERT_EQ(p.name, "model.layers.3.mlp.down_proj.weight");
      Tensor fresh = testing::RandomInts(p.weight.shape(), 70 + pass, 100);
      Tensor bf = Tensor::Cpu(p.weight.shape(), DType::kBF16);
      for (int64_t j = 0; j < bf.numel(); ++j) {
        bf.data<Bf16>()[j] =
            FloatToBf16(0.001f * static_cast<float>(fresh.data<int32_t>()[j] - 50));
      }
      ASSERT_TRUE(CopyTensor(p.weight, bf).ok());
      ASSERT_TRUE(CopyTensor(plain->parameters()[down3].weight, bf, ctx->stream()).ok());
      ASSERT_TRUE(ctx->Synchronize().ok());
    }
    const Batch batch = MakeBatch(3, 130, 9);
    StatusOr<Tensor> a = plain->Logits(batch), b = streamed->Logits(batch);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_TRUE(SameBits(*a, *b));
    EXPECT_GT(reader.reads.load(), 0);
  }
}

}  // namespace
}  // namespace tandem::model

// Universal checkpoints: round trip, resharding between tp sizes with thread-group ranks,
// metadata, coverage errors, corruption, truncation, keep-last-K and the background writer.
#include "checkpoint/universal.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "checkpoint/internal/h5_layout.h"
#include "checkpoint/universal_writer.h"
#include "collectives/thread_group.h"
#include "tests/checkpoint/universal_test_util.h"
#include "tests/common/testing.h"

namespace tandem::checkpoint {
namespace {

using ::tandem::testing::TempDir;
using testing::ExpectReadsMatch;
using testing::MetaFor;
using testing::ShardsOf;

// Runs fn(rank, comm) on `n` thread ranks and returns each rank's result.
template <typename Fn>
std::vector<Status> OnThreads(int n, Fn fn) {
  auto comms = collectives::CreateThreadGroup(n, {.timeout_s = 20});
  std::vector<Status> results(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] { results[r] = fn(r, comms[r].get()); });
  }
  for (auto& t : threads) t.join();
  return results;
}

std::vector<char> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

TEST(UniversalLayout, IsaLCrcMatchesZlibAndCombines) {
  Tensor a = ::tandem::testing::RandomUniform({1001}, 3);
  const auto* p = static_cast<const unsigned char*>(a.raw_data());
  const uint32_t z = static_cast<uint32_t>(crc32(0, p, static_cast<uInt>(a.num_bytes())));
  EXPECT_EQ(internal::Crc32(0, p, a.num_bytes()), z);
  const uint32_t c1 = internal::Crc32(0, p, 400),
                 c2 = internal::Crc32(0, p + 400, a.num_bytes() - 400);
  EXPECT_EQ(internal::Crc32Combine(c1, c2, static_cast<int64_t>(a.num_bytes()) - 400), z);
}

TEST(UniversalCheckpoint, RoundTripOneRankWithMetadata) {
  TempDir dir;
  auto shards = ShardsOf(0, 0, 1, /*seed=*/11, /*step=*/42);
  auto path = SaveUniversal(dir.path(), MetaFor(42, 1, 1), shards, nullptr, {});
  ASSERT_TRUE(path.ok()) << path.status().ToString();
  EXPECT_EQ(*path, dir.Join("step-42.h5"));
  auto latest = LatestCheckpoint(dir.path());
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, *path);
  auto reader = UniversalReader::Open(dir.path());
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  const UniversalMeta& m = reader->meta();
  EXPECT_EQ(m.step, 42);
  EXPECT_EQ(m.format_version, kUniversalFormatVersion);
  EXPECT_EQ(m.config_toml, "[train]\nsteps = 10\n");
  EXPECT_EQ(m.data_position_json, R"({"epoch": 1, "offset": 12345})");
  EXPECT_EQ(m.rng_state_json, R"({"seed": 7, "counter": 99})");
  EXPECT_EQ(m.adapter_configs.at("a1"), R"({"r": 2})");
  EXPECT_FALSE(m.git_commit.empty());
  ASSERT_EQ(reader->tensors().size(), testing::ModelSpecs().size());
  const TensorInfo* qkv = reader->Find("model.layers.0.self_attn.qkv.weight");
  ASSERT_NE(qkv, nullptr);
  EXPECT_EQ(qkv->split.fused.size(), 3u);
  EXPECT_EQ(qkv->split.fused[1].name, "k");
  EXPECT_EQ(qkv->step, 42);
  const TensorInfo* emb = reader->Find("model.embed_tokens.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_TRUE(emb->split.vocab_parallel);
  EXPECT_FALSE(reader->Find("frozen.weight")->has_moments);
  EXPECT_EQ(reader->Find("lora_B", "a1")->step, 142);
  EXPECT_TRUE(reader->VerifyAll().ok());
  ExpectReadsMatch(*reader, 0, 1, 11);
  EXPECT_NE(reader->Describe().find("fused=q:16,k:8,v:8"), std::string::npos);
}

// 4 thread ranks save under tp=4 and under dp2 x tp2; reads under tp 1, 2 and 4 are bitwise the
// independently sliced tensors.
TEST(UniversalCheckpoint, ReshardsBetweenTpSizes) {
  for (int tp : {4, 2}) {
    TempDir dir;
    const int dp = 4 / tp;
    auto results = OnThreads(4, [&](int rank, collectives::Communicator* comm) -> Status {
      auto path =
          SaveUniversal(dir.path(), MetaFor(7, dp, tp), ShardsOf(rank / tp, rank % tp, tp, 5, 7),
                        comm, {.chunk_bytes = 64});
      return path.status();
    });
    for (const Status& s : results) ASSERT_TRUE(s.ok()) << s.ToString();
    auto reader = UniversalReader::Open(dir.path());
    ASSERT_TRUE(reader.ok()) << reader.status().ToString();
    EXPECT_EQ(reader->meta().tp, tp);
    // 37 vocabulary rows padded to a multiple of tp.
    EXPECT_EQ(reader->Find("model.embed_tokens.weight")->split.vocab_padding, tp == 4 ? 3 : 1);
    EXPECT_TRUE(reader->VerifyAll().ok());
    for (int t : {1, 2, 4}) {
      for (int r = 0; r < t; ++r) ExpectReadsMatch(*reader, r, t, 5);
    }
    // Any box: a column slice crossing row blocks.
    auto box = reader->Read("model.layers.0.mlp.down_proj.weight", Hyperslab{{1, 2}, {6, 5}});
    ASSERT_TRUE(box.ok());
    const Tensor full = testing::Logical(testing::ModelSpecs()[5], 0, 5);
    for (int64_t i = 0; i < 6; ++i) {
      for (int64_t j = 0; j < 5; ++j) {
        EXPECT_EQ(box->master.data<float>()[i * 5 + j], full.data<float>()[(i + 1) * 12 + j + 2]);
      }
    }
  }
}

TEST(UniversalCheckpoint, ReadsUnderThreadRanksConcurrently) {
  TempDir dir;
  ASSERT_TRUE(
      SaveUniversal(dir.path(), MetaFor(3, 1, 1), ShardsOf(0, 0, 1, 9, 3), nullptr, {}).ok());
  auto results = OnThreads(4, [&](int rank, collectives::Communicator*) -> Status {
    auto reader = UniversalReader::Open(dir.path());
    if (!reader.ok()) return reader.status();
    ExpectReadsMatch(*reader, rank, 4, 9);
    return Status::Ok();
  });
  for (const Status& s : results) EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST(UniversalCheckpoint, GapsAndOverlapsAreRefusedOnEveryRank) {
  TempDir dir;
  // tp rank 1 of 2 gives nothing: half of every split tensor is missing.
  auto results = OnThreads(2, [&](int rank, collectives::Communicator* comm) -> Status {
    auto shards = rank == 0 ? ShardsOf(0, 0, 2, 1, 1) : std::vector<TensorShard>{};
    return SaveUniversal(dir.path(), MetaFor(1, 1, 2), shards, comm, {}).status();
  });
  for (const Status& s : results) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find("not covered by any rank's shard"), std::string::npos)
        << s.message();
  }
  // Both ranks give the replicated tensors: overlap.
  results = OnThreads(2, [&](int rank, collectives::Communicator* comm) -> Status {
    auto shards = ShardsOf(0, 0, 1, 1, 1);
    return SaveUniversal(dir.path(), MetaFor(1, 2, 1), shards, comm, {}).status();
  });
  for (const Status& s : results) {
    EXPECT_NE(s.message().find("covered by more than one shard"), std::string::npos) << s.message();
  }
  EXPECT_FALSE(std::filesystem::exists(dir.Join("latest")));
}

TEST(UniversalCheckpoint, CorruptedByteIsDetectedNamingTheDataset) {
  TempDir dir;
  auto path = SaveUniversal(dir.path(), MetaFor(5, 1, 1), ShardsOf(0, 0, 1, 21, 5), nullptr, {});
  ASSERT_TRUE(path.ok());
  // Find o_proj's exp_avg bytes in the file and flip one bit in the middle of them.
  const testing::Spec spec = testing::ModelSpecs()[3];
  const Tensor v = testing::Logical(spec, 1, 21);
  std::vector<char> bytes = ReadFile(*path);
  const char* needle = static_cast<const char*>(v.raw_data());
  auto it = std::search(bytes.begin(), bytes.end(), needle, needle + v.num_bytes());
  ASSERT_NE(it, bytes.end());
  const size_t at = static_cast<size_t>(it - bytes.begin()) + v.num_bytes() / 2;
  bytes[at] ^= 0x10;
  std::ofstream(*path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  auto reader = UniversalReader::Open(*path);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto got = reader->ReadAll(spec.name);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(got.status().message().find("o_proj.weight' dataset exp_avg"), std::string::npos)
      << got.status().message();
  EXPECT_NE(got.status().message().find("corrupted"), std::string::npos);
  EXPECT_FALSE(reader->VerifyAll().ok());
  // Without moments the master still reads.
  EXPECT_TRUE(reader->ReadAll(spec.name, "", /*with_moments=*/false).ok());
}

TEST(UniversalCheckpoint, TruncatedFileGivesDataLoss) {
  TempDir dir;
  auto path = SaveUniversal(dir.path(), MetaFor(5, 1, 1), ShardsOf(0, 0, 1, 2, 5), nullptr, {});
  ASSERT_TRUE(path.ok());
  const auto size = std::filesystem::file_size(*path);
  for (uintmax_t keep : {size - 100, size / 2, uintmax_t{10}}) {
    std::filesystem::resize_file(*path, keep);
    auto reader = UniversalReader::Open(*path);
    Status s = reader.ok() ? reader->VerifyAll() : reader.status();
    EXPECT_EQ(s.code(), StatusCode::kDataLoss) << keep << ": " << s.ToString();
    EXPECT_NE(s.message().find(*path), std::string::npos) << s.message();
  }
  EXPECT_EQ(UniversalReader::Open(dir.Join("nope.h5")).status().code(), StatusCode::kNotFound);
}

TEST(UniversalCheckpoint, KeepsTheLastK) {
  TempDir dir;
  // A leftover temporary of an interrupted save is cleaned up.
  std::ofstream(dir.Join("step-99.h5.tmp")) << "partial";
  for (int64_t step = 1; step <= 5; ++step) {
    ASSERT_TRUE(SaveUniversal(dir.path(), MetaFor(step, 1, 1), ShardsOf(0, 0, 1, step, step),
                              nullptr, {.keep_last = 2})
                    .ok());
  }
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step-4.h5", "step-5.h5"}));
  auto reader = UniversalReader::Open(dir.path());
  ASSERT_TRUE(reader.ok());
  EXPECT_EQ(reader->meta().step, 5);
  ExpectReadsMatch(*reader, 0, 1, 5);
}

TEST(UniversalCheckpoint, BackgroundWriterSavesAndReportsErrorsAtTheNextCall) {
  TempDir dir;
  auto results = OnThreads(2, [&](int rank, collectives::Communicator* comm) -> Status {
    CheckpointWriter writer(dir.path(), comm, {.keep_last = 5});
    for (int64_t step = 1; step <= 3; ++step) {
      auto copies = CopyShardsToHost(ShardsOf(0, rank, 2, step, step));
      if (!copies.ok()) return copies.status();
      TANDEM_RETURN_IF_ERROR(writer.Submit(MetaFor(step, 1, 2), std::move(*copies)));
    }
    TANDEM_RETURN_IF_ERROR(writer.Wait());
    if (writer.last_path() != dir.Join("step-3.h5")) return InternalError(writer.last_path());
    // A bad shard fails the save; the error comes back from the next call on every rank.
    auto bad = ShardsOf(0, rank, 2, 4, 4);
    bad[0].slab.count[0] += 1;
    EXPECT_TRUE(writer.Submit(MetaFor(4, 1, 2), bad).ok());
    Status s = writer.Wait();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_TRUE(writer.Wait().ok());  // reported once
    return Status::Ok();
  });
  for (const Status& s : results) ASSERT_TRUE(s.ok()) << s.ToString();
  auto reader = UniversalReader::Open(dir.path());
  ASSERT_TRUE(reader.ok());
  EXPECT_EQ(reader->meta().step, 3);
  for (int r = 0; r < 2; ++r) ExpectReadsMatch(*reader, r, 2, 3);
}

}  // namespace
}  // namespace tandem::checkpoint

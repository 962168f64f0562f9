// DataLoader: windows and targets against the stream read back independently, determinism,
// epoch reshuffles, rank independence, seek/resume, doc_mask packing and the errors.
#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "ops/ops.h"
#include "tests/common/testing.h"
#include "tests/trainer/data_test_util.h"
#include "trainer/data.h"
#include "trainer/internal/data_random.h"

namespace tandem::trainer {
namespace {

using ::tandem::testing::TempDir;
using namespace ::tandem::trainer::testutil;  // NOLINT

// A prepared directory of text and SFT documents over several shards (some documents continue
// across shard boundaries), and its train stream read back through the shard API.
class LoaderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    WriteFile(dir_->Join("text.jsonl"), RandomDocs(50, 3, 90));
    // Prompts and completions of random letters: every window of the stream is unique.
    std::string sft;
    std::mt19937_64 rng(17);
    auto letters = [&](int n) {
      std::string s;
      for (int k = 0; k < n; ++k) s += static_cast<char>('a' + rng() % 26);
      return s;
    };
    for (int i = 0; i < 20; ++i) {
      sft += json({{"prompt", "question " + letters(10) + "?"},
                   {"completion", " answer " + letters(5 + i)}})
                 .dump() +
             "\n";
    }
    WriteFile(dir_->Join("sft.jsonl"), sft);
    PrepareOptions o;
    o.inputs = {dir_->Join("text.jsonl"), dir_->Join("sft.jsonl")};
    o.out_dir = dir_->Join("data");
    o.val_fraction = 0.1;
    o.shard_tokens = 700;
    FakeTokenizer tok(false);
    StatusOr<PrepareReport> r = PrepareData(o, tok);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_GE(r->train.shards.size(), 3u);
    stream_ = new SplitData(ReadSplit(o.out_dir, "train"));
  }
  static void TearDownTestSuite() {
    delete stream_;
    delete dir_;
  }

  static std::unique_ptr<DataLoader> Open(int64_t b, int64_t t, uint64_t seed, int rank = 0,
                                          int world = 1, const std::string& packing = "eos",
                                          bool shuffle = true) {
    LoaderOptions o;
    o.batch_size = b;
    o.seq_len = t;
    o.seed = seed;
    o.packing = packing;
    o.shuffle = shuffle;
    StatusOr<std::unique_ptr<DataLoader>> l =
        DataLoader::Open(dir_->Join("data"), "train", o, rank, world);
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    return l.ok() ? std::move(*l) : nullptr;
  }

  // The window index of each row of `batch`, checking every token, target and position against
  // the stream (eos packing).
  static std::vector<int64_t> Windows(const TokenBatch& batch, int64_t t_len) {
    std::vector<int64_t> windows;
    const SplitData& s = *stream_;
    const int64_t num_windows = (static_cast<int64_t>(s.tokens.size()) - 1) / t_len;
    for (int64_t b = 0; b < batch.tokens.dim(0); ++b) {
      const int32_t* tok = batch.tokens.data<int32_t>() + b * t_len;
      int64_t found = -1;
      int matches = 0;
      for (int64_t w = 0; w < num_windows; ++w) {
        if (std::equal(tok, tok + t_len, s.tokens.begin() + w * t_len)) {
          found = w;
          ++matches;
        }
      }
      EXPECT_EQ(matches, 1) << "row " << b << " matches " << matches << " windows of the stream";
      if (found < 0) return windows;
      for (int64_t t = 0; t < t_len; ++t) {
        const int64_t g = found * t_len + t + 1;
        const int32_t expect = s.mask[g] ? s.tokens[g] : ops::kIgnoreIndex;
        EXPECT_EQ(batch.targets.data<int32_t>()[b * t_len + t], expect) << b << "," << t;
        EXPECT_EQ(batch.positions.data<int32_t>()[b * t_len + t], t);
      }
      windows.push_back(found);
    }
    return windows;
  }

  static std::vector<int32_t> Flat(const Tensor& t) {
    return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel());
  }

  static TempDir* dir_;
  static SplitData* stream_;
};

TempDir* LoaderTest::dir_ = nullptr;
SplitData* LoaderTest::stream_ = nullptr;

TEST_F(LoaderTest, EpochVisitsDistinctWindowsThenReshuffles) {
  const int64_t t_len = 16, b = 3;
  auto loader = Open(b, t_len, 42);
  ASSERT_TRUE(loader);
  const int64_t num_windows = (static_cast<int64_t>(stream_->tokens.size()) - 1) / t_len;
  EXPECT_EQ(loader->num_windows(), num_windows);
  EXPECT_EQ(loader->num_tokens(), static_cast<int64_t>(stream_->tokens.size()));
  const int64_t steps = loader->steps_per_epoch();
  ASSERT_EQ(steps, num_windows / b);
  std::vector<int64_t> epoch0, epoch1;
  for (int64_t i = 0; i < 2 * steps; ++i) {
    StatusOr<TokenBatch> batch = loader->Next();
    ASSERT_TRUE(batch.ok());
    EXPECT_EQ(batch->tokens.shape(), (Shape{b, t_len}));
    EXPECT_FALSE(batch->segment_ids.defined());
    int64_t loss_tokens = 0;
    for (int32_t v : Flat(batch->targets)) loss_tokens += v != ops::kIgnoreIndex;
    EXPECT_EQ(batch->num_loss_tokens, loss_tokens);
    for (int64_t w : Windows(*batch, t_len)) (i < steps ? epoch0 : epoch1).push_back(w);
  }
  EXPECT_EQ(loader->position().epoch, 1);
  EXPECT_EQ(loader->position().tokens_consumed, 2 * steps * b * t_len);
  // Each epoch: distinct windows, not in stream order, and a different order in epoch 1.
  EXPECT_EQ(std::set<int64_t>(epoch0.begin(), epoch0.end()).size(), epoch0.size());
  EXPECT_EQ(std::set<int64_t>(epoch1.begin(), epoch1.end()).size(), epoch1.size());
  EXPECT_FALSE(std::is_sorted(epoch0.begin(), epoch0.end()));
  EXPECT_NE(epoch0, epoch1);
  // The order is the documented Fisher-Yates permutation.
  const std::vector<int64_t> perm = internal::EpochPermutation(42, 1, num_windows, true);
  EXPECT_TRUE(std::equal(epoch1.begin(), epoch1.end(), perm.begin()));
}

TEST_F(LoaderTest, WithoutShuffleWindowsComeInStreamOrder) {
  auto loader = Open(2, 10, 1, 0, 1, "eos", /*shuffle=*/false);
  ASSERT_TRUE(loader);
  std::vector<int64_t> seen;
  for (int i = 0; i < 5; ++i) {
    StatusOr<TokenBatch> batch = loader->Next();
    ASSERT_TRUE(batch.ok());
    for (int64_t w : Windows(*batch, 10)) seen.push_back(w);
  }
  EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
}

TEST_F(LoaderTest, SameSeedSameBatchesOtherSeedOtherBatches) {
  auto a = Open(2, 12, 7), b = Open(2, 12, 7), c = Open(2, 12, 8);
  ASSERT_TRUE(a && b && c);
  bool any_different = false;
  for (int i = 0; i < 10; ++i) {
    TokenBatch x = *a->Next(), y = *b->Next(), z = *c->Next();
    EXPECT_EQ(Flat(x.tokens), Flat(y.tokens));
    EXPECT_EQ(Flat(x.targets), Flat(y.targets));
    any_different = any_different || Flat(x.tokens) != Flat(z.tokens);
  }
  EXPECT_TRUE(any_different);
}

// World 1 x batch 4 trains on the same rows, in the same order, as world 2 x batch 2 and
// world 4 x batch 1, across an epoch boundary, in both packings.
TEST_F(LoaderTest, TokenStreamIndependentOfRankCount) {
  for (const std::string packing : {"eos", "doc_mask"}) {
    auto single = Open(4, 20, 5, 0, 1, packing);
    std::vector<std::unique_ptr<DataLoader>> two, four;
    for (int r = 0; r < 2; ++r) two.push_back(Open(2, 20, 5, r, 2, packing));
    for (int r = 0; r < 4; ++r) four.push_back(Open(1, 20, 5, r, 4, packing));
    const int64_t steps = single->steps_per_epoch() + 3;
    for (int64_t i = 0; i < steps; ++i) {
      const TokenBatch whole = *single->Next();
      std::vector<int32_t> from_two, from_four, pos_two;
      for (auto& l : two) {
        const TokenBatch part = *l->Next();
        for (int32_t v : Flat(part.tokens)) from_two.push_back(v);
        for (int32_t v : Flat(part.positions)) pos_two.push_back(v);
      }
      for (auto& l : four) {
        for (int32_t v : Flat(l->Next()->targets)) from_four.push_back(v);
      }
      ASSERT_EQ(from_two, Flat(whole.tokens)) << packing << " step " << i;
      ASSERT_EQ(pos_two, Flat(whole.positions)) << packing << " step " << i;
      ASSERT_EQ(from_four, Flat(whole.targets)) << packing << " step " << i;
    }
    EXPECT_EQ(two[1]->position(), single->position());
  }
}

TEST_F(LoaderTest, SeekResumesTheExactStream) {
  auto loader = Open(3, 16, 11, 1, 2);
  const int64_t steps = loader->steps_per_epoch();
  std::string saved;
  std::vector<std::vector<int32_t>> after;
  for (int64_t i = 0; i < steps + 4; ++i) {
    if (i == steps - 2) saved = DataPositionToJson(loader->position());
    const TokenBatch batch = *loader->Next();
    if (i >= steps - 2) after.push_back(Flat(batch.tokens));
  }
  StatusOr<DataPosition> pos = DataPositionFromJson(saved);
  ASSERT_TRUE(pos.ok()) << pos.status().ToString();
  EXPECT_EQ(pos->window, (steps - 2) * 6);
  auto resumed = Open(3, 16, 11, 1, 2);
  ASSERT_TRUE(resumed->Seek(*pos).ok());
  for (const auto& expect : after) EXPECT_EQ(Flat(resumed->Next()->tokens), expect);
  EXPECT_EQ(resumed->position(), loader->position());
  EXPECT_EQ(resumed->position().epoch, 1);
}

TEST_F(LoaderTest, PositionJsonErrorsAndSeekRange) {
  EXPECT_FALSE(DataPositionFromJson("{\"epoch\": 1}").ok());
  EXPECT_FALSE(DataPositionFromJson("not json").ok());
  EXPECT_FALSE(
      DataPositionFromJson("{\"epoch\": 1, \"window\": 2.5, \"tokens_consumed\": 0}").ok());
  auto loader = Open(2, 16, 0);
  Status s = loader->Seek({0, loader->num_windows() + 1, 0});
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_FALSE(loader->Seek({-1, 0, 0}).ok());
}

TEST_F(LoaderTest, DocMaskSegmentsPositionsAndTargets) {
  const int64_t t_len = 48;
  auto loader = Open(4, t_len, 3, 0, 1, "doc_mask");
  auto eos = Open(4, t_len, 3, 0, 1, "eos");
  const SplitData& s = *stream_;
  // Document of each stream token, from the starts read back independently.
  std::vector<int64_t> doc_of(s.tokens.size());
  for (size_t d = 0; d < s.doc_starts.size(); ++d) {
    const size_t end = d + 1 < s.doc_starts.size() ? s.doc_starts[d + 1] : s.tokens.size();
    for (size_t i = s.doc_starts[d]; i < end; ++i) doc_of[i] = static_cast<int64_t>(d);
  }
  int64_t boundaries = 0;
  for (int step = 0; step < 20; ++step) {
    const TokenBatch batch = *loader->Next();
    const TokenBatch plain = *eos->Next();
    ASSERT_TRUE(batch.segment_ids.defined());
    EXPECT_EQ(Flat(batch.tokens), Flat(plain.tokens));  // same windows in both packings
    const std::vector<int64_t> windows = Windows(plain, t_len);
    for (size_t b = 0; b < windows.size(); ++b) {
      const int64_t start = windows[b] * t_len;
      for (int64_t t = 0; t < t_len; ++t) {
        const int64_t g = start + t, k = static_cast<int64_t>(b) * t_len + t;
        const int64_t doc_start = std::max(s.doc_starts[doc_of[g]], start);
        EXPECT_EQ(batch.segment_ids.data<int32_t>()[k], doc_of[g] - doc_of[start]);
        EXPECT_EQ(batch.positions.data<int32_t>()[k], g - doc_start);
        const bool crosses = doc_of[g + 1] != doc_of[g];
        boundaries += crosses;
        const int32_t expect = crosses || !s.mask[g + 1] ? ops::kIgnoreIndex : s.tokens[g + 1];
        EXPECT_EQ(batch.targets.data<int32_t>()[k], expect);
      }
    }
  }
  EXPECT_GT(boundaries, 10);  // the test saw many document boundaries
}

TEST_F(LoaderTest, TooLittleDataSaysHowMuchIsNeeded) {
  LoaderOptions o;
  o.batch_size = 8;
  o.seq_len = 512;
  StatusOr<std::unique_ptr<DataLoader>> l = DataLoader::Open(dir_->Join("data"), "val", o, 0, 2);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kFailedPrecondition);
  const std::string n = std::to_string(ReadSplit(dir_->Join("data"), "val").tokens.size());
  EXPECT_NE(l.status().message().find("has " + n + " tokens"), std::string::npos)
      << l.status().message();
  EXPECT_NE(l.status().message().find("needs 8193"), std::string::npos) << l.status().message();
}

TEST_F(LoaderTest, OpenErrors) {
  LoaderOptions o;
  o.batch_size = 1;
  o.seq_len = 8;
  auto expect = [&](const std::string& dir, std::string_view split, const LoaderOptions& opt,
                    int rank, int world, StatusCode code, const std::string& what) {
    StatusOr<std::unique_ptr<DataLoader>> l = DataLoader::Open(dir, split, opt, rank, world);
    ASSERT_FALSE(l.ok()) << what;
    EXPECT_EQ(l.status().code(), code) << l.status().ToString();
    EXPECT_NE(l.status().message().find(what), std::string::npos) << l.status().ToString();
  };
  const std::string data = dir_->Join("data");
  expect(dir_->Join("nothing"), "train", o, 0, 1, StatusCode::kNotFound, "no manifest.json");
  expect(data, "test", o, 0, 1, StatusCode::kNotFound, "has no split 'test' (it has: train, val)");
  expect(data, "train", o, 2, 2, StatusCode::kInvalidArgument, "rank 2 outside world of size 2");
  LoaderOptions bad = o;
  bad.packing = "padding";
  expect(data, "train", bad, 0, 1, StatusCode::kInvalidArgument, "unknown packing 'padding'");
  bad = o;
  bad.seq_len = 0;
  expect(data, "train", bad, 0, 1, StatusCode::kInvalidArgument, "must be >= 1");
}

TEST_F(LoaderTest, CheckVocabNamesBothSizes) {
  auto loader = Open(1, 8, 0);
  EXPECT_EQ(loader->vocab_size(), 258);
  EXPECT_TRUE(CheckVocab(*loader, 258).ok());
  EXPECT_TRUE(CheckVocab(*loader, 320).ok());  // padded embedding
  Status s = CheckVocab(*loader, 256);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("258"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("256"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace tandem::trainer

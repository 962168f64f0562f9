// safetensors: round trips (every dtype, metadata, strided input, shards) and every bad file.
#include "model/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/common/testing.h"

namespace tandem::model {
namespace {

using nlohmann::json;

// Writes a safetensors file by hand: 8-byte little-endian length, header text, data bytes.
void WriteRaw(const std::string& path, const std::string& header, const std::string& data,
              int64_t length_override = -1) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = length_override >= 0 ? static_cast<uint64_t>(length_override) : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << data;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

// Random bytes of any dtype (floats random, integers random).
Tensor RandomTensor(const Shape& shape, DType dtype, uint64_t seed) {
  Tensor f = testing::RandomUniform(shape, seed, -3.0f, 3.0f);
  if (dtype == DType::kF32) return f;
  if (IsFloating(dtype)) return *CastCpu(f, dtype);
  Tensor t = Tensor::Cpu(shape, dtype);
  uint8_t* p = static_cast<uint8_t*>(t.raw_data());
  const Tensor bytes = testing::RandomInts({static_cast<int64_t>(t.num_bytes())}, seed, 256);
  for (size_t i = 0; i < t.num_bytes(); ++i) p[i] = static_cast<uint8_t>(bytes.data<int32_t>()[i]);
  return t;
}

void ExpectOpenError(const std::string& path, StatusCode code,
                     std::initializer_list<const char*> fragments) {
  StatusOr<SafetensorsFile> f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), code) << f.status().ToString();
  EXPECT_NE(f.status().message().find(path), std::string::npos) << f.status().ToString();
  for (const char* s : fragments) {
    EXPECT_NE(f.status().message().find(s), std::string::npos)
        << "missing '" << s << "' in: " << f.status().ToString();
  }
}

TEST(SafetensorsTest, RoundTripEveryDTypeWithMetadata) {
  testing::TempDir dir;
  const std::string path = dir.Join("t.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"z.f32", RandomTensor({3, 5}, DType::kF32, 1)},
      {"a.bf16", RandomTensor({7}, DType::kBF16, 2)},
      {"m.f16", RandomTensor({2, 3, 2}, DType::kF16, 3)},
      {"i32", RandomTensor({4}, DType::kI32, 4)},
      {"i64", RandomTensor({1, 3}, DType::kI64, 5)},
      {"u8", RandomTensor({5}, DType::kU8, 6)},
      {"empty", Tensor::Cpu({0, 4}, DType::kF32)},
      {"scalar", RandomTensor({}, DType::kF32, 7)},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "hello"}};
  ASSERT_TRUE(WriteSafetensors(path, tensors, meta).ok());

  // The header length is a multiple of 8 and padded with spaces.
  const std::string bytes = ReadAll(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(json::parse(header)["__metadata__"]["note"], "hello");
  EXPECT_NE(header.back(), '\0');

  StatusOr<SafetensorsFile> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->metadata(), meta);
  ASSERT_EQ(f->tensors().size(), tensors.size());
  // Sorted by name, laid out in that order.
  uint64_t offset = 0;
  for (size_t i = 0; i < f->tensors().size(); ++i) {
    if (i > 0) {
      EXPECT_LT(f->tensors()[i - 1].name, f->tensors()[i].name);
    }
    EXPECT_EQ(f->tensors()[i].begin, offset);
    offset = f->tensors()[i].end;
  }
  EXPECT_EQ(8 + n + offset, bytes.size());
  for (const auto& [name, t] : tensors) {
    StatusOr<Tensor> back = f->Get(name);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_TRUE(SameBytes(*back, t)) << name;
  }
}

TEST(SafetensorsTest, WritesStridedViewsContiguously) {
  testing::TempDir dir;
  const Tensor full = testing::RandomUniform({4, 6}, 11);
  const Tensor cols = full.Slice(1, 2, 5);  // [4, 3], row stride 6
  ASSERT_TRUE(WriteSafetensors(dir.Join("s.safetensors"), {{"c", cols}}).ok());
  StatusOr<SafetensorsFile> f = SafetensorsFile::Open(dir.Join("s.safetensors"));
  ASSERT_TRUE(f.ok());
  const Tensor back = *f->Get("c");
  ASSERT_EQ(back.shape(), (Shape{4, 3}));
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 3; ++c) {
      EXPECT_EQ(back.data<float>()[r * 3 + c], full.data<float>()[r * 6 + 2 + c]);
    }
  }
}

TEST(SafetensorsTest, WriterRejectsDuplicatesAndWrongFetch) {
  testing::TempDir dir;
  const Tensor t = testing::RandomUniform({2}, 1);
  Status s = WriteSafetensors(dir.Join("d.safetensors"), {{"x", t}, {"x", t}});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("duplicate tensor 'x'"), std::string::npos) << s.ToString();
  s = WriteSafetensorsStreaming(dir.Join("e.safetensors"), {{"y", DType::kBF16, {2}}},
                                [&](size_t) -> StatusOr<Tensor> { return t; });
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tensor 'y'"), std::string::npos) << s.ToString();
  EXPECT_FALSE(std::filesystem::exists(dir.Join("e.safetensors")));
  EXPECT_FALSE(std::filesystem::exists(dir.Join("e.safetensors.tmp")));
}

TEST(SafetensorsTest, ShardedCheckpoint) {
  testing::TempDir dir;
  const Tensor a = RandomTensor({3, 4}, DType::kBF16, 1);
  const Tensor b = RandomTensor({5}, DType::kF32, 2);
  const Tensor c = RandomTensor({2, 2}, DType::kF16, 3);
  ASSERT_TRUE(
      WriteSafetensors(dir.Join("model-00001-of-00002.safetensors"), {{"a", a}, {"b", b}}).ok());
  ASSERT_TRUE(WriteSafetensors(dir.Join("model-00002-of-00002.safetensors"), {{"c", c}}).ok());
  json index = {{"metadata", {{"total_size", 52}}},
                {"weight_map",
                 {{"a", "model-00001-of-00002.safetensors"},
                  {"b", "model-00001-of-00002.safetensors"},
                  {"c", "model-00002-of-00002.safetensors"}}}};
  std::ofstream(dir.Join("model.safetensors.index.json")) << index.dump();

  StatusOr<SafetensorsCheckpoint> ck = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  EXPECT_EQ(ck->names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(ck->FileOf("c"), dir.Join("model-00002-of-00002.safetensors"));
  EXPECT_TRUE(SameBytes(*ck->Get("a"), a));
  EXPECT_TRUE(SameBytes(*ck->Get("c"), c));
  // GetFloat converts to f32.
  StatusOr<Tensor> af = ck->GetFloat("a", {3, 4});
  ASSERT_TRUE(af.ok());
  EXPECT_TRUE(SameBytes(*af, *CastCpu(a, DType::kF32)));
  StatusOr<Tensor> bad = ck->GetFloat("a", {4, 3});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(
      bad.status().message().find("tensor 'a' in '" + dir.Join("model-00001-of-00002.safetensors") +
                                  "': expected shape [4, 3], found [3, 4]"),
      std::string::npos)
      << bad.status().ToString();
  StatusOr<Tensor> missing = ck->Get("nope");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("'nope'"), std::string::npos);

  // An index that places a tensor in a shard without it.
  index["weight_map"]["d"] = "model-00002-of-00002.safetensors";
  std::ofstream(dir.Join("model.safetensors.index.json")) << index.dump();
  StatusOr<SafetensorsCheckpoint> broken = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_FALSE(broken.ok());
  EXPECT_NE(broken.status().message().find("tensor 'd'"), std::string::npos)
      << broken.status().ToString();
}

TEST(SafetensorsTest, GetFloatRejectsIntegerTensor) {
  testing::TempDir dir;
  ASSERT_TRUE(
      WriteSafetensors(dir.Join("model.safetensors"), {{"ids", RandomTensor({3}, DType::kI32, 1)}})
          .ok());
  StatusOr<SafetensorsCheckpoint> ck = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok());
  StatusOr<Tensor> t = ck->GetFloat("ids", {3});
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("expected a floating dtype"), std::string::npos);
  EXPECT_NE(t.status().message().find("I32"), std::string::npos);
}

TEST(SafetensorsTest, MissingFile) {
  StatusOr<SafetensorsFile> f = SafetensorsFile::Open("/nonexistent/x.safetensors");
  EXPECT_EQ(f.status().code(), StatusCode::kNotFound);
  testing::TempDir empty;
  StatusOr<SafetensorsCheckpoint> c = SafetensorsCheckpoint::Open(empty.path());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find("neither model.safetensors nor"), std::string::npos);
}

TEST(SafetensorsTest, FileShorterThanLength) {
  testing::TempDir dir;
  const std::string path = dir.Join("short.safetensors");
  std::ofstream(path, std::ios::binary) << "abc";
  ExpectOpenError(path, StatusCode::kDataLoss, {"too short"});
}

TEST(SafetensorsTest, BadHeaderLength) {
  testing::TempDir dir;
  const std::string path = dir.Join("len.safetensors");
  WriteRaw(path, "{}      ", "", /*length_override=*/1000);
  ExpectOpenError(path, StatusCode::kDataLoss, {"bad header length 1000"});
  WriteRaw(path, "{}      ", "", /*length_override=*/int64_t{1} << 40);
  ExpectOpenError(path, StatusCode::kDataLoss, {"bad header length"});
}

TEST(SafetensorsTest, BadJson) {
  testing::TempDir dir;
  const std::string path = dir.Join("json.safetensors");
  WriteRaw(path, "{\"a\": {\"dtype\": ", "");
  ExpectOpenError(path, StatusCode::kInvalidArgument, {"malformed JSON header at byte"});
  WriteRaw(path, "[1, 2]  ", "");
  ExpectOpenError(path, StatusCode::kInvalidArgument, {"not a JSON object"});
  WriteRaw(path, R"({"a": {"dtype": "F32", "shape": [1]}})", "");
  ExpectOpenError(path, StatusCode::kInvalidArgument, {"tensor 'a'", "data_offsets"});
  WriteRaw(path, R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", "1234");
  ExpectOpenError(path, StatusCode::kInvalidArgument, {"tensor 'a'", "non-negative"});
  WriteRaw(path, R"({"__metadata__": {"k": 3}})", "");
  ExpectOpenError(path, StatusCode::kInvalidArgument, {"__metadata__", "'k'"});
}

TEST(SafetensorsTest, UnknownDType) {
  testing::TempDir dir;
  const std::string path = dir.Join("dtype.safetensors");
  WriteRaw(path, R"({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", "12345678");
  ExpectOpenError(path, StatusCode::kInvalidArgument, {"tensor 'w'", "unknown dtype \"F64\""});
}

TEST(SafetensorsTest, ShapeOffsetMismatch) {
  testing::TempDir dir;
  const std::string path = dir.Join("shape.safetensors");
  WriteRaw(path, R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})",
           std::string(24, 'x'));
  ExpectOpenError(path, StatusCode::kDataLoss, {"tensor 'w'", "[2, 3]", "= 24 bytes", "span 20"});
}

TEST(SafetensorsTest, TruncatedData) {
  testing::TempDir dir;
  const std::string path = dir.Join("trunc.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"a", RandomTensor({4}, DType::kF32, 1)},
                                      {"b", RandomTensor({8}, DType::kF32, 2)}})
                  .ok());
  const std::string bytes = ReadAll(path);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 5);
  ExpectOpenError(path, StatusCode::kDataLoss, {"tensor 'b'", "truncated"});
}

TEST(SafetensorsTest, OverlappingRanges) {
  testing::TempDir dir;
  const std::string path = dir.Join("overlap.safetensors");
  WriteRaw(path,
           R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
           std::string(12, 'x'));
  ExpectOpenError(path, StatusCode::kDataLoss, {"'a'", "'b'", "overlap"});
}

TEST(SafetensorsTest, MisalignedDataIsCopied) {
  // A header whose length is not a multiple of 4 leaves f32 data misaligned.
  testing::TempDir dir;
  const std::string path = dir.Join("odd.safetensors");
  const float values[2] = {1.5f, -2.25f};
  WriteRaw(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} )",
           std::string(reinterpret_cast<const char*>(values), 8));
  StatusOr<SafetensorsFile> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const Tensor t = *f->Get("a");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 4, 0u);
  EXPECT_EQ(t.data<float>()[0], 1.5f);
  EXPECT_EQ(t.data<float>()[1], -2.25f);
}

}  // namespace
}  // namespace tandem::model

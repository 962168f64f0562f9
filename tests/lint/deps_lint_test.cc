// Checks every #include "..." in the source tree against the dependency table in
// docs/architecture.md, and that no module includes another module's private folders.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include "tests/common/testing.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

std::string Trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

// module -> modules it may use (itself included).
std::map<std::string, std::set<std::string>> ReadTable(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::map<std::string, std::set<std::string>> table;
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    if (line.find("<!-- deps:begin -->") != std::string::npos) inside = true;
    if (line.find("<!-- deps:end -->") != std::string::npos) break;
    if (!inside || line.rfind("|", 0) != 0 || line.find("---") != std::string::npos) continue;
    std::vector<std::string> cells;
    std::stringstream ss(line.substr(1));
    std::string cell;
    while (std::getline(ss, cell, '|')) cells.push_back(Trim(cell));
    if (cells.size() < 2 || cells[0] == "module") continue;
    std::set<std::string>& deps = table[cells[0]];
    deps.insert(cells[0]);
    std::stringstream ds(cells[1]);
    std::string dep;
    while (std::getline(ds, dep, ',')) {
      if (!Trim(dep).empty()) deps.insert(Trim(dep));
    }
  }
  return table;
}

TEST(DepsLint, EveryIncludeFollowsTheArchitectureTable) {
  const std::string root = testing::SourceDir();
  auto table = ReadTable(root + "/docs/architecture.md");
  ASSERT_GE(table.size(), 5u) << "dependency table not found in docs/architecture.md";
  const std::set<std::string> kPrivate = {"internal", "cpu", "cuda"};
  const std::regex include_re(R"re(^\s*#\s*include\s+"([^"]+)")re");
  std::vector<std::string> violations;
  int files = 0;
  for (const auto& [module, allowed] : table) {
    const fs::path dir = fs::path(root) / module;
    if (!fs::exists(dir)) continue;
    for (const auto& entry : fs::recursive_directory_iterator(dir)) {
      const std::string ext = entry.path().extension().string();
      if (ext != ".h" && ext != ".cc" && ext != ".cu" && ext != ".cuh") continue;
      ++files;
      std::ifstream in(entry.path());
      std::string line;
      int lineno = 0;
      // For tests/<m>/..., the module under test may expose its private headers.
      std::string tested;
      const std::string rel = fs::relative(entry.path(), root).string();
      if (module == "tests") {
        const size_t a = rel.find('/'), b = rel.find('/', a + 1);
        if (b != std::string::npos) tested = rel.substr(a + 1, b - a - 1);
      }
      while (std::getline(in, line)) {
        ++lineno;
        std::smatch m;
        if (!std::regex_search(line, m, include_re)) continue;
        const std::string inc = m[1];
        const size_t slash = inc.find('/');
        if (slash == std::string::npos) continue;  // a sibling file or a third-party header
        const std::string target = inc.substr(0, slash);
        if (!table.count(target)) continue;  // not one of our modules
        const std::string where = rel + ":" + std::to_string(lineno) + ": \"" + inc + "\"";
        if (!allowed.count(target)) {
          violations.push_back(where + " (" + module + " may not use " + target + ")");
          continue;
        }
        const size_t slash2 = inc.find('/', slash + 1);
        if (target != module && target != tested && slash2 != std::string::npos &&
            kPrivate.count(inc.substr(slash + 1, slash2 - slash - 1))) {
          violations.push_back(where + " (private header of " + target + ")");
        }
      }
    }
  }
  EXPECT_GT(files, 10);
  std::string all;
  for (const auto& v : violations) all += "\n  " + v;
  EXPECT_TRUE(violations.empty()) << violations.size() << " include(s) break docs/architecture.md:" << all;
}

}  // namespace
}  // namespace tandem

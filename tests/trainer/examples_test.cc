// Every shipped example under examples/ loads as a `tandem train` configuration: known keys,
// values in range, and the cross-section rules (offload, PEFT, mesh) satisfied. model.path is set
// for the examples that fine-tune a base named on the command line.
#include <gtest/gtest.h>

#include <filesystem>

#include "tests/common/testing.h"
#include "trainer/config.h"

namespace tandem::trainer {
namespace {

TEST(ExamplesTest, EveryExampleConfigLoads) {
  int seen = 0;
  for (const auto& e : std::filesystem::directory_iterator(testing::SourceDir() + "/examples")) {
    if (e.path().extension() != ".toml") continue;
    ++seen;
    // The PEFT examples leave model.path for the user to set (--set model.path=...).
    StatusOr<TrainConfig> c = LoadTrainConfig(e.path().string(), {"model.path=\"base\""});
    EXPECT_TRUE(c.ok()) << e.path().filename() << ": " << c.status().ToString();
  }
  EXPECT_GE(seen, 5);
}

}  // namespace
}  // namespace tandem::trainer

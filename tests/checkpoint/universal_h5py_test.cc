// A universal checkpoint read by h5py alone (scripts/check_universal_h5py.py, which follows
// docs/formats.md): every kind of tensor of the test model (tp splits, fused parts, a padded
// vocabulary, a 3-d tensor, a frozen tensor, adapter tensors), CRCs recomputed in Python. One
// element overwritten behind the writer's back (HDF5 C API) must make the script fail naming
// the dataset. Skips with a message where python3 has no h5py (install python3-h5py).
#include <hdf5.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tests/checkpoint/universal_test_util.h"

namespace tandem::checkpoint {
namespace {

using ::tandem::testing::TempDir;
using testing::MetaFor;
using testing::ShardsOf;

std::string Python() {
  return std::filesystem::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
}

bool HaveH5py() {
  return std::system((Python() + " -c 'import h5py, numpy' >/dev/null 2>&1").c_str()) == 0;
}

// Runs the script on `path`; returns its exit status and output in *log.
int RunCheck(const TempDir& dir, const std::string& path, const std::string& extra,
             std::string* log) {
  const std::string out = dir.Join("check.log");
  const std::string cmd = Python() + " " + ::tandem::testing::SourceDir() +
                          "/scripts/check_universal_h5py.py " + path + " " + extra + " >" + out +
                          " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(out);
  std::stringstream ss;
  ss << in.rdbuf();
  *log = ss.str();
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

TEST(UniversalH5py, ReadsAndVerifiesEveryTensorWithH5py) {
  if (!HaveH5py()) GTEST_SKIP() << "python3 has no h5py/numpy (Debian: apt install python3-h5py)";
  TempDir dir;
  auto path = SaveUniversal(dir.path(), MetaFor(7, 1, 1), ShardsOf(0, 0, 1, 5, 7), nullptr,
                            {.chunk_bytes = 64});
  ASSERT_TRUE(path.ok()) << path.status().ToString();
  std::string log;
  const int tensors = static_cast<int>(testing::ModelSpecs().size());
  ASSERT_EQ(RunCheck(dir, *path, "--expect-step 7 --expect-tensors " + std::to_string(tensors),
                     &log),
            0)
      << log;
  EXPECT_NE(log.find("PASS: " + std::to_string(tensors) + " tensors"), std::string::npos) << log;
  EXPECT_NE(log.find("adapters/a1/lora_B [16, 2]"), std::string::npos) << log;
  // The wrong expectations fail.
  EXPECT_EQ(RunCheck(dir, *path, "--expect-step 8", &log), 1) << log;

  // Overwrite element [3, 1] of the embedding's exp_avg (its CRC attributes stay as written).
  hid_t f = H5Fopen(path->c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t d = H5Dopen2(f, "/params/model.embed_tokens.weight/exp_avg", H5P_DEFAULT);
  ASSERT_GE(d, 0);
  hid_t space = H5Dget_space(d);
  const hsize_t start[2] = {3, 1}, count[2] = {1, 1};
  ASSERT_GE(H5Sselect_hyperslab(space, H5S_SELECT_SET, start, nullptr, count, nullptr), 0);
  hid_t mem = H5Screate_simple(2, count, nullptr);
  const float value = 12345.0f;
  ASSERT_GE(H5Dwrite(d, H5T_NATIVE_FLOAT, mem, space, H5P_DEFAULT, &value), 0);
  H5Sclose(mem);
  H5Sclose(space);
  H5Dclose(d);
  H5Fclose(f);
  ASSERT_EQ(RunCheck(dir, *path, "", &log), 1) << log;
  EXPECT_NE(log.find("params/model.embed_tokens.weight/exp_avg: CRC-32"), std::string::npos)
      << log;
}

}  // namespace
}  // namespace tandem::checkpoint

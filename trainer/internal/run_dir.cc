#include "trainer/internal/run_dir.h"

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/version.h"

namespace tandem::trainer::internal {
namespace {

namespace fs = std::filesystem;

Status WriteFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return NotFoundError(StrCat("cannot write ", tmp));
    out << text;
    out.flush();
    if (!out) return InternalError(StrCat("writing ", tmp, " failed"));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return InternalError(StrCat("renaming ", tmp, " to ", path, ": ", ec.message()));
  return Status::Ok();
}

std::string NowIso8601() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return buf;
}

}  // namespace

StatusOr<RunDir> RunDir::Create(const std::string& path, const TrainConfig& config, const std::string& command_line,
                                Device device, const model::LlamaConfig& mc) {
  std::error_code ec;
  fs::create_directories(fs::path(path) / "checkpoints", ec);
  if (ec) return NotFoundError(StrCat("cannot create run directory ", path, ": ", ec.message()));
  TANDEM_RETURN_IF_ERROR(WriteFile(path + "/config.toml", TrainConfigToToml(config)));
  nlohmann::json run = {
      {"git_commit", GitCommit()},
      {"build", BuildFlags()},
      {"built_with_cuda", BuiltWithCuda()},
      {"device", device.ToString()},
      {"device_name", DeviceName(device)},
      {"command_line", command_line},
      {"started", NowIso8601()},
      {"parameters", mc.NumParameters()},
  };
  TANDEM_RETURN_IF_ERROR(WriteFile(path + "/run.json", run.dump(1) + "\n"));
  return RunDir(path);
}

StatusOr<std::string> RunDir::SaveCheckpoint(const std::function<Status(const std::string& dir)>& write, int64_t step,
                                             const model::Tokenizer& tokenizer, const std::string& tokenizer_path) const {
  const fs::path dir = fs::path(path_) / "checkpoints";
  const std::string name = StrCat("step-", step);
  const fs::path tmp = dir / (name + ".tmp");
  const fs::path final_dir = dir / name;
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return InternalError(StrCat("cannot create ", tmp.string(), ": ", ec.message()));
  TANDEM_RETURN_IF_ERROR(write(tmp.string()));
  if (tokenizer.kind() == "bpe") {
    const fs::path src(tokenizer_path);
    fs::copy_file(src, tmp / "tokenizer.json", fs::copy_options::overwrite_existing, ec);
    if (!ec && fs::exists(src.parent_path() / "tokenizer_config.json")) {
      fs::copy_file(src.parent_path() / "tokenizer_config.json", tmp / "tokenizer_config.json",
                    fs::copy_options::overwrite_existing, ec);
    }
    if (ec) return InternalError(StrCat("copying the tokenizer into ", tmp.string(), ": ", ec.message()));
  }
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec) return InternalError(StrCat("renaming ", tmp.string(), " to ", final_dir.string(), ": ", ec.message()));
  TANDEM_RETURN_IF_ERROR(WriteFile((dir / "latest").string(), name + "\n"));
  return final_dir.string();
}

int64_t PeakResidentBytes() {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == "VmHWM:") {
      int64_t kb = 0;
      in >> kb;
      return kb * 1024;
    }
    in.ignore(1 << 20, '\n');
  }
  return 0;
}

}  // namespace tandem::trainer::internal

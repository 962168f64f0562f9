#include "peft/internal/adapter_files.h"

#include <filesystem>
#include <fstream>
#include <utility>

#include "model/safetensors.h"

namespace tandem::peft::internal {

Status WriteTextFileAtomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return InternalError(StrCat("cannot open ", tmp, " for writing"));
    out << text;
    if (!out.flush()) return InternalError(StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return InternalError(StrCat("cannot rename ", tmp, " to ", path, ": ", ec.message()));
  return Status::Ok();
}

Status WriteAdapterDir(const AdapterDirSpec& spec, const std::string& dir, DType dtype,
                       const std::vector<model::Parameter>& params,
                       const std::function<StatusOr<Tensor>(size_t)>& to_host) {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return InvalidArgumentError(
        StrCat(spec.who, ": dtype must be f32, bf16 or f16, found ", DTypeName(dtype)));
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return InternalError(StrCat(spec.who, ": cannot create ", dir, ": ", ec.message()));
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor host, to_host(i));
    if (dtype != DType::kF32) {
      TANDEM_ASSIGN_OR_RETURN(host, CastCpu(host, dtype));
    }
    tensors.emplace_back(params[i].name, host);
  }
  TANDEM_RETURN_IF_ERROR(model::WriteSafetensors(StrCat(dir, "/", spec.weights_file), tensors,
                                                 {{"format", spec.format}}));
  return WriteTextFileAtomic(StrCat(dir, "/", spec.config_file), spec.config_json);
}

}  // namespace tandem::peft::internal

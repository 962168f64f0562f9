#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace tandem::model {

using nlohmann::json;

namespace {

// The safetensors library refuses headers above 100 MB; so do we (a corrupt length is caught
// before we try to parse gigabytes).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeEntry {
  const char* name;
  DType dtype;
};
constexpr DTypeEntry kDTypes[] = {
    {"F32", DType::kF32}, {"BF16", DType::kBF16}, {"F16", DType::kF16},
    {"I32", DType::kI32}, {"I64", DType::kI64},   {"U8", DType::kU8},
};

bool ParseSafetensorsDType(const std::string& name, DType* out) {
  for (const DTypeEntry& e : kDTypes) {
    if (name == e.name) {
      *out = e.dtype;
      return true;
    }
  }
  return false;
}

std::string ErrnoText() { return std::strerror(errno); }

// Parses one header entry into `info`. `where` is "file 'x': tensor 'y'".
Status ParseEntry(const json& v, const std::string& where, SafetensorsTensorInfo* info) {
  if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
      !v.contains("data_offsets")) {
    return InvalidArgumentError(
        StrCat(where, ": expected an object with dtype, shape and data_offsets, found ", v.dump()));
  }
  const json& dt = v.at("dtype");
  if (!dt.is_string() || !ParseSafetensorsDType(dt.get<std::string>(), &info->dtype)) {
    return InvalidArgumentError(
        StrCat(where, ": unknown dtype ", dt.dump(), " (supported: F32, BF16, F16, I32, I64, U8)"));
  }
  const json& shape = v.at("shape");
  if (!shape.is_array()) return InvalidArgumentError(StrCat(where, ": shape is not a list"));
  for (const json& d : shape) {
    if (!d.is_number_unsigned()) {
      return InvalidArgumentError(
          StrCat(where, ": shape ", shape.dump(), " must hold non-negative integers"));
    }
    info->shape.push_back(d.get<int64_t>());
  }
  const json& off = v.at("data_offsets");
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
      !off[1].is_number_unsigned() || off[0].get<uint64_t>() > off[1].get<uint64_t>()) {
    return InvalidArgumentError(StrCat(
        where, ": data_offsets must be [begin, end] with 0 <= begin <= end, found ", off.dump()));
  }
  info->begin = off[0].get<uint64_t>();
  info->end = off[1].get<uint64_t>();
  // numel * size, guarding against overflow from absurd shapes.
  uint64_t bytes = DTypeSize(info->dtype);
  for (int64_t d : info->shape) {
    if (d != 0 && bytes > UINT64_MAX / static_cast<uint64_t>(d)) {
      return DataLossError(StrCat(where, ": shape ", ShapeToString(info->shape), " overflows"));
    }
    bytes *= static_cast<uint64_t>(d);
  }
  if (bytes != info->end - info->begin) {
    return DataLossError(StrCat(where, ": shape ", ShapeToString(info->shape), " x ",
                                DTypeSize(info->dtype), "-byte ", dt.get<std::string>(), " = ",
                                bytes, " bytes, but data_offsets [", info->begin, ", ", info->end,
                                "] span ", info->end - info->begin));
  }
  return Status::Ok();
}

// Checks that every span lies in the data region and no two overlap. `tensors` sorted by name.
Status CheckSpans(const std::vector<SafetensorsTensorInfo>& tensors, uint64_t data_bytes,
                  const std::string& path) {
  std::vector<const SafetensorsTensorInfo*> by_offset;
  for (const SafetensorsTensorInfo& t : tensors) {
    if (t.end > data_bytes) {
      return DataLossError(StrCat("file '", path, "': tensor '", t.name, "' ends at byte ", t.end,
                                  " of the data region, which holds only ", data_bytes,
                                  " bytes (truncated file?)"));
    }
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const auto* a, const auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsTensorInfo& a = *by_offset[i - 1];
    const SafetensorsTensorInfo& b = *by_offset[i];
    if (b.begin < a.end && b.begin != b.end && a.begin != a.end) {
      return DataLossError(StrCat("file '", path, "': tensors '", a.name, "' [", a.begin, ", ",
                                  a.end, ") and '", b.name, "' [", b.begin, ", ", b.end,
                                  ") overlap"));
    }
  }
  return Status::Ok();
}

}  // namespace

const char* SafetensorsDTypeName(DType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

// A read-only file mapping; private and writable so views can be handed out as Tensor (whose
// data pointer is mutable) without a write ever reaching the file.
struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr != nullptr) munmap(addr, size);
  }
};

StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT)
      return NotFoundError(StrCat("safetensors file '", path, "' does not exist"));
    return InternalError(StrCat("cannot open safetensors file '", path, "': ", ErrnoText()));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const std::string err = ErrnoText();
    ::close(fd);
    return InternalError(StrCat("fstat of '", path, "' failed: ", err));
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < 8) {
    ::close(fd);
    return DataLossError(StrCat("file '", path, "': ", file_bytes,
                                " bytes, too short for the 8-byte header length"));
  }
  auto mapping = std::make_shared<Mapping>();
  void* addr = mmap(nullptr, file_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file referenced
  if (addr == MAP_FAILED) {
    return InternalError(
        StrCat("mmap of '", path, "' (", file_bytes, " bytes) failed: ", ErrnoText()));
  }
  mapping->addr = addr;
  mapping->size = file_bytes;
  const uint8_t* bytes = static_cast<const uint8_t*>(addr);

  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | bytes[i];  // little-endian
  if (header_bytes > file_bytes - 8 || header_bytes > kMaxHeaderBytes) {
    return DataLossError(StrCat("file '", path, "': bad header length ", header_bytes,
                                " (the file has ", file_bytes - 8,
                                " bytes after the length field; limit ", kMaxHeaderBytes, ")"));
  }
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_bytes);
  } catch (const json::parse_error& e) {
    return InvalidArgumentError(
        StrCat("file '", path, "': malformed JSON header at byte ", e.byte, ": ", e.what()));
  }
  if (!header.is_object()) {
    return InvalidArgumentError(StrCat("file '", path, "': the header is not a JSON object"));
  }
  SafetensorsFile f;
  f.path_ = path;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) {
        return InvalidArgumentError(StrCat("file '", path, "': __metadata__ is not an object"));
      }
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) {
          return InvalidArgumentError(
              StrCat("file '", path, "': __metadata__ value of '", k, "' is not a string"));
        }
        f.metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    SafetensorsTensorInfo info;
    info.name = name;
    TANDEM_RETURN_IF_ERROR(
        ParseEntry(value, StrCat("file '", path, "': tensor '", name, "'"), &info));
    f.tensors_.push_back(std::move(info));
  }
  std::sort(f.tensors_.begin(), f.tensors_.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  TANDEM_RETURN_IF_ERROR(CheckSpans(f.tensors_, file_bytes - 8 - header_bytes, path));
  f.data_ = bytes + 8 + header_bytes;
  f.mapping_ = std::move(mapping);
  return f;
}

const SafetensorsTensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = std::lower_bound(
      tensors_.begin(), tensors_.end(), name,
      [](const SafetensorsTensorInfo& t, const std::string& n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

StatusOr<Tensor> SafetensorsFile::Get(const std::string& name) const {
  const SafetensorsTensorInfo* info = Find(name);
  if (info == nullptr) {
    return NotFoundError(StrCat("file '", path_, "' has no tensor '", name, "'"));
  }
  const uint8_t* src = data_ + info->begin;
  if (reinterpret_cast<uintptr_t>(src) % DTypeSize(info->dtype) == 0) {
    return Tensor::Wrap(const_cast<uint8_t*>(src), info->shape, info->dtype, Device::Cpu());
  }
  Tensor copy = Tensor::Cpu(info->shape, info->dtype);  // misaligned: hand out an aligned copy
  std::memcpy(copy.raw_data(), src, info->end - info->begin);
  return copy;
}

StatusOr<SafetensorsCheckpoint> SafetensorsCheckpoint::Open(const std::string& path) {
  namespace fs = std::filesystem;
  std::string index_path;
  std::string single_path;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    if (fs::exists(fs::path(path) / "model.safetensors.index.json", ec)) {
      index_path = (fs::path(path) / "model.safetensors.index.json").string();
    } else if (fs::exists(fs::path(path) / "model.safetensors", ec)) {
      single_path = (fs::path(path) / "model.safetensors").string();
    } else {
      return NotFoundError(StrCat("directory '", path, "' holds neither model.safetensors nor ",
                                  "model.safetensors.index.json"));
    }
  } else if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) {
    index_path = path;
  } else {
    single_path = path;
  }
  SafetensorsCheckpoint ckpt;
  if (!single_path.empty()) {
    TANDEM_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(single_path));
    for (const SafetensorsTensorInfo& t : f.tensors()) ckpt.where_[t.name] = 0;
    ckpt.files_.push_back(std::move(f));
    return ckpt;
  }
  std::ifstream in(index_path, std::ios::binary);
  if (!in) return NotFoundError(StrCat("safetensors index '", index_path, "' cannot be opened"));
  json index;
  try {
    index = json::parse(in);
  } catch (const json::parse_error& e) {
    return InvalidArgumentError(
        StrCat("index '", index_path, "': malformed JSON at byte ", e.byte, ": ", e.what()));
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    return InvalidArgumentError(StrCat("index '", index_path, "': expected an object with a ",
                                       "\"weight_map\" object (tensor name -> file)"));
  }
  const fs::path dir = fs::path(index_path).parent_path();
  std::map<std::string, size_t> file_index;  // shard file name -> index into files_
  for (const auto& [name, file] : index["weight_map"].items()) {
    if (!file.is_string()) {
      return InvalidArgumentError(
          StrCat("index '", index_path, "': weight_map entry '", name, "' is not a file name"));
    }
    const std::string shard = file.get<std::string>();
    auto it = file_index.find(shard);
    if (it == file_index.end()) {
      TANDEM_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open((dir / shard).string()));
      it = file_index.emplace(shard, ckpt.files_.size()).first;
      ckpt.files_.push_back(std::move(f));
    }
    if (ckpt.files_[it->second].Find(name) == nullptr) {
      return DataLossError(StrCat("index '", index_path, "' places tensor '", name, "' in '", shard,
                                  "', which does not hold it"));
    }
    ckpt.where_[name] = it->second;
  }
  return ckpt;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

std::string SafetensorsCheckpoint::FileOf(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? "" : files_[it->second].path();
}

const SafetensorsTensorInfo* SafetensorsCheckpoint::Find(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : files_[it->second].Find(name);
}

StatusOr<Tensor> SafetensorsCheckpoint::Get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return NotFoundError(StrCat("checkpoint has no tensor '", name,
                                "' (files: ", files_.empty() ? "none" : files_[0].path(),
                                files_.size() > 1 ? ", ..." : "", ")"));
  }
  return files_[it->second].Get(name);
}

StatusOr<Tensor> SafetensorsCheckpoint::GetFloat(const std::string& name,
                                                 const Shape& expected_shape) const {
  TANDEM_ASSIGN_OR_RETURN(Tensor t, Get(name));
  const std::string where = StrCat("tensor '", name, "' in '", FileOf(name), "'");
  if (t.shape() != expected_shape) {
    return InvalidArgumentError(StrCat(where, ": expected shape ", ShapeToString(expected_shape),
                                       ", found ", ShapeToString(t.shape())));
  }
  if (!IsFloating(t.dtype())) {
    return InvalidArgumentError(StrCat(where,
                                       ": expected a floating dtype (F32, BF16, F16), found ",
                                       SafetensorsDTypeName(t.dtype())));
  }
  if (t.dtype() == DType::kF32) return t;
  return CastCpu(t, DType::kF32);
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

// Writes all of `n` bytes or fails naming the file.
Status WriteAll(std::FILE* f, const void* p, size_t n, const std::string& path) {
  if (n != 0 && std::fwrite(p, 1, n, f) != n) {
    return InternalError(StrCat("writing ", n, " bytes to '", path, "' failed (disk full?)"));
  }
  return Status::Ok();
}

// Copies a strided host tensor element by element into a new contiguous one.
Tensor ContiguousHostCopy(const Tensor& t) {
  Tensor out = Tensor::Cpu(t.shape(), t.dtype());
  const size_t elem = DTypeSize(t.dtype());
  const uint8_t* src = static_cast<const uint8_t*>(t.raw_data());
  uint8_t* dst = static_cast<uint8_t*>(out.raw_data());
  std::vector<int64_t> idx(t.ndim(), 0);
  for (int64_t n = 0; n < t.numel(); ++n) {
    int64_t off = 0;
    for (int d = 0; d < t.ndim(); ++d) off += idx[d] * t.stride(d);
    std::memcpy(dst + n * elem, src + off * static_cast<int64_t>(elem), elem);
    for (int d = t.ndim() - 1; d >= 0 && ++idx[d] == t.dim(d); --d) idx[d] = 0;
  }
  return out;
}

StatusOr<std::string> BuildHeader(const std::vector<SafetensorsTensorSpec>& specs,
                                  const std::vector<size_t>& order,
                                  const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i : order) {
    const SafetensorsTensorSpec& s = specs[i];
    if (s.name.empty() || s.name == "__metadata__") {
      return InvalidArgumentError(StrCat("invalid tensor name '", s.name, "'"));
    }
    if (header.contains(s.name))
      return InvalidArgumentError(StrCat("duplicate tensor '", s.name, "'"));
    const uint64_t bytes = static_cast<uint64_t>(ShapeNumel(s.shape)) * DTypeSize(s.dtype);
    header[s.name] = {{"dtype", SafetensorsDTypeName(s.dtype)},
                      {"shape", s.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data region starts 8-byte aligned
  return text;
}

}  // namespace

Status WriteSafetensorsStreaming(const std::string& path,
                                 const std::vector<SafetensorsTensorSpec>& specs,
                                 const std::function<StatusOr<Tensor>(size_t index)>& fetch,
                                 const std::map<std::string, std::string>& metadata) {
  std::vector<size_t> order(specs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return specs[a].name < specs[b].name; });
  TANDEM_ASSIGN_OR_RETURN(std::string header, BuildHeader(specs, order, metadata));

  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return InternalError(StrCat("cannot create '", tmp, "': ", ErrnoText()));
  auto body = [&]() -> Status {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{header.size()} >> (8 * i));
    TANDEM_RETURN_IF_ERROR(WriteAll(f, len, 8, tmp));
    TANDEM_RETURN_IF_ERROR(WriteAll(f, header.data(), header.size(), tmp));
    for (size_t i : order) {
      const SafetensorsTensorSpec& s = specs[i];
      TANDEM_ASSIGN_OR_RETURN(Tensor t, fetch(i));
      if (!t.device().is_cpu() || t.dtype() != s.dtype || t.shape() != s.shape) {
        return InvalidArgumentError(StrCat("tensor '", s.name, "' for '", path, "': expected ",
                                           DTypeName(s.dtype), ShapeToString(s.shape),
                                           " on cpu, found ", t.DebugString()));
      }
      if (!t.is_contiguous()) t = ContiguousHostCopy(t);
      TANDEM_RETURN_IF_ERROR(WriteAll(f, t.raw_data(), t.num_bytes(), tmp));
    }
    if (std::fflush(f) != 0) return InternalError(StrCat("flushing '", tmp, "' failed"));
    return Status::Ok();
  };
  Status st = body();
  if (std::fclose(f) != 0 && st.ok()) st = InternalError(StrCat("closing '", tmp, "' failed"));
  if (st.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    st = InternalError(StrCat("renaming '", tmp, "' to '", path, "' failed: ", ErrnoText()));
  }
  if (!st.ok()) std::remove(tmp.c_str());
  return st;
}

Status WriteSafetensors(const std::string& path,
                        const std::vector<std::pair<std::string, Tensor>>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsTensorSpec> specs;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) return InvalidArgumentError(StrCat("tensor '", name, "' is undefined"));
    specs.push_back({name, t.dtype(), t.shape()});
  }
  auto fetch = [&](size_t i) -> StatusOr<Tensor> {
    const Tensor& t = tensors[i].second;
    if (t.device().is_cpu()) return t;
    return CopyToHostBlocking(t);
  };
  return WriteSafetensorsStreaming(path, specs, fetch, metadata);
}

}  // namespace tandem::model

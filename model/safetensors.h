// Reading and writing the safetensors format (Hugging Face weights), single files and sharded
// checkpoints (`model.safetensors.index.json`).
//
// File layout: 8-byte little-endian header length N, N bytes of JSON header
//   {"__metadata__": {"k": "v"}, "name": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}}
// then the data region; offsets are relative to its start. Open() validates everything before
// handing out a tensor: header length within the file, JSON valid, dtypes known (F32, BF16, F16,
// I32, I64, U8), shape x dtype size == offset span, spans within the data region and disjoint.
//
//   TANDEM_ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open(model_dir));
//   TANDEM_ASSIGN_OR_RETURN(Tensor w, ckpt.GetFloat("model.norm.weight", {C}));  // f32 host
//
// Ownership: a SafetensorsFile memory-maps its file (private, copy-on-write) and shares the
// mapping between its copies through a shared_ptr. Tensors returned by Get() are host views of
// that mapping (Tensor::Wrap): they stay valid while any copy of the SafetensorsFile (or of the
// SafetensorsCheckpoint holding it) lives. Writes to them never reach the file.
// Thread-safety: const methods may be called from several threads.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"

namespace tandem::model {

// "F32", "BF16", "F16", "I32", "I64", "U8".
const char* SafetensorsDTypeName(DType dtype);

struct SafetensorsTensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  uint64_t begin = 0;  // byte offsets within the data region, [begin, end)
  uint64_t end = 0;
};

class SafetensorsFile {
 public:
  // Maps and validates `path`. NotFound when missing; DataLoss for a truncated or inconsistent
  // file; InvalidArgument for malformed JSON or an unknown dtype. Errors name the file (and the
  // tensor where one is at fault).
  static StatusOr<SafetensorsFile> Open(const std::string& path);

  const std::string& path() const { return path_; }
  // All tensors, sorted by name.
  const std::vector<SafetensorsTensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const SafetensorsTensorInfo* Find(const std::string& name) const;
  // The "__metadata__" map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Contiguous host tensor with the stored dtype and shape: a view of the mapping, or a copy when
  // the stored bytes are not aligned to the element size. NotFound naming file and tensor.
  StatusOr<Tensor> Get(const std::string& name) const;

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  const uint8_t* data_ = nullptr;  // start of the data region inside the mapping
  std::vector<SafetensorsTensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A model's weights: one .safetensors file or the shards of an index.
class SafetensorsCheckpoint {
 public:
  // `path` is a directory (holding model.safetensors.index.json or model.safetensors), an index
  // .json file, or a .safetensors file. An index must list only tensors its shards hold.
  static StatusOr<SafetensorsCheckpoint> Open(const std::string& path);

  // Every tensor name, sorted.
  std::vector<std::string> names() const;
  bool Contains(const std::string& name) const { return where_.count(name) != 0; }
  // The file holding `name` ("" when absent).
  std::string FileOf(const std::string& name) const;
  const SafetensorsTensorInfo* Find(const std::string& name) const;

  // The stored tensor (see SafetensorsFile::Get).
  StatusOr<Tensor> Get(const std::string& name) const;
  // The tensor as f32 on the host, converted from BF16/F16 (a copy) or as stored (F32, a view);
  // InvalidArgument naming file and tensor when the shape differs from `expected_shape` or the
  // dtype is not floating.
  StatusOr<Tensor> GetFloat(const std::string& name, const Shape& expected_shape) const;

 private:
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

// What one tensor of a file being written will hold.
struct SafetensorsTensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
};

// Writes a safetensors file: tensors sorted by name (data in that order), header padded with
// spaces to a multiple of 8 bytes, optional "__metadata__". `fetch(i)` is called once per spec,
// in the sorted order, and must return a host tensor with spec i's dtype and shape (any layout
// is copied out contiguous); only one fetched tensor is alive at a time, so huge models stream.
// The file is written under a temporary name and renamed into place.
Status WriteSafetensorsStreaming(const std::string& path,
                                 const std::vector<SafetensorsTensorSpec>& specs,
                                 const std::function<StatusOr<Tensor>(size_t index)>& fetch,
                                 const std::map<std::string, std::string>& metadata = {});
// Same for tensors already in memory (host or device; device tensors are copied to the host).
Status WriteSafetensors(const std::string& path,
                        const std::vector<std::pair<std::string, Tensor>>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

}  // namespace tandem::model

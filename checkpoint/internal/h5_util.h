// Small helpers over the HDF5 C API for the universal checkpoint: one move-only owner for every
// hid_t, the HDF5 check macro (turns a negative return into a Status carrying HDF5's own
// innermost error description plus our context), and typed attribute and hyperslab helpers.
//
// HDF5 errors are never printed by the library (automatic printing is switched off for the
// calling thread by every entry point here, see H5Quiet); they travel in the Status instead.
// Thread-safety: the HDF5 build used here is thread-safe (one global lock inside the library);
// each H5Id is used by one thread at a time.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"

namespace tandem::checkpoint::internal {

// Owns one HDF5 identifier (file, group, dataset, dataspace, attribute, property list, type) and
// drops its reference on destruction (errors ignored there; use Close() to see them).
class H5Id {
 public:
  H5Id() = default;
  explicit H5Id(hid_t id) : id_(id) {}
  H5Id(H5Id&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)) {}
  H5Id& operator=(H5Id&& other) noexcept;
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id();

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now and reports failure (for files: the final flush). `what` names the object.
  Status Close(const std::string& what);

 private:
  hid_t id_ = H5I_INVALID_HID;
};

// Switches off HDF5's automatic error printing for this thread (idempotent, cheap).
void H5Quiet();

// The innermost messages of HDF5's current error stack, e.g. "truncated file: eof = 1234, ...".
std::string H5ErrorText();

// Status for a failed HDF5 call: `code` with "<context>: <HDF5's message>".
Status H5Error(StatusCode code, const std::string& context);

// Returns Status `code` with `context` when `expr` (an HDF5 call) returns a negative value.
#define TANDEM_H5_CHECK(expr, code, context)                                    \
  do {                                                                          \
    if ((expr) < 0) {                                                           \
      return ::tandem::checkpoint::internal::H5Error(code, context)             \
          .WithContext(::tandem::internal::SourceLocation(__FILE__, __LINE__)); \
    }                                                                           \
  } while (0)

// Wraps an identifier returned by an HDF5 call, or the error with `context`.
StatusOr<H5Id> H5Make(hid_t id, StatusCode code, const std::string& context);

// File access properties for universal checkpoints: 1.8+ object headers (metadata checksums,
// large attributes; h5py reads them) and file locking that is skipped, not fatal, on file systems
// without locks (some NFS and Lustre mounts).
StatusOr<H5Id> FileAccessProps();

// Attributes on any object (file root, group, dataset).
Status WriteStringAttr(hid_t obj, const std::string& name, const std::string& value);
Status WriteInt64Attr(hid_t obj, const std::string& name, const std::vector<int64_t>& values,
                      bool scalar);
Status WriteUint32Attr(hid_t obj, const std::string& name, const std::vector<uint32_t>& values,
                       bool scalar);
bool HasAttr(hid_t obj, const std::string& name);
StatusOr<std::string> ReadStringAttr(hid_t obj, const std::string& name, const std::string& where);
StatusOr<std::vector<int64_t>> ReadInt64Attr(hid_t obj, const std::string& name,
                                             const std::string& where);
StatusOr<std::vector<uint32_t>> ReadUint32Attr(hid_t obj, const std::string& name,
                                               const std::string& where);

// Names of the links directly under `group`, in name order.
StatusOr<std::vector<std::string>> ListLinks(hid_t group, const std::string& where);

// Writes / reads the f32 hyperslab [offset, offset + count) of dataset `dset` from / into the
// contiguous host buffer `data` (count-shaped, row-major).
Status WriteF32Slab(hid_t dset, const Shape& offset, const Shape& count, const float* data,
                    const std::string& where);
Status ReadF32Slab(hid_t dset, const Shape& offset, const Shape& count, float* data,
                   const std::string& where);

}  // namespace tandem::checkpoint::internal

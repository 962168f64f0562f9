#include "checkpoint/internal/h5_util.h"

#include <algorithm>
#include <cstring>

namespace tandem::checkpoint::internal {

H5Id& H5Id::operator=(H5Id&& other) noexcept {
  if (this != &other) {
    if (id_ >= 0) H5Idec_ref(id_);
    id_ = std::exchange(other.id_, H5I_INVALID_HID);
  }
  return *this;
}

H5Id::~H5Id() {
  if (id_ >= 0) H5Idec_ref(id_);
}

Status H5Id::Close(const std::string& what) {
  if (id_ < 0) return Status::Ok();
  const hid_t id = std::exchange(id_, H5I_INVALID_HID);
  const herr_t rc = H5Iget_type(id) == H5I_FILE ? H5Fclose(id) : H5Idec_ref(id);
  if (rc < 0) return H5Error(StatusCode::kInternal, StrCat("closing ", what));
  return Status::Ok();
}

void H5Quiet() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

namespace {

herr_t CollectMessage(unsigned n, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::vector<std::string>*>(data);
  if (err->desc != nullptr && err->desc[0] != '\0') out->push_back(err->desc);
  return 0;
}

}  // namespace

std::string H5ErrorText() {
  std::vector<std::string> messages;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, CollectMessage, &messages);
  H5Eclear2(H5E_DEFAULT);
  if (messages.empty()) return "HDF5 call failed (no message)";
  // Innermost first: the lowest-level cause, then up to two levels of context.
  std::string text = messages[0];
  for (size_t i = 1; i < messages.size() && i < 3; ++i) text += "; " + messages[i];
  return text;
}

Status H5Error(StatusCode code, const std::string& context) {
  return Status(code, StrCat(context, ": ", H5ErrorText()));
}

StatusOr<H5Id> H5Make(hid_t id, StatusCode code, const std::string& context) {
  if (id < 0) return H5Error(code, context);
  return H5Id(id);
}

StatusOr<H5Id> FileAccessProps() {
  TANDEM_ASSIGN_OR_RETURN(H5Id fapl, H5Make(H5Pcreate(H5P_FILE_ACCESS), StatusCode::kInternal,
                                            "file access properties"));
  TANDEM_H5_CHECK(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST),
                  StatusCode::kInternal, "H5Pset_libver_bounds");
  TANDEM_H5_CHECK(H5Pset_file_locking(fapl.get(), true, true), StatusCode::kInternal,
                  "H5Pset_file_locking");
  return fapl;
}

namespace {

StatusOr<H5Id> MakeSpace(size_t n, bool scalar) {
  if (scalar) return H5Make(H5Screate(H5S_SCALAR), StatusCode::kInternal, "H5Screate");
  const hsize_t dims[1] = {static_cast<hsize_t>(n)};
  return H5Make(H5Screate_simple(1, dims, nullptr), StatusCode::kInternal, "H5Screate_simple");
}

template <typename T>
Status WriteNumericAttr(hid_t obj, const std::string& name, const std::vector<T>& values,
                        bool scalar, hid_t file_type, hid_t mem_type) {
  TANDEM_CHECK(!scalar || values.size() == 1);
  if (H5Aexists(obj, name.c_str()) > 0) H5Adelete(obj, name.c_str());
  TANDEM_ASSIGN_OR_RETURN(H5Id space, MakeSpace(values.size(), scalar));
  TANDEM_ASSIGN_OR_RETURN(H5Id attr, H5Make(H5Acreate2(obj, name.c_str(), file_type, space.get(),
                                                       H5P_DEFAULT, H5P_DEFAULT),
                                            StatusCode::kInternal, "creating attribute " + name));
  TANDEM_H5_CHECK(H5Awrite(attr.get(), mem_type, values.data()), StatusCode::kInternal,
                  "writing attribute " + name);
  return attr.Close("attribute " + name);
}

template <typename T>
StatusOr<std::vector<T>> ReadNumericAttr(hid_t obj, const std::string& name,
                                         const std::string& where, hid_t mem_type) {
  const std::string what = StrCat(where, ": attribute '", name, "'");
  if (H5Aexists(obj, name.c_str()) <= 0) return DataLossError(what + " is missing");
  TANDEM_ASSIGN_OR_RETURN(H5Id attr, H5Make(H5Aopen(obj, name.c_str(), H5P_DEFAULT),
                                            StatusCode::kDataLoss, "opening " + what));
  TANDEM_ASSIGN_OR_RETURN(
      H5Id space, H5Make(H5Aget_space(attr.get()), StatusCode::kDataLoss, "dataspace of " + what));
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  if (n < 0) return H5Error(StatusCode::kDataLoss, "size of " + what);
  std::vector<T> values(static_cast<size_t>(n));
  if (n > 0) {
    TANDEM_H5_CHECK(H5Aread(attr.get(), mem_type, values.data()), StatusCode::kDataLoss,
                    "reading " + what);
  }
  return values;
}

}  // namespace

Status WriteStringAttr(hid_t obj, const std::string& name, const std::string& value) {
  if (H5Aexists(obj, name.c_str()) > 0) H5Adelete(obj, name.c_str());
  // Variable-length UTF-8: h5py returns a Python str.
  TANDEM_ASSIGN_OR_RETURN(H5Id type, H5Make(H5Tcopy(H5T_C_S1), StatusCode::kInternal, "H5Tcopy"));
  TANDEM_H5_CHECK(H5Tset_size(type.get(), H5T_VARIABLE), StatusCode::kInternal, "H5Tset_size");
  TANDEM_H5_CHECK(H5Tset_cset(type.get(), H5T_CSET_UTF8), StatusCode::kInternal, "H5Tset_cset");
  TANDEM_ASSIGN_OR_RETURN(H5Id space, MakeSpace(1, true));
  TANDEM_ASSIGN_OR_RETURN(H5Id attr, H5Make(H5Acreate2(obj, name.c_str(), type.get(), space.get(),
                                                       H5P_DEFAULT, H5P_DEFAULT),
                                            StatusCode::kInternal, "creating attribute " + name));
  const char* ptr = value.c_str();
  TANDEM_H5_CHECK(H5Awrite(attr.get(), type.get(), &ptr), StatusCode::kInternal,
                  "writing attribute " + name);
  return attr.Close("attribute " + name);
}

Status WriteInt64Attr(hid_t obj, const std::string& name, const std::vector<int64_t>& values,
                      bool scalar) {
  return WriteNumericAttr(obj, name, values, scalar, H5T_STD_I64LE, H5T_NATIVE_INT64);
}

Status WriteUint32Attr(hid_t obj, const std::string& name, const std::vector<uint32_t>& values,
                       bool scalar) {
  return WriteNumericAttr(obj, name, values, scalar, H5T_STD_U32LE, H5T_NATIVE_UINT32);
}

bool HasAttr(hid_t obj, const std::string& name) { return H5Aexists(obj, name.c_str()) > 0; }

StatusOr<std::string> ReadStringAttr(hid_t obj, const std::string& name, const std::string& where) {
  const std::string what = StrCat(where, ": attribute '", name, "'");
  if (H5Aexists(obj, name.c_str()) <= 0) return DataLossError(what + " is missing");
  TANDEM_ASSIGN_OR_RETURN(H5Id attr, H5Make(H5Aopen(obj, name.c_str(), H5P_DEFAULT),
                                            StatusCode::kDataLoss, "opening " + what));
  TANDEM_ASSIGN_OR_RETURN(
      H5Id ftype, H5Make(H5Aget_type(attr.get()), StatusCode::kDataLoss, "type of " + what));
  if (H5Tget_class(ftype.get()) != H5T_STRING) {
    return DataLossError(what + ": expected a string attribute");
  }
  if (H5Tis_variable_str(ftype.get()) > 0) {
    TANDEM_ASSIGN_OR_RETURN(H5Id mtype, H5Make(H5Tcopy(H5T_C_S1), StatusCode::kInternal, "copy"));
    H5Tset_size(mtype.get(), H5T_VARIABLE);
    H5Tset_cset(mtype.get(), H5Tget_cset(ftype.get()));
    char* ptr = nullptr;
    TANDEM_H5_CHECK(H5Aread(attr.get(), mtype.get(), &ptr), StatusCode::kDataLoss,
                    "reading " + what);
    std::string value = ptr != nullptr ? ptr : "";
    H5free_memory(ptr);
    return value;
  }
  // Fixed-length strings (written by other tools, e.g. h5py with numpy bytes).
  const size_t size = H5Tget_size(ftype.get());
  std::string value(size, '\0');
  TANDEM_H5_CHECK(H5Aread(attr.get(), ftype.get(), value.data()), StatusCode::kDataLoss,
                  "reading " + what);
  value.resize(std::strlen(value.c_str()));
  return value;
}

StatusOr<std::vector<int64_t>> ReadInt64Attr(hid_t obj, const std::string& name,
                                             const std::string& where) {
  return ReadNumericAttr<int64_t>(obj, name, where, H5T_NATIVE_INT64);
}

StatusOr<std::vector<uint32_t>> ReadUint32Attr(hid_t obj, const std::string& name,
                                               const std::string& where) {
  return ReadNumericAttr<uint32_t>(obj, name, where, H5T_NATIVE_UINT32);
}

namespace {

herr_t CollectLink(hid_t, const char* name, const H5L_info_t*, void* data) {
  static_cast<std::vector<std::string>*>(data)->push_back(name);
  return 0;
}

}  // namespace

StatusOr<std::vector<std::string>> ListLinks(hid_t group, const std::string& where) {
  std::vector<std::string> names;
  TANDEM_H5_CHECK(H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, nullptr, CollectLink, &names),
                  StatusCode::kDataLoss, "listing " + where);
  std::sort(names.begin(), names.end());
  return names;
}

namespace {

// File and memory dataspaces selecting the hyperslab.
Status SelectSlab(hid_t dset, const Shape& offset, const Shape& count, H5Id* file_space,
                  H5Id* mem_space, const std::string& where) {
  TANDEM_ASSIGN_OR_RETURN(
      *file_space, H5Make(H5Dget_space(dset), StatusCode::kDataLoss, "dataspace of " + where));
  const int ndim = H5Sget_simple_extent_ndims(file_space->get());
  if (ndim != static_cast<int>(offset.size())) {
    return DataLossError(StrCat(where, ": expected ", offset.size(), " dims, found ", ndim));
  }
  std::vector<hsize_t> start(offset.begin(), offset.end()), cnt(count.begin(), count.end());
  TANDEM_H5_CHECK(H5Sselect_hyperslab(file_space->get(), H5S_SELECT_SET, start.data(), nullptr,
                                      cnt.data(), nullptr),
                  StatusCode::kInvalidArgument, "selecting a hyperslab of " + where);
  TANDEM_ASSIGN_OR_RETURN(*mem_space, H5Make(H5Screate_simple(ndim, cnt.data(), nullptr),
                                             StatusCode::kInternal, "memory dataspace"));
  return Status::Ok();
}

}  // namespace

Status WriteF32Slab(hid_t dset, const Shape& offset, const Shape& count, const float* data,
                    const std::string& where) {
  H5Id file_space, mem_space;
  TANDEM_RETURN_IF_ERROR(SelectSlab(dset, offset, count, &file_space, &mem_space, where));
  TANDEM_H5_CHECK(
      H5Dwrite(dset, H5T_NATIVE_FLOAT, mem_space.get(), file_space.get(), H5P_DEFAULT, data),
      StatusCode::kInternal, "writing " + where);
  return Status::Ok();
}

Status ReadF32Slab(hid_t dset, const Shape& offset, const Shape& count, float* data,
                   const std::string& where) {
  H5Id file_space, mem_space;
  TANDEM_RETURN_IF_ERROR(SelectSlab(dset, offset, count, &file_space, &mem_space, where));
  TANDEM_H5_CHECK(
      H5Dread(dset, H5T_NATIVE_FLOAT, mem_space.get(), file_space.get(), H5P_DEFAULT, data),
      StatusCode::kDataLoss, "reading " + where);
  return Status::Ok();
}

}  // namespace tandem::checkpoint::internal

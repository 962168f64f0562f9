// UniversalReader: opens a universal checkpoint, reads hyperslabs with CRC checks per row block.
#include <sys/stat.h>

#include <algorithm>
#include <sstream>

#include "checkpoint/internal/h5_format.h"
#include "checkpoint/internal/h5_layout.h"
#include "checkpoint/internal/h5_util.h"
#include "checkpoint/universal.h"

namespace tandem::checkpoint {

using internal::H5Id;
using internal::H5Make;

struct UniversalReader::File {
  H5Id file;
};

UniversalReader::UniversalReader(UniversalReader&&) noexcept = default;
UniversalReader& UniversalReader::operator=(UniversalReader&&) noexcept = default;
UniversalReader::~UniversalReader() = default;

namespace {

constexpr int64_t kStagingBytes = 64 << 20;  // rows read per HDF5 call while verifying

std::string GroupPath(const TensorInfo& t) {
  return t.adapter.empty() ? StrCat("/", internal::kParamsGroup, "/", t.name)
                           : StrCat("/", internal::kAdaptersGroup, "/", t.adapter, "/", t.name);
}

std::string Label(const std::string& file, const TensorInfo& t, int which) {
  std::string s = StrCat(file, ": ");
  if (!t.adapter.empty()) s += StrCat("adapter '", t.adapter, "' ");
  s += StrCat("tensor '", t.name, "'");
  if (which >= 0) s += StrCat(" dataset ", internal::kDatasetNames[which]);
  return s;
}

StatusOr<int64_t> ScalarInt(hid_t obj, const char* name, const std::string& where) {
  TANDEM_ASSIGN_OR_RETURN(std::vector<int64_t> v, internal::ReadInt64Attr(obj, name, where));
  if (v.size() != 1)
    return DataLossError(StrCat(where, ": attribute '", name, "' is not a scalar"));
  return v[0];
}

// The stored block CRCs must combine to the stored whole CRC (a cheap metadata check).
Status CheckBlockCrcs(const std::string& path, const TensorInfo& t) {
  const int64_t row_elems = internal::RowElems(t.shape);
  const int64_t num_blocks = (t.shape[0] + t.block_rows - 1) / std::max<int64_t>(t.block_rows, 1);
  for (size_t which = 0; which < t.crc32.size(); ++which) {
    const std::string what = Label(path, t, static_cast<int>(which));
    if (t.block_rows <= 0 || static_cast<int64_t>(t.block_crc32[which].size()) != num_blocks) {
      return DataLossError(StrCat(what, ": expected ", num_blocks, " block CRCs, found ",
                                  t.block_crc32[which].size()));
    }
    uint32_t whole = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t rows = std::min(t.block_rows, t.shape[0] - b * t.block_rows);
      whole = b == 0 ? t.block_crc32[which][0]
                     : internal::Crc32Combine(whole, t.block_crc32[which][b], rows * row_elems * 4);
    }
    if (whole != t.crc32[which]) return DataLossError(what + ": block CRCs do not match crc32");
  }
  return Status::Ok();
}

// Shapes and CRC attributes of a tensor group's datasets.
Status ReadDatasetInfos(hid_t group, const std::string& path, TensorInfo* t) {
  for (int which = 0; which < (t->has_moments ? 3 : 1); ++which) {
    const std::string what = Label(path, *t, which);
    TANDEM_ASSIGN_OR_RETURN(H5Id d,
                            H5Make(H5Dopen2(group, internal::kDatasetNames[which], H5P_DEFAULT),
                                   StatusCode::kDataLoss, "opening " + what));
    TANDEM_ASSIGN_OR_RETURN(
        H5Id space, H5Make(H5Dget_space(d.get()), StatusCode::kDataLoss, "dataspace of " + what));
    const int ndim = H5Sget_simple_extent_ndims(space.get());
    if (ndim <= 0) return DataLossError(what + ": not a simple dataset of rank >= 1");
    std::vector<hsize_t> dims(ndim);
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    const Shape shape(dims.begin(), dims.end());
    if (which == 0) t->shape = shape;
    if (shape != t->shape)
      return DataLossError(StrCat(what, ": shape ", ShapeToString(shape), " differs from master's ",
                                  ShapeToString(t->shape)));
    TANDEM_ASSIGN_OR_RETURN(std::vector<uint32_t> whole,
                            internal::ReadUint32Attr(d.get(), "crc32", what));
    TANDEM_ASSIGN_OR_RETURN(std::vector<uint32_t> blocks,
                            internal::ReadUint32Attr(d.get(), "block_crc32", what));
    if (whole.size() != 1) return DataLossError(what + ": attribute crc32 is not a scalar");
    t->crc32.push_back(whole[0]);
    t->block_crc32.push_back(std::move(blocks));
  }
  return Status::Ok();
}

StatusOr<TensorInfo> ReadInfo(hid_t file, const std::string& path, const std::string& adapter,
                              const std::string& name) {
  TensorInfo t;
  t.name = name;
  t.adapter = adapter;
  const std::string where = Label(path, t, -1);
  TANDEM_ASSIGN_OR_RETURN(H5Id g, H5Make(H5Gopen2(file, GroupPath(t).c_str(), H5P_DEFAULT),
                                         StatusCode::kDataLoss, "opening " + where));
  TANDEM_ASSIGN_OR_RETURN(t.step, ScalarInt(g.get(), "step", where));
  TANDEM_ASSIGN_OR_RETURN(int64_t trainable, ScalarInt(g.get(), "trainable", where));
  t.trainable = trainable != 0;
  TANDEM_ASSIGN_OR_RETURN(int64_t tp_dim, ScalarInt(g.get(), "tp_dim", where));
  t.split.tp_dim = static_cast<int>(tp_dim);
  TANDEM_ASSIGN_OR_RETURN(std::string parts,
                          internal::ReadStringAttr(g.get(), "fused_parts", where));
  if (!parts.empty()) {
    TANDEM_ASSIGN_OR_RETURN(std::vector<int64_t> sizes,
                            internal::ReadInt64Attr(g.get(), "fused_sizes", where));
    std::stringstream ss(parts);
    std::string part;
    for (size_t i = 0; std::getline(ss, part, ','); ++i) {
      if (i >= sizes.size()) return DataLossError(where + ": fused_sizes shorter than fused_parts");
      t.split.fused.push_back({part, sizes[i]});
    }
  }
  TANDEM_ASSIGN_OR_RETURN(int64_t vp, ScalarInt(g.get(), "vocab_parallel", where));
  t.split.vocab_parallel = vp != 0;
  TANDEM_ASSIGN_OR_RETURN(t.split.vocab_padding, ScalarInt(g.get(), "vocab_padding", where));
  TANDEM_ASSIGN_OR_RETURN(t.block_rows, ScalarInt(g.get(), "block_rows", where));
  t.has_moments = H5Lexists(g.get(), internal::kDatasetNames[1], H5P_DEFAULT) > 0;
  TANDEM_RETURN_IF_ERROR(ReadDatasetInfos(g.get(), path, &t));
  TANDEM_RETURN_IF_ERROR(CheckBlockCrcs(path, t));
  return t;
}

}  // namespace

StatusOr<UniversalReader> UniversalReader::Open(const std::string& path_or_dir) {
  internal::H5Quiet();
  std::string path = path_or_dir;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    return NotFoundError(StrCat("checkpoint ", path, " does not exist"));
  if (S_ISDIR(st.st_mode)) {
    TANDEM_ASSIGN_OR_RETURN(path, LatestCheckpoint(path));
  }
  UniversalReader r;
  r.path_ = path;
  r.file_ = std::make_unique<File>();
  TANDEM_ASSIGN_OR_RETURN(H5Id fapl, internal::FileAccessProps());
  TANDEM_ASSIGN_OR_RETURN(
      r.file_->file,
      H5Make(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), StatusCode::kDataLoss,
             StrCat(path, ": not a readable HDF5 file (truncated or corrupted?)")));
  const hid_t f = r.file_->file.get();
  TANDEM_ASSIGN_OR_RETURN(std::string format, internal::ReadStringAttr(f, "format", path));
  if (format != internal::kFormatName) {
    return InvalidArgumentError(
        StrCat(path, ": expected format '", internal::kFormatName, "', found '", format, "'"));
  }
  UniversalMeta& m = r.meta_;
  TANDEM_ASSIGN_OR_RETURN(m.format_version, ScalarInt(f, "format_version", path));
  if (m.format_version > kUniversalFormatVersion) {
    return InvalidArgumentError(StrCat(path, ": format version ", m.format_version,
                                       " is newer than this build reads (", kUniversalFormatVersion,
                                       ")"));
  }
  TANDEM_ASSIGN_OR_RETURN(m.step, ScalarInt(f, "step", path));
  TANDEM_ASSIGN_OR_RETURN(m.git_commit, internal::ReadStringAttr(f, "git_commit", path));
  TANDEM_ASSIGN_OR_RETURN(m.config_toml, internal::ReadStringAttr(f, "config", path));
  TANDEM_ASSIGN_OR_RETURN(m.model_config_json, internal::ReadStringAttr(f, "model_config", path));
  TANDEM_ASSIGN_OR_RETURN(std::vector<int64_t> mesh, internal::ReadInt64Attr(f, "mesh", path));
  if (mesh.size() != 3) return DataLossError(path + ": attribute 'mesh' must hold dp, cp, tp");
  m.dp = mesh[0], m.cp = mesh[1], m.tp = mesh[2];
  TANDEM_ASSIGN_OR_RETURN(m.data_position_json, internal::ReadStringAttr(f, "data_position", path));
  TANDEM_ASSIGN_OR_RETURN(m.rng_state_json, internal::ReadStringAttr(f, "rng_state", path));
  TANDEM_ASSIGN_OR_RETURN(H5Id params, H5Make(H5Gopen2(f, internal::kParamsGroup, H5P_DEFAULT),
                                              StatusCode::kDataLoss, path + ": opening /params"));
  TANDEM_ASSIGN_OR_RETURN(std::vector<std::string> names, internal::ListLinks(params.get(), path));
  for (const std::string& n : names) {
    TANDEM_ASSIGN_OR_RETURN(TensorInfo t, ReadInfo(f, path, "", n));
    r.tensors_.push_back(std::move(t));
  }
  TANDEM_ASSIGN_OR_RETURN(H5Id adapters,
                          H5Make(H5Gopen2(f, internal::kAdaptersGroup, H5P_DEFAULT),
                                 StatusCode::kDataLoss, path + ": opening /adapters"));
  TANDEM_ASSIGN_OR_RETURN(std::vector<std::string> anames,
                          internal::ListLinks(adapters.get(), path));
  for (const std::string& a : anames) {
    const std::string gp = StrCat("/", internal::kAdaptersGroup, "/", a);
    TANDEM_ASSIGN_OR_RETURN(H5Id g, H5Make(H5Gopen2(f, gp.c_str(), H5P_DEFAULT),
                                           StatusCode::kDataLoss, StrCat(path, ": opening ", gp)));
    TANDEM_ASSIGN_OR_RETURN(m.adapter_configs[a], internal::ReadStringAttr(g.get(), "config", gp));
    TANDEM_ASSIGN_OR_RETURN(std::vector<std::string> tnames, internal::ListLinks(g.get(), gp));
    for (const std::string& n : tnames) {
      TANDEM_ASSIGN_OR_RETURN(TensorInfo t, ReadInfo(f, path, a, n));
      r.tensors_.push_back(std::move(t));
    }
  }
  return r;
}

const TensorInfo* UniversalReader::Find(const std::string& name, const std::string& adapter) const {
  for (const TensorInfo& t : tensors_) {
    if (t.name == name && t.adapter == adapter) return &t;
  }
  return nullptr;
}

// Reads whole row blocks covering the box's rows, checks each block's CRC, copies the box out.
Status UniversalReader::ReadDataset(const TensorInfo& info, int which, const Hyperslab& slab,
                                    float* out) const {
  internal::H5Quiet();
  const std::string what = Label(path_, info, which);
  TANDEM_ASSIGN_OR_RETURN(
      H5Id dset, H5Make(H5Dopen2(file_->file.get(),
                                 (GroupPath(info) + "/" + internal::kDatasetNames[which]).c_str(),
                                 H5P_DEFAULT),
                        StatusCode::kDataLoss, "opening " + what));
  const int64_t rows = info.shape[0], br = info.block_rows;
  const int64_t row_elems = internal::RowElems(info.shape);
  const int64_t r0 = slab.offset[0], r1 = r0 + slab.count[0];
  if (r1 <= r0) return Status::Ok();
  const int64_t blocks_per_read =
      std::max<int64_t>(1, kStagingBytes / std::max<int64_t>(1, br * row_elems * 4));
  std::vector<float> staging;
  for (int64_t b = r0 / br; b * br < r1; b += blocks_per_read) {
    const int64_t s0 = b * br, s1 = std::min(rows, (b + blocks_per_read) * br);
    Shape off(info.shape.size(), 0), cnt = info.shape;
    off[0] = s0;
    cnt[0] = s1 - s0;
    staging.resize(static_cast<size_t>(cnt[0] * row_elems));
    TANDEM_RETURN_IF_ERROR(internal::ReadF32Slab(dset.get(), off, cnt, staging.data(), what));
    for (int64_t k = b; k * br < s1; ++k) {
      const int64_t k1 = std::min(rows, (k + 1) * br);
      const float* p = staging.data() + (k * br - s0) * row_elems;
      const uint32_t crc =
          internal::Crc32(0, p, static_cast<size_t>((k1 - k * br) * row_elems) * 4);
      if (crc != info.block_crc32[which][k]) {
        return DataLossError(StrCat(what, ": rows [", k * br, ", ", k1, ") are corrupted (CRC-32 ",
                                    crc, ", stored ", info.block_crc32[which][k], ")"));
      }
    }
    // The part of the box inside the staged rows.
    const int64_t c0 = std::max(r0, s0), c1 = std::min(r1, s1);
    Shape src_off = slab.offset, dst_off(info.shape.size(), 0), count = slab.count;
    src_off[0] = c0 - s0;
    dst_off[0] = c0 - r0;
    count[0] = c1 - c0;
    internal::CopyBox(out, slab.count, dst_off, staging.data(), cnt, src_off, count);
  }
  return Status::Ok();
}

StatusOr<TensorShard> UniversalReader::Read(const std::string& name, const Hyperslab& slab,
                                            const std::string& adapter, bool with_moments) const {
  const TensorInfo* info = Find(name, adapter);
  if (info == nullptr) {
    return NotFoundError(StrCat(path_, ": no ", adapter.empty() ? "" : "adapter '" + adapter + "' ",
                                "tensor '", name, "'"));
  }
  if (!internal::SlabInside(info->shape, slab.offset, slab.count)) {
    return InvalidArgumentError(
        StrCat(Label(path_, *info, -1), ": box offset ", ShapeToString(slab.offset), " count ",
               ShapeToString(slab.count), " is not inside ", ShapeToString(info->shape)));
  }
  TensorShard s;
  s.name = name;
  s.adapter = adapter;
  s.logical_shape = info->shape;
  s.split = info->split;
  s.slab = slab;
  s.step = info->step;
  s.trainable = info->trainable;
  Tensor* outs[3] = {&s.master, &s.exp_avg, &s.exp_avg_sq};
  for (int which = 0; which < ((with_moments && info->has_moments) ? 3 : 1); ++which) {
    *outs[which] = Tensor::Cpu(slab.count, DType::kF32);
    TANDEM_RETURN_IF_ERROR(ReadDataset(*info, which, slab, outs[which]->data<float>()));
  }
  return s;
}

StatusOr<TensorShard> UniversalReader::ReadAll(const std::string& name, const std::string& adapter,
                                               bool with_moments) const {
  const TensorInfo* info = Find(name, adapter);
  if (info == nullptr) return Read(name, {}, adapter, with_moments);  // NotFound
  return Read(name, Hyperslab{Shape(info->shape.size(), 0), info->shape}, adapter, with_moments);
}

StatusOr<TensorShard> UniversalReader::ReadTp(const std::string& name, int tp_rank, int tp_size,
                                              const std::string& adapter, bool with_moments) const {
  const TensorInfo* info = Find(name, adapter);
  if (info == nullptr) return Read(name, {}, adapter, with_moments);  // NotFound
  if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size) {
    return InvalidArgumentError(StrCat("tp rank ", tp_rank, " of ", tp_size));
  }
  const int d = std::max(info->split.tp_dim, 0);
  if (info->split.tp_dim >= 0) {  // check divisibility here rather than abort in TpSlices
    for (const FusedPart& p : info->split.fused) {
      if (p.size % tp_size != 0) {
        return InvalidArgumentError(StrCat(Label(path_, *info, -1), ": fused part '", p.name,
                                           "' of ", p.size, " does not divide over tp ", tp_size));
      }
    }
    if (info->split.fused.empty() && !info->split.vocab_parallel && info->shape[d] % tp_size != 0) {
      return InvalidArgumentError(StrCat(Label(path_, *info, -1), ": dim ", d, " of ",
                                         info->shape[d], " does not divide over tp ", tp_size));
    }
  }
  const Shape local = TpLocalShape(info->shape, info->split, tp_size);
  TensorShard out;
  out.name = name;
  out.adapter = adapter;
  out.logical_shape = info->shape;
  out.split = info->split;
  out.slab = Hyperslab{Shape(local.size(), 0), local};
  out.step = info->step;
  out.trainable = info->trainable;
  const bool moments = with_moments && info->has_moments;
  out.master = Tensor::CpuZeros(local, DType::kF32);
  if (moments) {
    out.exp_avg = Tensor::CpuZeros(local, DType::kF32);
    out.exp_avg_sq = Tensor::CpuZeros(local, DType::kF32);
  }
  int64_t local_offset = 0;
  for (const Hyperslab& box : TpSlices(info->shape, info->split, tp_rank, tp_size)) {
    if (ShapeNumel(box.count) == 0) continue;  // a vocabulary rank holding only padding
    TANDEM_ASSIGN_OR_RETURN(TensorShard part, Read(name, box, adapter, moments));
    Shape dst_off(local.size(), 0);
    dst_off[d] = local_offset;
    const Tensor* src[3] = {&part.master, &part.exp_avg, &part.exp_avg_sq};
    Tensor* dst[3] = {&out.master, &out.exp_avg, &out.exp_avg_sq};
    for (int which = 0; which < (moments ? 3 : 1); ++which) {
      internal::CopyBox(dst[which]->data<float>(), local, dst_off, src[which]->data<float>(),
                        box.count, Shape(local.size(), 0), box.count);
    }
    local_offset += box.count[d];
  }
  return out;
}

Status UniversalReader::VerifyAll() const {
  for (const TensorInfo& t : tensors_) {
    const Hyperslab all{Shape(t.shape.size(), 0), t.shape};
    for (int which = 0; which < static_cast<int>(t.crc32.size()); ++which) {
      std::vector<float> data(static_cast<size_t>(ShapeNumel(t.shape)));
      TANDEM_RETURN_IF_ERROR(ReadDataset(t, which, all, data.data()));
      const uint32_t crc = internal::Crc32(0, data.data(), data.size() * sizeof(float));
      if (crc != t.crc32[which]) {
        return DataLossError(
            StrCat(Label(path_, t, which), ": CRC-32 ", crc, ", stored ", t.crc32[which]));
      }
    }
  }
  return Status::Ok();
}

std::string UniversalReader::Describe() const {
  std::ostringstream os;
  os << "file: " << path_ << "\nformat_version: " << meta_.format_version
     << "\nstep: " << meta_.step << "\ngit_commit: " << meta_.git_commit
     << "\nmesh: dp=" << meta_.dp << " cp=" << meta_.cp << " tp=" << meta_.tp
     << "\ndata_position: " << meta_.data_position_json << "\nrng_state: " << meta_.rng_state_json
     << "\n";
  for (const auto& [name, config] : meta_.adapter_configs) {
    os << "adapter " << name << ": " << config << "\n";
  }
  int64_t total = 0;
  os << "tensors:\n";
  for (const TensorInfo& t : tensors_) {
    total += ShapeNumel(t.shape);
    os << "  " << (t.adapter.empty() ? "" : t.adapter + "/") << t.name << " "
       << ShapeToString(t.shape) << " step=" << t.step << (t.trainable ? "" : " frozen")
       << (t.has_moments ? "" : " no-moments") << " split=";
    if (t.split.tp_dim < 0) {
      os << "replicated";
    } else {
      os << "dim" << t.split.tp_dim;
      for (size_t i = 0; i < t.split.fused.size(); ++i) {
        os << (i == 0 ? " fused=" : ",") << t.split.fused[i].name << ":" << t.split.fused[i].size;
      }
      if (t.split.vocab_parallel) os << " vocab_padding=" << t.split.vocab_padding;
    }
    os << " crc32=" << t.crc32[0] << "\n";
  }
  os << "parameters: " << tensors_.size() << " tensors, " << total << " elements\n";
  os << "config:\n" << meta_.config_toml << (meta_.config_toml.empty() ? "" : "\n");
  return os.str();
}

}  // namespace tandem::checkpoint

// SaveUniversal: gather shard descriptions and CRC pieces on rank 0, declare every dataset, let
// the ranks write their hyperslabs in turn, then publish atomically (see universal.h).
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "checkpoint/internal/h5_format.h"
#include "checkpoint/internal/h5_layout.h"
#include "checkpoint/internal/h5_util.h"
#include "checkpoint/universal.h"
#include "core/logging.h"
#include "core/version.h"

namespace tandem::checkpoint {
namespace {

using internal::H5Id;
using internal::H5Make;
using internal::Piece;
using json = nlohmann::json;

constexpr int kTagGather = 9101;
constexpr int kTagToken = 9102;

std::string TensorPath(const std::string& adapter, const std::string& name) {
  return adapter.empty() ? StrCat("/", internal::kParamsGroup, "/", name)
                         : StrCat("/", internal::kAdaptersGroup, "/", adapter, "/", name);
}

std::string Describe(const TensorShard& s) {
  return s.adapter.empty() ? StrCat("tensor '", s.name, "'")
                           : StrCat("adapter '", s.adapter, "' tensor '", s.name, "'");
}

Status ValidateShard(const TensorShard& s) {
  const std::string what = Describe(s);
  if (s.name.empty() || s.name.find('/') != std::string::npos ||
      s.adapter.find('/') != std::string::npos) {
    return InvalidArgumentError(StrCat(what, ": names must be non-empty and contain no '/'"));
  }
  if (s.logical_shape.empty()) return InvalidArgumentError(what + ": scalars are not supported");
  for (int64_t d : s.logical_shape) {
    if (d <= 0)
      return InvalidArgumentError(
          StrCat(what, ": logical shape ", ShapeToString(s.logical_shape), " has a dim <= 0"));
  }
  if (!internal::SlabInside(s.logical_shape, s.slab.offset, s.slab.count)) {
    return InvalidArgumentError(StrCat(what, ": box offset ", ShapeToString(s.slab.offset),
                                       " count ", ShapeToString(s.slab.count), " is not inside ",
                                       ShapeToString(s.logical_shape)));
  }
  if (s.exp_avg.defined() != s.exp_avg_sq.defined()) {
    return InvalidArgumentError(what + ": exp_avg and exp_avg_sq must both be defined or neither");
  }
  for (const Tensor* t : {&s.master, &s.exp_avg, &s.exp_avg_sq}) {
    if (t == &s.master && !t->defined())
      return InvalidArgumentError(what + ": master is undefined");
    if (!t->defined()) continue;
    if (t->shape() != s.slab.count || t->dtype() != DType::kF32 || !t->is_contiguous() ||
        !t->device().is_cpu()) {
      return InvalidArgumentError(StrCat(what, ": expected contiguous f32 host tensors of shape ",
                                         ShapeToString(s.slab.count), ", found ",
                                         t->DebugString()));
    }
  }
  return Status::Ok();
}

const Tensor& DatasetTensor(const TensorShard& s, int which) {
  return which == 0 ? s.master : which == 1 ? s.exp_avg : s.exp_avg_sq;
}

// ---- communication helpers ----

Status SendBytes(collectives::Communicator& g, int peer, const std::string& bytes) {
  Tensor n = Tensor::Cpu({1}, DType::kI64);
  n.data<int64_t>()[0] = static_cast<int64_t>(bytes.size());
  TANDEM_RETURN_IF_ERROR(g.Send(n, peer, kTagGather));
  if (bytes.empty()) return Status::Ok();
  Tensor t = Tensor::Wrap(const_cast<char*>(bytes.data()), {static_cast<int64_t>(bytes.size())},
                          DType::kU8, Device::Cpu());
  return g.Send(t, peer, kTagGather);
}

StatusOr<std::string> RecvBytes(collectives::Communicator& g, int peer) {
  Tensor n = Tensor::Cpu({1}, DType::kI64);
  TANDEM_RETURN_IF_ERROR(g.Recv(n, peer, kTagGather));
  std::string bytes(static_cast<size_t>(n.data<int64_t>()[0]), '\0');
  if (bytes.empty()) return bytes;
  Tensor t =
      Tensor::Wrap(bytes.data(), {static_cast<int64_t>(bytes.size())}, DType::kU8, Device::Cpu());
  TANDEM_RETURN_IF_ERROR(g.Recv(t, peer, kTagGather));
  return bytes;
}

// Every rank returns the same outcome: OK, or the error of the highest failing rank (its own
// message there, the message broadcast from it elsewhere, prefixed with its rank).
Status Agree(collectives::Communicator* g, const Status& mine) {
  if (g == nullptr || g->size() == 1) return mine;
  Tensor flag = Tensor::Cpu({1}, DType::kI64);
  flag.data<int64_t>()[0] = mine.ok() ? 0 : g->rank() + 1;
  TANDEM_RETURN_IF_ERROR(g->AllReduce(flag, collectives::ReduceOp::kMax));
  const int64_t failed = flag.data<int64_t>()[0];
  if (failed == 0) return Status::Ok();
  const int root = static_cast<int>(failed - 1);
  Tensor head = Tensor::Cpu({2}, DType::kI64);
  std::string text = root == g->rank() ? mine.message() : "";
  head.data<int64_t>()[0] = static_cast<int64_t>(mine.code());
  head.data<int64_t>()[1] = static_cast<int64_t>(text.size());
  TANDEM_RETURN_IF_ERROR(g->Broadcast(head, root));
  text.resize(static_cast<size_t>(head.data<int64_t>()[1]));
  if (!text.empty()) {
    Tensor t =
        Tensor::Wrap(text.data(), {static_cast<int64_t>(text.size())}, DType::kU8, Device::Cpu());
    TANDEM_RETURN_IF_ERROR(g->Broadcast(t, root));
  }
  if (root == g->rank()) return mine;
  return Status(static_cast<StatusCode>(head.data<int64_t>()[0]),
                StrCat("checkpoint save failed on rank ", root, ": ", text));
}

// ---- descriptions gathered on rank 0 ----

struct Merged {
  TensorShard info;  // no tensors; slab unused
  int64_t block_rows = 0;
  std::vector<Piece> pieces[3];
};

json ShardJson(const TensorShard& s) {
  json fused = json::array();
  for (const FusedPart& p : s.split.fused) fused.push_back({p.name, p.size});
  return {{"name", s.name},
          {"adapter", s.adapter},
          {"shape", s.logical_shape},
          {"tp_dim", s.split.tp_dim},
          {"fused", fused},
          {"vocab_parallel", s.split.vocab_parallel},
          {"vocab_padding", s.split.vocab_padding},
          {"step", s.step},
          {"trainable", s.trainable},
          {"has_moments", s.exp_avg.defined()}};
}

TensorShard ShardFromJson(const json& j) {
  TensorShard s;
  s.name = j.at("name");
  s.adapter = j.at("adapter");
  s.logical_shape = j.at("shape").get<Shape>();
  s.split.tp_dim = j.at("tp_dim");
  for (const json& p : j.at("fused")) s.split.fused.push_back({p[0], p[1]});
  s.split.vocab_parallel = j.at("vocab_parallel");
  s.split.vocab_padding = j.at("vocab_padding");
  s.step = j.at("step");
  s.trainable = j.at("trainable");
  if (j.at("has_moments")) s.exp_avg = Tensor::Cpu({1}, DType::kF32);  // marker only
  return s;
}

// This rank's description: JSON of its shards and the binary CRC pieces of their data.
std::pair<std::string, std::string> DescribeLocal(const std::vector<TensorShard>& shards,
                                                  int64_t chunk_bytes) {
  json list = json::array();
  std::vector<Piece> pieces;
  for (size_t i = 0; i < shards.size(); ++i) {
    const TensorShard& s = shards[i];
    list.push_back(ShardJson(s));
    const int64_t block_elems =
        internal::BlockRows(s.logical_shape, chunk_bytes) * internal::RowElems(s.logical_shape);
    for (int which = 0; which < 3; ++which) {
      const Tensor& t = DatasetTensor(s, which);
      if (!t.defined()) continue;
      internal::AppendPieces(s.logical_shape, s.slab.offset, s.slab.count, t.data<float>(),
                             block_elems, static_cast<int32_t>(i * 3 + which), &pieces);
    }
  }
  std::string bin(pieces.size() * sizeof(Piece), '\0');
  if (!pieces.empty()) std::memcpy(bin.data(), pieces.data(), bin.size());
  return {list.dump(), std::move(bin)};
}

Status MergeRank(int rank, const std::string& text, const std::string& bin, int64_t chunk_bytes,
                 std::map<std::pair<std::string, std::string>, Merged>* merged) {
  const json list = json::parse(text);
  std::vector<Merged*> by_index;
  for (const json& j : list) {
    TensorShard s = ShardFromJson(j);
    auto [it, fresh] = merged->try_emplace({s.adapter, s.name});
    Merged& m = it->second;
    if (fresh) {
      m.info = s;
      m.block_rows = internal::BlockRows(s.logical_shape, chunk_bytes);
    } else if (ShardJson(m.info) != ShardJson(s)) {
      return InvalidArgumentError(StrCat(Describe(s), ": rank ", rank, " describes it as ",
                                         ShardJson(s).dump(), ", another rank as ",
                                         ShardJson(m.info).dump()));
    }
    by_index.push_back(&m);
  }
  const size_t n = bin.size() / sizeof(Piece);
  std::vector<Piece> pieces(n);
  if (n > 0) std::memcpy(pieces.data(), bin.data(), n * sizeof(Piece));
  for (const Piece& p : pieces) by_index[p.dataset / 3]->pieces[p.dataset % 3].push_back(p);
  return Status::Ok();
}

// ---- the file ----

Status CreateDataset(hid_t group, int which, const Merged& m, const std::vector<uint32_t>& blocks,
                     uint32_t whole) {
  const char* ds = internal::kDatasetNames[which];
  const Shape& shape = m.info.logical_shape;
  std::vector<hsize_t> dims(shape.begin(), shape.end()), chunk = dims;
  chunk[0] = static_cast<hsize_t>(m.block_rows);
  TANDEM_ASSIGN_OR_RETURN(
      H5Id space, H5Make(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                         StatusCode::kInternal, "dataspace"));
  TANDEM_ASSIGN_OR_RETURN(H5Id dcpl, H5Make(H5Pcreate(H5P_DATASET_CREATE), StatusCode::kInternal,
                                            "dataset properties"));
  TANDEM_H5_CHECK(H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()),
                  StatusCode::kInternal, "H5Pset_chunk");
  TANDEM_H5_CHECK(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), StatusCode::kInternal,
                  "H5Pset_fill_time");
  const std::string what = StrCat(Describe(m.info), " dataset ", ds);
  TANDEM_ASSIGN_OR_RETURN(H5Id dset, H5Make(H5Dcreate2(group, ds, H5T_IEEE_F32LE, space.get(),
                                                       H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                                            StatusCode::kInternal, "creating " + what));
  TANDEM_RETURN_IF_ERROR(internal::WriteUint32Attr(dset.get(), "crc32", {whole}, true));
  TANDEM_RETURN_IF_ERROR(internal::WriteUint32Attr(dset.get(), "block_crc32", blocks, false));
  return dset.Close(what);
}

Status DeclareTensor(hid_t file, Merged& m) {
  const TensorShard& s = m.info;
  TANDEM_ASSIGN_OR_RETURN(H5Id group, H5Make(H5Gcreate2(file, TensorPath(s.adapter, s.name).c_str(),
                                                        H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                                             StatusCode::kInternal, "creating " + Describe(s)));
  const hid_t g = group.get();
  TANDEM_RETURN_IF_ERROR(internal::WriteInt64Attr(g, "step", {s.step}, true));
  TANDEM_RETURN_IF_ERROR(internal::WriteInt64Attr(g, "trainable", {s.trainable ? 1 : 0}, true));
  TANDEM_RETURN_IF_ERROR(internal::WriteInt64Attr(g, "tp_dim", {s.split.tp_dim}, true));
  std::string names;
  std::vector<int64_t> sizes;
  for (const FusedPart& p : s.split.fused) {
    names += (names.empty() ? "" : ",") + p.name;
    sizes.push_back(p.size);
  }
  TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(g, "fused_parts", names));
  if (!sizes.empty())
    TANDEM_RETURN_IF_ERROR(internal::WriteInt64Attr(g, "fused_sizes", sizes, false));
  TANDEM_RETURN_IF_ERROR(
      internal::WriteInt64Attr(g, "vocab_parallel", {s.split.vocab_parallel ? 1 : 0}, true));
  TANDEM_RETURN_IF_ERROR(
      internal::WriteInt64Attr(g, "vocab_padding", {s.split.vocab_padding}, true));
  TANDEM_RETURN_IF_ERROR(internal::WriteInt64Attr(g, "block_rows", {m.block_rows}, true));
  const int64_t numel = ShapeNumel(s.logical_shape);
  const int64_t block_elems = m.block_rows * internal::RowElems(s.logical_shape);
  for (int which = 0; which < (s.exp_avg.defined() ? 3 : 1); ++which) {
    auto& pieces = m.pieces[which];
    std::sort(pieces.begin(), pieces.end(),
              [](const Piece& a, const Piece& b) { return a.start < b.start; });
    std::vector<uint32_t> blocks;
    uint32_t whole = 0;
    TANDEM_RETURN_IF_ERROR(internal::CombinePieces(
        pieces, numel, block_elems,
        StrCat(Describe(s), " dataset ", internal::kDatasetNames[which]), &blocks, &whole));
    TANDEM_RETURN_IF_ERROR(CreateDataset(g, which, m, blocks, whole));
  }
  return group.Close(Describe(s));
}

Status DeclareFile(const std::string& path, const UniversalMeta& meta,
                   std::map<std::pair<std::string, std::string>, Merged>& merged) {
  internal::H5Quiet();
  TANDEM_ASSIGN_OR_RETURN(H5Id fapl, internal::FileAccessProps());
  TANDEM_ASSIGN_OR_RETURN(H5Id file,
                          H5Make(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()),
                                 StatusCode::kInternal, "creating " + path));
  const hid_t f = file.get();
  TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(f, "format", internal::kFormatName));
  TANDEM_RETURN_IF_ERROR(
      internal::WriteInt64Attr(f, "format_version", {kUniversalFormatVersion}, true));
  TANDEM_RETURN_IF_ERROR(internal::WriteInt64Attr(f, "step", {meta.step}, true));
  TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(f, "git_commit", GitCommit()));
  TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(f, "config", meta.config_toml));
  TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(f, "model_config", meta.model_config_json));
  TANDEM_RETURN_IF_ERROR(internal::WriteInt64Attr(f, "mesh", {meta.dp, meta.cp, meta.tp}, false));
  TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(f, "data_position", meta.data_position_json));
  TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(f, "rng_state", meta.rng_state_json));
  std::map<std::string, std::string> adapters = meta.adapter_configs;
  for (const auto& [key, m] : merged) {
    if (!key.first.empty()) adapters.try_emplace(key.first, "{}");
  }
  for (const char* g : {internal::kParamsGroup, internal::kAdaptersGroup}) {
    TANDEM_ASSIGN_OR_RETURN(H5Id grp,
                            H5Make(H5Gcreate2(f, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                                   StatusCode::kInternal, StrCat("creating /", g)));
  }
  for (const auto& [name, config] : adapters) {
    const std::string p = StrCat("/", internal::kAdaptersGroup, "/", name);
    TANDEM_ASSIGN_OR_RETURN(H5Id grp,
                            H5Make(H5Gcreate2(f, p.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                                   StatusCode::kInternal, "creating " + p));
    TANDEM_RETURN_IF_ERROR(internal::WriteStringAttr(grp.get(), "config", config));
  }
  for (auto& [key, m] : merged) TANDEM_RETURN_IF_ERROR(DeclareTensor(f, m));
  return file.Close(path);
}

Status WriteOwnShards(const std::string& path, const std::vector<TensorShard>& shards) {
  internal::H5Quiet();
  TANDEM_ASSIGN_OR_RETURN(H5Id fapl, internal::FileAccessProps());
  TANDEM_ASSIGN_OR_RETURN(H5Id file, H5Make(H5Fopen(path.c_str(), H5F_ACC_RDWR, fapl.get()),
                                            StatusCode::kInternal, "opening " + path));
  for (const TensorShard& s : shards) {
    for (int which = 0; which < 3; ++which) {
      const Tensor& t = DatasetTensor(s, which);
      if (!t.defined()) continue;
      const std::string p = TensorPath(s.adapter, s.name) + "/" + internal::kDatasetNames[which];
      const std::string what =
          StrCat(path, ": ", Describe(s), " dataset ", internal::kDatasetNames[which]);
      TANDEM_ASSIGN_OR_RETURN(H5Id dset, H5Make(H5Dopen2(file.get(), p.c_str(), H5P_DEFAULT),
                                                StatusCode::kInternal, "opening " + what));
      TANDEM_RETURN_IF_ERROR(
          internal::WriteF32Slab(dset.get(), s.slab.offset, s.slab.count, t.data<float>(), what));
    }
  }
  return file.Close(path);
}

// ---- publishing (rank 0) ----

Status FsyncPath(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return InternalError(StrCat("open ", path, ": ", std::strerror(errno)));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return InternalError(StrCat("fsync ", path, ": ", std::strerror(err)));
  return Status::Ok();
}

Status Rename(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0) {
    return InternalError(StrCat("rename ", from, " -> ", to, ": ", std::strerror(errno)));
  }
  return Status::Ok();
}

Status WriteLatest(const std::string& dir, const std::string& name,
                   const std::function<void(const std::string&)>& stage) {
  const std::string tmp = StrCat(dir, "/", internal::kLatestFile, ".tmp");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return InternalError(StrCat("open ", tmp, ": ", std::strerror(errno)));
  const std::string text = name + "\n";
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
                  ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) return InternalError(StrCat("writing ", tmp, ": ", std::strerror(err)));
  stage("latest_written");
  TANDEM_RETURN_IF_ERROR(Rename(tmp, StrCat(dir, "/", internal::kLatestFile)));
  TANDEM_RETURN_IF_ERROR(FsyncPath(dir, true));
  stage("latest_renamed");
  return Status::Ok();
}

// Step of "step-<N>.h5" (or -1).
int64_t StepOf(const std::string& name, const std::string& suffix) {
  if (name.rfind("step-", 0) != 0 || name.size() <= 5 + suffix.size() ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return -1;
  }
  const std::string digits = name.substr(5, name.size() - 5 - suffix.size());
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoll(digits);
}

// Deletes all but the newest `keep` complete checkpoints (never `current`) and leftover
// temporaries of interrupted saves.
void Prune(const std::string& dir, int keep, const std::string& current) {
  std::vector<std::pair<int64_t, std::string>> complete;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (StepOf(name, ".h5.tmp") >= 0) {
      std::filesystem::remove(entry.path(), ec);
    } else if (const int64_t step = StepOf(name, ".h5"); step >= 0) {
      complete.emplace_back(step, name);
    }
  }
  std::sort(complete.rbegin(), complete.rend());
  for (size_t i = static_cast<size_t>(std::max(keep, 1)); i < complete.size(); ++i) {
    if (complete[i].second == current) continue;
    if (!std::filesystem::remove(dir + "/" + complete[i].second, ec) || ec) {
      TANDEM_LOG(WARNING, "ckpt") << "could not delete old checkpoint " << dir << "/"
                                  << complete[i].second << ": " << ec.message();
    }
  }
}

// Makes `tmp` durable as `final_path`; with `update_latest`, then points `latest` at it and
// prunes old checkpoints.
Status Publish(const std::string& tmp, const std::string& final_path, bool update_latest,
               const SaveOptions& options) {
  auto stage = [&](const std::string& s) {
    if (options.on_stage) options.on_stage(s);
  };
  const std::filesystem::path fp(final_path);
  const std::string dir = fp.has_parent_path() ? fp.parent_path().string() : ".";
  const std::string name = fp.filename().string();
  TANDEM_RETURN_IF_ERROR(FsyncPath(tmp, false));
  stage("synced");
  TANDEM_RETURN_IF_ERROR(Rename(tmp, final_path));
  TANDEM_RETURN_IF_ERROR(FsyncPath(dir, true));
  stage("renamed");
  if (!update_latest) return Status::Ok();
  TANDEM_RETURN_IF_ERROR(WriteLatest(dir, name, stage));
  Prune(dir, options.keep_last, name);
  stage("pruned");
  return Status::Ok();
}

// Rank 0: gathers every rank's description, checks and declares the file.
Status GatherAndDeclare(collectives::Communicator* g, const std::string& tmp,
                        const UniversalMeta& meta, const std::pair<std::string, std::string>& mine,
                        const SaveOptions& options) {
  std::map<std::pair<std::string, std::string>, Merged> merged;
  Status status = MergeRank(0, mine.first, mine.second, options.chunk_bytes, &merged);
  const int size = g == nullptr ? 1 : g->size();
  for (int r = 1; r < size; ++r) {  // receive from everyone even after a failure
    TANDEM_ASSIGN_OR_RETURN(std::string text, RecvBytes(*g, r));
    TANDEM_ASSIGN_OR_RETURN(std::string bin, RecvBytes(*g, r));
    if (status.ok()) status = MergeRank(r, text, bin, options.chunk_bytes, &merged);
  }
  TANDEM_RETURN_IF_ERROR(status);
  return DeclareFile(tmp, meta, merged);
}

// Writes `final_path` through `final_path`.tmp (see universal.h).
Status SaveImpl(const std::string& final_path, bool update_latest, const UniversalMeta& meta,
                const std::vector<TensorShard>& shards, collectives::Communicator* group,
                const SaveOptions& options) {
  const int rank = group == nullptr ? 0 : group->rank();
  const int size = group == nullptr ? 1 : group->size();
  Status local;
  for (const TensorShard& s : shards) {
    local = ValidateShard(s);
    if (!local.ok()) break;
  }
  TANDEM_RETURN_IF_ERROR(Agree(group, local));
  const std::string tmp = final_path + ".tmp";
  // 1. Descriptions to rank 0, which declares every dataset.
  const auto mine = DescribeLocal(shards, options.chunk_bytes);
  Status declared;
  if (rank == 0) {
    const std::filesystem::path parent = std::filesystem::path(final_path).parent_path();
    std::error_code ec;
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    declared =
        ec ? InternalError(StrCat("creating directory ", parent.string(), ": ", ec.message()))
           : GatherAndDeclare(group, tmp, meta, mine, options);
    if (declared.ok() && options.on_stage) options.on_stage("declared");
  } else {
    declared = SendBytes(*group, 0, mine.first);
    if (declared.ok()) declared = SendBytes(*group, 0, mine.second);
  }
  TANDEM_RETURN_IF_ERROR(Agree(group, declared));
  // 2. Hyperslabs, one rank at a time (token passing).
  Tensor token = Tensor::Cpu({1}, DType::kI64);
  token.data<int64_t>()[0] = 0;
  if (rank > 0) TANDEM_RETURN_IF_ERROR(group->Recv(token, rank - 1, kTagToken));
  Status written;
  if (token.data<int64_t>()[0] == 0) {
    written = WriteOwnShards(tmp, shards);
    if (!written.ok()) token.data<int64_t>()[0] = rank + 1;
  }
  if (rank + 1 < size) TANDEM_RETURN_IF_ERROR(group->Send(token, rank + 1, kTagToken));
  TANDEM_RETURN_IF_ERROR(Agree(group, written));
  // 3. Publish.
  Status published;
  if (rank == 0) {
    if (options.on_stage) options.on_stage("written");
    published = Publish(tmp, final_path, update_latest, options);
  }
  return Agree(group, published);
}

}  // namespace

StatusOr<std::string> SaveUniversal(const std::string& dir, const UniversalMeta& meta,
                                    const std::vector<TensorShard>& shards,
                                    collectives::Communicator* group, const SaveOptions& options) {
  const std::string path = StrCat(dir, "/step-", meta.step, ".h5");
  TANDEM_RETURN_IF_ERROR(SaveImpl(path, true, meta, shards, group, options));
  return path;
}

Status SaveUniversalFile(const std::string& path, const UniversalMeta& meta,
                         const std::vector<TensorShard>& shards, collectives::Communicator* group,
                         const SaveOptions& options) {
  return SaveImpl(path, false, meta, shards, group, options);
}

}  // namespace tandem::checkpoint

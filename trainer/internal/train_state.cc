#include "trainer/internal/train_state.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "ops/ops.h"

namespace tandem::trainer::internal {
namespace {

using checkpoint::Hyperslab;
using checkpoint::TensorShard;

// The local tensor's shape as [rows, cols]; a vector is [n, 1], so that slicing it along dim 0
// stays a range of rows.
struct Matrix {
  int64_t rows = 0, cols = 1;
};

Matrix LocalMatrix(const model::Parameter& p) {
  const Shape& s = p.weight.defined() ? p.weight.shape() : p.master.shape();
  TANDEM_CHECK_MSG(s.size() == 1 || s.size() == 2, p.name, ": parameters are 1-D or 2-D");
  return {s[0], s.size() == 2 ? s[1] : 1};
}

const Shape& LogicalShape(const model::Parameter& p) {
  if (!p.logical_shape.empty()) return p.logical_shape;
  return p.weight.defined() ? p.weight.shape() : p.master.shape();
}

// A box of a parameter in logical coordinates that is elements [flat_begin, flat_end) of its
// local tensor.
struct Box {
  Hyperslab slab;
  int64_t flat_begin = 0, flat_end = 0;
};

// Appends local rows [r0, r1) x cols [c0, c1) as a logical box, rows past the logical end
// dropped (the vocabulary padding of a vocabulary-parallel tensor); nothing when none is left.
void AddBox(const model::Parameter& p, const Matrix& local, int64_t r0, int64_t r1, int64_t c0,
            int64_t c1, std::vector<Box>* out) {
  const Shape& logical = LogicalShape(p);
  const int64_t row_shift = p.tp_dim == 0 ? p.tp_offset : 0;
  const int64_t col_shift = p.tp_dim == 1 ? p.tp_offset : 0;
  const int64_t logical_rows = logical[0];
  const int64_t end_row = std::min(r1, logical_rows - row_shift);
  if (end_row <= r0 || c1 <= c0) return;
  Box b;
  b.flat_begin = r0 * local.cols + c0;
  b.flat_end = (end_row - 1) * local.cols + c1;
  if (logical.size() == 1) {
    b.slab.offset = {r0 + row_shift};
    b.slab.count = {end_row - r0};
  } else {
    b.slab.offset = {r0 + row_shift, c0 + col_shift};
    b.slab.count = {end_row - r0, c1 - c0};
  }
  out->push_back(std::move(b));
}

// Elements [begin, end) of p's local tensor as boxes that are each contiguous in it: a partial
// first row, whole rows, a partial last row.
std::vector<Box> LogicalBoxes(const model::Parameter& p, int64_t begin, int64_t end) {
  const Matrix m = LocalMatrix(p);
  std::vector<Box> boxes;
  if (begin >= end) return boxes;
  int64_t r0 = begin / m.cols;
  const int64_t c0 = begin % m.cols;
  const int64_t r1 = end / m.cols, c1 = end % m.cols;
  if (r0 == r1) {
    AddBox(p, m, r0, r0 + 1, c0, c1, &boxes);
    return boxes;
  }
  if (c0 > 0) AddBox(p, m, r0, r0 + 1, c0, m.cols, &boxes), ++r0;
  if (r1 > r0) AddBox(p, m, r0, r1, 0, m.cols, &boxes);
  if (c1 > 0) AddBox(p, m, r1, r1 + 1, 0, c1, &boxes);
  return boxes;
}

checkpoint::SplitSpec Split(const model::Parameter& p) {
  checkpoint::SplitSpec s;
  s.tp_dim = p.tp_dim;
  s.vocab_parallel =
      p.tp_dim == 0 && (p.name == "model.embed_tokens.weight" || p.name == "lm_head.weight");
  return s;
}

std::string Where(const checkpoint::UniversalReader& reader, const model::Parameter& p,
                  const std::string& adapter) {
  return StrCat(reader.path(), ": tensor '", p.name, "'",
                adapter.empty() ? "" : StrCat(" of adapter '", adapter, "'"));
}

Status CheckTensor(const checkpoint::UniversalReader& reader, const model::Parameter& p,
                   const std::string& adapter) {
  const checkpoint::TensorInfo* info = reader.Find(p.name, adapter);
  if (info == nullptr) {
    return InvalidArgumentError(StrCat(Where(reader, p, adapter),
                                       " is not in the checkpoint: it was written by a run with "
                                       "another model or training method"));
  }
  if (info->shape != LogicalShape(p)) {
    return InvalidArgumentError(StrCat(Where(reader, p, adapter), " has shape ",
                                       ShapeToString(info->shape), ", this run's model needs ",
                                       ShapeToString(LogicalShape(p))));
  }
  return Status::Ok();
}

// Copies `src` (host f32, a box's elements) into elements [offset, offset + src.numel()) of
// `dst_flat` ([n], host or device; f32, or bf16 state rounded to nearest), on the context's
// stream. The caller synchronizes before `src` goes.
Status CopyInto(ops::Context& ctx, const Tensor& dst_flat, int64_t offset, const Tensor& src) {
  Tensor dst = dst_flat.Slice(0, offset, offset + src.numel());
  const Tensor flat = src.View({src.numel()});
  if (dst.dtype() == flat.dtype() || dst.device().is_cpu())
    return CopyTensor(dst, flat, ctx.stream());
  Tensor narrowed = Tensor::Cpu(flat.shape(), dst.dtype());  // host to host converts
  TANDEM_RETURN_IF_ERROR(CopyTensor(narrowed, flat));
  TANDEM_RETURN_IF_ERROR(CopyTensor(dst, narrowed, ctx.stream()));
  return ctx.Synchronize();  // `narrowed` dies here
}

}  // namespace

std::vector<TensorShard> OwnedShards(const std::vector<StatePiece>& pieces,
                                     const StateOwner& owner, int64_t step) {
  std::vector<TensorShard> shards;
  if (!owner.sharded && !owner.first_replica) return shards;
  for (const StatePiece& piece : pieces) {
    const model::Parameter& p = *piece.param;
    if (p.tp_copies > 1 && owner.tp_rank % p.tp_copies != 0) continue;
    for (const Box& b : LogicalBoxes(p, piece.begin, piece.end)) {
      TensorShard s;
      s.name = p.name;
      s.adapter = owner.adapter;
      s.logical_shape = LogicalShape(p);
      s.split = Split(p);
      s.slab = b.slab;
      s.step = step;
      const int64_t a = b.flat_begin - piece.begin, e = b.flat_end - piece.begin;
      s.master = piece.master.Slice(0, a, e).View(b.slab.count);
      s.exp_avg = piece.exp_avg.Slice(0, a, e).View(b.slab.count);
      s.exp_avg_sq = piece.exp_avg_sq.Slice(0, a, e).View(b.slab.count);
      shards.push_back(std::move(s));
    }
  }
  return shards;
}

Status RestoreState(ops::Context& ctx, const checkpoint::UniversalReader& reader,
                    const std::vector<model::Parameter>& params,
                    const std::vector<StatePiece>& pieces, const std::string& adapter) {
  for (const model::Parameter& p : params) {
    if (!p.trainable) continue;
    TANDEM_RETURN_IF_ERROR(CheckTensor(reader, p, adapter));
    const Tensor& state = StateTensor(p);  // the f32 master, or the weight without one
    const int64_t n = state.numel();
    const Tensor master = state.View({n});
    for (const Box& b : LogicalBoxes(p, 0, n)) {
      TANDEM_ASSIGN_OR_RETURN(TensorShard s, reader.Read(p.name, b.slab, adapter, false));
      TANDEM_RETURN_IF_ERROR(CopyInto(ctx, master, b.flat_begin, s.master));
      TANDEM_RETURN_IF_ERROR(ctx.Synchronize());  // before `s` goes
    }
    if (p.master.defined() && p.weight.storage() != p.master.storage()) {
      Tensor weight = p.weight;
      TANDEM_RETURN_IF_ERROR(ops::Cast(ctx, weight, p.master));
    }
  }
  for (const StatePiece& piece : pieces) {
    const model::Parameter& p = *piece.param;
    const checkpoint::TensorInfo* info = reader.Find(p.name, adapter);
    if (info != nullptr && !info->has_moments) {
      return InvalidArgumentError(StrCat(Where(reader, p, adapter),
                                         " has no optimizer state (saved frozen)"));
    }
    for (const Box& b : LogicalBoxes(p, piece.begin, piece.end)) {
      TANDEM_ASSIGN_OR_RETURN(TensorShard s, reader.Read(p.name, b.slab, adapter, true));
      const int64_t at = b.flat_begin - piece.begin;
      TANDEM_RETURN_IF_ERROR(CopyInto(ctx, piece.exp_avg, at, s.exp_avg));
      TANDEM_RETURN_IF_ERROR(CopyInto(ctx, piece.exp_avg_sq, at, s.exp_avg_sq));
      TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
    }
  }
  return ctx.Synchronize();
}

StatusOr<std::string> ResolveResume(const std::string& resume, const std::string& dir) {
  if (resume.empty()) return std::string();
  if (resume == "auto") {
    StatusOr<std::string> latest = checkpoint::LatestCheckpoint(dir);
    if (latest.ok()) return *latest;
    if (latest.status().code() == StatusCode::kNotFound) return std::string();
    return latest.status();
  }
  if (std::filesystem::is_directory(resume)) {
    StatusOr<std::string> latest = checkpoint::LatestCheckpoint(resume);
    if (!latest.ok()) {
      return NotFoundError(StrCat("train.resume = '", resume, "': ", latest.status().message()));
    }
    return *latest;
  }
  if (!std::filesystem::exists(resume)) {
    return NotFoundError(StrCat("train.resume = '", resume, "': no such checkpoint file"));
  }
  return resume;
}

Status TruncateMetricsAfter(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return Status::Ok();
  std::ostringstream kept;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("step") || !j["step"].is_number_integer()) {
      return DataLossError(StrCat(path, " line ", n, ": not a metrics record"));
    }
    if (j["step"].get<int64_t>() <= step) kept << line << "\n";
  }
  in.close();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kept.str();
    if (!out.flush()) return InternalError(StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return InternalError(StrCat("cannot rename ", tmp, " to ", path, ": ", ec.message()));
  return Status::Ok();
}

Status WriteHeartbeat(const std::string& path, int64_t step) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr) return NotFoundError(StrCat("cannot write the heartbeat file ", tmp));
  const double now = std::chrono::duration<double>(
                         std::chrono::system_clock::now().time_since_epoch()).count();
  std::fprintf(f, "%lld %.3f\n", static_cast<long long>(step), now);
  std::fclose(f);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return InternalError(StrCat("cannot rename ", tmp, " to ", path));
  }
  return Status::Ok();
}

}  // namespace tandem::trainer::internal

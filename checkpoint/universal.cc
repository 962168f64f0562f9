// Tensor-parallel slicing rules and the `latest` pointer of universal checkpoints.
#include "checkpoint/universal.h"

#include <fstream>
#include <sstream>

#include "checkpoint/internal/h5_format.h"

namespace tandem::checkpoint {

std::vector<Hyperslab> TpSlices(const Shape& logical_shape, const SplitSpec& split, int tp_rank,
                                int tp_size) {
  TANDEM_CHECK(tp_size >= 1 && tp_rank >= 0 && tp_rank < tp_size);
  const Shape zero(logical_shape.size(), 0);
  if (split.tp_dim < 0) return {Hyperslab{zero, logical_shape}};
  const int d = split.tp_dim;
  TANDEM_CHECK_MSG(d < static_cast<int>(logical_shape.size()), "tp_dim ", d, " of a ",
                   logical_shape.size(), "-d tensor");
  const int64_t extent = logical_shape[d];
  std::vector<Hyperslab> out;
  auto box = [&](int64_t begin, int64_t size) {
    Hyperslab h{zero, logical_shape};
    h.offset[d] = begin;
    h.count[d] = size;
    out.push_back(h);
  };
  if (!split.fused.empty()) {
    int64_t start = 0;
    for (const FusedPart& part : split.fused) {
      TANDEM_CHECK_MSG(part.size % tp_size == 0, "fused part '", part.name, "' of ", part.size,
                       " rows does not divide over tp ", tp_size);
      const int64_t per = part.size / tp_size;
      box(start + tp_rank * per, per);
      start += part.size;
    }
    TANDEM_CHECK_MSG(start == extent, "fused parts sum to ", start, ", tensor has ", extent);
    return out;
  }
  if (split.vocab_parallel) {
    const int64_t per = (extent + tp_size - 1) / tp_size;
    const int64_t begin = std::min(extent, tp_rank * per);
    box(begin, std::min(extent, begin + per) - begin);
    return out;
  }
  TANDEM_CHECK_MSG(extent % tp_size == 0, "dim ", d, " of ", extent, " does not divide over tp ",
                   tp_size);
  box(tp_rank * (extent / tp_size), extent / tp_size);
  return out;
}

Shape TpLocalShape(const Shape& logical_shape, const SplitSpec& split, int tp_size) {
  Shape local = logical_shape;
  if (split.tp_dim < 0) return local;
  const int64_t extent = logical_shape[split.tp_dim];
  local[split.tp_dim] = (extent + tp_size - 1) / tp_size;  // exact unless vocab_parallel
  return local;
}

StatusOr<std::vector<TensorShard>> TpShards(const std::string& name, const Shape& logical_shape,
                                            const SplitSpec& split, int tp_rank, int tp_size,
                                            const Tensor& master, const Tensor& exp_avg,
                                            const Tensor& exp_avg_sq) {
  const Shape local = TpLocalShape(logical_shape, split, tp_size);
  for (const Tensor* t : {&master, &exp_avg, &exp_avg_sq}) {
    if (!t->defined()) continue;
    if (t->shape() != local || t->dtype() != DType::kF32 || !t->is_contiguous() ||
        t->device().is_cuda()) {
      return InvalidArgumentError(StrCat("tensor '", name, "': expected a contiguous f32 host ",
                                         ShapeToString(local), " local tensor, found ",
                                         t->DebugString()));
    }
  }
  if (exp_avg.defined() != exp_avg_sq.defined()) {
    return InvalidArgumentError(StrCat("tensor '", name,
                                       "': exp_avg and exp_avg_sq must both be "
                                       "given or both undefined"));
  }
  const std::vector<Hyperslab> boxes = TpSlices(logical_shape, split, tp_rank, tp_size);
  const int d = std::max(split.tp_dim, 0);
  std::vector<TensorShard> shards;
  int64_t local_offset = 0;
  for (const Hyperslab& box : boxes) {
    const int64_t rows = box.count[d];
    if (rows == 0) continue;
    auto view = [&](const Tensor& t) -> StatusOr<Tensor> {
      if (!t.defined() || (local_offset == 0 && rows == local[d])) return t;
      if (d != 0) {
        return UnimplementedError(StrCat("tensor '", name, "': a partial local slice along dim ", d,
                                         " (fused or padded) is not supported"));
      }
      return t.Slice(0, local_offset, local_offset + rows);
    };
    TensorShard s;
    s.name = name;
    s.logical_shape = logical_shape;
    s.split = split;
    if (split.vocab_parallel) s.split.vocab_padding = local[d] * tp_size - logical_shape[d];
    s.slab = box;
    TANDEM_ASSIGN_OR_RETURN(s.master, view(master));
    TANDEM_ASSIGN_OR_RETURN(s.exp_avg, view(exp_avg));
    TANDEM_ASSIGN_OR_RETURN(s.exp_avg_sq, view(exp_avg_sq));
    shards.push_back(std::move(s));
    local_offset += rows;
  }
  return shards;
}

StatusOr<std::string> LatestCheckpoint(const std::string& dir) {
  const std::string pointer = dir + "/" + internal::kLatestFile;
  std::ifstream in(pointer);
  if (!in) return NotFoundError(StrCat("no checkpoint in ", dir, ": ", pointer, " does not exist"));
  std::string name;
  std::getline(in, name);
  if (name.empty() || name.find('/') != std::string::npos) {
    return DataLossError(StrCat(pointer, ": expected a checkpoint file name, found '", name, "'"));
  }
  return dir + "/" + name;
}

}  // namespace tandem::checkpoint

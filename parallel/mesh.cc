#include "parallel/mesh.h"

namespace tandem::parallel {

std::string MeshShape::ToString() const { return StrCat("dp", dp, " x cp", cp, " x tp", tp); }

StatusOr<MeshShape> ResolveMesh(int world_size, int dp, int cp, int tp) {
  if (world_size < 1 || dp < 0 || cp < 1 || tp < 1) {
    return InvalidArgumentError(StrCat("parallel mesh: expected parallel.dp >= 0 (0: the rest), ",
                                       "parallel.cp >= 1, parallel.tp >= 1 and a world size >= 1, ",
                                       "found dp ", dp, ", cp ", cp, ", tp ", tp, ", world ",
                                       world_size));
  }
  MeshShape s{dp, cp, tp};
  if (dp == 0) {
    if (world_size % (cp * tp) != 0) {
      return InvalidArgumentError(StrCat("parallel mesh: the world size ", world_size,
                                         " is not a multiple of parallel.cp * parallel.tp = ", cp,
                                         " * ", tp, " = ", cp * tp));
    }
    s.dp = world_size / (cp * tp);
  }
  if (s.world() != world_size) {
    return InvalidArgumentError(
        StrCat("parallel mesh: parallel.dp * parallel.cp * parallel.tp = ", s.dp, " * ", cp, " * ",
               tp, " = ", s.world(), " but the job has ", world_size,
               " ranks (mpirun -np); set parallel.dp = 0 to derive it"));
  }
  return s;
}

MeshCoords CoordsOf(const MeshShape& s, int rank) {
  TANDEM_CHECK_MSG(rank >= 0 && rank < s.world(), "rank ", rank, " outside ", s.ToString());
  return MeshCoords{rank / (s.cp * s.tp), rank / s.tp % s.cp, rank % s.tp};
}

int RankOf(const MeshShape& s, const MeshCoords& c) { return (c.dp * s.cp + c.cp) * s.tp + c.tp; }

Status MeshGroups::Close() {
  Status first = Status::Ok();
  for (auto* g : {&dp, &cp, &tp, &dp_cp}) {
    if (*g == nullptr) continue;
    Status s = (*g)->Close();
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

StatusOr<MeshGroups> CreateMeshGroups(collectives::Communicator& world, const MeshShape& shape) {
  if (world.size() != shape.world()) {
    return InvalidArgumentError(StrCat("CreateMeshGroups: mesh ", shape.ToString(), " has ",
                                       shape.world(), " ranks, the communicator '", world.name(),
                                       "' has ", world.size()));
  }
  MeshGroups g;
  g.shape = shape;
  g.coords = CoordsOf(shape, world.rank());
  const MeshCoords& c = g.coords;
  // Split is collective over world: every rank makes the four calls in this order.
  TANDEM_ASSIGN_OR_RETURN(g.tp, world.Split(c.dp * shape.cp + c.cp, c.tp, "tp"));
  TANDEM_ASSIGN_OR_RETURN(g.cp, world.Split(c.dp * shape.tp + c.tp, c.cp, "cp"));
  TANDEM_ASSIGN_OR_RETURN(g.dp, world.Split(c.cp * shape.tp + c.tp, c.dp, "dp"));
  TANDEM_ASSIGN_OR_RETURN(g.dp_cp, world.Split(c.tp, c.dp * shape.cp + c.cp, "dp_cp"));
  return g;
}

}  // namespace tandem::parallel

// The device mesh dp x cp x tp and its communicators.
//
// world = dp * cp * tp ranks; tp is innermost (the ranks of one tp group are neighbours, inside a
// node), then cp, then dp: rank = (d * cp + c) * tp + t.
//
//   TANDEM_ASSIGN_OR_RETURN(MeshShape shape, ResolveMesh(world->size(), cfg.dp, cfg.cp, cfg.tp));
//   TANDEM_ASSIGN_OR_RETURN(MeshGroups groups, CreateMeshGroups(*world, shape));
//   groups.tp->AllReduce(...);        // the tp ranks of this rank's (d, c)
//
// Groups: tp (same d, c), cp (same d, t), dp (same c, t), and dp_cp (same t): gradients of
// parameters replicated over dp and cp are summed over dp_cp (equal to dp when cp == 1).
//
// Ownership: MeshGroups owns its communicators (not the world one); Close() them explicitly
// before the world. Thread-safety: as collectives/communicator.h.
#pragma once

#include <memory>
#include <string>

#include "collectives/communicator.h"
#include "core/status.h"

namespace tandem::parallel {

struct MeshShape {
  int dp = 1;
  int cp = 1;
  int tp = 1;
  int world() const { return dp * cp * tp; }
  std::string ToString() const;  // "dp2 x cp1 x tp2"
};

// This rank's coordinates in the mesh.
struct MeshCoords {
  int dp = 0;
  int cp = 0;
  int tp = 0;
};

// dp == 0 means world / (cp * tp). InvalidArgument, naming every number, when the product of the
// sizes is not the world size or a size is not positive.
StatusOr<MeshShape> ResolveMesh(int world_size, int dp, int cp, int tp);

MeshCoords CoordsOf(const MeshShape& shape, int rank);
int RankOf(const MeshShape& shape, const MeshCoords& coords);

struct MeshGroups {
  MeshShape shape;
  MeshCoords coords;
  std::unique_ptr<collectives::Communicator> dp, cp, tp, dp_cp;

  // Closes every group (the first error is returned, all are closed).
  Status Close();
};

// Collective over `world` (every rank calls it). world.size() must equal shape.world().
StatusOr<MeshGroups> CreateMeshGroups(collectives::Communicator& world, const MeshShape& shape);

}  // namespace tandem::parallel

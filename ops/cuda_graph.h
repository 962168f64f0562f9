// CudaGraph: the ops one function enqueues on a context's stream, captured once as a CUDA graph
// and replayed with one launch (no per-kernel launch cost).
//
//   Tensor out;
//   TANDEM_ASSIGN_OR_RETURN(ops::CudaGraph g, ops::CudaGraph::Capture(ctx, 16 << 20, [&] {
//     return ops::Add(ctx, out_from_arena, a, b);  // recorded, not run
//   }));
//   TANDEM_RETURN_IF_ERROR(g.Launch(ctx));  // runs everything recorded, on ctx's stream
//
// What a replay reads and writes is fixed at capture: the same device addresses, the same grid
// sizes, the same kernel arguments. Inputs change between replays by writing new bytes to the
// captured addresses (in stream order, before Launch); the function's host-side decisions are not
// re-made. So: the function must only enqueue device work (no host waits, no copies from pageable
// host memory, no host reads of device results), and a replay is valid only while every tensor it
// touches is alive at the same address.
//
// Memory: during capture ctx.allocator() hands out bytes from an arena owned by the graph (never
// reused, freed with the graph), so every temporary the captured ops allocate keeps its address.
// When the arena runs out the capture is discarded and redone with twice the bytes. Tensors made
// from the arena must be destroyed before the graph.
//
// CUDA only: Capture answers Unimplemented on a CPU context or a build without CUDA.
// Thread-safety: one thread at a time per graph, like the context; capture uses CUDA's
// thread-local capture mode, so other threads' CUDA calls are unaffected.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "core/status.h"
#include "ops/context.h"

namespace tandem::ops {

class CudaGraph {
 public:
  CudaGraph();
  ~CudaGraph();
  CudaGraph(CudaGraph&&) noexcept;
  CudaGraph& operator=(CudaGraph&&) noexcept;

  // Records fn's work on ctx's stream, starting with an arena of arena_bytes (at least 1 MiB).
  // fn's own error ends the capture and is returned; so is a CUDA error of the capture.
  static StatusOr<CudaGraph> Capture(Context& ctx, int64_t arena_bytes,
                                     const std::function<Status()>& fn);

  // Enqueues one replay on ctx's stream (the context it was captured on).
  Status Launch(Context& ctx) const;

  bool defined() const { return state_ != nullptr; }
  // Bytes of the arena (what the graph holds besides the instantiated graph itself).
  int64_t arena_bytes() const;
  // Kernels and copies recorded.
  int64_t num_nodes() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace tandem::ops

// CudaGraph (ops/cuda_graph.h).
#include "ops/cuda_graph.h"

#include <algorithm>
#include <utility>

#include "core/tensor.h"
#include "ops/internal/cuda_resources.h"

namespace tandem::ops {
namespace {

// Bump allocation over one block; Deallocate returns nothing (the block goes with the graph).
class ArenaAllocator final : public Allocator {
 public:
  explicit ArenaAllocator(Tensor storage) : storage_(std::move(storage)) {}

  StatusOr<void*> Allocate(size_t num_bytes) override {
    const size_t at = (used_ + 255) / 256 * 256;
    const size_t size = static_cast<size_t>(storage_.num_bytes());
    if (at > size || size - at < num_bytes) {
      return ResourceExhaustedError(StrCat("CudaGraph arena: ", num_bytes, " bytes asked with ",
                                           size - std::min(at, size), " of ", size, " left"));
    }
    used_ = at + std::max<size_t>(num_bytes, 1);
    return static_cast<char*>(storage_.raw_data()) + at;
  }
  void Deallocate(void*, size_t) override {}
  Device device() const override { return storage_.device(); }
  int64_t num_bytes() const { return storage_.num_bytes(); }

 private:
  Tensor storage_;
  size_t used_ = 0;
};

}  // namespace

#ifdef TANDEM_WITH_CUDA
struct CudaGraph::State {
  std::unique_ptr<ArenaAllocator> arena;
  cudaGraphExec_t exec = nullptr;
  int64_t nodes = 0;
  ~State() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
  }
};
#else
struct CudaGraph::State {
  std::unique_ptr<ArenaAllocator> arena;
};
#endif

CudaGraph::CudaGraph() = default;
CudaGraph::~CudaGraph() = default;
CudaGraph::CudaGraph(CudaGraph&&) noexcept = default;
CudaGraph& CudaGraph::operator=(CudaGraph&&) noexcept = default;

int64_t CudaGraph::arena_bytes() const {
  return state_ && state_->arena ? state_->arena->num_bytes() : 0;
}

#ifdef TANDEM_WITH_CUDA
int64_t CudaGraph::num_nodes() const { return state_ ? state_->nodes : 0; }

namespace {

Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return InternalError(StrCat("CudaGraph: ", what, ": ", cudaGetErrorString(err)));
}

// One capture attempt with the given arena. On any error the capture is ended and dropped.
Status CaptureOnce(Context& ctx, ArenaAllocator* arena, const std::function<Status()>& fn,
                   cudaGraphExec_t* exec, int64_t* nodes) {
  cudaStream_t stream = ctx.cuda()->stream;
  TANDEM_RETURN_IF_ERROR(CudaStatus(
      cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture"));
  Allocator* previous = ctx.ExchangeAllocator(arena);
  Status body = fn();
  ctx.ExchangeAllocator(previous);
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (!body.ok() || end != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // a failed capture leaves a (not sticky) error code behind: clear it
    if (!body.ok()) return body;
    return CudaStatus(end, "cudaStreamEndCapture (an op did something a capture cannot record)");
  }
  size_t count = 0;
  cudaGraphGetNodes(graph, nullptr, &count);
  const cudaError_t inst = cudaGraphInstantiate(exec, graph, 0);
  cudaGraphDestroy(graph);
  TANDEM_RETURN_IF_ERROR(CudaStatus(inst, "cudaGraphInstantiate"));
  *nodes = static_cast<int64_t>(count);
  return Status::Ok();
}

}  // namespace

StatusOr<CudaGraph> CudaGraph::Capture(Context& ctx, int64_t arena_bytes,
                                       const std::function<Status()>& fn) {
  if (!ctx.is_cuda()) return UnimplementedError("CudaGraph::Capture needs a CUDA context");
  int64_t bytes = std::max<int64_t>(arena_bytes, int64_t{1} << 20);
  for (int attempt = 0;; ++attempt) {
    auto state = std::make_unique<State>();
    TANDEM_ASSIGN_OR_RETURN(Tensor storage, Tensor::Empty({bytes}, DType::kU8, ctx.allocator()));
    state->arena = std::make_unique<ArenaAllocator>(std::move(storage));
    Status s = CaptureOnce(ctx, state->arena.get(), fn, &state->exec, &state->nodes);
    if (s.ok()) {
      CudaGraph g;
      g.state_ = std::move(state);
      return g;
    }
    // Only the arena running out is worth another try (fn allocates the same way each time).
    if (s.code() != StatusCode::kResourceExhausted || attempt >= 6) return s;
    bytes *= 2;
  }
}

Status CudaGraph::Launch(Context& ctx) const {
  if (!state_) return FailedPreconditionError("CudaGraph::Launch: no graph was captured");
  return CudaStatus(cudaGraphLaunch(state_->exec, ctx.cuda()->stream), "cudaGraphLaunch");
}

#else  // CPU-only build

int64_t CudaGraph::num_nodes() const { return 0; }

StatusOr<CudaGraph> CudaGraph::Capture(Context&, int64_t, const std::function<Status()>&) {
  return UnimplementedError("CudaGraph::Capture: this build has no CUDA support");
}

Status CudaGraph::Launch(Context&) const {
  return UnimplementedError("CudaGraph::Launch: this build has no CUDA support");
}

#endif

}  // namespace tandem::ops

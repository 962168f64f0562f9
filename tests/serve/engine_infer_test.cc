// InferModel (paged KV cache, chunked prefill, multi-adapter LoRA) equals LlamaModel::Logits on
// the CPU (f32): see engine_infer_parity.h.
#include "tests/serve/engine_infer_parity.h"

namespace tandem::serve {
namespace {

TEST(InferModel, MatchesLlamaLogitsOnCpu) {
  auto ctx = ops::Context::Cpu();
  RunInferParity(*ctx, 32, {1e-4, 1e-4});
}

}  // namespace
}  // namespace tandem::serve

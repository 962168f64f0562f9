// InferModel on CUDA (bf16 weights and KV pages, paged attention kernel, segmented LoRA kernels)
// against the CUDA LlamaModel::Logits (bf16, fused attention): see engine_infer_parity.h. bf16
// activations are rounded at different points in the two paths, hence the tolerance.
#include "tests/serve/engine_infer_parity.h"

namespace tandem::serve {
namespace {

TEST(InferModelGpu, MatchesLlamaLogitsOnCuda) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = std::move(ops::Context::Cuda(0)).value();
  RunInferParity(*ctx, 64, {5e-2, 5e-2});
  RunInferParity(*ctx, 128, {5e-2, 5e-2});
}

// Fused q|k|v and gate|up sites with per-projection ranks and scales (folded into bf16 B blocks).
TEST(InferModelGpu, FusedLoraSitesMatchLlamaLogitsOnCuda) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = std::move(ops::Context::Cuda(0)).value();
  RunInferParity(*ctx, 64, {5e-2, 5e-2}, FusedParitySpecs());
}

}  // namespace
}  // namespace tandem::serve

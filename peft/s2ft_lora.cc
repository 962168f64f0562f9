// S2ftAsLora (peft/s2ft.h): an S2FT adapter's blocks as LoRA factors.
#include <algorithm>

#include "peft/lora.h"
#include "peft/s2ft.h"

namespace tandem::peft {

StatusOr<std::unique_ptr<LoraAdapter>> S2ftAsLora(ops::Context& ctx, const S2ftAdapter& s2ft) {
  const std::vector<S2ftBlock>& blocks = s2ft.blocks();
  if (blocks.empty()) {
    return InvalidArgumentError("S2ftAsLora: the S2FT adapter has no blocks");
  }
  LoraConfig lc;
  lc.r = 1;
  lc.alpha = 1.0;
  lc.target_modules.clear();  // only the blocks' modules (not PEFT's default q_proj, v_proj)
  for (const S2ftBlock& b : blocks) {
    const std::string module = ProjectionModuleName(b.layer, b.proj);
    const int64_t k = static_cast<int64_t>(b.indices.size());
    lc.target_modules.push_back(module);
    lc.rank_pattern.emplace_back(module, k);
    lc.alpha_pattern.emplace_back(module, static_cast<double>(k));
  }
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<LoraAdapter> lora,
                          LoraAdapter::Create(ctx, s2ft.base_config(), lc));
  for (size_t i = 0; i < blocks.size(); ++i) {
    const S2ftBlock& b = blocks[i];
    const int t = lora->Find(b.layer, b.proj);
    if (t < 0) return InternalError(StrCat("S2ftAsLora: no LoRA target for ", b.name));
    const LoraTarget& target = lora->targets()[t];
    const int64_t k = static_cast<int64_t>(b.indices.size());
    TANDEM_ASSIGN_OR_RETURN(Tensor block, s2ft.ToHost(i));
    Tensor a = Tensor::CpuZeros({k, target.in}, DType::kF32);
    Tensor bm = Tensor::CpuZeros({target.out, k}, DType::kF32);
    if (b.axis == S2ftAxis::kColumns) {  // block [out, k] = B; A selects the columns
      for (int64_t j = 0; j < k; ++j) a.data<float>()[j * target.in + b.indices[j]] = 1.0f;
      std::copy_n(block.data<float>(), bm.numel(), bm.data<float>());
    } else {  // block [k, in] = A; B puts its rows at the indices
      std::copy_n(block.data<float>(), a.numel(), a.data<float>());
      for (int64_t j = 0; j < k; ++j) bm.data<float>()[b.indices[j] * k + j] = 1.0f;
    }
    TANDEM_RETURN_IF_ERROR(lora->SetFromHost(2 * static_cast<size_t>(t), a));
    TANDEM_RETURN_IF_ERROR(lora->SetFromHost(2 * static_cast<size_t>(t) + 1, bm));
  }
  return lora;
}

}  // namespace tandem::peft

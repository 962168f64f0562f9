// RoPE inverse frequencies of a Llama config, computed the way Hugging Face transformers does.
//
// The default rope type: inv_freq[i] = 1 / theta^(2i / D) for i in [0, D/2), with the exponent
// and the power in f32 as torch computes `1.0 / (base ** (arange(0, D, 2).float() / D))`.
// rope_type "llama3" then rescales by wavelength (wavelen = 2 pi / inv_freq): wavelengths shorter
// than original_max / high_freq_factor are kept, longer than original_max / low_freq_factor are
// divided by factor, and those between are interpolated with
//   smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
//   inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
// evaluated in f32 in torch's order of operations. The result feeds ops::Rope.
//
// Thread-safety: a pure function.
#pragma once

#include <vector>

#include "model/config.h"

namespace tandem::model {

// D/2 inverse frequencies (D = config.head_dim, or hidden_size / num_attention_heads when 0).
std::vector<float> RopeInvFreq(const LlamaConfig& config);

}  // namespace tandem::model

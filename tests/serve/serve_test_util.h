// Helpers shared by the serve tests: the small random Llama most of them serve, and the byte
// tokenizer's ids of a prompt.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/llama.h"

namespace tandem::serve::test_util {

// hidden 32, ffn 48, 2 layers, 4 heads of dim 8 over 2 kv heads: small enough for many engine
// iterations on a CPU, with GQA.
inline model::LlamaConfig TinyServeConfig(int64_t vocab_size, int64_t max_positions) {
  model::LlamaConfig c;
  c.vocab_size = vocab_size;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rope_theta = 100.0;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = max_positions;
  return c;
}

// <bos> (256) then the bytes of `text`, as the byte tokenizer encodes a prompt.
inline std::vector<int32_t> ByteIds(const std::string& text) {
  std::vector<int32_t> ids = {256};
  for (unsigned char ch : text) ids.push_back(ch);
  return ids;
}

}  // namespace tandem::serve::test_util

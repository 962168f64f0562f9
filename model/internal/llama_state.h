// Private state of model::LlamaModel: parameter groups, per-layer indices and the activation
// buffers of one batch shape. Included only by model/llama*.cc.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "model/llama.h"

namespace tandem::model {

// Parameters that share one contiguous range of the flat weight and grad buffers, as rows of one
// [rows, cols] matrix: q|k|v, gate|up, or a single parameter.
struct LlamaModel::Group {
  std::vector<size_t> members;     // parameter indices, in row order
  std::vector<int64_t> row_start;  // members.size() + 1 entries: member i is rows [s[i], s[i+1])
  bool one_dim = false;            // a norm weight [C] (rows == 1)
  int64_t offset = 0;              // first element in weights_flat_
  int64_t rows = 0, cols = 0;      // a 1-D parameter [C] is rows = 1, cols = C
  Tensor weight;                   // [rows, cols] view of weights_flat_ (compute dtype)
  Tensor grad;                     // [rows, cols] view of grads_flat_ (f32) or undefined
};

// Parameter indices of one decoder block.
struct LlamaModel::Layer {
  size_t q = 0, k = 0, v = 0, o = 0, gate = 0, up = 0, down = 0;
  size_t attn_norm = 0, mlp_norm = 0;
  int qkv_group = 0, gate_up_group = 0;
};

// One decoder layer's weights as the ops read them: views of the groups' weights, or of the device
// slot a streamed layer was copied into (ModelOptions::stream_layers).
struct LlamaModel::LayerWeights {
  Tensor attn_norm;  // [C]
  Tensor qkv;        // [H3 D, C]
  Tensor o;          // [C, Hq D]
  Tensor mlp_norm;   // [C]
  Tensor gate_up;    // [2F, C]
  Tensor down;       // [C, F]
};

// Buffers of one batch shape. N = B * T tokens, H3 = Hq + 2 Hkv. Compute dtype unless noted.
struct LlamaModel::Activations {
  int64_t batch = 0, seq = 0;
  bool has_backward = false;
  // [adapter] Spare columns after ln1 and dqkv (a whole number of heads), and after ln2 and
  // dgate_up, for the adapter's wide path (AdapterHooks::WideColumns); 0: none.
  int64_t wide_qkv = 0, wide_gate_up = 0;
  // The same after attn and dattn (whole heads: they are viewed as [B, T, Hq, D]), after act, and
  // after dres (the output gradient of both o and down: the larger of the two). wide_down is 0
  // under recompute (its repeat of a block stops before down).
  int64_t wide_o = 0, wide_down = 0;

  // Inputs on the device.
  Tensor tokens;                      // i32 [N]
  Tensor targets;                     // i32 [N]
  Tensor positions;                   // i32 [N]
  Tensor embed_ids;                   // i32 [N], tp > 1: rows of the local embedding table
  Tensor segment_ids;                 // i32 [B, T], allocated when a batch first brings segment ids
  bool use_segments = false;          // this batch has segment ids
  std::vector<int32_t> host_targets;  // [N], to skip loss chunks without targets
  Tensor ce_partials;                 // f32 [tp * chunk * 3], tp > 1: the gathered loss partials
  Tensor ce_mine;                     // f32 [chunk * 3], tp > 1: this rank's partials to send
  int64_t num_targets = 0;

  // Residual stream: x[l] is block l's input, x[L] the last block's output.
  std::vector<Tensor> x;  // L + 1 of [N, C]

  // What one block's backward needs. One per layer, or one shared by all with recompute.
  struct Block {
    Tensor ln1;       // [N, C] input_layernorm output (a view of ln1_wide)
    Tensor ln1_wide;  // [N, C + wide_qkv]
    Tensor rstd1;    // f32 [N]
    Tensor qkv;      // [N, H3 * D] q|k|v projections, q and k rotated in place (of qkv_wide)
    Tensor qkv_wide;  // [N, H3 * D + wide_qkv]
    Tensor attn;      // [N, Hq * D] attention output (before o_proj), a view of attn_wide
    Tensor attn_wide;  // [N, Hq * D + wide_o]
    Tensor lse;      // f32 [B, Hq, T]
    Tensor x_mid;    // [N, C] residual after attention
    Tensor ln2;      // [N, C] post_attention_layernorm output (a view of ln2_wide)
    Tensor ln2_wide;  // [N, C + wide_gate_up]
    Tensor rstd2;    // f32 [N]
    Tensor gate_up;  // [N, 2F]
    Tensor act;      // [N, F] silu(gate) * up, a view of act_wide
    Tensor act_wide;  // [N, F + wide_down]
  };
  std::vector<Block> blocks;

  Tensor lnf;     // [N, C] final norm output
  Tensor rstdf;   // f32 [N]
  Tensor proj;    // [N, C] o_proj / down_proj output before the residual add
  Tensor logits;  // [chunk, V], also dlogits in place
  Tensor losses;  // f32 [N]

  // Backward scratch (allocated when a backward pass is first asked for).
  Tensor dres;       // [N, C] gradient of the residual stream, a view of dres_wide
  Tensor dres_wide;  // [N, C + max(wide_o, wide_down)]
  Tensor dln;       // [N, C] gradient of a norm's output
  Tensor dqkv;      // [N, H3 * D], a view of dqkv_wide
  Tensor dqkv_wide;      // [N, H3 * D + wide_qkv]
  Tensor dattn;          // [N, Hq * D], a view of dattn_wide
  Tensor dattn_wide;     // [N, Hq * D + wide_o] (attention's backward: dout strided as out)
  Tensor dgate_up;       // [N, 2F], a view of dgate_up_wide
  Tensor dgate_up_wide;  // [N, 2F + wide_gate_up]
  Tensor dact;      // [N, F]
};

}  // namespace tandem::model

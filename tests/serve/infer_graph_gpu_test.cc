// InferModel's CUDA graphs for decode batches (serve/infer_model.h): greedy decoding of a ragged
// multi-adapter batch through a model with graphs gives logits bit for bit equal to the same
// model without them, step after step, while the context grows past block boundaries (the table
// width changes), a sequence leaves the batch (a new shape) and the adapter list changes (graphs
// dropped and captured again); and the graphs are really used.
#include <gtest/gtest.h>

#include <cstring>

#include "tests/serve/engine_infer_parity.h"

namespace tandem::serve {
namespace {

int32_t Argmax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) best = row[i] > row[best] ? i : best;
  return static_cast<int32_t>(best);
}

TEST(InferGraphGpu, DecodeReplaysEqualEagerBitwise) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = std::move(ops::Context::Cuda(0)).value();
  const model::LlamaConfig c = ParityConfig(64);
  model::ModelOptions mo;
  mo.trainable = false;
  auto m = std::move(model::LlamaModel::Create(*ctx, c, mo)).value();
  TANDEM_CHECK_OK(m->InitRandom(3, 0.1f));
  constexpr int64_t kBlock = 8, kBlocksPerSeq = 8;
  auto eager = std::move(InferModel::Create(*ctx, *m, kBlock)).value();
  eager->set_cuda_graphs(false);
  auto graphed = std::move(InferModel::Create(*ctx, *m, kBlock)).value();
  ASSERT_TRUE(graphed->cuda_graphs());
  const int64_t L = c.num_hidden_layers, V = c.vocab_size;
  const int64_t page_bytes = (eager->kv_block_bytes() + 255) / 256 * 256;

  auto host_ctx = ops::Context::Cpu();
  std::vector<ParitySpec> specs = DefaultParitySpecs();
  for (const ParitySpec& s : FusedParitySpecs()) specs.push_back(s);
  std::vector<AdapterWeights> weights;
  for (const ParitySpec& spec : specs) {
    auto a = ParityAdapter(*host_ctx, c, spec);
    weights.push_back(std::move(AdapterWeights::FromLora(*ctx, *a, m->compute_dtype())).value());
  }
  std::vector<const AdapterWeights*> list;
  for (const AdapterWeights& w : weights) list.push_back(&w);
  const int64_t A = static_cast<int64_t>(list.size());

  // Sequences grouped by adapter, as the engine sorts them; prompts of 3..11 tokens.
  std::vector<int32_t> adapter = {-1, -1, 0, 0, 1, 3, 5};
  const int S = static_cast<int>(adapter.size());
  struct Side {
    PagePool pool;
    Tensor pages;
    std::vector<std::vector<std::vector<int32_t>>> blocks;
  };
  auto make_side = [&] {
    Side side{
        std::move(PagePool::Create(ctx->allocator(), page_bytes, S * L * kBlocksPerSeq)).value(),
        Tensor(),
        {}};
    side.pages = side.pool.PagesAs(m->compute_dtype());
    side.blocks.assign(S, std::vector<std::vector<int32_t>>(L));
    return side;
  };
  // Blocks as the engine takes them: one more per layer when a sequence crosses a boundary.
  auto grow = [&](Side& side, int s, int64_t tokens) {
    for (int64_t l = 0; l < L; ++l) {
      while (static_cast<int64_t>(side.blocks[s][l].size()) * kBlock < tokens) {
        TANDEM_CHECK(side.pool.Allocate(PageUse::kKv, 1, &side.blocks[s][l]));
      }
    }
  };
  Side se = make_side(), sg = make_side();
  std::vector<std::vector<int32_t>> ids;
  for (int s = 0; s < S; ++s) {
    Tensor t = testing::RandomInts({3 + (s * 5) % 9}, 70 + s, static_cast<int32_t>(V));
    ids.emplace_back(t.data<int32_t>(), t.data<int32_t>() + t.numel());
  }
  // Runs the sequences in `live` (their pending tokens: the prompt, then one token) on both
  // models and checks the logits are the same bytes; appends each one's greedy next token.
  std::vector<int64_t> done(S, 0);  // tokens already in each sequence's cache
  auto step = [&](const std::vector<int>& live, const std::vector<int32_t>& map_adapter,
                  const std::vector<const AdapterWeights*>& adapters, int at) {
    std::vector<SeqChunk> ce, cg;
    for (int s : live) {
      grow(se, s, static_cast<int64_t>(ids[s].size()));
      grow(sg, s, static_cast<int64_t>(ids[s].size()));
      SeqChunk ch;
      ch.start = done[s];
      ch.tokens.assign(ids[s].begin() + done[s], ids[s].end());
      ch.adapter = adapter[s] < 0 ? -1 : map_adapter[adapter[s]];
      ch.blocks = &se.blocks[s];
      ce.push_back(ch);
      ch.blocks = &sg.blocks[s];
      cg.push_back(std::move(ch));
    }
    Tensor want = std::move(eager->Forward(se.pages, ce, adapters)).value();
    Tensor got = std::move(graphed->Forward(sg.pages, cg, adapters)).value();
    ASSERT_EQ(got.num_bytes(), want.num_bytes());
    ASSERT_EQ(std::memcmp(got.raw_data(), want.raw_data(), static_cast<size_t>(got.num_bytes())), 0)
        << "step " << at;
    for (size_t i = 0; i < live.size(); ++i) {
      const int s = live[i];
      done[s] = static_cast<int64_t>(ids[s].size());
      ids[s].push_back(Argmax(want.data<float>() + i * V, V));
    }
  };
  std::vector<int> all;
  for (int s = 0; s < S; ++s) all.push_back(s);
  std::vector<int32_t> same(A), reversed(A);
  for (int64_t a = 0; a < A; ++a) {
    same[a] = static_cast<int32_t>(a);
    reversed[a] = static_cast<int32_t>(A - 1 - a);
  }
  std::vector<const AdapterWeights*> list_reversed(list.rbegin(), list.rend());

  step(all, same, list, 0);  // prefill: never a graph
  EXPECT_EQ(graphed->graph_stats().captures, 0);
  for (int i = 1; i <= 12; ++i) step(all, same, list, i);  // tables 1-2 blocks wide, then 3
  const InferModel::GraphStats first = graphed->graph_stats();
  EXPECT_GE(first.captures, 1);
  EXPECT_GE(first.replays, 8);
  // Sequence 2 leaves: a new shape, eager once, then captured.
  std::vector<int> fewer = all;
  fewer.erase(fewer.begin() + 2);
  for (int i = 13; i <= 20; ++i) step(fewer, same, list, i);
  const InferModel::GraphStats second = graphed->graph_stats();
  EXPECT_GT(second.captures, first.captures);
  EXPECT_GE(second.kept, 2);
  // Another adapter list (the same adapters, reversed): graphs over the old tables go.
  step(fewer, reversed, list_reversed, 21);
  EXPECT_EQ(graphed->graph_stats().kept, 0);                  // all dropped with the old tables
  EXPECT_EQ(graphed->graph_stats().replays, second.replays);  // this shape: eager once
  for (int i = 22; i <= 26; ++i) step(fewer, reversed, list_reversed, i);
  const InferModel::GraphStats third = graphed->graph_stats();
  EXPECT_GT(third.captures, second.captures);
  EXPECT_GE(third.kept, 1);
  EXPECT_GT(third.arena_bytes, 0);
  graphed->ForgetAdapters();
  EXPECT_EQ(graphed->graph_stats().kept, 0);
  // The base model alone (no adapters) decodes through graphs too.
  const std::vector<const AdapterWeights*> none;
  std::vector<int> base = {0, 1};
  for (int i = 27; i <= 31; ++i) step(base, same, none, i);
  EXPECT_GT(graphed->graph_stats().replays, third.replays);
}

}  // namespace
}  // namespace tandem::serve

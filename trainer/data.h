// Training data: preparation of token shards from text, JSONL, SFT and chat files, and the
// loader that cuts the shards of a split into [B, T] batches for each data-parallel rank.
//
// Preparation (`tandem data prepare`): every input is parsed into documents, tokenized with
// BOS/EOS, assigned to "train" or "val" by a seeded hash of its index, and written as token shards
// (trainer/shard.h) plus a manifest.json. The input formats, the chat template and the split rule
// are documented in docs/formats.md ("Training data").
//
//   PrepareOptions opt;
//   opt.inputs = {"corpus.jsonl"};
//   opt.out_dir = "data/corpus";
//   TANDEM_ASSIGN_OR_RETURN(PrepareReport report, PrepareData(opt, *tokenizer));
//
// Loading: all shards of a split form one token stream, cut into windows of seq_len + 1 tokens
// with stride seq_len (input = window[0, T), target = window[1, T]). Each epoch visits the
// windows in a permutation determined by (seed, epoch). A global batch is world_size * batch_size
// consecutive windows of that order and rank r takes windows [r * B, (r + 1) * B) of it, so the
// tokens a run trains on depend only on the global batch, never on how it is split over ranks.
// Windows left over after the last full global batch of an epoch are skipped in that epoch.
//
//   TANDEM_ASSIGN_OR_RETURN(auto loader, DataLoader::Open(dir, "train", opts, rank, world));
//   TANDEM_RETURN_IF_ERROR(CheckVocab(*loader, model_config.vocab_size));
//   TANDEM_ASSIGN_OR_RETURN(TokenBatch batch, loader->Next());
//
// Thread-safety: a DataLoader is used by one thread at a time; PrepareData is reentrant.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/tokenizer.h"
#include "trainer/shard.h"

namespace tandem::trainer {

// ---------------------------------------------------------------------------------------------
// Preparation

struct PrepareOptions {
  std::vector<std::string> inputs;  // files, read in this order
  std::string format = "auto";      // text | jsonl | sft | chat | auto (per file: by extension
                                    // and, for .jsonl/.json, by the keys of the first record)
  std::string out_dir;              // created if missing
  double val_fraction = 0.01;       // expected fraction of documents in the "val" split
  int64_t shard_tokens = 64 << 20;  // max tokens per shard file
  bool add_bos = true;              // prepend the tokenizer's BOS (when it has one)
  bool add_eos = true;              // append the tokenizer's EOS (when it has one)
  uint64_t seed = 0;                // seeds the train/val assignment
};

struct SplitReport {
  int64_t num_tokens = 0;
  int64_t num_docs = 0;
  int64_t num_loss_tokens = 0;      // tokens with loss mask 1
  std::vector<std::string> shards;  // file names inside out_dir, in stream order
};

struct PrepareReport {
  SplitReport train;
  SplitReport val;
  int64_t num_records = 0;  // documents read from all inputs (train + val)
  std::string manifest_path;
};

// Errors: NotFound naming a missing input; InvalidArgument naming file:line for a malformed JSONL
// record (bad JSON, missing or non-string field, unknown format); I/O errors naming the path.
StatusOr<PrepareReport> PrepareData(const PrepareOptions& options,
                                    const model::Tokenizer& tokenizer);

// ---------------------------------------------------------------------------------------------
// Loading

struct LoaderOptions {
  int64_t batch_size = 1;  // sequences per rank per micro-step (B)
  int64_t seq_len = 256;   // tokens per sequence (T)
  uint64_t seed = 0;       // seeds the window order of every epoch
  bool shuffle = true;     // false: windows in stream order every epoch
  // "eos": documents concatenated with their EOS, attention across documents, positions 0..T-1.
  // "doc_mask": segment ids per document, positions restart at 0 at each document start (and
  // count from 0 at the window start for a document begun before the window), and targets that
  // cross into the next document are ignored.
  std::string packing = "eos";
};

// Where a run is in its data: enough to resume the exact stream. Independent of rank and world
// size (it counts global windows).
struct DataPosition {
  int64_t epoch = 0;
  int64_t window = 0;           // windows of this epoch's order already consumed (all ranks)
  int64_t tokens_consumed = 0;  // input tokens consumed by all ranks since the start (windows * T)

  bool operator==(const DataPosition&) const = default;
};
// {"epoch": 0, "window": 0, "tokens_consumed": 0}
std::string DataPositionToJson(const DataPosition& position);
StatusOr<DataPosition> DataPositionFromJson(std::string_view json);

// One micro-batch for one rank; host i32 tensors.
struct TokenBatch {
  Tensor tokens;                // [B, T]
  Tensor targets;               // [B, T] next token, or ops::kIgnoreIndex where there is no loss
  Tensor positions;             // [B, T] RoPE positions
  Tensor segment_ids;           // [B, T] in doc_mask mode (0, 1, ... per row in document order);
                                // undefined in eos mode
  int64_t num_loss_tokens = 0;  // targets != kIgnoreIndex
};

class DataLoader {
 public:
  // Opens `split` ("train", "val") of a directory made by PrepareData. Errors: NotFound (no
  // manifest, no such split, missing shard), DataLoss (a bad shard), InvalidArgument (options,
  // rank), FailedPrecondition when the split holds fewer tokens than one global batch needs.
  static StatusOr<std::unique_ptr<DataLoader>> Open(const std::string& data_dir,
                                                    std::string_view split,
                                                    const LoaderOptions& options, int rank,
                                                    int world_size);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // The next micro-batch of this rank; moves to the next epoch (a new order) when the current one
  // has no full global batch left.
  StatusOr<TokenBatch> Next();

  DataPosition position() const { return position_; }
  // Continues from `position` (from position() of a run with the same data, seq_len, seed and
  // global batch). OutOfRange when it does not fit this data.
  Status Seek(const DataPosition& position);

  int64_t vocab_size() const { return vocab_size_; }
  const std::string& tokenizer_kind() const { return tokenizer_kind_; }
  int64_t num_tokens() const;                           // tokens in the split
  int64_t num_windows() const { return num_windows_; }  // windows per epoch
  int64_t global_batch() const { return options_.batch_size * world_size_; }
  int64_t steps_per_epoch() const { return num_windows_ / global_batch(); }
  const LoaderOptions& options() const { return options_; }

 private:
  class Stream;
  DataLoader() = default;
  void FillRow(int64_t window, int64_t row, TokenBatch& batch) const;

  LoaderOptions options_;
  int rank_ = 0;
  int world_size_ = 1;
  int64_t vocab_size_ = 0;
  std::string tokenizer_kind_;
  std::unique_ptr<Stream> stream_;
  int64_t num_windows_ = 0;
  std::vector<int64_t> order_;  // window order of position_.epoch
  int64_t order_epoch_ = -1;
  DataPosition position_;
};

// OK when every token of the data is a valid id of a model with `model_vocab` embeddings
// (model_vocab >= the tokenizer's vocabulary; a padded embedding is fine), else InvalidArgument
// naming both numbers.
Status CheckVocab(const DataLoader& loader, int64_t model_vocab);

}  // namespace tandem::trainer

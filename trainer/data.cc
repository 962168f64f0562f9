// DataLoader: windows of a split's token stream, in a seeded per-epoch order, split over ranks.
#include "trainer/data.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "ops/ops.h"
#include "trainer/internal/data_manifest.h"
#include "trainer/internal/data_random.h"

namespace tandem::trainer {

// All shards of a split as one token stream, with the document starts merged across shards.
class DataLoader::Stream {
 public:
  std::vector<Shard> shards;
  std::vector<int64_t> offsets;     // start of each shard in the stream, then the total
  std::vector<int64_t> doc_starts;  // doc_mask only: start of each document, then the total

  int64_t num_tokens() const { return offsets.back(); }

  // Tokens and loss-mask bytes [start, start + count) of the stream.
  void Copy(int32_t* tokens, uint8_t* mask, int64_t start, int64_t count) const {
    size_t s = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), start) -
                                   offsets.begin() - 1);
    while (count > 0) {
      const Shard& shard = shards[s];
      const int64_t local = start - offsets[s];
      const int64_t n = std::min(count, shard.num_tokens() - local);
      shard.CopyTokens(tokens, local, n);
      if (shard.has_loss_mask()) {
        std::copy_n(shard.loss_mask().data() + local, n, mask);
      } else {
        std::fill_n(mask, n, uint8_t{1});
      }
      tokens += n;
      mask += n;
      start += n;
      count -= n;
      ++s;
    }
  }

  void BuildDocStarts() {
    doc_starts.clear();
    for (size_t s = 0; s < shards.size(); ++s) {
      const auto index = shards[s].doc_index();
      // A continued first document is part of the previous shard's last one.
      const size_t first = (shards[s].first_doc_continues() && !doc_starts.empty()) ? 1 : 0;
      for (size_t d = first; d + 1 < index.size(); ++d) {
        doc_starts.push_back(offsets[s] + static_cast<int64_t>(index[d]));
      }
    }
    doc_starts.push_back(num_tokens());
  }
};

namespace {

Status ValidateLoaderArgs(const LoaderOptions& o, int rank, int world_size) {
  if (o.batch_size < 1 || o.seq_len < 1) {
    return InvalidArgumentError(StrCat("data loader: batch_size and seq_len must be >= 1, got ",
                                       o.batch_size, " and ", o.seq_len));
  }
  if (o.packing != "eos" && o.packing != "doc_mask") {
    return InvalidArgumentError(
        StrCat("data loader: unknown packing '", o.packing, "' (expected eos or doc_mask)"));
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return InvalidArgumentError(
        StrCat("data loader: rank ", rank, " outside world of size ", world_size));
  }
  return Status::Ok();
}

StatusOr<std::vector<Shard>> OpenSplitShards(const std::string& dir,
                                             const internal::ManifestSplit& split,
                                             int64_t vocab_size) {
  std::vector<Shard> shards;
  for (const internal::ManifestShard& entry : split.shards) {
    const std::string path = dir + "/" + entry.file;
    TANDEM_ASSIGN_OR_RETURN(Shard shard, OpenShard(path));
    if (shard.vocab_size() != vocab_size || shard.num_tokens() != entry.num_tokens) {
      return DataLossError(StrCat("shard '", path, "' has vocab size ", shard.vocab_size(), " and ",
                                  shard.num_tokens(), " tokens; the manifest says ", vocab_size,
                                  " and ", entry.num_tokens));
    }
    if (shard.num_tokens() > 0) shards.push_back(std::move(shard));
  }
  return shards;
}

}  // namespace

StatusOr<std::unique_ptr<DataLoader>> DataLoader::Open(const std::string& data_dir,
                                                       std::string_view split,
                                                       const LoaderOptions& options, int rank,
                                                       int world_size) {
  TANDEM_RETURN_IF_ERROR(ValidateLoaderArgs(options, rank, world_size));
  const std::string manifest_path = data_dir + "/" + internal::kManifestName;
  if (!std::filesystem::exists(manifest_path)) {
    return NotFoundError(StrCat("no ", internal::kManifestName, " in data directory '", data_dir,
                                "': prepare the data first (tandem data prepare)"));
  }
  TANDEM_ASSIGN_OR_RETURN(internal::Manifest manifest, internal::ReadManifest(manifest_path));
  auto it = manifest.splits.find(std::string(split));
  if (it == manifest.splits.end()) {
    std::string names;
    for (const auto& [name, s] : manifest.splits) names += (names.empty() ? "" : ", ") + name;
    return NotFoundError(
        StrCat("data directory '", data_dir, "' has no split '", split, "' (it has: ", names, ")"));
  }
  auto loader = std::unique_ptr<DataLoader>(new DataLoader());
  loader->options_ = options;
  loader->rank_ = rank;
  loader->world_size_ = world_size;
  loader->vocab_size_ = manifest.vocab_size;
  loader->tokenizer_kind_ = manifest.tokenizer_kind;
  loader->stream_ = std::make_unique<Stream>();
  Stream& stream = *loader->stream_;
  TANDEM_ASSIGN_OR_RETURN(stream.shards,
                          OpenSplitShards(data_dir, it->second, manifest.vocab_size));
  stream.offsets.push_back(0);
  for (const Shard& s : stream.shards)
    stream.offsets.push_back(stream.offsets.back() + s.num_tokens());

  const int64_t n = stream.num_tokens();
  const int64_t g = loader->global_batch();
  const int64_t needed = g * options.seq_len + 1;
  if (n < needed) {
    return FailedPreconditionError(StrCat(
        "split '", split, "' of '", data_dir, "' has ", n, " tokens; one global batch (world_size ",
        world_size, " x batch_size ", options.batch_size, " sequences of seq_len ", options.seq_len,
        ", windows of seq_len + 1 tokens with stride seq_len) needs ", needed,
        ": add data or lower batch_size / seq_len"));
  }
  loader->num_windows_ = (n - 1) / options.seq_len;
  if (options.packing == "doc_mask") stream.BuildDocStarts();
  return loader;
}

DataLoader::~DataLoader() = default;

int64_t DataLoader::num_tokens() const { return stream_->num_tokens(); }

void DataLoader::FillRow(int64_t window, int64_t row, TokenBatch& batch) const {
  const int64_t t_len = options_.seq_len;
  const int64_t start = window * t_len;
  std::vector<int32_t> tok(static_cast<size_t>(t_len + 1));
  std::vector<uint8_t> mask(static_cast<size_t>(t_len + 1));
  stream_->Copy(tok.data(), mask.data(), start, t_len + 1);
  int32_t* tokens = batch.tokens.data<int32_t>() + row * t_len;
  int32_t* targets = batch.targets.data<int32_t>() + row * t_len;
  int32_t* positions = batch.positions.data<int32_t>() + row * t_len;
  for (int64_t t = 0; t < t_len; ++t) {
    tokens[t] = tok[t];
    targets[t] = mask[t + 1] ? tok[t + 1] : ops::kIgnoreIndex;
    positions[t] = static_cast<int32_t>(t);
  }
  if (options_.packing == "doc_mask") {
    const std::vector<int64_t>& starts = stream_->doc_starts;
    size_t d = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), start) -
                                   starts.begin() - 1);
    int32_t* segments = batch.segment_ids.data<int32_t>() + row * t_len;
    int32_t segment = 0;
    for (int64_t t = 0; t < t_len; ++t) {
      const int64_t g = start + t;
      while (g >= starts[d + 1]) {  // never at t = 0: starts[d] <= start < starts[d + 1]
        ++d;
        ++segment;
      }
      segments[t] = segment;
      // The document part that precedes the window is not in it: count from the window start.
      positions[t] = static_cast<int32_t>(g - std::max(starts[d], start));
      if (g + 1 >= starts[d + 1]) targets[t] = ops::kIgnoreIndex;  // next token: next document
    }
  }
  for (int64_t t = 0; t < t_len; ++t) batch.num_loss_tokens += targets[t] != ops::kIgnoreIndex;
}

StatusOr<TokenBatch> DataLoader::Next() {
  const int64_t g = global_batch();
  if (position_.window + g > num_windows_) {
    position_.epoch += 1;
    position_.window = 0;
  }
  if (order_epoch_ != position_.epoch) {
    order_ = internal::EpochPermutation(options_.seed, static_cast<uint64_t>(position_.epoch),
                                        num_windows_, options_.shuffle);
    order_epoch_ = position_.epoch;
  }
  const int64_t b_len = options_.batch_size;
  const int64_t t_len = options_.seq_len;
  TokenBatch batch;
  batch.tokens = Tensor::Cpu({b_len, t_len}, DType::kI32);     // [B, T]
  batch.targets = Tensor::Cpu({b_len, t_len}, DType::kI32);    // [B, T]
  batch.positions = Tensor::Cpu({b_len, t_len}, DType::kI32);  // [B, T]
  if (options_.packing == "doc_mask") {
    batch.segment_ids = Tensor::Cpu({b_len, t_len}, DType::kI32);  // [B, T]
  }
  const int64_t first = position_.window + rank_ * b_len;
  for (int64_t b = 0; b < b_len; ++b) FillRow(order_[first + b], b, batch);
  position_.window += g;
  position_.tokens_consumed += g * t_len;
  return batch;
}

Status DataLoader::Seek(const DataPosition& p) {
  if (p.epoch < 0 || p.window < 0 || p.window > num_windows_ || p.tokens_consumed < 0) {
    return OutOfRangeError(StrCat(
        "data position {epoch ", p.epoch, ", window ", p.window, ", tokens_consumed ",
        p.tokens_consumed, "} does not fit this split (", num_windows_,
        " windows per epoch of seq_len ", options_.seq_len, "); was the data or seq_len changed?"));
  }
  position_ = p;
  return Status::Ok();
}

std::string DataPositionToJson(const DataPosition& p) {
  nlohmann::json j = {
      {"epoch", p.epoch}, {"window", p.window}, {"tokens_consumed", p.tokens_consumed}};
  return j.dump();
}

StatusOr<DataPosition> DataPositionFromJson(std::string_view text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgumentError(
        StrCat("data position: expected a JSON object, found '", text, "'"));
  }
  DataPosition p;
  const std::pair<const char*, int64_t*> fields[] = {
      {"epoch", &p.epoch}, {"window", &p.window}, {"tokens_consumed", &p.tokens_consumed}};
  for (const auto& [key, out] : fields) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_integer()) {
      return InvalidArgumentError(
          StrCat("data position: missing or non-integer \"", key, "\" in '", text, "'"));
    }
    *out = it->get<int64_t>();
  }
  return p;
}

Status CheckVocab(const DataLoader& loader, int64_t model_vocab) {
  if (model_vocab < loader.vocab_size()) {
    return InvalidArgumentError(
        StrCat("vocabulary mismatch: the data was tokenized with a ", loader.tokenizer_kind(),
               " tokenizer of ", loader.vocab_size(), " ids but the model has ", model_vocab,
               " embeddings (need model vocab_size >= ", loader.vocab_size(), ")"));
  }
  return Status::Ok();
}

}  // namespace tandem::trainer

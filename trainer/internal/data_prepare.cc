// PrepareData: inputs -> tokenized documents -> train/val token shards + manifest.json.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <system_error>

#include "trainer/data.h"
#include "trainer/internal/data_io.h"
#include "trainer/internal/data_manifest.h"
#include "trainer/internal/data_random.h"
#include "trainer/internal/data_records.h"

namespace tandem::trainer {
namespace {

using internal::Document;
namespace fs = std::filesystem;

// Accumulates one split's documents and writes them as shards of at most shard_tokens tokens. A
// document that does not fit the current shard continues in the next one (flag "continues").
class SplitWriter {
 public:
  SplitWriter(std::string out_dir, std::string name, int64_t shard_tokens, int64_t vocab_size)
      : out_dir_(std::move(out_dir)),
        name_(std::move(name)),
        shard_tokens_(shard_tokens),
        vocab_size_(vocab_size) {}

  Status Add(const Document& doc) {
    const int64_t n = static_cast<int64_t>(doc.tokens.size());
    if (n == 0) return Status::Ok();
    for (int64_t off = 0; off < n;) {
      if (static_cast<int64_t>(tokens_.size()) == shard_tokens_) TANDEM_RETURN_IF_ERROR(Flush());
      if (tokens_.empty()) first_continues_ = off > 0;
      const int64_t take = std::min(shard_tokens_ - static_cast<int64_t>(tokens_.size()), n - off);
      starts_.push_back(static_cast<int64_t>(tokens_.size()));
      tokens_.insert(tokens_.end(), doc.tokens.begin() + off, doc.tokens.begin() + off + take);
      mask_.insert(mask_.end(), doc.mask.begin() + off, doc.mask.begin() + off + take);
      needs_mask_ = needs_mask_ || doc.needs_mask;
      off += take;
    }
    report_.num_docs += 1;
    report_.num_tokens += n;
    for (uint8_t m : doc.mask) report_.num_loss_tokens += m;
    return Status::Ok();
  }

  Status Flush() {
    if (tokens_.empty()) return Status::Ok();
    char name[64];
    std::snprintf(name, sizeof(name), "%s-%05zu.tshard", name_.c_str(), report_.shards.size());
    ShardWriteOptions opt;
    opt.first_doc_continues = first_continues_;
    const std::span<const uint8_t> mask =
        needs_mask_ ? std::span<const uint8_t>(mask_) : std::span<const uint8_t>();
    TANDEM_RETURN_IF_ERROR(
        WriteShard(out_dir_ + "/" + name, tokens_, starts_, mask, vocab_size_, opt));
    report_.shards.push_back(name);
    shard_sizes_.push_back(
        {static_cast<int64_t>(tokens_.size()), static_cast<int64_t>(starts_.size())});
    tokens_.clear();
    starts_.clear();
    mask_.clear();
    needs_mask_ = false;
    return Status::Ok();
  }

  const SplitReport& report() const { return report_; }
  const std::vector<std::pair<int64_t, int64_t>>& shard_sizes() const { return shard_sizes_; }

 private:
  std::string out_dir_;
  std::string name_;
  int64_t shard_tokens_;
  int64_t vocab_size_;
  std::vector<int32_t> tokens_;
  std::vector<int64_t> starts_;
  std::vector<uint8_t> mask_;
  bool needs_mask_ = false;
  bool first_continues_ = false;
  SplitReport report_;
  std::vector<std::pair<int64_t, int64_t>> shard_sizes_;  // (tokens, pieces) per shard
};

Status ValidateOptions(const PrepareOptions& o, const model::Tokenizer& tokenizer) {
  if (o.inputs.empty()) return InvalidArgumentError("data prepare: no input files given");
  if (o.out_dir.empty()) return InvalidArgumentError("data prepare: out_dir is empty");
  if (!(o.val_fraction >= 0.0 && o.val_fraction <= 1.0)) {
    return InvalidArgumentError(
        StrCat("data prepare: val_fraction must be in [0, 1], got ", o.val_fraction));
  }
  if (o.shard_tokens < 1) {
    return InvalidArgumentError(
        StrCat("data prepare: shard_tokens must be >= 1, got ", o.shard_tokens));
  }
  if (tokenizer.vocab_size() <= 0) {
    return InvalidArgumentError(
        StrCat("data prepare: tokenizer vocab size ", tokenizer.vocab_size()));
  }
  for (const std::string& path : o.inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(path, ec);
    if (!fs::exists(st)) return NotFoundError(StrCat("input file '", path, "' does not exist"));
    if (!fs::is_regular_file(st)) {
      return InvalidArgumentError(StrCat("input '", path, "' is not a regular file"));
    }
  }
  return Status::Ok();
}

internal::ManifestSplit ToManifest(const SplitWriter& w) {
  internal::ManifestSplit s;
  s.num_tokens = w.report().num_tokens;
  s.num_docs = w.report().num_docs;
  s.num_loss_tokens = w.report().num_loss_tokens;
  for (size_t i = 0; i < w.report().shards.size(); ++i) {
    s.shards.push_back({w.report().shards[i], w.shard_sizes()[i].first});
  }
  return s;
}

}  // namespace

StatusOr<PrepareReport> PrepareData(const PrepareOptions& options,
                                    const model::Tokenizer& tokenizer) {
  TANDEM_RETURN_IF_ERROR(ValidateOptions(options, tokenizer));
  std::error_code ec;
  fs::create_directories(options.out_dir, ec);
  if (ec) {
    return InternalError(
        StrCat("cannot create output directory '", options.out_dir, "': ", ec.message()));
  }
  const internal::RenderContext ctx =
      internal::MakeRenderContext(tokenizer, options.add_bos, options.add_eos);
  const int64_t vocab = tokenizer.vocab_size();
  SplitWriter train(options.out_dir, "train", options.shard_tokens, vocab);
  SplitWriter val(options.out_dir, "val", options.shard_tokens, vocab);

  internal::Manifest manifest;
  int64_t doc_index = 0;
  for (const std::string& path : options.inputs) {
    TANDEM_ASSIGN_OR_RETURN(internal::MappedFile file, internal::MappedFile::Open(path));
    const std::string_view contents(reinterpret_cast<const char*>(file.data()), file.size());
    TANDEM_ASSIGN_OR_RETURN(std::string format,
                            internal::ResolveFormat(path, contents, options.format));
    int64_t num_docs = 0;
    TANDEM_RETURN_IF_ERROR(
        internal::ReadDocuments(path, contents, format, ctx, [&](Document&& doc) -> Status {
          const double u = internal::HashToUnit(internal::DocHash(options.seed, doc_index++));
          ++num_docs;
          return u < options.val_fraction ? val.Add(doc) : train.Add(doc);
        }));
    manifest.inputs.push_back({path, format, num_docs});
  }
  if (doc_index == 0) {
    return InvalidArgumentError("data prepare: the inputs hold no documents");
  }
  TANDEM_RETURN_IF_ERROR(train.Flush());
  TANDEM_RETURN_IF_ERROR(val.Flush());

  manifest.tokenizer_kind = tokenizer.kind();
  manifest.vocab_size = vocab;
  manifest.bos_id = ctx.bos.value_or(-1);
  manifest.eos_id = ctx.eos.value_or(-1);
  manifest.chat_template = ctx.llama3_chat ? "llama3" : "plain";
  manifest.token_width = static_cast<int>(ShardTokenWidth(vocab));
  manifest.splits["train"] = ToManifest(train);
  manifest.splits["val"] = ToManifest(val);
  manifest.options = options;

  PrepareReport report;
  report.train = train.report();
  report.val = val.report();
  report.num_records = doc_index;
  report.manifest_path = options.out_dir + "/" + internal::kManifestName;
  TANDEM_RETURN_IF_ERROR(internal::WriteManifest(report.manifest_path, manifest));
  return report;
}

}  // namespace tandem::trainer

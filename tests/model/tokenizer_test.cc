#include "model/tokenizer.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "model/internal/tokenizer_pretokenize.h"
#include "model/internal/tokenizer_unicode.h"
#include "tests/common/testing.h"

namespace tandem::model {
namespace {

using nlohmann::json;
using Ids = std::vector<int32_t>;

// ---- A hand-written byte-level BPE tokenizer.json --------------------------------------------

// GPT-2's byte alphabet, written out here independently of the implementation: printable Latin-1
// bytes stand for themselves, the other 68 bytes take U+0100 upwards in byte order.
std::string ByteChar(int byte) {
  auto keeps = [](int b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174; };
  int cp = byte;
  if (!keeps(byte)) {
    cp = 256;
    for (int b = 0; b < byte; ++b) cp += keeps(b) ? 0 : 1;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Ids: bytes 0..255 (id = byte value), merges 256..276 in rank order, "Ġxyz" 277 (in the
// vocabulary, reachable by no merge), "<|endoftext|>" 278 (special), "foo bar" 279 (added, not
// special).
const char* const kMerges[] = {"Ġ t",  "l l", "e ll",  "h e", "h ell",   "hell o", "Ġt he",
                               "o r",  "Ġ w", "Ġw or", "l d", "Ġwor ld", "' s",    "1 2",
                               "12 3", "Ġ Ġ", "i n",   "n g", "in g",    "Ċ Ċ",    "' S"};
constexpr int32_t kXyz = 277, kEndOfText = 278, kFooBar = 279;

json ByteLevelPreTokenizer(bool add_prefix_space = false) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", add_prefix_space},
          {"trim_offsets", true},
          {"use_regex", true}};
}

json Llama3PreTokenizer() {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"},
             {"pattern", {{"Regex", std::string(internal::kLlama3Pattern)}}},
             {"behavior", "Isolated"},
             {"invert", false}},
            {{"type", "ByteLevel"},
             {"add_prefix_space", false},
             {"trim_offsets", true},
             {"use_regex", false}}}}};
}

json HandTokenizerJson(const json& pre_tokenizer, bool ignore_merges) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  json merges = json::array();
  int32_t next = 256;
  for (const char* m : kMerges) {
    std::string s = m;
    const size_t sp = s.find(' ');
    vocab[s.substr(0, sp) + s.substr(sp + 1)] = next++;
    merges.push_back(json::array({s.substr(0, sp), s.substr(sp + 1)}));
  }
  merges[1] = "l l";  // the older "a b" form is accepted too
  vocab["Ġxyz"] = kXyz;
  auto added = [](int id, const char* content, bool special) {
    return json{{"id", id},          {"content", content}, {"single_word", false},
                {"lstrip", false},   {"rstrip", false},    {"normalized", !special},
                {"special", special}};
  };
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens",
           {added(kEndOfText, "<|endoftext|>", true), added(kFooBar, "foo bar", false)}},
          {"normalizer", nullptr},
          {"pre_tokenizer", pre_tokenizer},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", ignore_merges},
            {"vocab", vocab},
            {"merges", merges}}}};
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::unique_ptr<Tokenizer> LoadJson(const testing::TempDir& dir, const json& j) {
  WriteFile(dir.Join("tokenizer.json"), j.dump());
  auto tok = LoadTokenizer(dir.Join("tokenizer.json"));
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  return tok.ok() ? std::move(*tok) : nullptr;
}

// ---- The byte tokenizer ----------------------------------------------------------------------

TEST(ByteTokenizerTest, RoundTripsArbitraryBytesAndMatchesSpecialTokens) {
  auto tok = MakeByteTokenizer();
  EXPECT_EQ(tok->kind(), "byte");
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->bos_id(), 256);
  EXPECT_EQ(tok->eos_id(), 257);
  EXPECT_EQ(*tok->TokenId("<pad>"), 258);
  EXPECT_EQ(*tok->TokenId("A"), 65);
  EXPECT_EQ(tok->TokenId("<unk>").status().code(), StatusCode::kNotFound);

  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 50; ++trial) {
    std::string text;
    for (int i = rng() % 200; i > 0; --i) {
      char c = static_cast<char>(rng() % 256);
      text += c == '<' ? 'x' : c;  // any byte, invalid UTF-8 included; no special-token text
    }
    Ids ids = tok->Encode(text);
    ASSERT_EQ(ids.size(), text.size());
    for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids[i], static_cast<uint8_t>(text[i]));
    EXPECT_EQ(tok->Decode(ids), text);
  }
  EXPECT_EQ(tok->Encode("a<bos>b<eos><pad"), (Ids{'a', 256, 'b', 257, '<', 'p', 'a', 'd'}));
  const Ids ids = {256, 'h', 'i', 258, 257};
  EXPECT_EQ(tok->Decode(ids), "<bos>hi<pad><eos>");
  EXPECT_EQ(tok->Decode(ids, /*skip_special=*/true), "hi");
}

// ---- Exact ids of the hand-written tokenizer, worked out by hand -----------------------------

const char kTextA[] = "hello the world's 12345\n\nsing<|endoftext|>  the";
const char kTextB[] = "IT'S a foo bar  xyz";

TEST(BpeTokenizerTest, Gpt2StyleGivesHandComputedIds) {
  testing::TempDir dir;
  auto tok = LoadJson(dir, HandTokenizerJson(ByteLevelPreTokenizer(), /*ignore_merges=*/false));
  ASSERT_NE(tok, nullptr);
  // hello | Ġthe | Ġworld | 's | Ġ123 4 5 | Ċ | Ċ | s ing | <|endoftext|> | Ġ | Ġthe
  EXPECT_EQ(tok->Encode(kTextA),
            (Ids{261, 262, 267, 268, 32, 270, 52, 53, 10, 10, 115, 274, kEndOfText, 32, 262}));
  // I T | ' | S | Ġa | Ġ | "foo bar" | Ġ | Ġ x y z   (case-sensitive contractions; no 'S)
  EXPECT_EQ(tok->Encode(kTextB), (Ids{73, 84, 39, 83, 32, 97, 32, kFooBar, 32, 32, 120, 121, 122}));
  EXPECT_EQ(tok->Encode(""), Ids{});
  // Equal ranks merge leftmost first: l l l -> ll l; e l l l -> e ll l -> ell l.
  EXPECT_EQ(tok->Encode("lll"), (Ids{257, 'l'}));
  EXPECT_EQ(tok->Encode("elll"), (Ids{258, 'l'}));
  EXPECT_EQ(tok->Decode(tok->Encode(kTextA)), kTextA);
  EXPECT_EQ(tok->Decode(tok->Encode(kTextA), /*skip_special=*/true),
            "hello the world's 12345\n\nsing  the");
  EXPECT_EQ(tok->Decode(Ids{kFooBar, kXyz}, /*skip_special=*/true), "foo bar xyz");
  EXPECT_EQ(tok->Decode(Ids{-1, 5000, 262}), " the");  // unknown ids are skipped
  EXPECT_EQ(tok->kind(), "bpe");
  EXPECT_EQ(tok->vocab_size(), 280);
  EXPECT_EQ(*tok->TokenId("<|endoftext|>"), kEndOfText);
  EXPECT_EQ(*tok->TokenId("Ġthe"), 262);
  EXPECT_EQ(tok->TokenId("the").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(tok->bos_id(), std::nullopt);  // no tokenizer_config.json and no known BOS name
  EXPECT_EQ(tok->eos_id(), kEndOfText);
}

TEST(BpeTokenizerTest, AddPrefixSpaceAppliesToEachPieceBetweenAddedTokens) {
  testing::TempDir dir;
  auto tok = LoadJson(dir, HandTokenizerJson(ByteLevelPreTokenizer(true), false));
  ASSERT_NE(tok, nullptr);
  // "the" -> "Ġthe"; "hello" after the special token -> "Ġhello" = Ġ hello.
  EXPECT_EQ(tok->Encode("the<|endoftext|>hello"), (Ids{262, kEndOfText, 32, 261}));
}

TEST(BpeTokenizerTest, Llama3StyleGivesHandComputedIds) {
  testing::TempDir dir;
  auto tok = LoadJson(dir, HandTokenizerJson(Llama3PreTokenizer(), /*ignore_merges=*/true));
  ASSERT_NE(tok, nullptr);
  // hello | Ġthe | Ġworld | 's | Ġ | 123 | 4 5 | ĊĊ | s ing | <|endoftext|> | Ġ | Ġthe
  EXPECT_EQ(tok->Encode(kTextA),
            (Ids{261, 262, 267, 268, 32, 270, 52, 53, 275, 115, 274, kEndOfText, 32, 262}));
  // I T | 'S | Ġa | Ġ | "foo bar" | Ġ | Ġxyz (whole word in the vocabulary: ignore_merges)
  EXPECT_EQ(tok->Encode(kTextB), (Ids{73, 84, 276, 32, 97, 32, kFooBar, 32, kXyz}));
  EXPECT_EQ(tok->Decode(tok->Encode(kTextB)), kTextB);
}

TEST(BpeTokenizerTest, AddedTokenIdsFollowTokenizersRuleNotTheFile) {
  // tokenizers ignores the ids written in added_tokens: a content in the vocabulary keeps its id,
  // a repeated content is dropped, others count up from the vocabulary's size (278 entries here).
  json j = HandTokenizerJson(ByteLevelPreTokenizer(), false);
  auto added = [](const char* content, bool special) {
    return json{{"id", 3}, {"content", content}, {"special", special}, {"normalized", false}};
  };
  j["added_tokens"] = {added("hello", false), added("<a>", true), added("<b>", false),
                       added("<a>", false)};
  testing::TempDir dir;
  auto tok = LoadJson(dir, j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("<b>hello<a>x"), (Ids{279, 261, 278, 'x'}));
  EXPECT_EQ(*tok->TokenId("<a>"), 278);
  EXPECT_EQ(tok->vocab_size(), 280);
  EXPECT_EQ(tok->Decode(Ids{279, 261, 278}, /*skip_special=*/true), "<b>hello");
}

// ---- Unicode classes and UTF-8 decoding --------------------------------------------------------

TEST(UnicodeTest, ClassesMatchOnigurumaMeaning) {
  using internal::CharClass;
  const std::pair<uint32_t, CharClass> cases[] = {
      {'a', CharClass::kLetter},     {0xE9, CharClass::kLetter},  {0x4E2D, CharClass::kLetter},
      {0x2EBF0, CharClass::kLetter},  // CJK Extension I: Unicode 15.1
      {'7', CharClass::kNumber},     {0x663, CharClass::kNumber}, {0x216B, CharClass::kNumber},
      {0xBD, CharClass::kNumber},    {' ', CharClass::kSpace},    {0x0B, CharClass::kSpace},
      {0x85, CharClass::kSpace},     {0xA0, CharClass::kSpace},   {0x2028, CharClass::kSpace},
      {0x3000, CharClass::kSpace},   {0x1C, CharClass::kOther},   {0x200D, CharClass::kOther},
      {0x1F600, CharClass::kOther},  {'\'', CharClass::kOther},   {0x10FFFF, CharClass::kOther}};
  for (const auto& [cp, cls] : cases) {
    EXPECT_EQ(internal::ClassifyCodePoint(cp), cls) << std::hex << cp;
  }
}

TEST(UnicodeTest, InvalidUtf8DecodesOneByteAtATime) {
  for (std::string_view bad :
       {"\xC0\x80", "\xED\xA0\x80", "\xE4\xB8", "\xF4\x90\x80\x80", "\x80"}) {
    const internal::DecodedChar c = internal::DecodeUtf8(bad, 0);
    EXPECT_EQ(c.cp, internal::kInvalidCodePoint) << json(std::string(bad)).dump(-1, ' ', true);
    EXPECT_EQ(c.len, 1u);
  }
  const internal::DecodedChar emoji = internal::DecodeUtf8("x\xF0\x9F\x98\x80", 1);
  EXPECT_EQ(emoji.cp, 0x1F600u);
  EXPECT_EQ(emoji.len, 4u);
  EXPECT_EQ(internal::ByteToCodePoint(' '), 0x120u);
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(internal::CodePointToByte(internal::ByteToCodePoint(static_cast<uint8_t>(b))), b);
  }
}

// ---- The pre-tokenization patterns, piece by piece -------------------------------------------

std::vector<std::string> Pieces(internal::SplitRegex re, std::string_view text) {
  std::vector<std::string> out;
  size_t end = 0;
  for (const internal::Span& s : internal::FindRegexSpans(re, text)) {
    EXPECT_EQ(s.begin, end);
    EXPECT_TRUE(s.is_match);
    end = s.end;
    out.emplace_back(text.substr(s.begin, s.end - s.begin));
  }
  EXPECT_EQ(end, text.size());
  return out;
}

using Strs = std::vector<std::string>;

TEST(PreTokenizeTest, Gpt2PatternPieces) {
  constexpr auto kGpt2 = internal::SplitRegex::kGpt2;
  EXPECT_EQ(Pieces(kGpt2, "abc123456 'LL x\r\n\r\n  y"),
            (Strs{"abc", "123456", " '", "LL", " x", "\r\n\r\n ", " y"}));
  EXPECT_EQ(Pieces(kGpt2, "Hello  world\n\n"), (Strs{"Hello", " ", " world", "\n\n"}));
  EXPECT_EQ(Pieces(kGpt2, "we'll it's"), (Strs{"we", "'ll", " it", "'s"}));
  EXPECT_EQ(Pieces(kGpt2, "中文 ß10 \u00a0x"), (Strs{"中文", " ß", "10", " ", "\u00a0", "x"}));
  EXPECT_EQ(Pieces(kGpt2, "a\x80\xff!b"), (Strs{"a", "\x80\xff!", "b"}));  // invalid bytes
}

TEST(PreTokenizeTest, Llama3PatternPieces) {
  constexpr auto kLlama3 = internal::SplitRegex::kLlama3;
  EXPECT_EQ(Pieces(kLlama3, "abc123456 'LL x\r\n\r\n  y"),
            (Strs{"abc", "123", "456", " '", "LL", " x", "\r\n\r\n", " ", " y"}));
  EXPECT_EQ(Pieces(kLlama3, "x,\n\ny (hi) it'Ve we'ſ 'x"),
            (Strs{"x", ",\n\n", "y", " (", "hi", ")", " it", "'Ve", " we", "'ſ", " '", "x"}));
  EXPECT_EQ(Pieces(kLlama3, "中文 ß1234 \u00a0x"),
            (Strs{"中文", " ß", "123", "4", " ", "\u00a0x"}));
  EXPECT_EQ(Pieces(kLlama3, "a \n b"), (Strs{"a", " \n", " b"}));
}

TEST(PreTokenizeTest, SplitBehaviorsAndLiteralPattern) {
  auto run = [](internal::SplitBehavior behavior, bool invert) {
    internal::PreTokenizerStep step;
    step.kind = internal::PreTokenizerStep::Kind::kSplit;
    step.literal = "--";
    step.behavior = behavior;
    step.invert = invert;
    std::vector<std::string> pieces = {"a--b----c--"};
    internal::ApplyPreTokenizerStep(step, &pieces);
    return pieces;
  };
  using B = internal::SplitBehavior;
  EXPECT_EQ(run(B::kIsolated, false), (Strs{"a", "--", "b", "--", "--", "c", "--"}));
  EXPECT_EQ(run(B::kRemoved, false), (Strs{"a", "b", "c"}));
  EXPECT_EQ(run(B::kMergedWithPrevious, false), (Strs{"a--", "b--", "--", "c--"}));
  EXPECT_EQ(run(B::kMergedWithNext, false), (Strs{"a", "--b", "--", "--c", "--"}));
  EXPECT_EQ(run(B::kContiguous, false), (Strs{"a", "--", "b", "----", "c", "--"}));
  EXPECT_EQ(run(B::kRemoved, true), (Strs{"--", "--", "--", "--"}));
}

// ---- decode(encode(x)) == x over random text -------------------------------------------------

std::string RandomText(std::mt19937& rng) {
  static const char* const kParts[] = {
      "a",       "Z",           "the",    " ",        "  ",      "\n",     "\r\n", "\t",
      "'s",      "'LL",         "'",      "0",        "1234567", ".",      "!?",   "é",
      "ß",       "中文",        "😀",      "👍🏽", "\u00a0",  "\u3000", "ſ",    "<|endoftext|>",
      "foo bar", "<|endoftext", "\u0301", "٣"};
  std::string s;
  for (int n = rng() % 40; n > 0; --n) {
    if (rng() % 5 == 0) {  // any valid code point but surrogates
      uint32_t cp = rng() % 0x110000;
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'q';
      std::string u;
      if (cp < 0x80) {
        u = static_cast<char>(cp);
      } else if (cp < 0x800) {
        u = {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
      } else if (cp < 0x10000) {
        u = {static_cast<char>(0xE0 | (cp >> 12)), static_cast<char>(0x80 | ((cp >> 6) & 0x3F)),
             static_cast<char>(0x80 | (cp & 0x3F))};
      } else {
        u = {static_cast<char>(0xF0 | (cp >> 18)), static_cast<char>(0x80 | ((cp >> 12) & 0x3F)),
             static_cast<char>(0x80 | ((cp >> 6) & 0x3F)), static_cast<char>(0x80 | (cp & 0x3F))};
      }
      s += u;
    } else {
      s += kParts[rng() % std::size(kParts)];
    }
  }
  return s;
}

TEST(BpeTokenizerTest, DecodeInvertsEncodeOnRandomText) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937 rng(seed);
  testing::TempDir dir;
  for (const json& pre : {ByteLevelPreTokenizer(), Llama3PreTokenizer()}) {
    for (bool ignore_merges : {false, true}) {
      auto tok = LoadJson(dir, HandTokenizerJson(pre, ignore_merges));
      ASSERT_NE(tok, nullptr);
      for (int trial = 0; trial < 300; ++trial) {
        const std::string text = RandomText(rng);
        const Ids ids = tok->Encode(text);
        for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->vocab_size()) << id;
        ASSERT_EQ(tok->Decode(ids), text) << json(text).dump();
      }
    }
  }
}

TEST(BpeTokenizerTest, EncodeIsSafeFromSeveralThreads) {
  testing::TempDir dir;
  auto tok = LoadJson(dir, HandTokenizerJson(Llama3PreTokenizer(), false));
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(std::random_device{}());
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(RandomText(rng));
  std::vector<Ids> expected;
  for (const std::string& t : texts) expected.push_back(tok->Encode(t));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = 0; i < texts.size(); ++i)
        mismatches[t] += tok->Encode(texts[i]) != expected[i];
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// ---- tokenizer_config.json and bad tokenizer.json files --------------------------------------

TEST(BpeTokenizerTest, BosEosComeFromTokenizerConfig) {
  testing::TempDir dir;
  WriteFile(
      dir.Join("tokenizer_config.json"),
      R"({"bos_token": {"content": "<|endoftext|>", "lstrip": false}, "eos_token": "hello"})");
  auto tok = LoadJson(dir, HandTokenizerJson(ByteLevelPreTokenizer(), false));
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), kEndOfText);
  EXPECT_EQ(tok->eos_id(), 261);

  WriteFile(dir.Join("tokenizer_config.json"), R"({"bos_token": null})");
  tok = LoadJson(dir, HandTokenizerJson(ByteLevelPreTokenizer(), false));
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), std::nullopt);
  EXPECT_EQ(tok->eos_id(), kEndOfText);  // absent key: the well-known name

  WriteFile(dir.Join("tokenizer_config.json"), R"({"eos_token": "<|eot_id|>"})");
  auto bad = LoadTokenizer(dir.Join("tokenizer.json"));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("tokenizer_config.json: eos_token"), std::string::npos)
      << bad.status().ToString();
}

// Loads a modified hand tokenizer and expects an InvalidArgument naming the file and `needles`.
void ExpectLoadError(const std::string& text, std::initializer_list<const char*> needles) {
  testing::TempDir dir;
  WriteFile(dir.Join("tokenizer.json"), text);
  auto tok = LoadTokenizer(dir.Join("tokenizer.json"));
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), StatusCode::kInvalidArgument);
  const std::string msg = tok.status().message();
  EXPECT_NE(msg.find(dir.Join("tokenizer.json")), std::string::npos) << msg;
  for (const char* n : needles) EXPECT_NE(msg.find(n), std::string::npos) << n << " in " << msg;
}

TEST(BpeTokenizerTest, BadFilesGiveErrorsNamingFileAndJsonPath) {
  const json good = HandTokenizerJson(Llama3PreTokenizer(), false);
  json j = good;
  j.erase("model");
  ExpectLoadError(j.dump(), {"model: missing"});
  j = good;
  j["model"]["type"] = "Unigram";
  ExpectLoadError(j.dump(), {"model.type", "\"Unigram\""});
  j = good;
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+|\\s+";
  ExpectLoadError(j.dump(), {"pre_tokenizer.pretokenizers[0].pattern.Regex", "unsupported regex"});
  ExpectLoadError(good.dump().substr(0, 100), {"malformed JSON"});
  j = good;
  j["normalizer"] = {{"type", "NFC"}};
  ExpectLoadError(j.dump(), {"normalizer.type", "\"NFC\""});
  j = good;
  j["model"]["merges"][3] = "h zzz";
  ExpectLoadError(j.dump(), {"model.merges[3]", "\"zzz\" is not in model.vocab"});
  j = good;
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  ExpectLoadError(j.dump(), {"pre_tokenizer.type", "Whitespace"});
  j = good;
  j["added_tokens"][1]["id"] = "x";
  ExpectLoadError(j.dump(), {"added_tokens[1].id"});
  j = good;
  j["decoder"] = nullptr;
  ExpectLoadError(j.dump(), {"decoder: missing"});

  auto missing = LoadTokenizer("/nonexistent/tokenizer.json");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/tokenizer.json"), std::string::npos);
}

}  // namespace
}  // namespace tandem::model

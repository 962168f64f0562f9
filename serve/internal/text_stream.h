// TextStream: incremental detokenization for one request (private to serve/). Emits only complete
// UTF-8, removes stop strings and holds back text that could still become one.
//
//   TextStream ts(&tokenizer, {"\n\n"});
//   TextStream::Step s = ts.Add(token);   // s.text: new text to send; s.stopped: a stop matched
//
// Decoding: the text of all generated ids (special tokens skipped), cut before a trailing
// incomplete UTF-8 sequence. Byte-level tokenizers decode by concatenation, so that text only
// grows. Thread-safety: one owner.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/tokenizer.h"

namespace tandem::serve::internal {

// Length of the longest prefix of `s` that does not end inside a UTF-8 sequence.
size_t CompleteUtf8Prefix(const std::string& s);

class TextStream {
 public:
  struct Step {
    std::string text;
    bool stopped = false;
  };

  TextStream(const model::Tokenizer* tokenizer, std::vector<std::string> stops)
      : tokenizer_(tokenizer), stops_(std::move(stops)) {}

  // Adds a generated id (not EOS) and returns the text it releases.
  Step Add(int32_t token);
  // Releases held-back text at the end of generation (no stop matched).
  std::string Flush();

 private:
  const model::Tokenizer* tokenizer_;
  std::vector<std::string> stops_;
  std::vector<int32_t> ids_;
  std::string text_;    // complete UTF-8 decoded so far
  size_t emitted_ = 0;  // bytes of text_ already released
};

}  // namespace tandem::serve::internal

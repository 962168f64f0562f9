// TextStream (serve/internal/text_stream.h).
#include "serve/internal/text_stream.h"

#include <algorithm>

namespace tandem::serve::internal {

size_t CompleteUtf8Prefix(const std::string& s) {
  // Walk back over at most 3 continuation bytes to the last lead byte and check its length.
  size_t i = s.size();
  int cont = 0;
  while (i > 0 && cont < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) {
    --i;
    ++cont;
  }
  if (i == 0) return cont == 0 ? s.size() : 0;
  const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
  int need = 0;
  if (lead < 0x80)
    need = 0;
  else if ((lead & 0xE0) == 0xC0)
    need = 1;
  else if ((lead & 0xF0) == 0xE0)
    need = 2;
  else if ((lead & 0xF8) == 0xF0)
    need = 3;
  else
    return s.size();  // an invalid byte: nothing to wait for
  return cont >= need ? s.size() : i - 1;
}

TextStream::Step TextStream::Add(int32_t token) {
  ids_.push_back(token);
  const std::string full = tokenizer_->Decode(ids_, /*skip_special=*/true);
  text_ = full.substr(0, CompleteUtf8Prefix(full));
  Step step;
  // The earliest stop string that now occurs (searching from where a new match could begin).
  size_t cut = std::string::npos;
  for (const std::string& stop : stops_) {
    if (stop.empty()) continue;
    const size_t from = emitted_ >= stop.size() ? emitted_ - stop.size() + 1 : 0;
    const size_t at = text_.find(stop, from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    if (cut > emitted_) step.text = text_.substr(emitted_, cut - emitted_);
    emitted_ = std::max(emitted_, cut);
    step.stopped = true;
    return step;
  }
  // Hold back the longest suffix that is a proper prefix of a stop string.
  size_t hold = 0;
  for (const std::string& stop : stops_) {
    for (size_t k = std::min(stop.size() - (stop.empty() ? 0 : 1), text_.size()); k > hold; --k) {
      if (text_.compare(text_.size() - k, k, stop, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  const size_t release = std::max(emitted_, text_.size() - hold);
  step.text = text_.substr(emitted_, release - emitted_);
  emitted_ = release;
  return step;
}

std::string TextStream::Flush() {
  std::string rest = emitted_ < text_.size() ? text_.substr(emitted_) : std::string();
  emitted_ = text_.size();
  return rest;
}

}  // namespace tandem::serve::internal

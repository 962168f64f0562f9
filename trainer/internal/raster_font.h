// A tiny built-in bitmap font for the plot renderer: every printable ASCII character (32..126) as
// a 5x9 cell (rows 0..6 above the baseline, rows 7..8 for descenders), drawn at an integer scale.
//
// Thread-safety: the table is immutable.
#pragma once

namespace tandem::trainer::internal {

inline constexpr int kGlyphWidth = 5;    // pixels per glyph row at scale 1
inline constexpr int kGlyphHeight = 9;   // rows per glyph, descenders included
inline constexpr int kGlyphAdvance = 6;  // horizontal pitch at scale 1 (one column of spacing)
inline constexpr int kGlyphAscent = 7;   // rows above and on the baseline

// The glyph's rows, top first, each kGlyphWidth characters of '#' (ink) or '.' (background).
// Characters outside 32..126 map to the glyph of '?'.
const char* const* GlyphRows(char c);

}  // namespace tandem::trainer::internal

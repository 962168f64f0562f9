#include "checkpoint/internal/agent_image.h"

#include <cstring>

#include "checkpoint/erasure.h"

namespace tandem::checkpoint::internal {
namespace {

constexpr uint32_t kImageMagic = 0x4d494e54;  // "TNIM"

struct ImageHeader {
  uint32_t magic;
  uint32_t num_ranks;
  uint64_t version;
};
struct ShardEntry {
  uint32_t rank;
  uint32_t crc32;
  uint64_t capacity_bytes;
  uint64_t num_bytes;
};

}  // namespace

StatusOr<std::vector<uint8_t>> BuildNodeImage(const SnapshotStore& store, uint64_t version) {
  std::vector<int> ranks = store.ranks();
  std::vector<SlotView> views;
  std::vector<ShardEntry> entries;
  size_t total = sizeof(ImageHeader) + ranks.size() * sizeof(ShardEntry);
  for (int r : ranks) {
    TANDEM_ASSIGN_OR_RETURN(SlotView v, store.Find(r, version));
    TANDEM_ASSIGN_OR_RETURN(ShardMapping map, ShardMapping::Open(store.ShmName(r)));
    entries.push_back({static_cast<uint32_t>(r), v.crc32, map.capacity_bytes(), v.num_bytes});
    views.push_back(v);
    total += v.num_bytes;
  }
  std::vector<uint8_t> image(total);
  ImageHeader h{kImageMagic, static_cast<uint32_t>(ranks.size()), version};
  uint8_t* p = image.data();
  std::memcpy(p, &h, sizeof(h));
  p += sizeof(h);
  std::memcpy(p, entries.data(), entries.size() * sizeof(ShardEntry));
  p += entries.size() * sizeof(ShardEntry);
  for (const SlotView& v : views) {
    std::memcpy(p, v.data, v.num_bytes);
    p += v.num_bytes;
  }
  return image;
}

StatusOr<std::vector<ImageShard>> ParseNodeImage(std::span<const uint8_t> image,
                                                 uint64_t* version) {
  ImageHeader h;
  if (image.size() < sizeof(h)) return DataLossError("node image: shorter than its header");
  std::memcpy(&h, image.data(), sizeof(h));
  if (h.magic != kImageMagic || image.size() < sizeof(h) + h.num_ranks * sizeof(ShardEntry)) {
    return DataLossError(StrCat("node image: bad magic or ", h.num_ranks, " ranks in ",
                                image.size(), " bytes"));
  }
  *version = h.version;
  std::vector<ImageShard> shards;
  size_t off = sizeof(h) + h.num_ranks * sizeof(ShardEntry);
  for (uint32_t i = 0; i < h.num_ranks; ++i) {
    ShardEntry e;
    std::memcpy(&e, image.data() + sizeof(h) + i * sizeof(ShardEntry), sizeof(e));
    if (off + e.num_bytes > image.size() || e.num_bytes > e.capacity_bytes) {
      return DataLossError(StrCat("node image: rank ", e.rank, " shard of ", e.num_bytes,
                                  " bytes overruns the image"));
    }
    ImageShard s{static_cast<int>(e.rank), e.capacity_bytes,
                 std::vector<uint8_t>(image.data() + off, image.data() + off + e.num_bytes)};
    if (Crc32(0, s.bytes.data(), s.bytes.size()) != e.crc32) {
      return DataLossError(StrCat("node image: rank ", e.rank, " shard CRC mismatch"));
    }
    off += e.num_bytes;
    shards.push_back(std::move(s));
  }
  return shards;
}

}  // namespace tandem::checkpoint::internal

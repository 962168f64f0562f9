#include "checkpoint/snapshot_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "checkpoint/erasure.h"

namespace tandem::checkpoint {
namespace {

constexpr size_t kPageBytes = 4096;
size_t RoundUpToPage(size_t n) { return (n + kPageBytes - 1) / kPageBytes * kPageBytes; }

std::string Errno(const char* what, const std::string& name) {
  return StrCat(what, " '", name, "': ", std::strerror(errno));
}

}  // namespace

const char* SlotStateName(SlotState s) {
  switch (s) {
    case SlotState::kEmpty: return "empty";
    case SlotState::kWriting: return "writing";
    case SlotState::kCommitted: return "committed";
  }
  return "unknown";
}

// ---- ShmMapping ----

ShmMapping::~ShmMapping() {
  if (data_) munmap(data_, size_);
}

ShmMapping::ShmMapping(ShmMapping&& o) noexcept
    : name_(std::move(o.name_)), data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

ShmMapping& ShmMapping::operator=(ShmMapping&& o) noexcept {
  if (this != &o) {
    if (data_) munmap(data_, size_);
    name_ = std::move(o.name_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

StatusOr<ShmMapping> ShmMapping::Create(const std::string& name, size_t num_bytes) {
  shm_unlink(name.c_str());  // a stale object of a dead agent: its contents are not trusted
  int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return InternalError(Errno("shm_open(create)", name));
  if (ftruncate(fd, static_cast<off_t>(num_bytes)) != 0) {
    std::string msg = Errno(StrCat("ftruncate to ", num_bytes, " bytes of").c_str(), name);
    close(fd);
    shm_unlink(name.c_str());
    return ResourceExhaustedError(msg);
  }
  void* p = mmap(nullptr, num_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name.c_str());
    return ResourceExhaustedError(Errno("mmap", name));
  }
  ShmMapping m;
  m.name_ = name;
  m.data_ = static_cast<uint8_t*>(p);
  m.size_ = num_bytes;
  return m;
}

StatusOr<ShmMapping> ShmMapping::Open(const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return NotFoundError(Errno("shm_open", name));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    std::string msg = Errno("fstat", name);
    close(fd);
    return InternalError(msg);
  }
  void* p = mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return InternalError(Errno("mmap", name));
  ShmMapping m;
  m.name_ = name;
  m.data_ = static_cast<uint8_t*>(p);
  m.size_ = static_cast<size_t>(st.st_size);
  return m;
}

// ---- ShardMapping ----

StatusOr<ShardMapping> ShardMapping::Open(const std::string& shm_name) {
  ShardMapping s;
  TANDEM_ASSIGN_OR_RETURN(s.map_, ShmMapping::Open(shm_name));
  if (s.map_.size() < sizeof(RegionHeader) || s.header()->magic != kRegionMagic) {
    return DataLossError(StrCat("shm '", shm_name, "': not a snapshot region (bad magic or ",
                                s.map_.size(), " bytes)"));
  }
  const RegionHeader* h = s.header();
  if (h->data_offset[1] + h->capacity_bytes > s.map_.size()) {
    return DataLossError(StrCat("shm '", shm_name, "': slots end at ",
                                h->data_offset[1] + h->capacity_bytes, " beyond its ",
                                s.map_.size(), " bytes"));
  }
  return s;
}

uint8_t* ShardMapping::slot_data(int slot) const {
  TANDEM_CHECK(slot == 0 || slot == 1);
  return map_.data() + header()->data_offset[slot];
}

// ---- SnapshotStore ----

StatusOr<std::unique_ptr<SnapshotStore>> SnapshotStore::Create(const std::string& prefix) {
  if (prefix.empty() || prefix.find('/') != std::string::npos || prefix.size() > 200) {
    return InvalidArgumentError(StrCat("snapshot store: expected a shm prefix without '/', found '",
                                       prefix, "'"));
  }
  // Unlink the regions a dead agent of the same name left behind (Linux keeps shm in /dev/shm).
  if (DIR* dir = opendir("/dev/shm")) {
    const std::string stem = prefix + "-r";
    while (dirent* e = readdir(dir)) {
      if (std::strncmp(e->d_name, stem.c_str(), stem.size()) == 0) {
        shm_unlink((std::string("/") + e->d_name).c_str());
      }
    }
    closedir(dir);
  }
  return std::unique_ptr<SnapshotStore>(new SnapshotStore(prefix));
}

SnapshotStore::~SnapshotStore() {
  for (auto& [rank, m] : regions_) shm_unlink(m.name().c_str());
}

std::string SnapshotStore::ShmName(int rank) const { return StrCat("/", prefix_, "-r", rank); }

RegionHeader* SnapshotStore::Region(int rank) const {
  auto it = regions_.find(rank);
  return it == regions_.end() ? nullptr : reinterpret_cast<RegionHeader*>(it->second.data());
}

StatusOr<std::string> SnapshotStore::RegisterRank(int rank, uint64_t capacity_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (rank < 0) return InvalidArgumentError(StrCat("snapshot store: bad rank ", rank));
  if (RegionHeader* h = Region(rank)) {
    if (h->capacity_bytes == capacity_bytes) return ShmName(rank);
    if (latest_complete_) {
      return InvalidArgumentError(StrCat("snapshot store: rank ", rank, " registered with ",
                                         h->capacity_bytes, " bytes per slot, now asks for ",
                                         capacity_bytes, " after version ", *latest_complete_,
                                         " was completed"));
    }
  }
  const size_t slot_bytes = RoundUpToPage(std::max<uint64_t>(capacity_bytes, 1));
  const size_t total = kPageBytes + 2 * slot_bytes;
  TANDEM_ASSIGN_OR_RETURN(ShmMapping m, ShmMapping::Create(ShmName(rank), total));
  auto* h = reinterpret_cast<RegionHeader*>(m.data());
  std::memset(h, 0, sizeof(*h));
  h->magic = kRegionMagic;
  h->format_version = 1;
  h->rank = static_cast<uint32_t>(rank);
  h->capacity_bytes = capacity_bytes;
  h->data_offset[0] = kPageBytes;
  h->data_offset[1] = kPageBytes + slot_bytes;
  regions_[rank] = std::move(m);
  return ShmName(rank);
}

std::vector<int> SnapshotStore::ranks() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int> r;
  for (const auto& [rank, m] : regions_) r.push_back(rank);
  return r;
}

StatusOr<int> SnapshotStore::BeginVersion(int rank, uint64_t version) {
  std::lock_guard<std::mutex> lock(mu_);
  return BeginLocked(rank, version);
}

StatusOr<int> SnapshotStore::BeginLocked(int rank, uint64_t version) {
  RegionHeader* h = Region(rank);
  if (!h) return FailedPreconditionError(StrCat("snapshot store: rank ", rank, " not registered"));
  if (version == 0 || (latest_complete_ && version <= *latest_complete_)) {
    return FailedPreconditionError(StrCat("snapshot store: rank ", rank, " begins version ",
                                          version, ", expected a version above the newest ",
                                          "complete one (", latest_complete_.value_or(0), ")"));
  }
  // Never the slot holding the newest complete version; otherwise the older of the two.
  int slot = h->slots[0].version <= h->slots[1].version ? 0 : 1;
  for (int s = 0; s < 2; ++s) {
    const SlotHeader& sh = h->slots[s];
    if (latest_complete_ && sh.version == *latest_complete_ &&
        sh.state == static_cast<uint32_t>(SlotState::kCommitted)) {
      slot = 1 - s;
    }
  }
  SlotHeader& sh = h->slots[slot];
  sh.state = static_cast<uint32_t>(SlotState::kWriting);  // first: the old bytes are now invalid
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  sh.version = version;
  sh.num_bytes = 0;
  sh.crc32 = 0;
  return slot;
}

Status SnapshotStore::CommitVersion(int rank, uint64_t version, uint64_t num_bytes,
                                    uint32_t crc32) {
  std::lock_guard<std::mutex> lock(mu_);
  return CommitLocked(rank, version, num_bytes, crc32);
}

Status SnapshotStore::CommitLocked(int rank, uint64_t version, uint64_t num_bytes,
                                   uint32_t crc32) {
  RegionHeader* h = Region(rank);
  if (!h) return FailedPreconditionError(StrCat("snapshot store: rank ", rank, " not registered"));
  for (int s = 0; s < 2; ++s) {
    SlotHeader& sh = h->slots[s];
    if (sh.version != version || sh.state != static_cast<uint32_t>(SlotState::kWriting)) continue;
    if (num_bytes > h->capacity_bytes) {
      return InvalidArgumentError(StrCat("snapshot store: rank ", rank, " commits ", num_bytes,
                                         " bytes of version ", version, ", capacity is ",
                                         h->capacity_bytes));
    }
    const uint8_t* data = reinterpret_cast<const uint8_t*>(h) + h->data_offset[s];
    uint32_t actual = Crc32(0, data, num_bytes);
    if (actual != crc32) {
      return DataLossError(StrCat("snapshot store: rank ", rank, " version ", version,
                                  ": CRC-32 of the slot is ", actual, ", the trainer sent ",
                                  crc32, " (torn or corrupted write; not committed)"));
    }
    sh.num_bytes = num_bytes;
    sh.crc32 = crc32;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    sh.state = static_cast<uint32_t>(SlotState::kCommitted);
    return Status::Ok();
  }
  return FailedPreconditionError(StrCat("snapshot store: rank ", rank, " commits version ",
                                        version, " but no slot is being written with it (slots: ",
                                        h->slots[0].version, " ",
                                        SlotStateName(SlotState(h->slots[0].state)), ", ",
                                        h->slots[1].version, " ",
                                        SlotStateName(SlotState(h->slots[1].state)), ")"));
}

bool SnapshotStore::AllCommitted(uint64_t version) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (regions_.empty()) return false;
  for (const auto& [rank, m] : regions_) {
    const RegionHeader* h = Region(rank);
    bool found = false;
    for (const SlotHeader& sh : h->slots) {
      found |= sh.version == version && sh.state == static_cast<uint32_t>(SlotState::kCommitted);
    }
    if (!found) return false;
  }
  return true;
}

Status SnapshotStore::Publish(uint64_t version) {
  if (!AllCommitted(version)) {
    return FailedPreconditionError(StrCat("snapshot store: version ", version,
                                          " is not committed by every registered rank"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!latest_complete_ || version > *latest_complete_) latest_complete_ = version;
  return Status::Ok();
}

std::optional<uint64_t> SnapshotStore::latest_complete() const {
  std::lock_guard<std::mutex> lock(mu_);
  return latest_complete_;
}

StatusOr<SlotView> SnapshotStore::Find(int rank, uint64_t version) const {
  std::lock_guard<std::mutex> lock(mu_);
  const RegionHeader* h = Region(rank);
  if (!h) return NotFoundError(StrCat("snapshot store: rank ", rank, " not registered"));
  for (int s = 0; s < 2; ++s) {
    const SlotHeader& sh = h->slots[s];
    if (sh.version == version && sh.state == static_cast<uint32_t>(SlotState::kCommitted)) {
      return SlotView{s, version, reinterpret_cast<const uint8_t*>(h) + h->data_offset[s],
                      sh.num_bytes, sh.crc32};
    }
  }
  return NotFoundError(StrCat("snapshot store: rank ", rank, " has no committed version ",
                              version));
}

Status SnapshotStore::PutCommitted(int rank, uint64_t version, std::span<const uint8_t> bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  TANDEM_ASSIGN_OR_RETURN(int slot, BeginLocked(rank, version));
  RegionHeader* h = Region(rank);
  if (bytes.size() > h->capacity_bytes) {
    return InvalidArgumentError(StrCat("snapshot store: rank ", rank, " gets ", bytes.size(),
                                       " bytes, capacity is ", h->capacity_bytes));
  }
  std::memcpy(reinterpret_cast<uint8_t*>(h) + h->data_offset[slot], bytes.data(), bytes.size());
  return CommitLocked(rank, version, bytes.size(), Crc32(0, bytes.data(), bytes.size()));
}

}  // namespace tandem::checkpoint

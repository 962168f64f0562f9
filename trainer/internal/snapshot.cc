#include "trainer/internal/snapshot.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>

#include "checkpoint/erasure.h"
#include "core/logging.h"

namespace tandem::trainer::internal {
namespace {

constexpr uint64_t kAlign = 4096;

uint64_t AlignUp(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The header's room: the JSON of every piece and the meta, generously.
uint64_t HeaderBudget(const std::vector<StatePiece>& pieces) {
  uint64_t n = 64 << 10;
  for (const StatePiece& p : pieces) n += p.param->name.size() + 64;
  return AlignUp(n);
}

std::string NodeSocket(const SnapshotSection& cfg, int world_rank, int world_size) {
  int per_node = static_cast<int>(cfg.ranks_per_node);
  if (per_node <= 0) {
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    per_node = local != nullptr ? std::atoi(local) : world_size;
  }
  const int node = world_rank / std::max(1, per_node);
  std::string s = cfg.agent_socket;
  for (size_t at; (at = s.find("{node}")) != std::string::npos;) s.replace(at, 6, std::to_string(node));
  return s;
}

const Tensor* Part(const StatePiece& p, int which) {
  return which == 0 ? &p.master : which == 1 ? &p.exp_avg : &p.exp_avg_sq;
}

}  // namespace

StatusOr<std::unique_ptr<Snapshotter>> Snapshotter::Open(const SnapshotSection& cfg,
                                                         collectives::Communicator* world,
                                                         int world_rank, int world_size,
                                                         std::vector<StatePiece> pieces,
                                                         ops::Context& ctx) {
  std::unique_ptr<Snapshotter> s(new Snapshotter());
  s->world_ = world;
  s->rank_ = world_rank;
  s->ctx_ = &ctx;
  s->pieces_ = std::move(pieces);
  s->socket_ = NodeSocket(cfg, world_rank, world_size);
  s->skip_when_busy_ = cfg.when_busy == "skip";
  uint64_t data = 0;
  for (const StatePiece& p : s->pieces_) {
    for (int which = 0; which < 3; ++which) data += Part(p, which)->num_bytes();
  }
  s->capacity_ = HeaderBudget(s->pieces_) + data;
  StatusOr<checkpoint::AgentClient> client = checkpoint::AgentClient::Connect(s->socket_, cfg.timeout_s);
  if (!client.ok()) {
    return UnavailableError(StrCat("snapshot.agent_socket: no agent at ", s->socket_, " (start `tandem agent --socket ",
                                   s->socket_, "` first, or leave snapshot.agent_socket empty): ",
                                   client.status().message()));
  }
  s->client_.emplace(std::move(client).value());
  s->client_->timeout_s = cfg.timeout_s;
  TANDEM_RETURN_IF_ERROR(s->client_->Register(world_rank, s->capacity_));
  TANDEM_ASSIGN_OR_RETURN(std::optional<uint64_t> newest, s->client_->LatestComplete());
  int64_t base = newest ? static_cast<int64_t>(*newest) : 0;
  if (world != nullptr && world->size() > 1) {
    Tensor t = Tensor::Cpu({1}, DType::kI64);
    t.data<int64_t>()[0] = base;
    TANDEM_RETURN_IF_ERROR(world->AllReduce(t, collectives::ReduceOp::kMax));
    base = t.data<int64_t>()[0];
  }
  s->next_version_ = static_cast<uint64_t>(base) + 1;
  if (ctx.is_cuda()) {
    TANDEM_ASSIGN_OR_RETURN(CudaStreamOwner stream, CudaStreamOwner::Create(ctx.device().index));
    s->stream_.emplace(std::move(stream));
    TANDEM_ASSIGN_OR_RETURN(CudaEventOwner ready, CudaEventOwner::Create(ctx.device().index, false));
    TANDEM_ASSIGN_OR_RETURN(CudaEventOwner copied, CudaEventOwner::Create(ctx.device().index, false));
    s->ready_.emplace(std::move(ready));
    s->copied_.emplace(std::move(copied));
  }
  return s;
}

Snapshotter::~Snapshotter() {
  const Status s = Drain();
  if (!s.ok()) TANDEM_LOG(ERROR, "snapshot") << "last snapshot: " << s.message();
}

std::string Snapshotter::Header(int64_t step, const std::string& meta_json) const {
  nlohmann::json pieces = nlohmann::json::array();
  for (const StatePiece& p : pieces_) {  // the state's dtypes: f32, or bf16 (optimizer.precision)
    pieces.push_back({p.param->name, p.begin, p.end, DTypeName(p.master.dtype()),
                      DTypeName(p.exp_avg.dtype()), DTypeName(p.exp_avg_sq.dtype())});
  }
  return nlohmann::json{{"step", step}, {"meta", meta_json}, {"pieces", pieces}}.dump();
}

StatusOr<uint8_t*> Snapshotter::Begin(uint64_t version) {
  TANDEM_ASSIGN_OR_RETURN(uint8_t* slot, client_->BeginVersion(rank_, version));
  if (stream_ && !registered_.contains(slot)) {
    StatusOr<HostRegistration> r = HostRegistration::Create(slot, capacity_);
    if (r.ok()) {
      registered_.emplace(slot, std::move(r).value());
    } else {
      TANDEM_LOG(WARNING, "snapshot") << "the agent's slot could not be page-locked (" << r.status().message()
                                      << "): snapshot copies run synchronously";
      registered_.emplace(slot, HostRegistration());
    }
  }
  return slot;
}

namespace {
// [pipelined CRC] Bytes per checksummed group of the snapshot copy.
constexpr uint64_t kCrcGroupBytes = uint64_t{512} << 20;

std::string Ms(double seconds) { return std::to_string(std::llround(1e3 * seconds)); }

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}
}  // namespace

std::string Snapshotter::TimingSummary() const {
  if (taken_ == 0) return std::string();
  const double n = static_cast<double>(taken_);
  return StrCat("copy ", Ms(timings_.copy_s / n), " ms, commit ", Ms(timings_.commit_s / n),
                " ms, updates waited ", Ms(timings_.waited_s / n), " ms per snapshot");
}

Status Snapshotter::Start(int64_t step, const std::string& meta_json) {
  TANDEM_RETURN_IF_ERROR(Fence());
  int64_t busy = skip_when_busy_ && committing_.load() ? 1 : 0;
  if (skip_when_busy_ && world_ != nullptr && world_->size() > 1) {  // the same decision everywhere
    Tensor t = Tensor::Cpu({1}, DType::kI64);
    t.data<int64_t>()[0] = busy;
    TANDEM_RETURN_IF_ERROR(world_->AllReduce(t, collectives::ReduceOp::kMax));
    busy = t.data<int64_t>()[0];
  }
  if (busy) {
    ++skipped_;
    return Status::Ok();
  }
  const auto draining = std::chrono::steady_clock::now();
  TANDEM_RETURN_IF_ERROR(Drain());
  timings_.waited_s += SecondsSince(draining);
  // Every node must have published the previous version before any rank may overwrite the
  // slot of the one before it.
  if (last_started_ > 0 && world_ != nullptr && world_->size() > 1) {
    TANDEM_ASSIGN_OR_RETURN(std::optional<uint64_t> agreed, AgreedLatest());
    if (!agreed || *agreed < last_started_) {
      if (rank_ == 0) {
        TANDEM_LOG(WARNING, "snapshot") << "step " << step << ": skipped, a node has not published version "
                                        << last_started_ << " yet";
      }
      return Status::Ok();
    }
  }
  const std::string header = Header(step, meta_json);
  const uint64_t data_offset = AlignUp(8 + header.size());
  if (data_offset > HeaderBudget(pieces_)) {
    return InternalError(StrCat("snapshot header of ", header.size(), " bytes exceeds its room"));
  }
  const uint64_t version = next_version_++;
  TANDEM_ASSIGN_OR_RETURN(uint8_t* slot, Begin(version));  // the first use of a slot page-locks it
  const auto copy_start = std::chrono::steady_clock::now();
  const uint64_t length = header.size();
  std::memcpy(slot, &length, 8);
  std::memcpy(slot + 8, header.data(), header.size());
  std::memset(slot + 8 + header.size(), 0, data_offset - 8 - header.size());
  uint64_t at = data_offset;
  const bool async = stream_ && registered_.at(slot).data() != nullptr;
  if (stream_) {
    TANDEM_RETURN_IF_ERROR(ready_->Record(ctx_->stream()));
    TANDEM_RETURN_IF_ERROR(stream_->Wait(*ready_));
  }
  // [pipelined CRC] Asynchronous copies land in groups of about kCrcGroupBytes, each marked by an
  // event, so that the commit thread checksums a group while the next one is still copying.
  std::vector<uint64_t> group_end;
  auto end_group = [&]() -> Status {
    if (!async || (!group_end.empty() && group_end.back() == at)) return Status::Ok();
    if (group_events_.size() <= group_end.size()) {
      TANDEM_ASSIGN_OR_RETURN(CudaEventOwner e, CudaEventOwner::Create(ctx_->device().index, false));
      group_events_.push_back(std::move(e));
    }
    TANDEM_RETURN_IF_ERROR(group_events_[group_end.size()].Record(stream_->get()));
    group_end.push_back(at);
    return Status::Ok();
  };
  uint64_t group_start = 0;
  for (const StatePiece& p : pieces_) {
    for (int which = 0; which < 3; ++which) {
      const Tensor& src = *Part(p, which);
      Tensor dst = Tensor::Wrap(slot + at, {src.numel()}, src.dtype(), Device::Cpu());
      if (src.device().is_cuda()) {
        TANDEM_RETURN_IF_ERROR(CopyTensor(dst, src, async ? stream_->get() : nullptr));
        if (!async) TANDEM_RETURN_IF_ERROR(ctx_->Synchronize());
      } else {
        std::memcpy(dst.raw_data(), src.raw_data(), src.num_bytes());
      }
      at += src.num_bytes();
      if (at - group_start >= kCrcGroupBytes) {
        TANDEM_RETURN_IF_ERROR(end_group());
        group_start = at;
      }
    }
  }
  TANDEM_RETURN_IF_ERROR(end_group());
  if (stream_) TANDEM_RETURN_IF_ERROR(copied_->Record(stream_->get()));
  last_started_ = version;
  ++taken_;
  if (stream_) copying_ = version;  // host state: already copied
  // The commit (checksums, the agent's parity work) starts as soon as the copy lands, so that it
  // overlaps this step's forward and backward rather than waiting for the next Fence.
  committing_ = true;
  commit_ = std::thread([this, version, slot, bytes = at, started = copy_start,
                         group_end = std::move(group_end)] {
    Status s = Status::Ok();
    if (stream_) s = UseDeviceOnThisThread(ctx_->device().index);
    // Checksum each group as it lands (the header and anything before the first event with it).
    uint32_t crc = 0;
    uint64_t done_bytes = 0;
    for (size_t g = 0; g < group_end.size() && s.ok(); ++g) {
      s = group_events_[g].Synchronize();
      if (!s.ok()) break;
      crc = checkpoint::Crc32(crc, slot + done_bytes, group_end[g] - done_bytes);
      done_bytes = group_end[g];
    }
    if (s.ok() && stream_) s = copied_->Synchronize();
    timings_.copy_s += SecondsSince(started);
    const auto committing = std::chrono::steady_clock::now();
    if (s.ok()) {
      if (done_bytes < bytes) crc = checkpoint::Crc32(crc, slot + done_bytes, bytes - done_bytes);
      StatusOr<bool> done = client_->CommitVersion(rank_, version, bytes, crc);
      timings_.commit_s += SecondsSince(committing);
      s = done.status();
      if (s.ok()) s = client_->Heartbeat(rank_);
    }
    commit_status_ = s;
    committing_ = false;
  });
  return Status::Ok();
}

Status Snapshotter::Fence() {
  if (!copying_) return Status::Ok();
  copying_.reset();
  const auto entered = std::chrono::steady_clock::now();
  const Status s = copied_->Synchronize();
  timings_.waited_s += SecondsSince(entered);
  return s;
}

Status Snapshotter::Drain() {
  TANDEM_RETURN_IF_ERROR(Fence());
  if (commit_.joinable()) commit_.join();
  return std::exchange(commit_status_, Status::Ok());
}

StatusOr<std::optional<uint64_t>> Snapshotter::AgreedLatest() {
  TANDEM_ASSIGN_OR_RETURN(std::optional<uint64_t> mine, client_->LatestComplete());
  int64_t v = mine ? static_cast<int64_t>(*mine) : -1;
  if (world_ != nullptr && world_->size() > 1) {
    Tensor t = Tensor::Cpu({1}, DType::kI64);
    t.data<int64_t>()[0] = v;
    TANDEM_RETURN_IF_ERROR(world_->AllReduce(t, collectives::ReduceOp::kMin));
    v = t.data<int64_t>()[0];
  }
  if (v < 0) return std::optional<uint64_t>();
  return std::optional<uint64_t>(static_cast<uint64_t>(v));
}

StatusOr<std::pair<int64_t, std::string>> Snapshotter::Restore(uint64_t version) {
  TANDEM_ASSIGN_OR_RETURN(checkpoint::MappedShard shard, client_->RestoreMapped(rank_, version));
  const std::string where = StrCat("snapshot version ", version, " of rank ", rank_, " (agent ", socket_, ")");
  uint64_t length = 0;
  if (shard.bytes.size() < 8) return DataLossError(where + ": shorter than its header");
  std::memcpy(&length, shard.bytes.data(), 8);
  if (8 + length > shard.bytes.size()) return DataLossError(where + ": header runs past the data");
  const nlohmann::json h = nlohmann::json::parse(shard.bytes.begin() + 8, shard.bytes.begin() + 8 + length,
                                                 nullptr, false);
  if (h.is_discarded() || !h.contains("pieces") || !h.contains("step")) {
    return DataLossError(where + ": the header is not the snapshot JSON");
  }
  const nlohmann::json& pieces = h["pieces"];
  bool same = pieces.size() == pieces_.size();
  for (size_t i = 0; same && i < pieces_.size(); ++i) {
    same = pieces[i].is_array() && pieces[i].size() == 6 &&
           pieces[i][0] == pieces_[i].param->name && pieces[i][1] == pieces_[i].begin &&
           pieces[i][2] == pieces_[i].end;
    for (int which = 0; same && which < 3; ++which)
      same = pieces[i][3 + which] == DTypeName(Part(pieces_[i], which)->dtype());
  }
  if (!same) {
    return InvalidArgumentError(
        where +
        ": holds other tensors, ranges or state dtypes than this rank's (another "
        "mesh, model, method or optimizer.precision)");
  }
  uint64_t need = AlignUp(8 + length);
  for (const StatePiece& p : pieces_) {
    for (int which = 0; which < 3; ++which) need += Part(p, which)->num_bytes();
  }
  if (need > shard.bytes.size()) return DataLossError(where + ": data is truncated");
  fetched_data_ = AlignUp(8 + length);
  const int64_t step = h["step"].get<int64_t>();
  std::string meta = h["meta"].get<std::string>();
  fetched_.emplace(std::move(shard));
  return std::make_pair(step, std::move(meta));
}

Status Snapshotter::ApplyRestore() {
  TANDEM_CHECK_MSG(fetched_.has_value(), "Snapshotter::ApplyRestore without a successful Restore");
  uint64_t at = fetched_data_;
  for (const StatePiece& p : pieces_) {
    for (int which = 0; which < 3; ++which) {
      const Tensor& dst_view = *Part(p, which);
      // Straight from the agent's shared memory (a const view: CopyTensor only reads it).
      Tensor src = Tensor::Wrap(const_cast<uint8_t*>(fetched_->bytes.data()) + at,
                                {dst_view.numel()}, dst_view.dtype(), Device::Cpu());
      Tensor dst = dst_view;
      TANDEM_RETURN_IF_ERROR(CopyTensor(dst, src, ctx_->stream()));
      at += dst_view.num_bytes();
    }
  }
  TANDEM_RETURN_IF_ERROR(ctx_->Synchronize());
  fetched_.reset();
  return Status::Ok();
}

}  // namespace tandem::trainer::internal

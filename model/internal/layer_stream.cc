#include "model/internal/layer_stream.h"

#include "core/cuda_allocator.h"
#include "model/llama.h"

namespace tandem::model::internal {

StatusOr<std::unique_ptr<LayerStream>> LayerStream::Create(ops::Context& ctx, const Tensor& home,
                                                           int64_t layers, int64_t elems,
                                                           LayerReader* reader) {
  if (!home.defined() || !home.device().is_cpu() || !home.is_contiguous() ||
      home.numel() != layers * elems || layers <= 0 || elems <= 0) {
    return InvalidArgumentError(StrCat("LayerStream: expected a contiguous host tensor of ", layers,
                                       " x ", elems, " elements, found ", home.DebugString()));
  }
  std::unique_ptr<LayerStream> s(new LayerStream(ctx, home, layers, elems, reader));
  for (Tensor& slot : s->slots_) {
    TANDEM_ASSIGN_OR_RETURN(slot, Tensor::Empty({elems}, home.dtype(), ctx.allocator()));
  }
  if (ctx.is_cuda()) {
    const int device = ctx.device().index;
    if (reader == nullptr) {
      TANDEM_ASSIGN_OR_RETURN(HostRegistration pinned,
                              HostRegistration::Create(home.raw_data(), home.num_bytes()));
      s->pinned_.emplace(std::move(pinned));
    } else {
      TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<CachingAllocator> pinned,
                              CreatePinnedHostAllocator());
      s->pinned_memory_ = std::move(pinned);
      for (Tensor& staging : s->staging_) {
        TANDEM_ASSIGN_OR_RETURN(staging, Tensor::Empty({elems}, home.dtype(), *s->pinned_memory_));
      }
    }
    TANDEM_ASSIGN_OR_RETURN(CudaStreamOwner copy, CudaStreamOwner::Create(device));
    s->copy_.emplace(std::move(copy));
    for (int i = 0; i < 2; ++i) {
      TANDEM_ASSIGN_OR_RETURN(CudaEventOwner ev, CudaEventOwner::Create(device, false));
      s->ready_.push_back(std::move(ev));
      TANDEM_ASSIGN_OR_RETURN(CudaEventOwner done, CudaEventOwner::Create(device, false));
      s->readers_done_.push_back(std::move(done));
    }
  }
  return s;
}

LayerStream::~LayerStream() {
  for (int i = 0; i < 2; ++i) (void)Join(i);
  if (copy_) (void)copy_->Synchronize();
  // The staging tensors go back to pinned_memory_ before it is destroyed (declared after it).
  for (Tensor& staging : staging_) staging = Tensor();
}

void LayerStream::Invalidate() { holds_[0] = holds_[1] = -1; }

int LayerStream::SlotOf(int64_t layer) const {
  for (int i = 0; i < 2; ++i) {
    if (holds_[i] == layer) return i;
  }
  return -1;
}

int LayerStream::Victim(int64_t keep) const {
  for (int i = 0; i < 2; ++i) {
    if (holds_[i] < 0) return i;
  }
  return holds_[0] == keep ? 1 : 0;
}

Status LayerStream::Join(int slot) {
  if (!pending_[slot].valid()) return Status::Ok();
  Status done = pending_[slot].get();
  pending_[slot] = {};
  return done;
}

Status LayerStream::ReadLayer(int64_t layer, void* dst) {
  const uint64_t bytes = static_cast<uint64_t>(elems_) * DTypeSize(home_.dtype());
  return reader_->Read(static_cast<uint64_t>(layer) * bytes, dst, bytes)
      .WithContext(StrCat("reading streamed layer ", layer));
}

Status LayerStream::ReadAndUpload(int slot, int64_t layer) {
  TANDEM_RETURN_IF_ERROR(UseDeviceOnThisThread(ctx_.device().index));
  // The slot's previous upload read staging_[slot]: it must be done before the buffer is reused.
  TANDEM_RETURN_IF_ERROR(ready_[slot].Synchronize());
  const Tensor& staging = staging_[slot];
  TANDEM_RETURN_IF_ERROR(ReadLayer(layer, staging.raw_data()));
  // Everything that may read the slot was enqueued before readers_done_[slot] was recorded.
  TANDEM_RETURN_IF_ERROR(copy_->Wait(readers_done_[slot]));
  TANDEM_RETURN_IF_ERROR(CopyTensor(slots_[slot], staging, copy_->get()));
  return ready_[slot].Record(copy_->get());
}

Status LayerStream::Load(int slot, int64_t layer) {
  Join(slot)
      .IgnoreError();  // an earlier load into this slot, superseded: its error no longer matters
  const Tensor src = home_.Slice(0, layer * elems_, (layer + 1) * elems_);
  holds_[slot] = -1;  // until the copy is queued
  if (ctx_.is_cuda() && reader_ != nullptr) {
    TANDEM_RETURN_IF_ERROR(readers_done_[slot].Record(ctx_.stream()));
    // Reads go one at a time, in the order the layers are needed.
    std::shared_future<Status> before = pending_[1 - slot];
    pending_[slot] = std::async(std::launch::async, [this, slot, layer, before] {
                       if (before.valid()) before.wait();
                       return ReadAndUpload(slot, layer);
                     }).share();
  } else if (ctx_.is_cuda()) {
    // Everything enqueued on the compute stream so far may read the slot: the copy waits for it.
    TANDEM_RETURN_IF_ERROR(readers_done_[slot].Record(ctx_.stream()));
    TANDEM_RETURN_IF_ERROR(copy_->Wait(readers_done_[slot]));
    TANDEM_RETURN_IF_ERROR(CopyTensor(slots_[slot], src, copy_->get()));
    TANDEM_RETURN_IF_ERROR(ready_[slot].Record(copy_->get()));
  } else if (reader_ != nullptr) {
    TANDEM_RETURN_IF_ERROR(ReadLayer(layer, slots_[slot].raw_data()));
  } else {
    TANDEM_RETURN_IF_ERROR(CopyTensor(slots_[slot], src));
  }
  holds_[slot] = layer;
  bytes_copied_ += static_cast<int64_t>(src.num_bytes());
  return Status::Ok();
}

StatusOr<Tensor> LayerStream::Get(int64_t layer, int64_t next) {
  TANDEM_CHECK(layer >= 0 && layer < layers_ && next < layers_);
  int slot = SlotOf(layer);
  if (slot < 0) {
    slot = Victim(next);
    TANDEM_RETURN_IF_ERROR(Load(slot, layer));
  }
  const Status loaded = Join(slot);  // the worker has enqueued the slot's upload
  if (!loaded.ok()) {
    holds_[slot] = -1;
    return loaded;
  }
  if (ctx_.is_cuda()) TANDEM_RETURN_IF_ERROR(ready_[slot].Wait(ctx_.stream()));
  if (next >= 0 && SlotOf(next) < 0) TANDEM_RETURN_IF_ERROR(Load(1 - slot, next));
  return slots_[slot];
}

}  // namespace tandem::model::internal

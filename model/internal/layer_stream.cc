#include "model/internal/layer_stream.h"

namespace tandem::model::internal {

StatusOr<std::unique_ptr<LayerStream>> LayerStream::Create(ops::Context& ctx, const Tensor& home,
                                                           int64_t layers, int64_t elems) {
  if (!home.defined() || !home.device().is_cpu() || !home.is_contiguous() ||
      home.numel() != layers * elems || layers <= 0 || elems <= 0) {
    return InvalidArgumentError(StrCat("LayerStream: expected a contiguous host tensor of ", layers,
                                       " x ", elems, " elements, found ", home.DebugString()));
  }
  std::unique_ptr<LayerStream> s(new LayerStream(ctx, home, layers, elems));
  for (Tensor& slot : s->slots_) {
    TANDEM_ASSIGN_OR_RETURN(slot, Tensor::Empty({elems}, home.dtype(), ctx.allocator()));
  }
  if (ctx.is_cuda()) {
    const int device = ctx.device().index;
    TANDEM_ASSIGN_OR_RETURN(HostRegistration pinned,
                            HostRegistration::Create(home.raw_data(), home.num_bytes()));
    s->pinned_.emplace(std::move(pinned));
    TANDEM_ASSIGN_OR_RETURN(CudaStreamOwner copy, CudaStreamOwner::Create(device));
    s->copy_.emplace(std::move(copy));
    for (int i = 0; i < 2; ++i) {
      TANDEM_ASSIGN_OR_RETURN(CudaEventOwner ev, CudaEventOwner::Create(device, false));
      s->ready_.push_back(std::move(ev));
    }
    TANDEM_ASSIGN_OR_RETURN(CudaEventOwner done, CudaEventOwner::Create(device, false));
    s->readers_done_.emplace(std::move(done));
  }
  return s;
}

LayerStream::~LayerStream() {
  if (copy_) (void)copy_->Synchronize();
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

Status LayerStream::Load(int slot, int64_t layer) {
  const Tensor src = home_.Slice(0, layer * elems_, (layer + 1) * elems_);
  holds_[slot] = -1;  // until the copy is queued
  if (ctx_.is_cuda()) {
    // Everything enqueued on the compute stream so far may read the slot: the copy waits for it.
    TANDEM_RETURN_IF_ERROR(readers_done_->Record(ctx_.stream()));
    TANDEM_RETURN_IF_ERROR(copy_->Wait(*readers_done_));
    TANDEM_RETURN_IF_ERROR(CopyTensor(slots_[slot], src, copy_->get()));
    TANDEM_RETURN_IF_ERROR(ready_[slot].Record(copy_->get()));
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
  if (ctx_.is_cuda()) TANDEM_RETURN_IF_ERROR(ready_[slot].Wait(ctx_.stream()));
  if (next >= 0 && SlotOf(next) < 0) TANDEM_RETURN_IF_ERROR(Load(1 - slot, next));
  return slots_[slot];
}

}  // namespace tandem::model::internal

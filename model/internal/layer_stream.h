// LayerStream: decoder-layer weights kept in host memory and brought to the device a layer ahead
// of their use (ModelOptions::stream_layers). Private to model/.
//
// The weights of all L layers live in one host buffer [L, E] (page-locked on CUDA, so copies run
// asynchronously at full link speed); the device holds two slots of E elements. Get(l, next)
// returns the slot holding layer l, ready for work enqueued on the context's stream after the
// call, and starts copying layer `next` into the other slot on a copy stream behind every piece
// of work enqueued so far (the last readers of that slot), so the copy of layer l + 1 overlaps the
// compute of layer l. On a CPU context the slots are host buffers and copies are synchronous:
// the same code path, for tests.
//
// Invalidate() forgets what the slots hold; the model calls it at the start of every pass, so
// weights written into the host buffer between passes (an optimizer, a load) are always seen.
// Writers must not touch a layer's host weights while a pass that still reads them is queued:
// the model's passes read layer l's host weights only before layer l's work is enqueued.
//
// Ownership: owns the slots, the copy stream and events, and the page-locking of `home` (undone
// at destruction, before `home`'s memory may go). Thread-safety: the model's thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "core/status.h"
#include "core/stream.h"
#include "core/tensor.h"
#include "ops/context.h"

namespace tandem::model::internal {

class LayerStream {
 public:
  // `home`: host, contiguous, [layers * elems] in the compute dtype.
  static StatusOr<std::unique_ptr<LayerStream>> Create(ops::Context& ctx, const Tensor& home,
                                                       int64_t layers, int64_t elems);
  ~LayerStream();  // waits for copies still in flight (errors ignored)
  LayerStream(const LayerStream&) = delete;
  LayerStream& operator=(const LayerStream&) = delete;

  // The slot holding layer `layer` ([elems], on the device); `next` (-1: none) is copied into
  // the other slot meanwhile.
  StatusOr<Tensor> Get(int64_t layer, int64_t next);
  void Invalidate();

  int64_t bytes_copied() const { return bytes_copied_; }

 private:
  LayerStream(ops::Context& ctx, Tensor home, int64_t layers, int64_t elems)
      : ctx_(ctx), home_(std::move(home)), layers_(layers), elems_(elems) {}
  int SlotOf(int64_t layer) const;
  int Victim(int64_t keep) const;  // a slot not holding `keep`, an empty one first
  Status Load(int slot, int64_t layer);

  ops::Context& ctx_;
  Tensor home_;  // [layers, elems] host
  int64_t layers_ = 0, elems_ = 0;
  Tensor slots_[2];
  int64_t holds_[2] = {-1, -1};
  int64_t bytes_copied_ = 0;
  // CUDA only.
  std::optional<CudaStreamOwner> copy_;
  std::vector<CudaEventOwner> ready_;  // per slot: its copy is done
  std::optional<CudaEventOwner> readers_done_;
  std::optional<HostRegistration> pinned_;
};

}  // namespace tandem::model::internal

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
// With a LayerReader (ModelOptions::stream_reader) a load reads the layer through it instead of
// copying out of `home`, which is then not page-locked: on CUDA a worker thread reads the layer
// into a page-locked staging buffer of the slot's (after the slot's previous upload from it is
// done), then enqueues the upload on the copy stream behind the slot's last readers; Get waits
// for the worker to have enqueued it. On the CPU the reader fills the slot directly. A reader
// error fails the Get that needs the layer, naming the layer.
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
#include <future>
#include <memory>
#include <optional>
#include <vector>

#include "core/status.h"
#include "core/stream.h"
#include "core/tensor.h"
#include "ops/context.h"

namespace tandem::model {
class LayerReader;
}

namespace tandem::model::internal {

class LayerStream {
 public:
  // `home`: host, contiguous, [layers * elems] in the compute dtype. `reader` (may be null, not
  // owned) reads home's bytes from where they are kept.
  static StatusOr<std::unique_ptr<LayerStream>> Create(ops::Context& ctx, const Tensor& home,
                                                       int64_t layers, int64_t elems,
                                                       LayerReader* reader = nullptr);
  ~LayerStream();  // waits for reads and copies still in flight (errors ignored)
  LayerStream(const LayerStream&) = delete;
  LayerStream& operator=(const LayerStream&) = delete;

  // The slot holding layer `layer` ([elems], on the device); `next` (-1: none) is copied into
  // the other slot meanwhile.
  StatusOr<Tensor> Get(int64_t layer, int64_t next);
  void Invalidate();

  int64_t bytes_copied() const { return bytes_copied_; }

 private:
  LayerStream(ops::Context& ctx, Tensor home, int64_t layers, int64_t elems, LayerReader* reader)
      : ctx_(ctx), home_(std::move(home)), layers_(layers), elems_(elems), reader_(reader) {}
  int SlotOf(int64_t layer) const;
  int Victim(int64_t keep) const;  // a slot not holding `keep`, an empty one first
  Status Load(int slot, int64_t layer);
  // Layer `layer`'s bytes through the reader into `dst` (host, elems_ elements).
  Status ReadLayer(int64_t layer, void* dst);
  // The worker's part of a load through the reader (CUDA): read into staging_[slot], upload.
  Status ReadAndUpload(int slot, int64_t layer);
  Status Join(int slot);  // waits for the slot's worker, if any; its error

  ops::Context& ctx_;
  Tensor home_;  // [layers, elems] host
  int64_t layers_ = 0, elems_ = 0;
  LayerReader* reader_ = nullptr;
  Tensor slots_[2];
  int64_t holds_[2] = {-1, -1};
  int64_t bytes_copied_ = 0;
  // CUDA only.
  std::optional<CudaStreamOwner> copy_;
  std::vector<CudaEventOwner> ready_;         // per slot: its copy is done
  std::vector<CudaEventOwner> readers_done_;  // per slot: the work that may read it is done
  std::optional<HostRegistration> pinned_;
  // With a reader on CUDA: page-locked staging per slot, and the slot's worker in flight.
  std::unique_ptr<Allocator> pinned_memory_;
  Tensor staging_[2];
  std::shared_future<Status> pending_[2];  // a load waits for the other slot's read first
};

}  // namespace tandem::model::internal

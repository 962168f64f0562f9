// Universal checkpoints: one HDF5 file per saved step holding every parameter in its logical
// (unsharded) shape with its f32 master weights, Adam moments and step, plus how tensor
// parallelism splits it, so a run saved under one dp x cp x tp mesh resumes under any other.
// The layout is documented in docs/formats.md ("Universal checkpoints") and readable with h5py.
//
// Saving (every rank of `group` calls it with the shards it owns):
//
//   std::vector<TensorShard> mine = TpShards("model.embed_tokens.weight", {V, C}, split,
//                                            tp_rank, tp, local_master, local_m, local_v);
//   TANDEM_ASSIGN_OR_RETURN(std::string path, SaveUniversal(dir, meta, mine, group, {}));
//
// Every logical element of every tensor must be covered by exactly one shard over all ranks
// (a replicated tensor is given by one rank only, e.g. dp rank 0 / tp rank 0); SaveUniversal
// checks this and fails on gaps or overlaps naming the tensor. No rank ever holds the whole
// model: shard descriptions and per-piece CRCs (a few bytes per row at most) go to rank 0, which
// declares every dataset in `step-<N>.h5.tmp`; then the ranks write their hyperslabs in turn
// (rank r opens the file after rank r-1 closed it: the serial HDF5 library has no parallel
// writer, and one writer at a time keeps the file consistent without MPI-IO). Rank 0 then
// fsyncs, renames to `step-<N>.h5`, fsyncs the directory, replaces `latest` (temporary file +
// rename) and deletes all but the newest `keep_last` checkpoints. A crash at any point leaves the
// previous checkpoint and a `latest` that names a complete file.
//
// Loading: UniversalReader::Open(path or dir) then Read (one hyperslab) or ReadTp (the slices of
// tp rank r of t, stacked as that rank's local tensor). Every block of rows a read touches is read
// whole and its CRC-32 checked (chunks are row blocks, so this costs no extra disk reads); a
// mismatch or a truncated file is a DataLoss error naming the file, tensor, dataset and rows.
// VerifyAll() reads everything and also checks each dataset's whole-tensor CRC.
//
// Timeouts: rank r waits for ranks 0..r-1 to write, so the communicator given to SaveUniversal
// needs a timeout_s longer than a whole save (CheckpointWriter: give it its own communicator).
//
// Thread-safety: free functions may run on several threads at once (the HDF5 library is built
// thread-safe); a UniversalReader is used by one thread at a time. SaveUniversal uses `group`
// like any collective: one thread per communicator.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "core/status.h"
#include "core/tensor.h"

namespace tandem::checkpoint {

inline constexpr int64_t kUniversalFormatVersion = 1;

// One member of a fused parameter stacked along the split dimension ("q" of q|k|v).
struct FusedPart {
  std::string name;
  int64_t size = 0;  // extent along tp_dim
};

// How tensor parallelism splits a parameter.
struct SplitSpec {
  int tp_dim = -1;               // -1: replicated on every tp rank; else the dimension sliced
  std::vector<FusedPart> fused;  // non-empty: parts stacked along tp_dim, each sliced on its own
  // The split dimension is padded up to a multiple of tp (vocabulary-parallel embedding and
  // lm_head); the padding rows are not stored. vocab_padding records the writer's padding rows.
  bool vocab_parallel = false;
  int64_t vocab_padding = 0;
};

// A box [offset, offset + count) of a logical tensor.
struct Hyperslab {
  Shape offset;
  Shape count;
};

// What one rank contributes (saving) or receives (Read) for one tensor.
struct TensorShard {
  std::string name;     // HF name, e.g. "model.layers.0.mlp.down_proj.weight"
  std::string adapter;  // "" for base parameters; else the adapter's name
  Shape logical_shape;
  SplitSpec split;
  Hyperslab slab;     // the box this shard holds
  Tensor master;      // f32 host, contiguous, slab.count-shaped
  Tensor exp_avg;     // same, or undefined (a frozen tensor has no optimizer state)
  Tensor exp_avg_sq;  // defined exactly when exp_avg is
  int64_t step = 0;   // Adam step count of this tensor
  bool trainable = true;
};

// Run-wide state saved at the file's root.
struct UniversalMeta {
  int64_t step = 0;                       // training step the checkpoint was taken after
  std::string config_toml;                // the writer's resolved config
  std::string model_config_json;          // HF config.json of the base model (export-hf needs it)
  int64_t dp = 1, cp = 1, tp = 1;         // the writer's mesh
  std::string data_position_json = "{}";  // opaque to checkpoint/: the trainer's loader state
  std::string rng_state_json = "{}";      // seed and counters
  std::map<std::string, std::string> adapter_configs;  // adapter name -> its config JSON
  // Filled when reading:
  int64_t format_version = kUniversalFormatVersion;
  std::string git_commit;
};

struct SaveOptions {
  int keep_last = 3;  // checkpoints kept in the directory (>= 1), newest by step
  // Target bytes of one chunk (= one CRC block of whole rows) per dataset.
  int64_t chunk_bytes = 4 << 20;
  // Tests only: called on rank 0 at each stage of publishing ("declared", "written", "synced",
  // "renamed", "latest_written", "latest_renamed", "pruned"), e.g. to kill the process there.
  std::function<void(const std::string& stage)> on_stage;
};

// The hyperslabs of a tensor of `logical_shape` that tp rank `tp_rank` of `tp_size` holds under
// `split`, in the order its local tensor stacks them along split.tp_dim (one per fused part;
// one in total otherwise; the whole tensor when replicated). With vocab_parallel the split
// dimension is padded to a multiple of tp_size and a rank's box is clipped to the real rows (it
// may be empty: count 0 along tp_dim). Programmer errors (sizes that do not divide) abort.
std::vector<Hyperslab> TpSlices(const Shape& logical_shape, const SplitSpec& split, int tp_rank,
                                int tp_size);
// Shape of a tp rank's local tensor under `split` (padding rows included).
Shape TpLocalShape(const Shape& logical_shape, const SplitSpec& split, int tp_size);

// Shards (views, no copies) of a tp rank's local tensors: one per non-empty TpSlices box (with
// vocab_parallel, split.vocab_padding is set to this tp size's padding rows).
// `exp_avg`/`exp_avg_sq` may be undefined (frozen). Local tensors must be contiguous, f32, on the
// host, of TpLocalShape. Fused splits along a dim other than 0
// are Unimplemented.
StatusOr<std::vector<TensorShard>> TpShards(const std::string& name, const Shape& logical_shape,
                                            const SplitSpec& split, int tp_rank, int tp_size,
                                            const Tensor& master, const Tensor& exp_avg,
                                            const Tensor& exp_avg_sq);

// Saves `meta.step` into `dir`/step-<step>.h5 as described above; every rank of `group`
// (nullptr: one rank) calls it. Returns the published path on every rank, or the same failure on
// every rank (the failing rank's message on that rank, a summary naming it on the others).
StatusOr<std::string> SaveUniversal(const std::string& dir, const UniversalMeta& meta,
                                    const std::vector<TensorShard>& shards,
                                    collectives::Communicator* group, const SaveOptions& options);

// Writes one checkpoint file at `path` (through `path`.tmp, fsync, rename, directory fsync)
// without touching `latest` or other files; for tools (import-hf).
Status SaveUniversalFile(const std::string& path, const UniversalMeta& meta,
                         const std::vector<TensorShard>& shards, collectives::Communicator* group,
                         const SaveOptions& options);

// `dir`/latest resolved to a path ("<dir>/step-<N>.h5"); NotFound when there is none.
StatusOr<std::string> LatestCheckpoint(const std::string& dir);

// The stored description of one tensor.
struct TensorInfo {
  std::string name;
  std::string adapter;
  Shape shape;
  SplitSpec split;
  int64_t step = 0;
  bool trainable = true;
  bool has_moments = true;
  int64_t block_rows = 0;                          // rows per chunk / CRC block
  std::vector<uint32_t> crc32;                     // per dataset (master, exp_avg, exp_avg_sq)
  std::vector<std::vector<uint32_t>> block_crc32;  // per dataset, per block of rows
};

class UniversalReader {
 public:
  // `path`: a checkpoint file, or a directory (its `latest`). NotFound, DataLoss (truncated,
  // corrupted, not HDF5, missing attributes) or InvalidArgument (a newer format version).
  static StatusOr<UniversalReader> Open(const std::string& path);

  UniversalReader(UniversalReader&&) noexcept;
  UniversalReader& operator=(UniversalReader&&) noexcept;
  ~UniversalReader();

  const std::string& path() const { return path_; }
  const UniversalMeta& meta() const { return meta_; }
  // Base parameters first, then adapters; each sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name, const std::string& adapter = "") const;

  // The box `slab` of a tensor (master and, when with_moments and stored, the moments).
  StatusOr<TensorShard> Read(const std::string& name, const Hyperslab& slab,
                             const std::string& adapter = "", bool with_moments = true) const;
  // The whole tensor.
  StatusOr<TensorShard> ReadAll(const std::string& name, const std::string& adapter = "",
                                bool with_moments = true) const;
  // Tp rank `tp_rank`'s local tensors under the stored split and `tp_size` (boxes of TpSlices
  // stacked along tp_dim, padding rows zero). The result's slab is the local shape at offset 0.
  StatusOr<TensorShard> ReadTp(const std::string& name, int tp_rank, int tp_size,
                               const std::string& adapter = "", bool with_moments = true) const;
  // Reads every dataset and checks every block and whole-tensor CRC.
  Status VerifyAll() const;
  // Human-readable listing: meta, then one line per tensor (shape, split, step, CRC).
  std::string Describe() const;

 private:
  struct File;
  UniversalReader() = default;
  Status ReadDataset(const TensorInfo& info, int which, const Hyperslab& slab, float* out) const;

  std::string path_;
  std::unique_ptr<File> file_;
  UniversalMeta meta_;
  std::vector<TensorInfo> tensors_;
};

}  // namespace tandem::checkpoint

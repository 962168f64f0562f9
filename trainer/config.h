// The `tandem train` configuration: three sections of a TOML file, each one typed struct whose
// fields are declared once (default + doc). `tandem train --help` prints them all.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace tandem::trainer {

// [model]: the Llama to train. init = "scratch" builds it from the fields below; "pretrained"
// loads config.json and safetensors from `path` (the shape fields are then ignored).
struct ModelSection {
  std::string init = "scratch";
  std::string path;
  int64_t vocab_size = 0;
  int64_t hidden_size = 256;
  int64_t intermediate_size = 688;
  int64_t num_layers = 4;
  int64_t num_heads = 8;
  int64_t num_kv_heads = 4;
  int64_t head_dim = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 4096;
  double init_std = 0.02;
  bool recompute = false;
  // The CUDA attention kernels (ops::AttentionKernel, process-wide): "auto", "wgmma_split_dq" or
  // "mma_sync"; the last two are for comparisons.
  std::string attention_kernel = "auto";
  // "host": the decoder layers' weights live in CPU memory and are streamed to the device a layer
  // ahead (model::ModelOptions::stream_layers); "nvme": in a file under nvme_path, read a layer
  // ahead with O_DIRECT (trainer/internal/layer_file.h).
  std::string offload = "none";
  std::string nvme_path;  // directory of the layer file for offload = "nvme"

  static void Describe(ConfigSchema<ModelSection>& s);
};

// [data]: token shards made by `tandem data prepare`, or raw inputs prepared on first use.
struct DataSection {
  std::string dir;
  std::vector<std::string> inputs;
  std::string format = "auto";
  std::string tokenizer = "byte";
  int64_t seq_len = 256;
  std::string packing = "eos";
  double val_fraction = 0.02;

  static void Describe(ConfigSchema<DataSection>& s);
};

// [train]: the loop.
struct TrainSection {
  std::string device = "cpu";
  int64_t seed = 1234;
  int64_t steps = 200;
  int64_t micro_batch_size = 8;
  int64_t grad_accum = 1;
  double lr = 1e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup_steps = 20;
  std::string schedule = "cosine";
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;
  int64_t log_interval = 10;
  int64_t eval_interval = 50;
  int64_t eval_batches = 4;
  bool eval_accuracy = false;
  int64_t save_interval = 0;
  std::string out_dir = "runs/default";
  double max_minutes = 0;
  double peak_tflops = 0;
  // Universal checkpoints (checkpoint/universal.h) at every save, for resuming under any mesh.
  bool universal_checkpoints = true;
  int64_t keep_checkpoints = 3;
  // "" starts fresh; "auto" resumes from out_dir's newest universal checkpoint when there is one;
  // else a checkpoint file or directory to resume from.
  std::string resume;
  // Rewritten after every update with "<step> <unix time>" (for supervisors); "" = none.
  std::string heartbeat_file;
  // Profile this update (ops/profiler.h): per-category times logged and written to
  // out_dir/profile-step-N.json; 0 = off.
  int64_t profile_step = 0;

  static void Describe(ConfigSchema<TrainSection>& s);
};

// [peft]: parameter-efficient fine-tuning. method = "lora" freezes the base model (no f32
// masters or gradients for it) and trains one LoRA adapter, saved in PEFT format; method = "s2ft"
// freezes it too and trains S²FT blocks (peft/s2ft.h), saved in tandem's S²FT format.
struct PeftSection {
  std::string method = "none";
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  std::vector<std::string> target_modules = {"all-linear"};
  bool use_rslora = false;
  // lora: the wide path (peft/adapter_set.h): the projections run their adapter inside the base
  // GEMMs, at the cost of one more copy of those frozen weights.
  bool lora_wide = true;
  std::string init_adapter;
  // method = "s2ft" (peft/s2ft.h): heads and FFN channels per layer, by fraction or budget.
  double s2ft_heads_fraction = 0.1;
  double s2ft_ffn_fraction = 0.1;
  int64_t s2ft_budget = 0;
  std::string s2ft_selection = "random";
  bool s2ft_coupled = false;
  int64_t s2ft_seed = -1;

  static void Describe(ConfigSchema<PeftSection>& s);
};

// [parallel]: the mesh dp x cp x tp (= mpirun -np), tp innermost. One process per GPU.
struct ParallelSection {
  int64_t dp = 0;  // 0: world / (cp * tp)
  int64_t cp = 1;
  int64_t tp = 1;
  int64_t zero = 0;  // 1: ZeRO-1 (optimizer states sharded over dp x cp)
  double bucket_mb = 25.0;
  double timeout_s = 300.0;

  static void Describe(ConfigSchema<ParallelSection>& s);
};

// [snapshot]: in-memory snapshots of every rank's state in its node's agent (`tandem agent`,
// checkpoint/agent.h), taken after an update and copied while the next one computes.
struct SnapshotSection {
  std::string agent_socket;    // "" = off; "{node}" becomes world_rank / ranks_per_node
  int64_t interval = 1;        // updates between snapshots
  int64_t ranks_per_node = 0;  // 0: mpirun's local size (OMPI_COMM_WORLD_LOCAL_SIZE), else all
  double timeout_s = 60;       // connecting to and waiting on the agent
  // While the previous snapshot's commit still runs: "wait" for it (at most `interval` updates
  // are ever lost) or "skip" this snapshot (training never waits on the agent).
  std::string when_busy = "wait";

  static void Describe(ConfigSchema<SnapshotSection>& s);
};

// [optimizer]: where the AdamW state lives (its hyperparameters are in [train]). offload =
// "host" or "nvme" keeps the f32 master weights and Adam moments off the device in an
// offload::OffloadedOptimizer updated on CPU threads (host memory, or a file under nvme_path);
// one rank and full fine-tuning only for now (trainer/internal/offload_step.h).
struct OptimizerSection {
  std::string offload = "none";
  std::string nvme_path;  // directory of the state file for offload = "nvme"
  double chunk_mib = 4.0;  // MiB of f32 gradients per chunk (the unit of copy, update and I/O)
  int64_t threads = 4;     // CPU update threads
  // The update of step t runs during step t + 1 (one step stale gradients; see offload_step.h).
  bool delayed_update = false;
  int64_t delayed_update_after = 0;  // updates run undelayed before the delay starts
  // "f32": f32 master weights and Adam moments (18 bytes of state per parameter with bf16
  // weights and f32 gradients). "bf16": no master; the bf16 weights are updated in place and the
  // moments are bf16, each rounded stochastically (ops::AdamWBf16Multi): 10 bytes per parameter.
  // One rank, full fine-tuning, offload = "none".
  std::string precision = "f32";

  static void Describe(ConfigSchema<OptimizerSection>& s);
};

struct TrainConfig {
  ModelSection model;
  PeftSection peft;
  DataSection data;
  TrainSection train;
  ParallelSection parallel;
  SnapshotSection snapshot;
  OptimizerSection optimizer;
};

// Reads `path` (empty: defaults only), applies `--set` overrides in order, binds the
// sections and rejects unknown keys. Errors name the key, its source and the nearest valid key.
StatusOr<TrainConfig> LoadTrainConfig(const std::string& path, const std::vector<std::string>& overrides);
// The resolved configuration as TOML (written to the run directory; loads back identically).
std::string TrainConfigToToml(const TrainConfig& config);
// Help text listing every option with its default.
std::string TrainConfigHelp();

}  // namespace tandem::trainer

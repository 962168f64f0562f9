#include "trainer/config.h"

namespace tandem::trainer {

void ModelSection::Describe(ConfigSchema<ModelSection>& s) {
  s.Field("init", &ModelSection::init, "scratch (random init from the fields below) or pretrained (load `path`)")
      .OneOf({"scratch", "pretrained"});
  s.Field("path", &ModelSection::path, "HF model directory (config.json + safetensors) for init = pretrained");
  s.Field("vocab_size", &ModelSection::vocab_size, "vocabulary size; 0 = the tokenizer's").Min(0);
  s.Field("hidden_size", &ModelSection::hidden_size, "model width C").Min(1);
  s.Field("intermediate_size", &ModelSection::intermediate_size, "SwiGLU width F").Min(1);
  s.Field("num_layers", &ModelSection::num_layers, "decoder blocks L").Min(1);
  s.Field("num_heads", &ModelSection::num_heads, "query heads").Min(1);
  s.Field("num_kv_heads", &ModelSection::num_kv_heads, "key/value heads (divides num_heads)").Min(1);
  s.Field("head_dim", &ModelSection::head_dim, "head dimension; 0 = hidden_size / num_heads").Min(0);
  s.Field("rope_theta", &ModelSection::rope_theta, "RoPE base").Min(1.0);
  s.Field("rms_norm_eps", &ModelSection::rms_norm_eps, "RMSNorm epsilon").Min(0.0);
  s.Field("tie_word_embeddings", &ModelSection::tie_word_embeddings, "share embedding and lm_head weights");
  s.Field("max_position_embeddings", &ModelSection::max_position_embeddings, "longest sequence").Min(1);
  s.Field("init_std", &ModelSection::init_std, "std of the normal init of linears and embeddings").Min(0.0);
  s.Field("recompute", &ModelSection::recompute, "recompute each block in backward (saves memory)");
  s.Field("attention_kernel", &ModelSection::attention_kernel,
          "CUDA attention kernels: auto (the fastest for the device), wgmma_split_dq (Hopper, the "
          "backward's dQ in a kernel of its own) or mma_sync (any GPU); the last two for "
          "comparisons")
      .OneOf({"auto", "wgmma_split_dq", "mma_sync"});
  s.Field(
       "offload", &ModelSection::offload,
       "where the decoder layers' weights live: none (the device), host (CPU memory, streamed to "
       "the device a layer ahead) or nvme (a file under model.nvme_path, read a layer ahead with "
       "O_DIRECT); host and nvme need optimizer.offload = host/nvme or a frozen base "
       "(peft.method lora/s2ft)")
      .OneOf({"none", "host", "nvme"});
  s.Field(
      "nvme_path", &ModelSection::nvme_path,
      "with offload = nvme: an existing directory on the NVMe drive for the layer file (removed "
      "at exit)");
}

void PeftSection::Describe(ConfigSchema<PeftSection>& s) {
  s.Field("method", &PeftSection::method,
          "none (train every weight), lora (frozen base, one adapter) or s2ft (frozen base, sparse blocks)")
      .OneOf({"none", "lora", "s2ft"});
  s.Field("r", &PeftSection::r, "LoRA rank").Min(1);
  s.Field("alpha", &PeftSection::alpha, "LoRA alpha; the update is scaled by alpha / r").Min(0.0);
  s.Field("dropout", &PeftSection::dropout, "dropout on the adapter input").Min(0.0).Max(0.99);
  s.Field("target_modules", &PeftSection::target_modules,
          "projections to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear");
  s.Field("use_rslora", &PeftSection::use_rslora, "scale by alpha / sqrt(r) (rsLoRA)");
  s.Field("lora_wide", &PeftSection::lora_wide,
          "lora: fold the adapter into the base projections' GEMMs (faster, keeps small updates; "
          "one more copy of the frozen projection weights)");
  s.Field("init_adapter", &PeftSection::init_adapter, "PEFT adapter directory to start from (empty: PEFT init)");
  s.Field("s2ft_heads_fraction", &PeftSection::s2ft_heads_fraction, "s2ft: fraction of kv head groups per layer")
      .Min(0.0).Max(1.0);
  s.Field("s2ft_ffn_fraction", &PeftSection::s2ft_ffn_fraction, "s2ft: fraction of FFN channels per layer")
      .Min(0.0).Max(1.0);
  s.Field("s2ft_budget", &PeftSection::s2ft_budget,
          "s2ft: trainable parameters in all (> 0 overrides the fractions' counts, keeps their ratio)").Min(0);
  s.Field("s2ft_selection", &PeftSection::s2ft_selection, "s2ft: random (seeded) or weight (largest column norms)")
      .OneOf({"random", "weight"});
  s.Field("s2ft_coupled", &PeftSection::s2ft_coupled, "s2ft: also train q/k/v and gate/up rows of the selection");
  s.Field("s2ft_seed", &PeftSection::s2ft_seed, "s2ft: selection seed; -1 = derived from train.seed").Min(-1);
}

void DataSection::Describe(ConfigSchema<DataSection>& s) {
  s.Field("dir", &DataSection::dir, "directory of token shards (tandem data prepare)");
  s.Field("inputs", &DataSection::inputs, "raw files prepared into `dir` when it has no manifest.json");
  s.Field("format", &DataSection::format, "format of `inputs`").OneOf({"auto", "text", "jsonl", "sft", "chat"});
  s.Field("tokenizer", &DataSection::tokenizer, "byte, or the path of a HF tokenizer.json");
  s.Field("seq_len", &DataSection::seq_len, "tokens per sequence T").Min(1);
  s.Field("packing", &DataSection::packing, "eos (documents back to back) or doc_mask (attention within documents)")
      .OneOf({"eos", "doc_mask"});
  s.Field("val_fraction", &DataSection::val_fraction, "fraction of documents held out for evaluation").Min(0.0).Max(0.5);
}

void TrainSection::Describe(ConfigSchema<TrainSection>& s) {
  s.Field("device", &TrainSection::device, "cpu (f32) or cuda[:N] (bf16 with f32 master weights)");
  s.Field("seed", &TrainSection::seed, "the one seed; per-purpose seeds derive from it").Min(0);
  s.Field("steps", &TrainSection::steps, "optimizer updates").Min(1);
  s.Field("micro_batch_size", &TrainSection::micro_batch_size, "sequences per forward/backward").Min(1);
  s.Field("grad_accum", &TrainSection::grad_accum, "micro-batches per update").Min(1);
  s.Field("lr", &TrainSection::lr, "peak learning rate").Min(0.0);
  s.Field("min_lr_ratio", &TrainSection::min_lr_ratio, "final lr as a fraction of the peak").Min(0.0).Max(1.0);
  s.Field("warmup_steps", &TrainSection::warmup_steps, "linear warmup updates").Min(0);
  s.Field("schedule", &TrainSection::schedule, "lr decay after warmup").OneOf({"cosine", "linear", "constant"});
  s.Field("weight_decay", &TrainSection::weight_decay, "AdamW decoupled weight decay (not on norms)").Min(0.0);
  s.Field("beta1", &TrainSection::beta1, "AdamW beta1").Min(0.0).Max(1.0);
  s.Field("beta2", &TrainSection::beta2, "AdamW beta2").Min(0.0).Max(1.0);
  s.Field("eps", &TrainSection::eps, "AdamW epsilon").Min(0.0);
  s.Field("grad_clip", &TrainSection::grad_clip, "clip the global gradient norm to this; 0 = off").Min(0.0);
  s.Field("log_interval", &TrainSection::log_interval, "updates between progress lines").Min(1);
  s.Field("eval_interval", &TrainSection::eval_interval, "updates between evaluations; 0 = only at the end").Min(0);
  s.Field("eval_batches", &TrainSection::eval_batches, "micro-batches of held-out data per evaluation").Min(0);
  s.Field("eval_accuracy", &TrainSection::eval_accuracy,
          "also report token accuracy on the held-out split (argmax == target over target tokens), "
          "before the first update and at each evaluation; one process only");
  s.Field("save_interval", &TrainSection::save_interval, "updates between checkpoints; 0 = only at the end").Min(0);
  s.Field("out_dir", &TrainSection::out_dir, "run directory (config, metrics.jsonl, checkpoints)");
  s.Field("max_minutes", &TrainSection::max_minutes, "stop (and save) after this wall time; 0 = no limit").Min(0.0);
  s.Field("peak_tflops", &TrainSection::peak_tflops, "device peak for MFU; 0 = known GPUs only").Min(0.0);
  s.Field("universal_checkpoints", &TrainSection::universal_checkpoints,
          "also save f32 weights and optimizer state as HDF5 (out_dir/checkpoints/universal) at every "
          "save, resumable under any mesh");
  s.Field("keep_checkpoints", &TrainSection::keep_checkpoints, "universal checkpoints kept (newest)").Min(1);
  s.Field("resume", &TrainSection::resume,
          "\"\" = start fresh; \"auto\" = from out_dir's newest universal checkpoint if any; or a "
          "checkpoint file or directory");
  s.Field("heartbeat_file", &TrainSection::heartbeat_file,
          "rewritten after every update with \"<step> <unix time>\" (for supervisors); \"\" = none");
  s.Field("profile_step", &TrainSection::profile_step,
          "profile this update: time per op category (gemm, attention, norm, loss, optimizer, ...) "
          "and the unlabelled gap, logged and written to out_dir/profile-step-N.json; 0 = off")
      .Min(0);
}

void ParallelSection::Describe(ConfigSchema<ParallelSection>& s) {
  s.Field("dp", &ParallelSection::dp, "data-parallel replicas; 0 = world size / (cp * tp)").Min(0);
  s.Field("cp", &ParallelSection::cp, "context-parallel ranks (ring attention, zig-zag chunks)").Min(1);
  s.Field("tp", &ParallelSection::tp, "tensor-parallel ranks (Megatron; innermost, inside a node)").Min(1);
  s.Field("zero", &ParallelSection::zero, "1: ZeRO-1, Adam states and master weights sharded over dp x cp").Min(0).Max(1);
  s.Field("bucket_mb", &ParallelSection::bucket_mb, "gradient all-reduce bucket size (MB of f32)").Min(0.001);
  s.Field("timeout_s", &ParallelSection::timeout_s, "seconds any collective may take before the job fails").Min(0.001);
}

void SnapshotSection::Describe(ConfigSchema<SnapshotSection>& s) {
  s.Field("agent_socket", &SnapshotSection::agent_socket,
          "Unix socket of the node's `tandem agent`; \"{node}\" = world rank / ranks_per_node; \"\" = no snapshots");
  s.Field("interval", &SnapshotSection::interval, "updates between snapshots").Min(1);
  s.Field("ranks_per_node", &SnapshotSection::ranks_per_node,
          "ranks per node for {node}; 0 = mpirun's local size").Min(0);
  s.Field("timeout_s", &SnapshotSection::timeout_s, "seconds to reach the agent and for each request").Min(0.001);
  s.Field("when_busy", &SnapshotSection::when_busy,
          "the previous commit still running: wait (lose at most `interval` updates) or skip (never stall)")
      .OneOf({"wait", "skip"});
}

void OptimizerSection::Describe(ConfigSchema<OptimizerSection>& s) {
  s.Field("offload", &OptimizerSection::offload,
          "where f32 master weights and Adam moments live: none (the device), host (CPU memory) or "
          "nvme (a file under nvme_path); host and nvme update on CPU threads, one rank, full "
          "fine-tuning only")
      .OneOf({"none", "host", "nvme"});
  s.Field("nvme_path", &OptimizerSection::nvme_path,
          "directory for the optimizer-state file with offload = nvme (O_DIRECT where possible)");
  s.Field("chunk_mib", &OptimizerSection::chunk_mib,
          "MiB of f32 gradients per offload chunk (copy, CPU update and I/O unit)")
      .Min(1e-6)
      .Max(1024.0);
  s.Field("threads", &OptimizerSection::threads, "CPU threads updating offloaded chunks").Min(1).Max(256);
  s.Field(
      "delayed_update", &OptimizerSection::delayed_update,
      "offload only: run step t's CPU update during step t + 1 (its gradients then come from the "
      "weights one update older: ZeRO-Offload's delayed parameter update; changes the math)");
  s.Field("delayed_update_after", &OptimizerSection::delayed_update_after,
          "with delayed_update: the first N updates run undelayed (early steps move the weights "
          "most, where a stale gradient overshoots)")
      .Min(0);
  s.Field("precision", &OptimizerSection::precision,
          "optimizer state: f32 (f32 master weights and Adam moments) or bf16 (no master: bf16 "
          "weights and moments updated with stochastic rounding; 8 bytes less per parameter; one "
          "rank, full fine-tuning, offload = none)")
      .OneOf({"f32", "bf16"});
}

namespace {

// [model] Streamed layer weights live in host memory: no optimizer may keep device copies of them
// (a frozen base, or the optimizer offloaded), and ZeRO-1 shards a device buffer of every weight.
Status CheckModelOffload(const TrainConfig& c) {
  if (c.model.offload == "none") return Status::Ok();
  const std::string what = StrCat("model.offload = \"", c.model.offload, "\"");
  if (c.model.offload == "nvme" && c.model.nvme_path.empty()) {
    return InvalidArgumentError(
        StrCat(what, " needs model.nvme_path: an existing directory for the layer file"));
  }
  if (c.optimizer.offload == "none" && c.peft.method == "none") {
    return InvalidArgumentError(StrCat(
        what,
        " streams the layer weights from off the device, so their optimizer must live off "
        "it too: set optimizer.offload = \"host\" or \"nvme\" (full fine-tuning), or train an "
        "adapter over the frozen base (peft.method = \"lora\" or \"s2ft\")"));
  }
  if (c.parallel.zero != 0) {
    return UnimplementedError(
        StrCat(what, " with parallel.zero = ", c.parallel.zero,
               ": ZeRO-1 shards a device buffer of every weight, which streamed "
               "layers do not have (set parallel.zero = 0)"));
  }
  return Status::Ok();
}

// [optimizer] Offload is one rank, full fine-tuning, no in-memory snapshots for now.
Status CheckOffload(const TrainConfig& c) {
  TANDEM_RETURN_IF_ERROR(CheckModelOffload(c));
  const OptimizerSection& o = c.optimizer;
  if (o.offload == "none" && o.delayed_update) {
    return InvalidArgumentError(
        "optimizer.delayed_update = true delays the CPU update of an offloaded optimizer: set "
        "optimizer.offload = \"host\" or \"nvme\" too");
  }
  if (o.offload == "none") return Status::Ok();
  const std::string what = StrCat("optimizer.offload = \"", o.offload, "\"");
  if (o.offload == "nvme" && o.nvme_path.empty()) {
    return InvalidArgumentError(StrCat(what, " needs optimizer.nvme_path (a directory on the NVMe drive for the ",
                                       "optimizer-state file)"));
  }
  if (c.parallel.dp > 1 || c.parallel.cp > 1 || c.parallel.tp > 1 || c.parallel.zero != 0) {
    return UnimplementedError(StrCat(what, " runs on one rank for now; found parallel.dp = ", c.parallel.dp,
                                     ", parallel.cp = ", c.parallel.cp, ", parallel.tp = ", c.parallel.tp,
                                     ", parallel.zero = ", c.parallel.zero,
                                     " (set optimizer.offload = \"none\" for a mesh)"));
  }
  if (c.peft.method != "none") {
    return UnimplementedError(StrCat(what, " is for full fine-tuning; found peft.method = \"", c.peft.method,
                                     "\" (its adapter state is small: use optimizer.offload = \"none\")"));
  }
  if (!c.snapshot.agent_socket.empty()) {
    return UnimplementedError(StrCat(what, " cannot be combined with in-memory snapshots yet; found ",
                                     "snapshot.agent_socket = \"", c.snapshot.agent_socket,
                                     "\" (universal checkpoints work: train.universal_checkpoints)"));
  }
  return Status::Ok();
}

// [optimizer] bf16 state is for full fine-tuning on one rank with the optimizer on the device.
Status CheckPrecision(const TrainConfig& c) {
  const OptimizerSection& o = c.optimizer;
  if (o.precision == "f32") return Status::Ok();
  const std::string what = StrCat("optimizer.precision = \"", o.precision, "\"");
  if (c.peft.method != "none") {
    return UnimplementedError(
        StrCat(what, " is for full fine-tuning; found peft.method = \"", c.peft.method,
               "\" (an adapter's f32 state is small: use optimizer.precision = \"f32\")"));
  }
  if (o.offload != "none") {
    return UnimplementedError(
        StrCat(what, " keeps the state on the device; found optimizer.offload = \"", o.offload,
               "\" (offload keeps f32 state in host memory or on NVMe)"));
  }
  if (c.parallel.dp > 1 || c.parallel.cp > 1 || c.parallel.tp > 1 || c.parallel.zero != 0) {
    return UnimplementedError(StrCat(
        what, " runs on one rank for now; found parallel.dp = ", c.parallel.dp, ", parallel.cp = ",
        c.parallel.cp, ", parallel.tp = ", c.parallel.tp, ", parallel.zero = ", c.parallel.zero));
  }
  return Status::Ok();
}

}  // namespace

StatusOr<TrainConfig> LoadTrainConfig(const std::string& path, const std::vector<std::string>& overrides) {
  ConfigDoc doc;
  if (!path.empty()) {
    TANDEM_ASSIGN_OR_RETURN(doc, ConfigDoc::FromTomlFile(path));
  }
  for (const std::string& o : overrides) TANDEM_RETURN_IF_ERROR(doc.ApplyOverride(o));
  TrainConfig c;
  TANDEM_RETURN_IF_ERROR(doc.Bind("model", &c.model));
  TANDEM_RETURN_IF_ERROR(doc.Bind("peft", &c.peft));
  TANDEM_RETURN_IF_ERROR(doc.Bind("data", &c.data));
  TANDEM_RETURN_IF_ERROR(doc.Bind("train", &c.train));
  TANDEM_RETURN_IF_ERROR(doc.Bind("parallel", &c.parallel));
  TANDEM_RETURN_IF_ERROR(doc.Bind("snapshot", &c.snapshot));
  TANDEM_RETURN_IF_ERROR(doc.Bind("optimizer", &c.optimizer));
  TANDEM_RETURN_IF_ERROR(doc.CheckNoUnknownKeys());
  if (c.data.dir.empty()) {
    return InvalidArgumentError(StrCat("data.dir is not set", path.empty() ? "" : " in " + path,
                                       ": name a directory of token shards (tandem data prepare)"));
  }
  if (c.model.init == "pretrained" && c.model.path.empty()) {
    return InvalidArgumentError("model.init = \"pretrained\" needs model.path (a HF model directory)");
  }
  if (c.model.num_heads % c.model.num_kv_heads != 0) {
    return InvalidArgumentError(StrCat("model.num_heads (", c.model.num_heads, ") must be a multiple of model.num_kv_heads (",
                                       c.model.num_kv_heads, ")"));
  }
  if (c.model.head_dim == 0 && c.model.hidden_size % c.model.num_heads != 0) {
    return InvalidArgumentError(StrCat("model.hidden_size (", c.model.hidden_size, ") is not a multiple of model.num_heads (",
                                       c.model.num_heads, "); set model.head_dim"));
  }
  if (c.data.seq_len > c.model.max_position_embeddings && c.model.init == "scratch") {
    return InvalidArgumentError(StrCat("data.seq_len (", c.data.seq_len, ") exceeds model.max_position_embeddings (",
                                       c.model.max_position_embeddings, ")"));
  }
  TANDEM_RETURN_IF_ERROR(CheckOffload(c));
  TANDEM_RETURN_IF_ERROR(CheckPrecision(c));
  return c;
}

std::string TrainConfigToToml(const TrainConfig& c) {
  return ToToml("model", c.model) + "\n" + ToToml("peft", c.peft) + "\n" + ToToml("data", c.data) + "\n" + ToToml("train", c.train) + "\n" +
         ToToml("parallel", c.parallel) + "\n" + ToToml("snapshot", c.snapshot) + "\n" +
         ToToml("optimizer", c.optimizer);
}

std::string TrainConfigHelp() {
  return DescribeSection<ModelSection>("model") + "\n" + DescribeSection<PeftSection>("peft") + "\n" +
         DescribeSection<DataSection>("data") + "\n" +
         DescribeSection<TrainSection>("train") + "\n" + DescribeSection<ParallelSection>("parallel") +
         "\n" + DescribeSection<SnapshotSection>("snapshot") + "\n" +
         DescribeSection<OptimizerSection>("optimizer");
}

}  // namespace tandem::trainer

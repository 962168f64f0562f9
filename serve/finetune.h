// Fine-tuning jobs inside `tandem serve` (co-serving): the job description the engine accepts,
// the status it reports, the server options, and the reader of JSONL training files.
//
//   TANDEM_ASSIGN_OR_RETURN(auto examples,
//                           ReadFineTuneFile(path, engine->tokenizer(), &chat_template, 512));
//   FineTuneJobSpec spec{.training_file = path, .adapter = "sql", .examples = examples};
//   TANDEM_ASSIGN_OR_RETURN(FineTuneJobInfo job, engine->CreateFineTuneJob(spec));
//   ... engine->GetFineTuneJob(job.id) until job.status is "succeeded" ...
//   // requests for "sql" now get the newest published version, "sql@2" a given one
//
// The engine trains one job at a time (FIFO) on its own thread, with the tokens each iteration
// leaves over after inference (serve/internal/engine_impl.h). Every publish_every_steps steps and
// at the end of every epoch it writes the adapter to <publish_dir>/<adapter>-v<version> (PEFT
// files) and loads it as "<adapter>@<version>".
//
// These are plain values; thread-safety is that of the Engine methods that hand them out.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/tokenizer.h"

namespace tandem::serve {

class ChatTemplate;

// One training row, tokenized: loss on tokens[loss_from:] (the completion, or the last assistant
// message, plus EOS when the tokenizer has one).
struct FineTuneExample {
  std::vector<int32_t> tokens;
  int64_t loss_from = 0;
};

struct FineTuneHyperparameters {
  int64_t n_epochs = 3;
  int64_t batch_size = 8;       // examples per optimizer step
  double learning_rate = 1e-3;  // AdamW, constant; betas (0.9, 0.999), eps 1e-8, no decay
  int64_t lora_r = 8;
  double lora_alpha = 16;
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};  // or {"all-linear"}
  // method "s2ft" (peft/s2ft.h: o_proj columns of whole kv groups, down_proj columns of FFN
  // channels, the same counts in every layer); lora_r, lora_alpha and target_modules unused.
  double heads_fraction = 0.1;       // of the kv groups per layer, in [0, 1]
  double ffn_fraction = 0.1;         // of the FFN channels per layer, in [0, 1]
  std::string selection = "random";  // or "weight" (largest column norms of the base)
  bool coupled = false;  // also the q/k/v rows of the heads and gate/up rows of the channels
  int64_t publish_every_steps = 0;   // 0: only at the end of each epoch
  uint64_t seed = 0;                 // adapter init (LoRA) or selection (S2FT), and data order
};

struct FineTuneJobSpec {
  std::string training_file;    // where the examples came from (reported, not re-read)
  std::string adapter;          // name the versions are published under
  // "lora", or "s2ft": trained in LoRA form (peft::S2ftAsLora: B = the column block, A one-hot and
  // frozen) through the same multi-adapter kernels, published as S2FT adapter directories.
  std::string method = "lora";
  FineTuneHyperparameters hyper;
  std::vector<FineTuneExample> examples;
};

struct FineTuneJobInfo {
  std::string id;        // "ftjob-<n>"
  std::string status;    // "queued", "running", "succeeded", "failed", "cancelled"
  FineTuneJobSpec spec;  // examples left empty in copies handed out
  int64_t num_examples = 0;
  int64_t created_at = 0;   // unix seconds
  int64_t finished_at = 0;  // 0 while not finished
  int64_t step = 0;         // optimizer steps done
  int64_t total_steps = 0;
  int64_t epoch = 0;                   // epochs completed
  int64_t trained_tokens = 0;          // tokens through forward+backward (padding excluded)
  double loss = 0;                     // mean token loss of the last step
  std::vector<double> step_losses;     // every step's mean loss, in order
  std::vector<std::string> published;  // "<adapter>@<version>", oldest first
  std::string error;                   // when failed
  bool resumed = false;  // unfinished at the last engine's end, picked up at this one's start
};

struct FineTuneOptions {
  // Where published versions are written (<dir>/<adapter>-v<version>); empty: jobs are refused.
  std::string publish_dir;
  // Job state for crash recovery (<dir>/<job>/{job.json, final.json, state}); empty: none kept,
  // and jobs do not survive a restart.
  std::string state_dir;
  // Padded tokens (rows x longest row) of one forward+backward at most; a longer example runs
  // alone.
  int64_t micro_batch_tokens = 1024;
  // While requests are being served, each engine iteration lets the fine-tuning thread enqueue
  // at most this many of a micro-batch's forward/backward units (a block's forward, the MLP or
  // attention half of its backward, or the loss head; a micro-batch has 3 * layers + 1), which
  // run on the GPU beside the next decode steps at a lower stream priority; an idle engine puts
  // no limit. 0: no limit while serving either.
  int64_t busy_units = 1;
  // CUDA only: > 0 sets this many streaming multiprocessors apart (a green context, rounded up
  // to the device's granularity) on which fine-tuning kernels run while requests are being
  // served, so that decode kernels never wait for its thread blocks on the others; an idle
  // engine runs them on the whole device. Combine with busy_units 0 to let fine-tuning fill its
  // partition. 0: none. The results do not depend on where the kernels ran.
  int64_t busy_sms = 0;
  int64_t snapshot_every_steps = 10;  // and at every publication and when a job ends
};

// Reads a JSONL file of {"prompt": ..., "completion": ...} or {"messages": [...]} rows (the
// latter rendered with `chat_template`, loss on the last message, which must be the assistant's;
// refused when chat_template is null). Tokens: BOS (when the tokenizer has one), prompt,
// completion, EOS. Errors (InvalidArgument) name the file and line; rows longer than
// max_tokens (> 0) are errors; NotFound when the file cannot be opened.
StatusOr<std::vector<FineTuneExample>> ReadFineTuneFile(const std::string& path,
                                                        const model::Tokenizer& tokenizer,
                                                        const ChatTemplate* chat_template,
                                                        int64_t max_tokens);

}  // namespace tandem::serve

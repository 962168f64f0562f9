// The fine-tuning endpoints of `tandem serve` (private to serve/http_server.cc), modelled on
// OpenAI's fine-tuning API:
//   POST /v1/fine_tuning/jobs              create (body: see ParseFineTuneBody)
//   GET  /v1/fine_tuning/jobs              list, newest first
//   GET  /v1/fine_tuning/jobs/{id}         one job
//   POST /v1/fine_tuning/jobs/{id}/cancel  cancel
// Job objects: OpenAI's "fine_tuning.job" fields plus tandem's step, total_steps, epoch, loss,
// published_versions, num_examples and resumed.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/internal/http_lib.h"
#include "serve/internal/openai_protocol.h"

namespace tandem::serve::internal {

struct FineTuneHttpContext {
  Engine* engine = nullptr;
  std::vector<std::string> finetune_dirs;  // training files must resolve inside one of these
  const ChatTemplate* chat_template = nullptr;
};

// Parses a create body into spec (without examples): "training_file", "suffix" or "adapter",
// optional "model" (must be the base model), "method": {"type": "lora"|"s2ft", "<type>":
// {"hyperparameters": {...}}}, and hyperparameters at the top level or in "hyperparameters"
// (n_epochs, batch_size, learning_rate: an integer/number or "auto"; lora_r, lora_alpha,
// target_modules, publish_every_steps, seed). Unknown keys are errors.
std::optional<ApiError> ParseFineTuneBody(const std::string& body, const std::string& base_model,
                                          FineTuneJobSpec* spec);
nlohmann::json FineTuneJobJson(const FineTuneJobInfo& job, const std::string& base_model);

void HandleCreateFineTuneJob(const FineTuneHttpContext& ctx, const httplib::Request& req,
                             httplib::Response* res);
void HandleListFineTuneJobs(const FineTuneHttpContext& ctx, httplib::Response* res);
void HandleGetFineTuneJob(const FineTuneHttpContext& ctx, const std::string& id,
                          httplib::Response* res);
void HandleCancelFineTuneJob(const FineTuneHttpContext& ctx, const std::string& id,
                             httplib::Response* res);

}  // namespace tandem::serve::internal

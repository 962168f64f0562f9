#include "serve/metrics.h"

#include <cstdio>
#include <utility>

namespace tandem::serve {
namespace {

// Shortest text that reads back as the same double ("0.005", "1", "2.5").
std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  for (int precision = 1; precision <= 17; ++precision) {
    char shorter[32];
    std::snprintf(shorter, sizeof(shorter), "%.*g", precision, v);
    if (std::stod(shorter) == v) return shorter;
  }
  return buf;
}

void Gauge(const char* name, const char* help, const char* type, int64_t value, std::string* out) {
  *out += StrCat("# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n", name, " ", value,
                 "\n");
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += value;
  ++count_;
}

int64_t Histogram::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return count_;
}

void Histogram::AppendText(const std::string& name, const std::string& help,
                           std::string* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  *out += StrCat("# HELP ", name, " ", help, "\n# TYPE ", name, " histogram\n");
  int64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < bounds_.size() ? Num(bounds_[i]) : "+Inf";
    *out += StrCat(name, "_bucket{le=\"", le, "\"} ", cumulative, "\n");
  }
  *out += StrCat(name, "_sum ", Num(sum_), "\n", name, "_count ", count_, "\n");
}

ServerMetrics::ServerMetrics()
    : ttft_({0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      tpot_({0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1}) {}

void ServerMetrics::CountResponse(int http_status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++responses_by_status_[http_status];
}

std::string ServerMetrics::Render(const EngineStats& s) const {
  std::string out;
  ttft_.AppendText("tandem_time_to_first_token_seconds",
                   "Time from request arrival to the first generated token.", &out);
  tpot_.AppendText("tandem_time_per_output_token_seconds",
                   "Mean time per generated token after the first, per request.", &out);
  Gauge("tandem_requests_waiting", "Requests queued, not yet admitted.", "gauge", s.waiting, &out);
  Gauge("tandem_requests_running", "Requests in the running batch.", "gauge", s.running, &out);
  out +=
      "# HELP tandem_pool_pages Pages of the unified pool by use.\n"
      "# TYPE tandem_pool_pages gauge\n";
  out += StrCat("tandem_pool_pages{use=\"kv\"} ", s.pool_pages_kv, "\n");
  out += StrCat("tandem_pool_pages{use=\"adapter\"} ", s.pool_pages_adapter, "\n");
  out += StrCat("tandem_pool_pages{use=\"total\"} ", s.pool_pages_total, "\n");
  Gauge("tandem_adapter_loads_total", "Adapter loads into the pool since start.", "counter",
        s.adapter_loads, &out);
  Gauge("tandem_preemptions_total", "Requests preempted (recomputed) since start.", "counter",
        s.preemptions, &out);
  Gauge("tandem_decode_graph_captures_total", "Decode step shapes captured as CUDA graphs.",
        "counter", s.decode_graph_captures, &out);
  Gauge("tandem_decode_graph_replays_total", "Decode steps run as a CUDA graph replay.", "counter",
        s.decode_graph_replays, &out);
  Gauge("tandem_generated_tokens_total", "Tokens generated since start.", "counter",
        s.generated_tokens, &out);
  Gauge("tandem_prompt_tokens_total", "Prompt tokens processed since start.", "counter",
        s.prompt_tokens, &out);
  Gauge("tandem_finetune_tokens_total", "Fine-tuning tokens through forward+backward since start.",
        "counter", s.finetune_tokens, &out);
  Gauge("tandem_finetune_steps_total", "Fine-tuning optimizer steps since start.", "counter",
        s.finetune_steps, &out);
  Gauge("tandem_finetune_jobs_running", "Fine-tuning jobs being trained.", "gauge",
        s.finetune_jobs_running, &out);
  out += StrCat("# HELP tandem_finetune_loss Mean token loss of the last fine-tuning step.\n",
                "# TYPE tandem_finetune_loss gauge\n", "tandem_finetune_loss ", s.finetune_loss,
                "\n");
  out +=
      "# HELP tandem_http_requests_total HTTP responses by status code.\n"
      "# TYPE tandem_http_requests_total counter\n";
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [status, n] : responses_by_status_) {
    out += StrCat("tandem_http_requests_total{status=\"", status, "\"} ", n, "\n");
  }
  return out;
}

}  // namespace tandem::serve

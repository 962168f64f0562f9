#include "trainer/metrics.h"

#include <cmath>
#include <nlohmann/json.hpp>

namespace tandem::trainer {

double FlopsPerToken(const model::LlamaConfig& c, int64_t seq_len, bool frozen_base) {
  const double n = static_cast<double>(c.NumParameters()) -
                   static_cast<double>(c.vocab_size) * static_cast<double>(c.hidden_size) +
                   (c.tie_word_embeddings ? static_cast<double>(c.vocab_size) * c.hidden_size : 0.0);
  const double attn = 6.0 * c.num_hidden_layers * c.hidden_size * static_cast<double>(seq_len);
  return (frozen_base ? 4.0 : 6.0) * n + attn;
}

double PeakFlopsForDevice(const std::string& name) {
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) return 989e12;
  if (name.find("A100") != std::string::npos) return 312e12;
  return 0;
}

StatusOr<MetricsWriter> MetricsWriter::Open(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) return NotFoundError(StrCat("cannot open metrics file ", path, " for append"));
  return MetricsWriter(f, path);
}

MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

Status MetricsWriter::Write(const StepMetrics& m) {
  nlohmann::json j = {{"step", m.step},
                      {"loss", m.loss},
                      {"lr", m.lr},
                      {"grad_norm", m.grad_norm},
                      {"tokens", m.tokens},
                      {"step_s", m.step_s},
                      {"tokens_per_s", m.tokens_per_s},
                      {"mem_gib", m.mem_gib},
                      {"elapsed_s", m.elapsed_s}};
  if (m.mfu >= 0) j["mfu"] = m.mfu;
  if (m.eval_loss) j["eval_loss"] = *m.eval_loss;
  if (m.eval_accuracy) j["eval_accuracy"] = *m.eval_accuracy;
  const std::string line = j.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    return InternalError(StrCat("writing ", path_, " failed"));
  }
  return Status::Ok();
}

std::string FormatDuration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(t / 3600), static_cast<long long>(t % 3600 / 60));
  } else if (t >= 60) {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", static_cast<long long>(t / 60), static_cast<long long>(t % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%llds", static_cast<long long>(t));
  }
  return buf;
}

namespace {
std::string HumanCount(double x) {
  char buf[32];
  if (x >= 1e6) std::snprintf(buf, sizeof(buf), "%.2fM", x / 1e6);
  else if (x >= 1e3) std::snprintf(buf, sizeof(buf), "%.1fK", x / 1e3);
  else std::snprintf(buf, sizeof(buf), "%.0f", x);
  return buf;
}
}  // namespace

std::string FormatProgressLine(const StepMetrics& m, bool bar) {
  const int width = static_cast<int>(std::to_string(m.total_steps).size());
  char head[64];
  std::snprintf(head, sizeof(head), "step %*lld/%lld", width, static_cast<long long>(m.step),
                static_cast<long long>(m.total_steps));
  std::string out = head;
  if (bar) {
    const int cells = 20;
    const int done = m.total_steps > 0 ? static_cast<int>(cells * m.step / m.total_steps) : 0;
    out += " [" + std::string(done, '=') + (done < cells ? ">" : "") +
           std::string(std::max(0, cells - done - 1), ' ') + "]";
  }
  char rest[256];
  std::snprintf(rest, sizeof(rest), " loss %.4f | lr %.2e | gnorm %.3f | %s tok/s", m.loss, m.lr, m.grad_norm,
                HumanCount(m.tokens_per_s).c_str());
  out += rest;
  if (m.mfu >= 0) {
    std::snprintf(rest, sizeof(rest), " | MFU %.1f%%", 100.0 * m.mfu);
    out += rest;
  }
  std::snprintf(rest, sizeof(rest), " | mem %.2f GiB | ETA %s", m.mem_gib, FormatDuration(m.eta_s).c_str());
  out += rest;
  if (m.eval_loss) {
    std::snprintf(rest, sizeof(rest), " | eval %.4f", *m.eval_loss);
    out += rest;
  }
  return out;
}

}  // namespace tandem::trainer

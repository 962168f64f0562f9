// ServerMetrics: what `GET /metrics` reports, in the Prometheus text format (version 0.0.4).
//
// The HTTP layer records time to first token (TTFT), time per output token after the first
// (TPOT) and a count of responses by HTTP status; the engine's gauges (queue length, running
// requests, pool pages by use, adapter loads) are read from EngineStats when rendering.
//
//   metrics.ObserveTtft(0.12);
//   std::string text = metrics.Render(engine->Stats());
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "serve/engine.h"

namespace tandem::serve {

// A cumulative histogram with fixed upper bounds (seconds), as Prometheus expects.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);
  // Appends `# HELP`, `# TYPE`, the _bucket lines (le="...", then "+Inf"), _sum and _count.
  void AppendText(const std::string& name, const std::string& help, std::string* out) const;
  int64_t count() const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // per bucket, not cumulative; last is +Inf
  double sum_ = 0;
  int64_t count_ = 0;
};

class ServerMetrics {
 public:
  ServerMetrics();
  void ObserveTtft(double seconds) { ttft_.Observe(seconds); }
  void ObserveTpot(double seconds) { tpot_.Observe(seconds); }
  void CountResponse(int http_status);
  std::string Render(const EngineStats& stats) const;

 private:
  Histogram ttft_;
  Histogram tpot_;
  mutable std::mutex mu_;
  std::map<int, int64_t> responses_by_status_;
};

}  // namespace tandem::serve

// Serving benchmark: S-LoRA's synthetic workload replayed against the engine (serve/engine.h).
//
//   tandem-serve_bench [--model-dir DIR | --layers 22 --hidden 2048 --inter 5632 --vocab 32000
//                       --heads 32 --kv-heads 4] [--adapters 16] [--rank 16] [--requests 256]
//                      [--rate 8] [--cv 1] [--alpha 1] [--min-len 8] [--max-len 512]
//                      [--device auto] [--pool-gb 0] [--max-batch-tokens 2048]
//                      [--progress-s 10] [--timeout-s 600] [--targets q_proj,k_proj,v_proj,o_proj]
//                      [--warmup-requests 0] [--cuda-graphs 1]
//
// Without --model-dir a random model of the given shape is saved (bf16) to a temporary directory.
// N random rank-r LoRA adapters on --targets (comma-separated, or all-linear; nonzero B) are
// written once and registered under N
// names (each name is a separate adapter to the engine: its own pool pages and loads). Requests:
// adapter chosen by a power law (probability of the i-th adapter ~ 1 / (i + 1)^alpha), arrivals
// with gamma-distributed gaps (mean 1 / rate, coefficient of variation cv), prompt and output
// lengths uniform in [min-len, max-len] (random token ids; EOS ignored). --adapters 0 runs the base
// model alone. Prints one JSON object: requests/s, generated tokens/s, TTFT and TPOT p50/p99,
// engine iterations and their mean wall time. While it waits it prints the engine's state to
// stderr every --progress-s seconds; past --timeout-s it prints {"timed_out": true, ...} and exits
// with status 2 (a stalled engine is diagnosed, not waited for).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>

#include "bench/bench_workload.h"
#include "core/version.h"
#include "serve/engine.h"

namespace {

using namespace tandem;
using bench::Args;
using bench::Percentile;
using Clock = std::chrono::steady_clock;

struct Timing {
  Clock::time_point submit, first, last;
  int64_t tokens = 0;
  bool done = false;
};

void Fail(const Status& s) {
  std::fprintf(stderr, "serve_bench: %s\n", s.ToString().c_str());
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = bench::ParseArgs(argc, argv);
  const std::string tmp =
      (std::filesystem::temp_directory_path() / ("serve_bench_" + std::to_string(getpid())))
          .string();
  model::LlamaConfig config;
  StatusOr<std::string> model_dir = bench::PrepareModel(a, tmp, &config);
  if (!model_dir.ok()) Fail(model_dir.status());
  const int64_t num_adapters = a.Int("adapters", 16);
  serve::EngineOptions eo;
  eo.model_dir = *model_dir;
  eo.device = a.Get("device", "auto");
  eo.pool_bytes = static_cast<int64_t>(a.Num("pool-gb", 0) * (1 << 30));
  eo.max_batch_tokens = a.Int("max-batch-tokens", 2048);
  eo.cuda_graphs = a.Int("cuda-graphs", 1) != 0;
  eo.max_waiting = 1 << 20;
  if (Status s = bench::AddRandomAdapters(a, config, tmp, &eo); !s.ok()) Fail(s);
  auto engine_or = serve::Engine::Create(eo);
  if (!engine_or.ok()) Fail(engine_or.status());
  std::unique_ptr<serve::Engine> engine = std::move(engine_or).value();

  // The workload.
  const int64_t n = a.Int("requests", 256), lo = a.Int("min-len", 8), hi = a.Int("max-len", 512);
  const double rate = a.Num("rate", 8), cv = a.Num("cv", 1), alpha = a.Num("alpha", 1);
  std::mt19937_64 rng(1234);
  std::gamma_distribution<double> gap(1.0 / (cv * cv), cv * cv / rate);
  std::uniform_int_distribution<int64_t> len(lo, hi);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(config.vocab_size) - 1);
  std::vector<double> weights;
  for (int64_t i = 0; i < num_adapters; ++i) weights.push_back(1.0 / std::pow(i + 1.0, alpha));
  std::discrete_distribution<int64_t> pick(weights.begin(), weights.end());
  std::vector<Timing> t(n);
  std::mutex mu;
  std::condition_variable cv_done;
  int64_t finished = 0;
  // --warmup-requests W: W short requests (16 prompt tokens, 4 new; adapters in turn) run to the
  // end before the clock starts, so adapters are resident and first-use costs are paid (as the
  // PEFT baseline's warm-up generate does). The reported iteration counts exclude them.
  const int64_t warmup = a.Int("warmup-requests", 0);
  for (int64_t i = 0; i < warmup; ++i) {
    serve::GenerationRequest r;
    r.model =
        num_adapters > 0 ? "lora" + std::to_string(i % num_adapters) : engine->base_model_name();
    r.prompt_tokens.resize(16);
    for (int32_t& id : r.prompt_tokens) id = tok(rng);
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = 4;
    r.sampling.ignore_eos = true;
    auto id = engine->Submit(std::move(r), [&](const serve::TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (e.finished && ++finished == warmup) cv_done.notify_all();
    });
    if (!id.ok()) Fail(id.status());
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv_done.wait(lock, [&] { return finished >= warmup; });
    finished = 0;
  }
  const serve::EngineStats before = engine->Stats();
  const Clock::time_point start = Clock::now();
  double at = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    at += gap(rng);
    serve::GenerationRequest r;
    r.model = num_adapters > 0 ? "lora" + std::to_string(pick(rng)) : engine->base_model_name();
    r.prompt_tokens.resize(len(rng));
    for (int32_t& id : r.prompt_tokens) id = tok(rng);
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = static_cast<int>(len(rng));
    r.sampling.ignore_eos = true;
    std::this_thread::sleep_until(start + std::chrono::duration<double>(at));
    t[i].submit = Clock::now();
    auto id = engine->Submit(std::move(r), [&, i](const serve::TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      const Clock::time_point now = Clock::now();
      if (e.has_token && t[i].tokens++ == 0) t[i].first = now;
      t[i].last = now;
      if (e.finished && !t[i].done) {  // a second final event (an engine bug) counts once
        t[i].done = true;
        ++finished;
        cv_done.notify_all();
      }
    });
    if (!id.ok()) Fail(id.status());
  }
  // Wait, printing the engine's state every --progress-s seconds to stderr; past --timeout-s the
  // run is reported as timed out (with the last state) instead of hanging.
  const double progress_s = a.Num("progress-s", 10), timeout_s = a.Num("timeout-s", 600);
  bool timed_out = false;
  {
    std::unique_lock<std::mutex> lock(mu);
    const auto every = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(progress_s));
    Clock::time_point next = Clock::now() + every;
    while (!cv_done.wait_until(lock, next, [&] { return finished == n; })) {
      next += every;
      const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      const serve::EngineStats st = engine->Stats();
      std::fprintf(stderr,
                   "serve_bench: %.0f s: %ld/%ld finished, engine waiting %ld running %ld, pool "
                   "pages kv %ld adapter %ld of %ld, adapter loads %ld, LoRA table builds %ld, "
                   "preemptions %ld, generated %ld, iterations %ld (%.2f ms each)\n",
                   elapsed, static_cast<long>(finished), static_cast<long>(n),
                   static_cast<long>(st.waiting), static_cast<long>(st.running),
                   static_cast<long>(st.pool_pages_kv), static_cast<long>(st.pool_pages_adapter),
                   static_cast<long>(st.pool_pages_total), static_cast<long>(st.adapter_loads),
                   static_cast<long>(st.lora_table_builds), static_cast<long>(st.preemptions),
                   static_cast<long>(st.generated_tokens), static_cast<long>(st.iterations),
                   st.iterations > 0 ? 1e3 * st.batch_seconds / st.iterations : 0.0);
      if (elapsed > timeout_s) {
        timed_out = true;
        break;
      }
    }
  }
  if (timed_out) {  // the engine thread may be stuck: report and leave without joining it
    std::printf("{\"bench\":\"serve\",\"timed_out\":true,\"finished\":%ld,\"requests\":%ld}\n",
                static_cast<long>(finished), static_cast<long>(n));
    std::fflush(stdout);
    std::filesystem::remove_all(tmp);
    std::_Exit(2);
  }
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> ttft, tpot;
  int64_t generated = 0;
  for (const Timing& x : t) {
    generated += x.tokens;
    if (x.tokens > 0) ttft.push_back(std::chrono::duration<double>(x.first - x.submit).count());
    if (x.tokens > 1) {
      tpot.push_back(std::chrono::duration<double>(x.last - x.first).count() / (x.tokens - 1));
    }
  }
  serve::EngineStats st = engine->Stats();
  st.iterations -= before.iterations;
  st.batch_seconds -= before.batch_seconds;
  st.decode_graph_captures -= before.decode_graph_captures;
  st.decode_graph_replays -= before.decode_graph_replays;
  engine->Shutdown();
  std::filesystem::remove_all(tmp);
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  nlohmann::json j = {
      {"bench", "serve"},
      {"device", eo.device},
      {"layers", config.num_hidden_layers},
      {"hidden", config.hidden_size},
      {"adapters", num_adapters},
      {"rank", a.Int("rank", 16)},
      {"targets", a.Get("targets", "q_proj,k_proj,v_proj,o_proj")},
      {"warmup_requests", warmup},
      {"requests", n},
      {"rate", rate},
      {"cv", cv},
      {"alpha", alpha},
      {"len", {lo, hi}},
      {"wall_s", wall},
      {"requests_per_s", n / wall},
      {"generated_tokens_per_s", generated / wall},
      {"ttft_p50_s", Percentile(ttft, 0.5)},
      {"ttft_p99_s", Percentile(ttft, 0.99)},
      {"tpot_p50_s", Percentile(tpot, 0.5)},
      {"tpot_p99_s", Percentile(tpot, 0.99)},
      {"preemptions", st.preemptions},
      {"iterations", st.iterations},
      {"ms_per_iteration", st.iterations > 0 ? 1e3 * st.batch_seconds / st.iterations : 0.0},
      {"adapter_loads", st.adapter_loads},
      {"lora_table_builds", st.lora_table_builds},
      {"decode_graph_captures", st.decode_graph_captures},
      {"decode_graph_replays", st.decode_graph_replays},
      {"commit", GitCommit()},
      {"date", date}};
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

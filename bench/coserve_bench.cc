// Co-serving benchmark (issue #11): inference latency with and without a LoRA fine-tuning job
// training inside the same engine (serve/finetune.h), and the fine-tuning throughput it keeps.
//
//   tandem-coserve_bench [--model-dir DIR | --layers 22 --hidden 2048 --inter 5632 --vocab 32000
//                         --heads 32 --kv-heads 4] [--adapters 1] [--rank 16] [--rates 2,4,8]
//                        [--requests 64 | --trace-s S] [--cv 1] [--alpha 1] [--min-len 8]
//                        [--max-len 128] [--seed 1234] [--device auto] [--pool-gb 0]
//                        [--max-batch-tokens 2048]
//                        [--ft-rank 8] [--ft-alpha 16] [--ft-targets q_proj,v_proj]
//                        [--ft-lr 1e-4] [--ft-batch 8] [--ft-seq-len 256] [--ft-examples 4096]
//                        [--ft-micro-tokens 1024] [--ft-busy-units 1] [--ft-busy-sms 0]
//                        [--ft-seconds 15] [--ft-steps 0]
//                        [--progress-s 10] [--timeout-s 600]
//
// Model and inference adapters as tandem-serve_bench (bench/bench_workload.h). The fine-tuning
// data is a JSONL file of random lowercase words ({"prompt", "completion"}, a quarter prompt),
// --ft-seq-len tokens a row with the byte tokenizer (fewer with a real one), read back with
// serve::ReadFineTuneFile. Phases, one Engine each, in this order:
//   finetune_alone  a job (rank/alpha/targets/lr/batch from --ft-*) trains with no inference:
//                   after its first optimizer step (warm-up), tokens/s over --ft-seconds (or
//                   --ft-steps steps, whichever comes first).
//   serve_alone     per rate in --rates: --requests requests, or with --trace-s S about S
//                   seconds of arrivals (rate x S requests, at least 8) (serve_bench's S-LoRA
//                   workload, one seeded trace per rate) -> TTFT/TPOT p50/p99, generated tokens/s,
//                   the fraction of the window the engine spent in inference batches
//                   (busy_fraction).
//   serve_with_job  the same trace with a job training (started and warmed up before the first
//                   arrival) -> the same latencies, their p99 ratios to serve_alone, and the job's
//                   tokens/s over the trace's window and its ratio to finetune_alone (ft_ratio).
// Every engine first serves one short warm-up request on the base model (except finetune_alone).
// One JSON line per phase, then a summary line. Exit status: 0; 1 when a request failed, a job
// failed, or a job trained no tokens in a serve_with_job window; 2 on --timeout-s (per phase).
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_workload.h"
#include "core/version.h"
#include "serve/engine.h"
#include "serve/finetune.h"

namespace {

using namespace tandem;
using bench::Args;
using bench::Percentile;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// What every phase shares.
struct Bench {
  Args args;
  std::string tmp;
  model::LlamaConfig config;
  serve::EngineOptions options;  // without the fine-tuning publish dir
  std::vector<serve::FineTuneExample> examples;
  int engines = 0;  // engines made so far (each gets its own publish dir)
  double progress_s = 10, timeout_s = 600;
};

// Prints the error, removes the temporary directory and exits 1 (engine threads die with the
// process).
[[noreturn]] void Fail(const Bench& b, const Status& s) {
  std::fprintf(stderr, "coserve_bench: %s\n", s.ToString().c_str());
  std::fflush(stdout);
  std::filesystem::remove_all(b.tmp);
  std::_Exit(1);
}

[[noreturn]] void TimedOut(const Bench& b, const std::string& phase, double rate,
                           const std::string& what) {
  const json j = {{"bench", "coserve"}, {"phase", phase}, {"rate", rate}, {"timed_out", true}};
  std::printf("%s\n", j.dump().c_str());
  std::fprintf(stderr, "coserve_bench: %s: timed out waiting for %s\n", phase.c_str(),
               what.c_str());
  std::fflush(stdout);
  std::filesystem::remove_all(b.tmp);
  std::_Exit(2);  // the engine thread may be stuck: leave without joining it
}

std::unique_ptr<serve::Engine> MakeEngine(Bench& b) {
  serve::EngineOptions eo = b.options;
  eo.finetune.publish_dir = b.tmp + "/published" + std::to_string(b.engines++);
  eo.finetune.micro_batch_tokens =
      b.args.Int("ft-micro-tokens", serve::FineTuneOptions{}.micro_batch_tokens);
  eo.finetune.busy_units = b.args.Int("ft-busy-units", 1);
  eo.finetune.busy_sms = b.args.Int("ft-busy-sms", 0);
  auto engine = serve::Engine::Create(eo);
  if (!engine.ok()) Fail(b, engine.status());
  return std::move(engine).value();
}

// Random lowercase words, exactly n characters.
std::string Words(std::mt19937_64& rng, int64_t n) {
  std::uniform_int_distribution<int> letter('a', 'z'), word_len(2, 7);
  std::string s;
  while (static_cast<int64_t>(s.size()) < n) {
    if (!s.empty()) s += ' ';
    for (int i = word_len(rng); i > 0; --i) s += static_cast<char>(letter(rng));
  }
  s.resize(n);
  return s;
}

// Writes the JSONL training file and reads it back with the engine's tokenizer.
std::vector<serve::FineTuneExample> MakeExamples(const Bench& b, const serve::Engine& engine) {
  const int64_t seq = b.args.Int("ft-seq-len", 256), n = b.args.Int("ft-examples", 4096);
  if (seq < 4 || n < 1)
    Fail(b, InvalidArgumentError("--ft-seq-len must be >= 4, --ft-examples >= 1"));
  std::filesystem::create_directories(b.tmp + "/data");
  const std::string path = b.tmp + "/data/train.jsonl";
  {
    std::ofstream out(path);
    std::mt19937_64 rng(b.args.Int("seed", 1234) + 1);
    const int64_t chars = seq - 2, prompt = std::max<int64_t>(1, chars / 4);  // BOS and EOS
    for (int64_t i = 0; i < n; ++i) {
      const std::string text = Words(rng, chars);
      out << json{{"prompt", text.substr(0, prompt)}, {"completion", text.substr(prompt)}}.dump()
          << "\n";
    }
    if (!out) Fail(b, InternalError("cannot write " + path));
  }
  auto examples = serve::ReadFineTuneFile(path, engine.tokenizer(), nullptr, 0);
  if (!examples.ok()) Fail(b, examples.status());
  return std::move(examples).value();
}

std::string StartJob(const Bench& b, serve::Engine& engine) {
  serve::FineTuneJobSpec spec;
  spec.training_file = b.tmp + "/data/train.jsonl";
  spec.adapter = "ft";
  spec.examples = b.examples;
  serve::FineTuneHyperparameters& h = spec.hyper;
  h.n_epochs = 1000000;  // never ends by itself: cancelled after the measurement
  h.batch_size = b.args.Int("ft-batch", 8);
  h.learning_rate = b.args.Num("ft-lr", 1e-4);
  h.lora_r = b.args.Int("ft-rank", 8);
  h.lora_alpha = b.args.Num("ft-alpha", 2.0 * h.lora_r);
  h.target_modules = Split(b.args.Get("ft-targets", "q_proj,v_proj"));
  h.seed = 1;
  auto job = engine.CreateFineTuneJob(std::move(spec));
  if (!job.ok()) Fail(b, job.status());
  return job->id;
}

// The job's state; a failed job ends the run.
serve::FineTuneJobInfo CheckJob(const Bench& b, const serve::Engine& engine,
                                const std::string& id) {
  auto job = engine.GetFineTuneJob(id);
  if (!job.ok()) Fail(b, job.status());
  if (job->status == "failed") Fail(b, InternalError("fine-tuning job failed: " + job->error));
  return *job;
}

// Waits for the job's first optimizer step (allocations and first-call costs out of the window).
void WaitWarm(const Bench& b, const serve::Engine& engine, const std::string& id,
              const std::string& phase, double rate) {
  const Clock::time_point start = Clock::now();
  while (CheckJob(b, engine, id).step < 1) {
    if (Since(start) > b.timeout_s) TimedOut(b, phase, rate, "the job's first step");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// One short greedy request on the base model, waited for.
void Warmup(const Bench& b, serve::Engine& engine, const std::string& phase, double rate) {
  serve::GenerationRequest r;
  r.model = engine.base_model_name();
  for (int32_t i = 0; i < 16; ++i) r.prompt_tokens.push_back(i % b.config.vocab_size);
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = 4;
  r.sampling.ignore_eos = true;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::string error;
  auto id = engine.Submit(std::move(r), [&](const serve::TokenEvent& e) {
    if (!e.finished) return;
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    if (e.finish_reason != "length") error = e.finish_reason + " " + e.error;
    cv.notify_all();
  });
  if (!id.ok()) Fail(b, id.status());
  std::unique_lock<std::mutex> lock(mu);
  const auto limit = std::chrono::duration<double>(b.timeout_s);
  if (!cv.wait_for(lock, limit, [&] { return done; })) TimedOut(b, phase, rate, "the warm-up");
  if (!error.empty()) Fail(b, InternalError("warm-up request: " + error));
}

struct TraceRequest {
  double at_s = 0;  // arrival, from the first one's
  std::string model;
  std::vector<int32_t> prompt;
  int max_tokens = 0;
};

// serve_bench's workload at `rate`, from --seed: gamma gaps, power-law adapters, uniform lengths.
std::vector<TraceRequest> MakeTrace(const Bench& b, double rate, const std::string& base) {
  const Args& a = b.args;
  const int64_t lo = a.Int("min-len", 8), hi = a.Int("max-len", 128);
  const double trace_s = a.Num("trace-s", 0);  // > 0: about trace_s seconds of arrivals
  const int64_t n =
      trace_s > 0 ? std::max<int64_t>(8, std::llround(rate * trace_s)) : a.Int("requests", 64);
  const int64_t num_adapters = a.Int("adapters", 1);
  const double cv = a.Num("cv", 1), alpha = a.Num("alpha", 1);
  std::mt19937_64 rng(a.Int("seed", 1234));
  std::gamma_distribution<double> gap(1.0 / (cv * cv), cv * cv / rate);
  std::uniform_int_distribution<int64_t> len(lo, hi);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(b.config.vocab_size) - 1);
  std::vector<double> weights;
  for (int64_t i = 0; i < num_adapters; ++i) weights.push_back(1.0 / std::pow(i + 1.0, alpha));
  std::discrete_distribution<int64_t> pick(weights.begin(), weights.end());
  std::vector<TraceRequest> trace(n);
  double at = 0.0, first = -1;
  for (TraceRequest& r : trace) {
    at += gap(rng);
    if (first < 0) first = at;
    r.at_s = at - first;  // the first request arrives as the window opens
    r.model = num_adapters > 0 ? "lora" + std::to_string(pick(rng)) : base;
    r.prompt.resize(len(rng));
    for (int32_t& id : r.prompt) id = tok(rng);
    r.max_tokens = static_cast<int>(len(rng));
  }
  return trace;
}

struct TraceResult {
  double wall_s = 0;
  std::vector<double> ttft, tpot;  // seconds, per request with >= 1 (>= 2) tokens
  int64_t submitted = 0, generated = 0, failed = 0;
};

struct Timing {
  Clock::time_point submit, first, last;
  int64_t tokens = 0;
  bool done = false, failed = false;
};

void PrintProgress(const serve::Engine& engine, const std::string& phase, double elapsed,
                   int64_t finished, int64_t n) {
  const serve::EngineStats st = engine.Stats();
  std::fprintf(stderr,
               "coserve_bench %s: %.0f s: %ld/%ld finished, waiting %ld running %ld, "
               "preemptions %ld, generated %ld, iterations %ld (%.2f ms each), fine-tuning "
               "tokens %ld steps %ld\n",
               phase.c_str(), elapsed, static_cast<long>(finished), static_cast<long>(n),
               static_cast<long>(st.waiting), static_cast<long>(st.running),
               static_cast<long>(st.preemptions), static_cast<long>(st.generated_tokens),
               static_cast<long>(st.iterations),
               st.iterations > 0 ? 1e3 * st.batch_seconds / st.iterations : 0.0,
               static_cast<long>(st.finetune_tokens), static_cast<long>(st.finetune_steps));
}

TraceResult Summarize(const std::vector<Timing>& timings, double wall_s) {
  TraceResult out;
  out.wall_s = wall_s;
  out.submitted = static_cast<int64_t>(timings.size());
  for (const Timing& x : timings) {
    out.generated += x.tokens;
    out.failed += x.failed;
    if (x.tokens > 0) out.ttft.push_back(std::chrono::duration<double>(x.first - x.submit).count());
    if (x.tokens > 1) {
      out.tpot.push_back(std::chrono::duration<double>(x.last - x.first).count() / (x.tokens - 1));
    }
  }
  return out;
}

// Replays the trace in real time and waits for every request (printing progress).
TraceResult RunTrace(const Bench& b, serve::Engine& engine, const std::vector<TraceRequest>& trace,
                     const std::string& phase, double rate) {
  const int64_t n = static_cast<int64_t>(trace.size());
  std::vector<Timing> t(n);
  std::mutex mu;
  std::condition_variable cv_done;
  int64_t finished = 0;
  const Clock::time_point start = Clock::now();
  for (int64_t i = 0; i < n; ++i) {
    serve::GenerationRequest r;
    r.model = trace[i].model;
    r.prompt_tokens = trace[i].prompt;
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = trace[i].max_tokens;
    r.sampling.ignore_eos = true;
    std::this_thread::sleep_until(start + std::chrono::duration<double>(trace[i].at_s));
    t[i].submit = Clock::now();
    auto id = engine.Submit(std::move(r), [&, i](const serve::TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      const Clock::time_point now = Clock::now();
      if (e.has_token && t[i].tokens++ == 0) t[i].first = now;
      t[i].last = now;
      if (e.finished && !t[i].done) {
        t[i].done = true;
        t[i].failed = e.finish_reason != "length" && e.finish_reason != "stop";
        if (t[i].failed)
          std::fprintf(stderr, "coserve_bench: request %ld: %s %s\n", static_cast<long>(i),
                       e.finish_reason.c_str(), e.error.c_str());
        ++finished;
        cv_done.notify_all();
      }
    });
    if (!id.ok()) {
      std::fprintf(stderr, "coserve_bench: submit %ld: %s\n", static_cast<long>(i),
                   id.status().ToString().c_str());
      std::lock_guard<std::mutex> lock(mu);
      t[i].done = t[i].failed = true;
      ++finished;
    }
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    const auto every =
        std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(b.progress_s));
    Clock::time_point next = Clock::now() + every;
    while (!cv_done.wait_until(lock, next, [&] { return finished == n; })) {
      next += every;
      PrintProgress(engine, phase, Since(start), finished, n);
      if (Since(start) > b.timeout_s) TimedOut(b, phase, rate, "requests");
    }
  }
  return Summarize(t, Since(start));
}

struct Phase {
  std::string name;
  double rate = 0;
  TraceResult trace;
  serve::EngineStats before, after;  // around the measured window
  double window_s = 0;
  int64_t publications = 0;  // adapter versions the job published (epoch ends)
  bool has_job = false;
  double ft_tokens_per_s() const {
    return window_s > 0 ? (after.finetune_tokens - before.finetune_tokens) / window_s : 0.0;
  }
};

json Ratio(double x, double alone) { return alone > 0 ? json(x / alone) : json(nullptr); }

// What was measured, where, and from which commit.
json SetupJson(const Bench& b) {
  const Args& a = b.args;
  double mean_tokens = 0;  // --ft-seq-len with the byte tokenizer, fewer with a real one
  for (const serve::FineTuneExample& e : b.examples) mean_tokens += e.tokens.size();
  if (!b.examples.empty()) mean_tokens /= b.examples.size();
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return {{"device", b.options.device},
          {"build", BuildFlags()},
          {"layers", b.config.num_hidden_layers},
          {"hidden", b.config.hidden_size},
          {"adapters", a.Int("adapters", 1)},
          {"rank", a.Int("rank", 16)},
          {"len", {a.Int("min-len", 8), a.Int("max-len", 128)}},
          {"max_batch_tokens", b.options.max_batch_tokens},
          {"ft",
           {{"rank", a.Int("ft-rank", 8)},
            {"targets", Split(a.Get("ft-targets", "q_proj,v_proj"))},
            {"batch", a.Int("ft-batch", 8)},
            {"seq_len", a.Int("ft-seq-len", 256)},
            {"mean_example_tokens", mean_tokens},
            {"micro_tokens", a.Int("ft-micro-tokens", serve::FineTuneOptions{}.micro_batch_tokens)},
            {"busy_units", a.Int("ft-busy-units", 1)},
            {"busy_sms", a.Int("ft-busy-sms", 0)}}},
          {"commit", GitCommit()},
          {"date", date}};
}

json PhaseJson(const Bench& b, const Phase& p, const Phase* alone, double ft_alone) {
  const int64_t iterations = p.after.iterations - p.before.iterations;
  const double batch_s = p.after.batch_seconds - p.before.batch_seconds;
  const bool serving = p.name != "finetune_alone";
  const TraceResult& t = p.trace;
  json j = {{"bench", "coserve"}, {"phase", p.name}, {"rate", serving ? json(p.rate) : json()}};
  j["requests"] = static_cast<int64_t>(t.submitted);
  j["failed"] = t.failed;
  j["wall_s"] = p.window_s;
  j["gen_tokens_per_s"] = serving ? t.generated / p.window_s : 0.0;
  j["ttft_p50_ms"] = 1e3 * Percentile(t.ttft, 0.5);
  j["ttft_p99_ms"] = 1e3 * Percentile(t.ttft, 0.99);
  j["tpot_p50_ms"] = 1e3 * Percentile(t.tpot, 0.5);
  j["tpot_p99_ms"] = 1e3 * Percentile(t.tpot, 0.99);
  j["ttft_p99_ratio"] =
      alone ? Ratio(Percentile(t.ttft, 0.99), Percentile(alone->trace.ttft, 0.99)) : json();
  j["tpot_p99_ratio"] =
      alone ? Ratio(Percentile(t.tpot, 0.99), Percentile(alone->trace.tpot, 0.99)) : json();
  j["busy_fraction"] = p.window_s > 0 ? batch_s / p.window_s : 0.0;  // inference batches
  j["iterations"] = iterations;
  j["ms_per_iteration"] = iterations > 0 ? 1e3 * batch_s / iterations : 0.0;
  j["preemptions"] = p.after.preemptions - p.before.preemptions;
  j["ft_tokens"] = p.after.finetune_tokens - p.before.finetune_tokens;
  j["ft_steps"] = p.after.finetune_steps - p.before.finetune_steps;
  j["ft_tokens_per_s"] = p.has_job ? json(p.ft_tokens_per_s()) : json();
  j["ft_ratio"] = p.has_job && serving ? Ratio(p.ft_tokens_per_s(), ft_alone) : json();
  j["ft_publications"] = p.publications;
  j.update(SetupJson(b));
  return j;
}

Phase FinetuneAlone(Bench& b) {
  Phase p{.name = "finetune_alone", .has_job = true};
  std::unique_ptr<serve::Engine> engine = MakeEngine(b);
  b.examples = MakeExamples(b, *engine);
  const std::string id = StartJob(b, *engine);
  WaitWarm(b, *engine, id, p.name, 0);
  const double seconds = b.args.Num("ft-seconds", 15);
  const int64_t steps = b.args.Int("ft-steps", 0);
  p.before = engine->Stats();
  const Clock::time_point start = Clock::now();
  int64_t published0 = CheckJob(b, *engine, id).published.size();
  while (true) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const serve::EngineStats st = engine->Stats();
    if (Since(start) >= seconds) break;
    if (steps > 0 && st.finetune_steps - p.before.finetune_steps >= steps) break;
  }
  p.after = engine->Stats();
  p.window_s = Since(start);
  p.publications = CheckJob(b, *engine, id).published.size() - published0;
  (void)engine->CancelFineTuneJob(id);
  engine->Shutdown();
  return p;
}

Phase Serve(Bench& b, double rate, bool with_job) {
  Phase p{.name = with_job ? "serve_with_job" : "serve_alone", .rate = rate, .has_job = with_job};
  std::unique_ptr<serve::Engine> engine = MakeEngine(b);
  Warmup(b, *engine, p.name, rate);
  std::string id;
  int64_t published0 = 0;
  if (with_job) {
    id = StartJob(b, *engine);
    WaitWarm(b, *engine, id, p.name, rate);
    published0 = CheckJob(b, *engine, id).published.size();
  }
  const std::vector<TraceRequest> trace = MakeTrace(b, rate, engine->base_model_name());
  p.before = engine->Stats();
  p.trace = RunTrace(b, *engine, trace, p.name, rate);
  p.after = engine->Stats();
  p.window_s = p.trace.wall_s;
  if (with_job) {
    p.publications = CheckJob(b, *engine, id).published.size() - published0;
    (void)engine->CancelFineTuneJob(id);
  }
  engine->Shutdown();
  return p;
}

struct Summary {
  json per_rate = json::array();
  int64_t failed = 0;     // requests, all serving phases
  int64_t idle_jobs = 0;  // serve_with_job phases whose job trained no token
};

bool Within(const json& ratio, double limit) {
  return ratio.is_number() && ratio.get<double>() <= limit;
}

// serve_alone then serve_with_job at one rate (the same trace), printed and summarized.
void RunRate(Bench& b, double rate, double ft_alone, Summary* sum) {
  const Phase alone = Serve(b, rate, false);
  const json ja = PhaseJson(b, alone, nullptr, ft_alone);
  std::printf("%s\n", ja.dump().c_str());
  std::fflush(stdout);
  const Phase co = Serve(b, rate, true);
  const json jc = PhaseJson(b, co, &alone, ft_alone);
  std::printf("%s\n", jc.dump().c_str());
  std::fflush(stdout);
  sum->failed += alone.trace.failed + co.trace.failed;
  sum->idle_jobs += jc["ft_tokens"].get<int64_t>() == 0;
  sum->per_rate.push_back(
      {{"rate", rate},
       {"busy_fraction_alone", ja["busy_fraction"]},
       {"ttft_p99_ratio", jc["ttft_p99_ratio"]},
       {"tpot_p99_ratio", jc["tpot_p99_ratio"]},
       {"p99_within_10pct", Within(jc["ttft_p99_ratio"], 1.1) && Within(jc["tpot_p99_ratio"], 1.1)},
       {"ft_ratio", jc["ft_ratio"]}});
}

}  // namespace

int main(int argc, char** argv) {
  Bench b;
  b.args = bench::ParseArgs(argc, argv);
  const Args& a = b.args;
  b.tmp = (std::filesystem::temp_directory_path() / ("coserve_bench_" + std::to_string(getpid())))
              .string();
  b.progress_s = a.Num("progress-s", 10);
  b.timeout_s = a.Num("timeout-s", 600);
  std::vector<double> rates;
  for (const std::string& r : Split(a.Get("rates", "2,4,8"))) rates.push_back(std::stod(r));
  StatusOr<std::string> model_dir = bench::PrepareModel(a, b.tmp, &b.config);
  if (!model_dir.ok()) Fail(b, model_dir.status());
  b.options.model_dir = *model_dir;
  b.options.device = a.Get("device", "auto");
  b.options.pool_bytes = static_cast<int64_t>(a.Num("pool-gb", 0) * (1 << 30));
  b.options.max_batch_tokens = a.Int("max-batch-tokens", 2048);
  b.options.max_waiting = 1 << 20;
  b.args.kv.try_emplace("adapters", "1");  // this bench's default
  if (Status s = bench::AddRandomAdapters(a, b.config, b.tmp, &b.options); !s.ok()) Fail(b, s);

  const Phase ft = FinetuneAlone(b);
  const double ft_alone = ft.ft_tokens_per_s();
  std::printf("%s\n", PhaseJson(b, ft, nullptr, ft_alone).dump().c_str());
  std::fflush(stdout);
  Summary sum;
  for (double rate : rates) RunRate(b, rate, ft_alone, &sum);
  json summary = {{"bench", "coserve"},
                  {"phase", "summary"},
                  {"ft_alone_tokens_per_s", ft_alone},
                  {"rates", sum.per_rate},
                  {"failed_requests", sum.failed},
                  {"jobs_without_tokens", sum.idle_jobs}};
  // The rate whose serve_alone run kept the engine in inference closest to half the time.
  double best = 2;
  for (const json& r : sum.per_rate) {
    const double d = std::abs(r["busy_fraction_alone"].get<double>() - 0.5);
    if (d < best) {
      best = d;
      summary["half_idle_rate"] = r["rate"];
      summary["ft_ratio_at_half_idle"] = r["ft_ratio"];
    }
  }
  summary.update(SetupJson(b));
  std::printf("%s\n", summary.dump().c_str());
  std::fflush(stdout);
  const int64_t failed = sum.failed, idle_jobs = sum.idle_jobs;
  std::filesystem::remove_all(b.tmp);
  if (failed > 0 || idle_jobs > 0) {
    std::fprintf(stderr,
                 "coserve_bench: %ld failed requests, %ld co-served phases without "
                 "fine-tuning tokens\n",
                 static_cast<long>(failed), static_cast<long>(idle_jobs));
    return 1;
  }
  return 0;
}

// Op benchmark: GEMM, attention forward/backward, cross-entropy, RMSNorm, the optimizer on one
// device.
// Prints one JSON object per result: device, op, sizes, dtype, achieved TFLOP/s or GB/s, the
// ceiling it is compared with, commit and date. Not a test; never run by ctest.
//
//   tandem-ops_bench [--device cuda:0|cpu] [--iters 20]
//                    [--only gemm,attention,lora,cross_entropy,rmsnorm,rope,embedding,optimizer]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "core/tensor.h"
#include "core/version.h"
#include "ops/multi_tensor.h"
#include "ops/ops.h"

namespace {

using tandem::DType;
using tandem::Shape;
using tandem::Tensor;
namespace ops = tandem::ops;

// Ceilings measured on the H100 used for docs/benchmarks.md (see there); 0 = not stated.
constexpr double kGemmCeilingTflops = 793.0;  // cuBLAS bf16 8192^3
constexpr double kHbmCeilingGBs = 3000.0;     // device-to-device copy

std::string Today() {
  std::time_t now = std::time(nullptr);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

struct Bench {
  ops::Context& ctx;
  int iters;
  std::string device_name;

  // Mean seconds per call of fn after warmup.
  double Time(const std::function<void()>& fn) {
    for (int i = 0; i < 3; ++i) fn();
    TANDEM_CHECK_OK(ctx.Synchronize());
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) fn();
    TANDEM_CHECK_OK(ctx.Synchronize());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  }

  Tensor Random(const Shape& shape, DType dtype, float scale = 1.0f) {
    Tensor host = Tensor::Cpu(shape, DType::kF32);
    uint64_t s = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(host.numel());
    float* p = host.data<float>();
    for (int64_t i = 0; i < host.numel(); ++i) {
      s ^= s << 13; s ^= s >> 7; s ^= s << 17;
      p[i] = scale * (static_cast<float>(s >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f);
    }
    Tensor typed = *tandem::CastCpu(host, dtype);
    return *tandem::CopyToDeviceBlocking(typed, ctx.allocator());
  }
  Tensor Empty(const Shape& shape, DType dtype) { return *Tensor::Empty(shape, dtype, ctx.allocator()); }

  void Report(const std::string& op, nlohmann::json sizes, const char* dtype, double seconds, double flops,
              double bytes) {
    nlohmann::json j = {{"bench", "ops"}, {"device", device_name}, {"op", op}, {"sizes", sizes},
                        {"dtype", dtype}, {"ms", seconds * 1e3}, {"commit", tandem::GitCommit()}, {"date", Today()}};
    if (flops > 0) {
      j["tflops"] = flops / seconds / 1e12;
      if (ctx.is_cuda()) j["gemm_ceiling_tflops"] = kGemmCeilingTflops;
    }
    if (bytes > 0) {
      j["gb_per_s"] = bytes / seconds / 1e9;
      if (ctx.is_cuda()) j["hbm_ceiling_gb_per_s"] = kHbmCeilingGBs;
    }
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
};

void GemmBench(Bench& b, DType dt) {
  const int64_t shapes[][3] = {{8192, 8192, 8192}, {8192, 2048, 2048}, {8192, 6144, 2048}, {8192, 2048, 8192},
                               {8192, 16384, 2048}, {8192, 32000, 2048}};
  for (auto& s : shapes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    if (!b.ctx.is_cuda() && m * n * k > (int64_t{1} << 33)) continue;
    Tensor a = b.Random({m, k}, dt), w = b.Random({n, k}, dt), c = b.Empty({m, n}, dt);
    const double sec = b.Time([&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, c, a, w, false, true)); });
    b.Report("gemm_nt", {{"m", m}, {"n", n}, {"k", k}}, tandem::DTypeName(dt), sec, 2.0 * m * n * k, 0);
  }
}

// The small GEMMs of one LoRA projection (peft/adapter_set.cc, one adapter): x [N, in],
// A [r, in], B [out, r], h = x A^T [N, r]; f32 adapter gradients. The expand and dx come twice:
// written (beta 0, the projection-group fast path, before the base GEMM adds to them) and
// accumulated (beta 1, one projection at a time). They are memory-bound, so each
// reports GB/s of its compulsory traffic against the HBM ceiling.
void LoraGemmBench(Bench& b, DType dt) {
  const int64_t N = b.ctx.is_cuda() ? 8192 : 512, r = 16;
  const int64_t shapes[][2] = {{2048, 2048}, {2048, 512}, {2048, 8192}, {8192, 2048}};
  const double es = tandem::DTypeSize(dt);
  for (auto& s : shapes) {
    const int64_t in = s[0], out = s[1];
    Tensor x = b.Random({N, in}, dt), A = b.Random({r, in}, dt, 0.02f), B = b.Random({out, r}, dt, 0.02f);
    Tensor h = b.Random({N, r}, dt), y = b.Random({N, out}, dt), dy = b.Random({N, out}, dt);
    Tensor dh = b.Empty({N, r}, dt), dx = b.Random({N, in}, dt);
    Tensor dA = b.Empty({r, in}, DType::kF32), dB = b.Empty({out, r}, DType::kF32);
    TANDEM_CHECK_OK(ops::Fill(b.ctx, dA, 0.0f));
    TANDEM_CHECK_OK(ops::Fill(b.ctx, dB, 0.0f));
    const nlohmann::json sizes = {{"tokens", N}, {"in", in}, {"out", out}, {"rank", r}};
    struct Op {
      const char* name;
      double bytes;
      std::function<void()> run;
    };
    const Op ops_list[] = {
        {"lora_shrink", (N * in + N * r) * es, [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, h, x, A, false, true)); }},
        {"lora_expand", (N * out + N * r) * es,
         [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, y, h, B, false, true, 2.0f, 0.0f)); }},
        {"lora_dx", (N * in + N * r) * es,
         [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, dx, dh, A, false, false, 1.0f, 0.0f)); }},
        {"lora_expand_acc", (2.0 * N * out + N * r) * es,
         [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, y, h, B, false, true, 2.0f, 1.0f)); }},
        {"lora_dh", (N * out + N * r) * es, [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, dh, dy, B, false, false, 2.0f, 0.0f)); }},
        {"lora_dB_acc", (N * out + N * r) * es,
         [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, dB, dy, h, true, false, 2.0f, 1.0f)); }},
        {"lora_dA_acc", (N * in + N * r) * es,
         [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, dA, dh, x, true, false, 1.0f, 1.0f)); }},
        {"lora_dx_acc", (2.0 * N * in + N * r) * es,
         [&] { TANDEM_CHECK_OK(ops::Matmul(b.ctx, dx, dh, A, false, false, 1.0f, 1.0f)); }},
    };
    for (const Op& o : ops_list) {
      const double sec = b.Time(o.run);
      b.Report(o.name, sizes, tandem::DTypeName(dt), sec, 0, o.bytes);
    }
  }
}

void AttentionBench(Bench& b) {
  struct Case { int64_t batch, seq, heads, kv_heads, dim; };
  const Case cases[] = {{4, 2048, 32, 8, 64}, {4, 2048, 32, 32, 128}, {4, 2048, 16, 4, 128}, {1, 8192, 32, 8, 128}};
  for (const Case& c : cases) {
    if (!b.ctx.is_cuda() && c.seq > 512) continue;
    const DType dt = b.ctx.is_cuda() ? DType::kBF16 : DType::kF32;
    Tensor q = b.Random({c.batch, c.seq, c.heads, c.dim}, dt), k = b.Random({c.batch, c.seq, c.kv_heads, c.dim}, dt);
    Tensor v = b.Random({c.batch, c.seq, c.kv_heads, c.dim}, dt), out = b.Empty({c.batch, c.seq, c.heads, c.dim}, dt);
    Tensor lse = b.Empty({c.batch, c.heads, c.seq}, DType::kF32);
    Tensor dout = b.Random({c.batch, c.seq, c.heads, c.dim}, dt);
    Tensor dq = b.Empty(q.shape(), dt), dk = b.Empty(k.shape(), dt), dv = b.Empty(v.shape(), dt);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.dim));
    // Causal: half of the 4*B*H*T*T*D matmul FLOPs of the forward; backward is 2.5x the forward.
    const double fwd_flops = 4.0 * c.batch * c.heads * c.seq * c.seq * c.dim / 2.0;
    nlohmann::json sizes = {{"batch", c.batch}, {"seq", c.seq}, {"heads", c.heads}, {"kv_heads", c.kv_heads}, {"head_dim", c.dim}};
    // The default kernels (wgmma on an H100), then the mma.sync kernels as "_mma" where they
    // differ.
    // "_split": the wgmma backward with dQ in a kernel of its own (the forward is the default's).
    for (const ops::AttentionKernel kernel :
         {ops::AttentionKernel::kAuto, ops::AttentionKernel::kWgmmaSplitDq,
          ops::AttentionKernel::kMmaSync}) {
      if (kernel != ops::AttentionKernel::kAuto && !b.ctx.is_cuda()) break;
      ops::SetAttentionKernel(kernel);
      const std::string suffix = kernel == ops::AttentionKernel::kMmaSync        ? "_mma"
                                 : kernel == ops::AttentionKernel::kWgmmaSplitDq ? "_split"
                                                                                 : "";
      double sec = 0;
      if (kernel != ops::AttentionKernel::kWgmmaSplitDq) {
        sec = b.Time(
            [&] { TANDEM_CHECK_OK(ops::AttentionForward(b.ctx, out, lse, q, k, v, scale)); });
        b.Report("attention_fwd" + suffix, sizes, tandem::DTypeName(dt), sec, fwd_flops, 0);
      }
      sec = b.Time([&] {
        TANDEM_CHECK_OK(ops::AttentionBackward(b.ctx, dq, dk, dv, dout, q, k, v, out, lse, scale));
      });
      b.Report("attention_bwd" + suffix, sizes, tandem::DTypeName(dt), sec, 2.5 * fwd_flops, 0);
    }
    ops::SetAttentionKernel(ops::AttentionKernel::kAuto);
  }
}

void CrossEntropyBench(Bench& b, DType dt) {
  const int64_t rows = b.ctx.is_cuda() ? 8192 : 512, vocab = 32000;
  Tensor logits = b.Random({rows, vocab}, dt, 4.0f), losses = b.Empty({rows}, DType::kF32);
  Tensor targets_host = Tensor::Cpu({rows}, DType::kI32);
  for (int64_t i = 0; i < rows; ++i) targets_host.data<int32_t>()[i] = static_cast<int32_t>((i * 7919) % vocab);
  Tensor targets = *tandem::CopyToDeviceBlocking(targets_host, b.ctx.allocator());
  Tensor dlogits = b.Empty({rows, vocab}, dt);
  const double sec = b.Time([&] { TANDEM_CHECK_OK(ops::CrossEntropy(b.ctx, losses, dlogits, logits, targets, 1.0f)); });
  const double bytes = 2.0 * rows * vocab * tandem::DTypeSize(dt);  // read logits, write dlogits
  b.Report("cross_entropy_fwd_bwd", {{"rows", rows}, {"vocab", vocab}}, tandem::DTypeName(dt), sec, 0, bytes);
}

void RmsNormBench(Bench& b, DType dt) {
  const int64_t rows = b.ctx.is_cuda() ? 8192 : 1024, cols = 2048;
  Tensor x = b.Random({rows, cols}, dt), w = b.Random({cols}, dt), y = b.Empty({rows, cols}, dt);
  Tensor rstd = b.Empty({rows}, DType::kF32), dy = b.Random({rows, cols}, dt), dx = b.Empty({rows, cols}, dt);
  Tensor dw = b.Empty({cols}, DType::kF32);
  TANDEM_CHECK_OK(ops::Fill(b.ctx, dw, 0.0f));
  const double es = tandem::DTypeSize(dt);
  double sec = b.Time([&] { TANDEM_CHECK_OK(ops::RmsNormForward(b.ctx, y, rstd, x, w, 1e-5f)); });
  b.Report("rmsnorm_fwd", {{"rows", rows}, {"cols", cols}}, tandem::DTypeName(dt), sec, 0, 2.0 * rows * cols * es);
  sec = b.Time([&] { TANDEM_CHECK_OK(ops::RmsNormBackward(b.ctx, dx, dw, dy, x, w, rstd, false)); });
  b.Report("rmsnorm_bwd", {{"rows", rows}, {"cols", cols}}, tandem::DTypeName(dt), sec, 0, 3.0 * rows * cols * es);
  // A frozen norm weight (LoRA): dx alone, added into the residual's gradient.
  Tensor no_dw;
  sec = b.Time(
      [&] { TANDEM_CHECK_OK(ops::RmsNormBackward(b.ctx, dx, no_dw, dy, x, w, rstd, true)); });
  b.Report("rmsnorm_bwd_dx_acc", {{"rows", rows}, {"cols", cols}}, tandem::DTypeName(dt), sec, 0,
           4.0 * rows * cols * es);
}

// RoPE in place on the q and k heads of a fused [N, Hq + 2 Hkv, D] buffer (the 1.1B step's
// layout: 32 q heads, 8 kv heads, D 64), forward: reads and writes q and k.
void RopeBench(Bench& b, DType dt) {
  const int64_t n = b.ctx.is_cuda() ? 8192 : 512, hq = 32, hkv = 8, d = 64;
  Tensor qkv = b.Random({n, hq + 2 * hkv, d}, dt);
  Tensor qk = qkv.Slice(1, 0, hq + hkv);
  Tensor pos_host = Tensor::Cpu({n}, DType::kI32);
  for (int64_t i = 0; i < n; ++i) pos_host.data<int32_t>()[i] = static_cast<int32_t>(i % 2048);
  Tensor pos = *tandem::CopyToDeviceBlocking(pos_host, b.ctx.allocator());
  Tensor inv_host = Tensor::Cpu({d / 2}, DType::kF32);
  for (int64_t i = 0; i < d / 2; ++i) {
    inv_host.data<float>()[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / d));
  }
  Tensor inv = *tandem::CopyToDeviceBlocking(inv_host, b.ctx.allocator());
  const double sec = b.Time([&] { TANDEM_CHECK_OK(ops::Rope(b.ctx, qk, qk, pos, inv, false)); });
  b.Report("rope_qk", {{"tokens", n}, {"heads", hq + hkv}, {"head_dim", d}}, tandem::DTypeName(dt),
           sec, 0, 2.0 * n * (hq + hkv) * d * tandem::DTypeSize(dt));
}

// Embedding backward of 8192 tokens of a byte-level vocabulary (ids skewed like text: id
// floor(256 u^3), so id 0 takes about 16% of the tokens) into a [32000, 2048] f32 gradient;
// GB/s counts only the read of dout.
void EmbeddingBench(Bench& b, DType dt) {
  const int64_t n = b.ctx.is_cuda() ? 8192 : 512, vocab = 32000, dim = 2048;
  Tensor ids_host = Tensor::Cpu({n}, DType::kI32);
  uint64_t s = 0x2545f4914f6cdd1dull;
  for (int64_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const double u = static_cast<double>(s >> 11) / static_cast<double>(uint64_t{1} << 53);
    ids_host.data<int32_t>()[i] = static_cast<int32_t>(256.0 * u * u * u);
  }
  Tensor ids = *tandem::CopyToDeviceBlocking(ids_host, b.ctx.allocator());
  Tensor dout = b.Random({n, dim}, dt), dtable = b.Empty({vocab, dim}, DType::kF32);
  TANDEM_CHECK_OK(ops::Fill(b.ctx, dtable, 0.0f));
  const double sec =
      b.Time([&] { TANDEM_CHECK_OK(ops::EmbeddingBackward(b.ctx, dtable, dout, ids)); });
  b.Report("embedding_bwd", {{"tokens", n}, {"vocab", vocab}, {"dim", dim}}, tandem::DTypeName(dt),
           sec, 0, static_cast<double>(n * dim * tandem::DTypeSize(dt)));
}

// One optimizer update over one flat parameter tensor of n elements (memory-bound): AdamWMulti
// with f32 master and moments and bf16 model weights (30 bytes a parameter: reads master, m, v
// and grad, writes master, m, v and the weights), AdamWBf16Multi (16: reads and writes the bf16
// weight and moments, reads the f32 grad), and the gradient norm (4), each as GB/s of that
// traffic beside a device-to-device copy of the gradient measured in the same run (the ceiling).
void OptimizerBench(Bench& b) {
  const int64_t n = b.ctx.is_cuda() ? (int64_t{256} << 20) : (int64_t{1} << 20);
  const nlohmann::json sizes = {{"params", n}};
  Tensor grad = b.Random({n}, DType::kF32, 1e-3f), copy = b.Empty({n}, DType::kF32);
  double sec = b.Time([&] { TANDEM_CHECK_OK(tandem::CopyTensor(copy, grad, b.ctx.stream())); });
  b.Report("copy_d2d", sizes, "f32", sec, 0, 8.0 * n);
  copy = Tensor();
  Tensor norm = b.Empty({1}, DType::kF32);
  const std::vector<Tensor> grads = {grad};
  sec = b.Time([&] { TANDEM_CHECK_OK(ops::SumSquaresMulti(b.ctx, norm, grads)); });
  b.Report("grad_norm", sizes, "f32", sec, 0, 4.0 * n);
  ops::AdamWParams p;
  p.lr = 1e-5f;
  p.step = 10;
  {
    Tensor master = b.Random({n}, DType::kF32, 0.02f), m = b.Random({n}, DType::kF32, 1e-4f);
    Tensor v = b.Empty({n}, DType::kF32), weights = b.Empty({n}, DType::kBF16);
    TANDEM_CHECK_OK(ops::Fill(b.ctx, v, 1e-8f));  // a second moment is never negative
    const std::vector<ops::AdamWTensors> e = {{&master, &m, &v, &weights, &grad, 0.0f}};
    sec = b.Time([&] { TANDEM_CHECK_OK(ops::AdamWMulti(b.ctx, e, p)); });
    b.Report("adamw_f32_state", sizes, "f32", sec, 0, 30.0 * n);
  }
  Tensor param = b.Random({n}, DType::kBF16, 0.02f), m = b.Random({n}, DType::kBF16, 1e-4f);
  Tensor v = b.Empty({n}, DType::kBF16);
  TANDEM_CHECK_OK(ops::Fill(b.ctx, v, 1e-8f));
  uint64_t key = 1;
  const std::vector<ops::AdamWBf16Tensors> e = {{&param, &m, &v, &grad, 0.0f, key}};
  sec = b.Time([&] { TANDEM_CHECK_OK(ops::AdamWBf16Multi(b.ctx, e, p)); });
  b.Report("adamw_bf16_state", sizes, "bf16", sec, 0, 16.0 * n);
}

}  // namespace

int main(int argc, char** argv) {
  std::string device = tandem::CudaAvailable() ? "cuda:0" : "cpu", only;
  int iters = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--device" && i + 1 < argc) device = argv[++i];
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--device cpu|cuda:N] [--iters N] [--only gemm,attention,lora,cross_entropy,rmsnorm,optimizer]\n", argv[0]);
      return 2;
    }
  }
  auto dev = tandem::ParseDevice(device);
  TANDEM_CHECK_OK(dev);
  auto made = ops::Context::ForDevice(*dev);
  TANDEM_CHECK_OK(made);
  std::unique_ptr<ops::Context> ctx = std::move(made).value();
  Bench b{*ctx, iters, tandem::DeviceName(*dev)};
  auto want = [&](const char* name) { return only.empty() || only.find(name) != std::string::npos; };
  const DType dt = ctx->is_cuda() ? DType::kBF16 : DType::kF32;
  if (want("gemm")) GemmBench(b, dt);
  if (want("attention")) AttentionBench(b);
  if (want("lora")) LoraGemmBench(b, dt);
  if (want("cross_entropy")) CrossEntropyBench(b, dt);
  if (want("rmsnorm")) RmsNormBench(b, dt);
  if (want("rope")) RopeBench(b, dt);
  if (want("embedding")) EmbeddingBench(b, dt);
  if (want("optimizer")) OptimizerBench(b);
  return 0;
}

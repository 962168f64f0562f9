// Collective benchmark: all-reduce, reduce-scatter and all-gather over a range of sizes, on MPI
// (host buffers) or NCCL (one GPU per rank). Rank 0 prints one JSON object per result with the
// time, algbw and busbw computed as nccl-tests does, the device, commit and date. Not a test.
//
//   mpirun -np 4 tandem-collectives_bench --backend nccl [--min-bytes 8] [--max-bytes 1G]
//       [--factor 2] [--ops all_reduce,reduce_scatter,all_gather] [--dtype f32|bf16]
//       [--iters 20] [--warmup 5] [--timeout 300]
//
// Sizes follow nccl-tests: `bytes` is the all-reduce buffer, and for reduce-scatter (all-gather)
// the whole input (output) buffer, i.e. ranks x the per-rank chunk. algbw = bytes / time;
// busbw = algbw x 2(n-1)/n for all-reduce and x (n-1)/n for reduce-scatter and all-gather, the
// bandwidth each link needs, comparable with the hardware's. Time is the slowest rank's mean over
// `iters` calls issued back to back (NCCL: enqueued, then one Synchronize).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "collectives/mpi.h"
#include "collectives/nccl.h"
#include "core/cuda_allocator.h"
#include "core/tensor.h"
#include "core/version.h"

namespace {

using tandem::DType;
using tandem::Status;
using tandem::StatusOr;
using tandem::Tensor;
using tandem::collectives::Communicator;
using tandem::collectives::ReduceOp;

struct Flags {
  std::string backend = "nccl";
  int64_t min_bytes = 8;
  int64_t max_bytes = -1;  // default: 1 GiB (nccl), 64 MiB (mpi)
  int64_t factor = 2;
  std::string ops = "all_reduce,reduce_scatter,all_gather";
  std::string dtype = "f32";
  int iters = 20;
  int warmup = 5;
  double timeout_s = 300;
};

std::string Today() {
  std::time_t now = std::time(nullptr);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

// "8", "64K", "1M", "1G" (binary units).
int64_t ParseBytes(const std::string& s) {
  if (s.empty()) return 0;
  int64_t scale = 1;
  const char unit = s.back();
  if (unit == 'K' || unit == 'k') scale = int64_t{1} << 10;
  if (unit == 'M' || unit == 'm') scale = int64_t{1} << 20;
  if (unit == 'G' || unit == 'g') scale = int64_t{1} << 30;
  return std::atoll(s.c_str()) * scale;
}

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--backend")
      f->backend = next();
    else if (a == "--min-bytes")
      f->min_bytes = ParseBytes(next());
    else if (a == "--max-bytes")
      f->max_bytes = ParseBytes(next());
    else if (a == "--factor")
      f->factor = std::atoll(next().c_str());
    else if (a == "--ops")
      f->ops = next();
    else if (a == "--dtype")
      f->dtype = next();
    else if (a == "--iters")
      f->iters = std::atoi(next().c_str());
    else if (a == "--warmup")
      f->warmup = std::atoi(next().c_str());
    else if (a == "--timeout")
      f->timeout_s = std::atof(next().c_str());
    else
      return false;
  }
  if (f->max_bytes < 0) f->max_bytes = f->backend == "nccl" ? int64_t{1} << 30 : int64_t{64} << 20;
  return (f->backend == "nccl" || f->backend == "mpi") && f->factor >= 2 && f->iters > 0 &&
         f->min_bytes > 0 && f->min_bytes <= f->max_bytes &&
         (f->dtype == "f32" || f->dtype == "bf16");
}

struct Bench {
  Communicator& comm;  // the measured group
  Communicator& host;  // MPI world: agrees on the slowest rank's time
  tandem::Allocator& allocator;
  const Flags& flags;
  DType dtype;
  std::string device_name;

  Tensor Buffer(int64_t numel) {
    Tensor host_zeros = Tensor::CpuZeros({numel}, dtype);
    if (comm.device().is_cpu()) return host_zeros;
    return *tandem::CopyToDeviceBlocking(host_zeros, allocator);
  }

  // Mean seconds per call on the slowest rank.
  StatusOr<double> Time(const std::function<Status()>& call) {
    for (int i = 0; i < flags.warmup; ++i) TANDEM_RETURN_IF_ERROR(call());
    TANDEM_RETURN_IF_ERROR(comm.Synchronize());
    TANDEM_RETURN_IF_ERROR(comm.Barrier());
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < flags.iters; ++i) TANDEM_RETURN_IF_ERROR(call());
    TANDEM_RETURN_IF_ERROR(comm.Synchronize());
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / flags.iters;
    Tensor t = Tensor::Cpu({1}, DType::kF32);
    t.data<float>()[0] = static_cast<float>(s * 1e6);  // microseconds keep f32 precise
    TANDEM_RETURN_IF_ERROR(host.AllReduce(t, ReduceOp::kMax));
    return t.data<float>()[0] * 1e-6;
  }

  // One size of one op. `bytes`: nccl-tests' size; returns false on a failed call.
  Status Run(const std::string& op, int64_t bytes) {
    const int n = comm.size();
    const int64_t elem = static_cast<int64_t>(tandem::DTypeSize(dtype));
    double bus_factor = 1.0;
    int64_t count = bytes / elem;  // elements of the measured buffer
    std::function<Status()> call;
    Tensor a, b;
    if (op == "all_reduce") {
      if (count == 0) return Status::Ok();
      a = Buffer(count);
      call = [&] { return comm.AllReduce(a, ReduceOp::kSum); };
      bus_factor = 2.0 * (n - 1) / n;
    } else {
      const int64_t chunk = count / n;
      if (chunk == 0) return Status::Ok();
      count = chunk * n;
      a = Buffer(chunk);
      b = Buffer(count);
      if (op == "reduce_scatter") {
        call = [&] { return comm.ReduceScatter(a, b, ReduceOp::kSum); };
      } else if (op == "all_gather") {
        call = [&] { return comm.AllGather(b, a); };
      } else {
        return tandem::InvalidArgumentError("unknown op " + op);
      }
      bus_factor = static_cast<double>(n - 1) / n;
    }
    TANDEM_ASSIGN_OR_RETURN(const double seconds, Time(call));
    const double moved = static_cast<double>(count * elem);
    const double algbw = moved / seconds / 1e9;
    if (comm.rank() == 0) {
      nlohmann::json j = {{"bench", "collectives"},
                          {"backend", comm.backend()},
                          {"op", op},
                          {"dtype", tandem::DTypeName(dtype)},
                          {"bytes", count * elem},
                          {"count", count},
                          {"ranks", n},
                          {"iters", flags.iters},
                          {"time_us", seconds * 1e6},
                          {"algbw_gbps", algbw},
                          {"busbw_gbps", algbw * bus_factor},
                          {"device", device_name},
                          {"commit", tandem::GitCommit()},
                          {"date", Today()}};
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
    }
    return Status::Ok();
  }
};

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int Main(int argc, char** argv) {
  namespace tc = tandem::collectives;
  auto mpi = tc::MpiRuntime::Init(&argc, &argv);
  if (!mpi.ok()) {
    std::fprintf(stderr, "%s\n", mpi.status().ToString().c_str());
    return 1;
  }
  Flags flags;
  if (!ParseFlags(argc, argv, &flags)) {
    std::fprintf(stderr,
                 "usage: %s [--backend nccl|mpi] [--min-bytes 8] [--max-bytes 1G] [--factor 2] "
                 "[--ops all_reduce,reduce_scatter,all_gather] [--dtype f32|bf16] [--iters 20] "
                 "[--warmup 5] [--timeout 300]\n",
                 argv[0]);
    mpi->AbortJob(2, "bad command line");
  }
  const tc::CollectiveOptions options{.timeout_s = flags.timeout_s};
  auto host = tc::CreateMpiWorld(options);
  if (!host.ok()) mpi->AbortJob(1, host.status().ToString());
  std::unique_ptr<tandem::CachingAllocator> device_allocator;
  std::unique_ptr<Communicator> nccl;
  std::string device_name = mpi->host_name() + " (cpu)";
  if (flags.backend == "nccl") {
    auto alloc = tandem::CreateCudaCachingAllocator(mpi->local_rank());
    if (!alloc.ok()) mpi->AbortJob(1, alloc.status().ToString());
    device_allocator = std::move(*alloc);
    auto made = tc::CreateNcclWorld(**host, mpi->local_rank(), options);
    if (!made.ok()) mpi->AbortJob(1, made.status().ToString());
    nccl = std::move(*made);
    device_name = tandem::DeviceName(tandem::Device::Cuda(mpi->local_rank()));
  }
  Communicator& comm = nccl ? *nccl : **host;
  tandem::Allocator& allocator = device_allocator
                                     ? static_cast<tandem::Allocator&>(*device_allocator)
                                     : tandem::HostAllocator();
  Bench bench{
      comm,       **host, allocator, flags, flags.dtype == "bf16" ? DType::kBF16 : DType::kF32,
      device_name};
  for (const std::string& op : Split(flags.ops)) {
    for (int64_t bytes = flags.min_bytes; bytes <= flags.max_bytes; bytes *= flags.factor) {
      const Status s = bench.Run(op, bytes);
      if (!s.ok()) mpi->AbortJob(1, s.ToString());
    }
  }
  if (nccl && !nccl->Close().ok()) mpi->AbortJob(1, "closing the NCCL communicator failed");
  nccl.reset();
  device_allocator.reset();
  if (!(*host)->Close().ok()) mpi->AbortJob(1, "closing the MPI world failed");
  return mpi->Finalize().ok() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }

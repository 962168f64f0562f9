// LlamaModel: loading and saving HF-format weights (config.json + safetensors).
#include <algorithm>
#include <filesystem>
#include <set>

#include "model/internal/llama_state.h"
#include "model/llama.h"
#include "model/safetensors.h"

namespace tandem::model {

namespace {

// Tensors an HF checkpoint may carry that are not parameters: the rotary inv_freq buffers older
// exports saved, and lm_head when embeddings are tied (transformers ties it on load).
bool IgnorableTensor(const std::string& name, bool tied) {
  const std::string suffix = "rotary_emb.inv_freq";
  if (name.size() >= suffix.size() &&
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
    return true;
  }
  return tied && name == "lm_head.weight";
}

std::string JoinNames(const std::vector<std::string>& names) {
  std::string out;
  const size_t shown = std::min<size_t>(names.size(), 8);
  for (size_t i = 0; i < shown; ++i) out += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > shown) out += StrCat(" and ", names.size() - shown, " more");
  return out;
}

const char* TorchDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
    default:
      return "float32";
  }
}

}  // namespace

Status LlamaModel::LoadSafetensors(const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open(path));
  // Check names, shapes and dtypes of everything before changing any weight.
  std::set<std::string> expected;
  std::vector<std::string> missing, extra, bad;
  for (const Parameter& p : params_) {
    expected.insert(p.name);
    const SafetensorsTensorInfo* info = ckpt.Find(p.name);
    if (info == nullptr) {
      missing.push_back(p.name);
    } else if (info->shape != p.logical_shape || !IsFloating(info->dtype)) {
      bad.push_back(StrCat("'", p.name, "' in '", ckpt.FileOf(p.name), "' is ",
                           SafetensorsDTypeName(info->dtype), ShapeToString(info->shape),
                           ", expected ", ShapeToString(p.logical_shape), " F32/BF16/F16"));
    }
  }
  for (const std::string& name : ckpt.names()) {
    if (!expected.count(name) && !IgnorableTensor(name, config_.tie_word_embeddings)) {
      extra.push_back(name);
    }
  }
  const std::string where = StrCat("loading weights from '", path, "': ");
  if (!missing.empty()) {
    return NotFoundError(StrCat(where, missing.size(), " tensor(s) missing: ", JoinNames(missing)));
  }
  if (!extra.empty()) {
    return InvalidArgumentError(
        StrCat(where, extra.size(), " unexpected tensor(s) for this config: ", JoinNames(extra)));
  }
  if (!bad.empty()) {
    std::string all;
    for (const std::string& b : bad) all += (all.empty() ? "" : "; ") + b;
    return InvalidArgumentError(StrCat(where, "mis-shaped or non-float tensor(s): ", all));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor host, ckpt.GetFloat(params_[i].name, params_[i].logical_shape));
    if (!host.is_contiguous()) return InternalError("safetensors view is not contiguous");
    TANDEM_RETURN_IF_ERROR(SetFromHost(i, SliceForRank(i, host)));  // this rank's tp slice
  }
  return Status::Ok();
}

Status LlamaModel::SaveSafetensors(const std::string& dir, DType dtype) const {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return InvalidArgumentError(
        StrCat("SaveSafetensors: expected dtype f32, bf16 or f16, found ", DTypeName(dtype)));
  }
  if (tp() && options_.parallel.tp_rank != 0) return GatherOnly();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return InternalError(StrCat("cannot create directory '", dir, "': ", ec.message()));
  LlamaConfig config = config_;
  config.torch_dtype = TorchDTypeName(dtype);
  TANDEM_RETURN_IF_ERROR(SaveLlamaConfig(config, dir + "/config.json"));

  std::vector<SafetensorsTensorSpec> specs;
  for (const Parameter& p : params_) specs.push_back({p.name, dtype, p.logical_shape});
  auto fetch = [&](size_t i) -> StatusOr<Tensor> {
    TANDEM_ASSIGN_OR_RETURN(Tensor host, GatherParameter(i, /*grad=*/false));
    if (dtype == DType::kF32) return host;
    return CastCpu(host, dtype);
  };
  return WriteSafetensorsStreaming(dir + "/model.safetensors", specs, fetch, {{"format", "pt"}});
}

Status LlamaModel::GatherOnly() const {
  // The writer fetches in sorted-name order; the other tp ranks gather in that same order.
  std::vector<size_t> order(params_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return params_[a].name < params_[b].name; });
  for (size_t i : order) TANDEM_RETURN_IF_ERROR(GatherParameter(i, false).status());
  return Status::Ok();
}

StatusOr<Tensor> LlamaModel::GatherParameter(size_t i, bool grad) const {
  const Parameter& p = params_[i];
  const Tensor& src = grad ? p.grad : (p.master.defined() ? p.master : p.weight);
  if (!src.defined()) {
    return FailedPreconditionError(
        StrCat("parameter '", p.name, "' has no ", grad ? "gradient" : "weight", " to gather"));
  }
  // The f32 master where there is one: saving must not lose what the optimizer holds.
  Tensor local;
  if (!grad && !p.master.defined() && host_masters_ != nullptr) {  // [offload] masters off device
    local = Tensor::Cpu(p.weight.shape(), DType::kF32);
    TANDEM_RETURN_IF_ERROR(host_masters_->GetMaster(i, local));
  } else {
    TANDEM_ASSIGN_OR_RETURN(local, ToHostF32(src));
  }
  if (p.tp_dim < 0 || !tp()) return local;
  const int64_t tp = options_.parallel.tp_size, n = local.numel();
  Tensor all = Tensor::Cpu({tp * n}, DType::kF32);
  TANDEM_RETURN_IF_ERROR(options_.parallel.hooks->TpAllGather(all, local.View({n})));
  Tensor out = Tensor::Cpu(p.logical_shape, DType::kF32);
  const int64_t lrows = p.logical_shape[0];
  const int64_t lcols = p.logical_shape.size() > 1 ? p.logical_shape[1] : 1;
  const int64_t rows = local.dim(0), cols = local.ndim() > 1 ? local.dim(1) : 1;
  // Rank r's slice starts where rank 0's would, shifted by r slices; replicated kv heads: the
  // slice of the first rank holding each head.
  for (int64_t r = 0; r < tp; ++r) {
    if (r % p.tp_copies != 0) continue;
    const int64_t start = r / p.tp_copies * (p.tp_dim == 0 ? rows : cols);
    const float* s = all.data<float>() + r * n;
    for (int64_t y = 0; y < rows; ++y) {
      for (int64_t x = 0; x < cols; ++x) {
        const int64_t ly = p.tp_dim == 0 ? start + y : y, lx = p.tp_dim == 1 ? start + x : x;
        if (ly < lrows) out.data<float>()[ly * lcols + lx] = s[y * cols + x];
      }
    }
  }
  return out;
}

}  // namespace tandem::model

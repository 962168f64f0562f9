#!/usr/bin/env python3
"""Full fine-tuning of the baselines' HF Llama under torch.compile: the speed issue's "compiled
run". Same model as ../shared/baselines/hf_peft_baseline.py (a Llama-3.2-1B-shaped decoder:
hidden 2048, 16 layers, 32 / 8 heads, ffn 8192, vocabulary 32000, random bf16 weights, SDPA
attention), same batch, AdamW (fused) at lr 1e-5 and the same timing: warm-up steps (here also
the compilation), then the mean of --steps steps. Prints one JSON line. Run it in the same device
call as `tandem train` and the eager baseline so the three are comparable."""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    a = ap.parse_args()

    torch.manual_seed(0)
    vocab, hidden, layers = 32000, 2048, 16
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8192,
                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=max(4096, a.seq), rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters()) - vocab * hidden
    flops_per_token = 6 * n + 6 * layers * hidden * a.seq
    compiled = torch.compile(model, mode=a.mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x = torch.randint(0, vocab, (a.batch, a.seq), device="cuda")

    def step():
        compiled(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tokens = a.batch * a.seq / dt
    print("hf_full_finetune_compiled", json.dumps({
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "mode": a.mode,
        "batch": a.batch, "seq": a.seq, "step_ms": dt * 1e3, "tokens_per_s": tokens,
        "mfu": tokens * flops_per_token / 989e12, "warmup_s": warmup_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)


if __name__ == "__main__":
    main()

"""Checks that a model tandem saved loads in HF transformers and gives tandem's logits.

Run where python3 has torch and transformers (the GPU machine):
  tandem logits --model CKPT --tokens "1,2,3;4,5,6" --out /tmp/tandem_logits.safetensors
  python3 scripts/check_hf_export.py CKPT /tmp/tandem_logits.safetensors [--tol 1e-4]
Prints one JSON line with the max relative difference; exits 1 when it exceeds --tol.
"""
import argparse
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("tandem_logits")
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args()
    expected = load_file(a.tandem_logits)
    model = LlamaForCausalLM.from_pretrained(a.model_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"].long()).logits.float()
    ours = expected["logits"].float()
    err = ((logits - ours).abs().max() / ours.abs().max()).item()
    ok = logits.shape == ours.shape and err <= a.tol
    print(json.dumps({"model_dir": a.model_dir, "shape": list(ours.shape), "max_rel_diff": err,
                      "tol": a.tol, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

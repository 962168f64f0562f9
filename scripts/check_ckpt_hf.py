"""Checks `tandem ckpt import-hf` / `export-hf` against HF transformers (run on the GPU machine,
where python3 has torch and transformers; h5py is optional).

  python3 scripts/check_ckpt_hf.py --tandem build/cuda/bin/tandem [--model DIR] [--work /tmp/x]

Without --model, a tiny random LlamaForCausalLM is made with transformers and saved in f32.
Steps: import-hf MODEL -> ckpt.h5; export-hf ckpt.h5 -> f32 and bf16 directories; both must load
in transformers (LlamaForCausalLM.from_pretrained) with every tensor equal to the original (f32:
bitwise; bf16: the original rounded to bf16) and the same logits. With h5py, also reads ckpt.h5
directly and checks its layout and each dataset's crc32 attribute (zlib.crc32 of the bytes).
Prints one JSON line; exits 1 on any mismatch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import zlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
    return r.stdout


def tiny_model(path):
    cfg = LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def compare(orig, path, bf16):
    other = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    a, b = orig.state_dict(), other.state_dict()
    bad = []
    for name, t in a.items():
        if name not in b:
            bad.append(f"missing {name}")
            continue
        want = t.to(torch.bfloat16).float() if bf16 else t
        if not torch.equal(want, b[name].float()):
            bad.append(name)
    ids = torch.arange(0, 24).reshape(2, 12) % orig.config.vocab_size
    with torch.no_grad():
        la = orig(input_ids=ids).logits
        lb = other(input_ids=ids).logits
    err = ((la - lb).abs().max() / la.abs().max()).item()
    return bad, err


def check_h5(path):
    try:
        import h5py
        import numpy as np
    except ImportError:
        return "h5py not installed: skipped"
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "tandem-universal", f.attrs["format"]
        assert int(f.attrs["format_version"]) == 1
        n = 0
        for name, g in f["params"].items():
            for ds in ("master", "exp_avg", "exp_avg_sq"):
                if ds not in g:
                    continue
                data = np.ascontiguousarray(g[ds][...], dtype="<f4")
                if zlib.crc32(data.tobytes()) != int(g[ds].attrs["crc32"]):
                    raise SystemExit(f"{path}: {name}/{ds}: crc32 mismatch")
                n += 1
    return f"h5py read {n} datasets, crc32 ok"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tandem", required=True)
    p.add_argument("--model")
    p.add_argument("--work")
    p.add_argument("--tol", type=float, default=1e-2)
    a = p.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="tandem_ckpt_hf_")
    model_dir = a.model or tiny_model(os.path.join(work, "orig"))
    orig = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ckpt = os.path.join(work, "ckpt.h5")
    run([a.tandem, "ckpt", "import-hf", model_dir, ckpt])
    inspect = run([a.tandem, "ckpt", "inspect", ckpt, "--verify"])
    results = {"model": model_dir, "inspect_verified": "verified" in inspect}
    ok = results["inspect_verified"]
    for dtype in ("f32", "bf16"):
        out = os.path.join(work, f"export_{dtype}")
        run([a.tandem, "ckpt", "export-hf", ckpt, out, "--dtype", dtype])
        bad, err = compare(orig, out, dtype == "bf16")
        tol = 0.0 if dtype == "f32" else a.tol
        results[dtype] = {"mismatched_tensors": bad[:5], "logits_max_rel_diff": err}
        ok = ok and not bad and err <= tol
    results["h5py"] = check_h5(ckpt)
    results["ok"] = ok
    print(json.dumps(results))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch's fused attention (SDPA, flash backend), timed on the shapes of tandem-ops_bench's
attention cases, with its FLOP convention: causal forward = half of 4*B*H*T*T*D, backward = 2.5x
the forward. Prints one JSON line per case and pass. Run it in the same device call as
tandem-ops_bench --only attention so the two are comparable."""
import json
import sys

import torch
import torch.nn.functional as F

CASES = [(4, 2048, 32, 8, 64), (4, 2048, 32, 32, 128), (4, 2048, 16, 4, 128), (1, 8192, 32, 8, 128)]


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main():
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    for b, t, hq, hkv, d in CASES:
        # SDPA wants [B, H, T, D]; GQA as expanded kv heads (enable_gqa where the version has it).
        q = torch.randn(b, hq, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        kwargs = {"is_causal": True}
        try:
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
            kwargs["enable_gqa"] = True
            kk, vv = k, v
        except TypeError:
            kk = k.repeat_interleave(hq // hkv, dim=1).detach().requires_grad_()
            vv = v.repeat_interleave(hq // hkv, dim=1).detach().requires_grad_()
        fwd_flops = 4.0 * b * hq * t * t * d / 2
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            sec = timed(lambda: F.scaled_dot_product_attention(q, kk, vv, **kwargs))
            out = F.scaled_dot_product_attention(q, kk, vv, **kwargs)
            grad = torch.randn_like(out)
            bwd = timed(lambda: torch.autograd.grad(out, (q, kk, vv), grad, retain_graph=True))
        sizes = {"batch": b, "seq": t, "heads": hq, "kv_heads": hkv, "head_dim": d}
        for op, s, f in (("sdpa_fwd", sec, fwd_flops), ("sdpa_bwd", bwd, 2.5 * fwd_flops)):
            print(json.dumps({"bench": "sdpa", "device": name, "op": op, "sizes": sizes,
                              "torch": torch.__version__, "ms": s * 1e3, "tflops": f / s / 1e12}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reads a tandem universal checkpoint with h5py alone and checks it against docs/formats.md.

  check_universal_h5py.py CHECKPOINT.h5 [--expect-step N] [--expect-tensors N]

Checks the root attributes, every tensor group (params/ and adapters/<name>/), each dataset's
shape and dtype, the whole-dataset CRC-32 and every block CRC-32 (zlib polynomial over the
little-endian f32 bytes, blocks of `block_rows` rows), and the moments' presence against
`trainable`. Prints one line per tensor and "PASS" or the failures, exit status 0 or 1.
Needs h5py and numpy (Debian: python3-h5py).
"""
import argparse
import json
import sys
import zlib

import h5py
import numpy as np


def crc(a):
    return zlib.crc32(np.ascontiguousarray(a, dtype="<f4").tobytes()) & 0xFFFFFFFF


def attr_int(obj, name):
    return int(np.asarray(obj.attrs[name]).reshape(-1)[0])


def attr_str(obj, name):
    v = obj.attrs[name]
    return v.decode() if isinstance(v, bytes) else str(v)


def check_tensor(path, g, problems):
    names = [n for n in ("master", "exp_avg", "exp_avg_sq") if n in g]
    if "master" not in names:
        problems.append(f"{path}: no master dataset")
        return None
    trainable = attr_int(g, "trainable")
    block_rows = attr_int(g, "block_rows")
    shape = g["master"].shape
    if trainable and len(names) != 3:
        problems.append(f"{path}: trainable but has only {names}")
    for n in names:
        d = g[n]
        if d.dtype != np.float32 or d.shape != shape:
            problems.append(f"{path}/{n}: {d.dtype} {d.shape}, expected float32 {shape}")
            continue
        data = d[...]
        if crc(data) != int(np.asarray(d.attrs["crc32"]).reshape(-1)[0]):
            problems.append(f"{path}/{n}: CRC-32 of the data does not match its crc32 attribute")
        blocks = np.asarray(d.attrs["block_crc32"]).reshape(-1)
        want = [crc(data[r:r + block_rows]) for r in range(0, shape[0], block_rows)]
        if len(blocks) != len(want) or any(int(b) != w for b, w in zip(blocks, want)):
            problems.append(f"{path}/{n}: block CRC-32s do not match block_crc32")
        if not np.all(np.isfinite(data)):
            problems.append(f"{path}/{n}: non-finite values")
    print(f"  {path} {list(shape)} tp_dim={attr_int(g, 'tp_dim')} step={attr_int(g, 'step')} "
          f"{'+'.join(names)}")
    return shape


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--expect-step", type=int)
    ap.add_argument("--expect-tensors", type=int)
    args = ap.parse_args()
    problems = []
    with h5py.File(args.checkpoint, "r") as f:
        if attr_str(f, "format") != "tandem-universal":
            problems.append(f"format attribute is {attr_str(f, 'format')!r}")
        version = attr_int(f, "format_version")
        step = attr_int(f, "step")
        mesh = [int(x) for x in np.asarray(f.attrs["mesh"]).reshape(-1)]
        for key in ("config", "model_config", "data_position", "rng_state", "git_commit"):
            if key not in f.attrs:
                problems.append(f"root attribute {key} is missing")
        json.loads(attr_str(f, "model_config"))
        position = json.loads(attr_str(f, "data_position"))
        print(f"{args.checkpoint}: format v{version}, step {step}, mesh dp{mesh[0]} cp{mesh[1]} "
              f"tp{mesh[2]}, data position {position}")
        tensors = 0
        for name, g in f.get("params", {}).items():
            tensors += check_tensor(f"params/{name}", g, problems) is not None
        for adapter, ag in f.get("adapters", {}).items():
            json.loads(attr_str(ag, "config"))
            for name, g in ag.items():
                tensors += check_tensor(f"adapters/{adapter}/{name}", g, problems) is not None
    if args.expect_step is not None and step != args.expect_step:
        problems.append(f"step is {step}, expected {args.expect_step}")
    if args.expect_tensors is not None and tensors != args.expect_tensors:
        problems.append(f"{tensors} tensors, expected {args.expect_tensors}")
    if problems:
        print("FAIL\n" + "\n".join(problems))
        return 1
    print(f"PASS: {tensors} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

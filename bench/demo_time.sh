#!/usr/bin/env bash
# Time `ftlab demo` and `ftlab demo --all` (the previous demo) in one sitting: default, --all, default again, with the
# fp32 matmul speed measured before and after each run. One JSON line per run, then the ratio line. 25-40 minutes on
# a 2-core CPU at 120-200 GFLOP/s. Outputs go to a temporary folder (or $1) and are kept for inspection.
set -u
export HF_HUB_OFFLINE=1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$(mktemp -d -t ftlab-demo-time-XXXX)}; mkdir -p "$out"
mm() { python -c "import sys; sys.path.insert(0, '$here'); from _machine import matmul_gflops; print(round(matmul_gflops(), 1))"; }
run() {
  local name=$1; shift
  rm -rf "$out/$name"
  local before t0 t1 rc after
  before=$(mm); t0=$(date +%s.%N)
  ftlab demo --out "$out/$name" "$@" >"$out/$name.log" 2>&1; rc=$?
  t1=$(date +%s.%N); after=$(mm)
  printf '{"run": "%s", "args": "%s", "rc": %s, "wall_s": %.1f, "matmul_before": %s, "matmul_after": %s}\n' \
    "$name" "$*" "$rc" "$(python -c "print($t1 - $t0)")" "$before" "$after"
}
rows=$(run default1; run all --all; run default2)
echo "$rows"
python - "$rows" <<'PY'
import json, sys
rows = {r["run"]: r for r in map(json.loads, sys.argv[1].splitlines())}
base = rows["all"]["wall_s"]
print(json.dumps({"run": "ratio", "default_over_all": [round(rows[k]["wall_s"] / base, 3) for k in ("default1", "default2")]}))
PY

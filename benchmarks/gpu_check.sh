#!/usr/bin/env bash
# Every GPU-only check of the fused kernels in one call, for a session lent a GPU:
#   1. benchmarks.kernels: each compiled Triton kernel vs its torch reference on sampler-sized
#      problems (equality, speed-up) -> benchmarks/results/kernels.json;
#   2. the samplers wired to the kernels (SD, SJD, GSD group-exact, FKC-CFG, TarFlow, CSpD; the
#      cached windows' ragged attention) on CUDA: the same ids / particles / tokens with
#      backend="triton" as with backend="torch" from the same generator;
#   3. benchmarks.gpu_check_graphs: CUDA-graph plain decoding (sample_ar cuda_graph=True) vs eager
#      on the photos shapes: token mismatches (reported, not required 0) and ms per image.
# Writes benchmarks/results/gpu_check.json (one JSON: each step's exit code and results) in a few
# minutes. Until it has run on a GPU, the compiled path is unverified: the tests and the CPU
# benchmark only run the kernels under the Triton interpreter.
#     bash benchmarks/gpu_check.sh     (PYTHON=... to choose the interpreter; vargen installed with
#                                      pip install -e ., which maps vargen_kernels to kernels/)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels
mkdir -p benchmarks/results
tmp=$(mktemp -d)

timeout 300 "$PY" -m benchmarks.kernels > "$tmp/kernels.log" 2>&1
echo $? > "$tmp/kernels.rc"

timeout 240 "$PY" -m benchmarks.gpu_check_samplers > "$tmp/samplers.log" 2>&1
echo $? > "$tmp/samplers.rc"

timeout 120 "$PY" -m benchmarks.gpu_check_graphs > "$tmp/graphs.log" 2>&1
echo $? > "$tmp/graphs.rc"

"$PY" - "$tmp" <<'PYEOF'
import datetime, json, os, sys
from benchmarks.common import commit
tmp = sys.argv[1]
res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit()}
for step in ("kernels", "samplers", "graphs"):
    res[f"{step}.rc"] = int(open(os.path.join(tmp, f"{step}.rc")).read())
    log = open(os.path.join(tmp, f"{step}.log")).read()
    res[f"{step}.log_tail"] = log[-3000:]
    for line in log.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[len("RESULT "):]))
path = "benchmarks/results/kernels.json"
if res["kernels.rc"] == 0 and os.path.exists(path):
    res.update({k: v for k, v in json.load(open(path)).items() if k.startswith("kernels.")})
# graphs: its rc is 1 only when a case raised; its token mismatches are reported, not gated
res["ok"] = res["kernels.rc"] == 0 and res["samplers.rc"] == 0 and res["graphs.rc"] == 0 and all(
    v for k, v in res.items() if k.endswith(".equal")
)
json.dump(res, open("benchmarks/results/gpu_check.json", "w"), indent=2)
print(json.dumps({k: v for k, v in res.items() if not k.endswith("log_tail")}, indent=2))
PYEOF
rm -rf "$tmp"

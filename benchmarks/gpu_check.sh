#!/usr/bin/env bash
# Every GPU-only check of the fused kernels in one call, for a session lent a GPU:
#   1. benchmarks.kernels: each compiled Triton kernel vs its torch reference on sampler-sized
#      problems (equality, speed-up) -> benchmarks/results/kernels.json;
#   2. the samplers wired to the kernels (SD, SJD, GSD group-exact, FKC-CFG, TarFlow, CSpD; the
#      cached windows' ragged attention) on CUDA: the same ids / particles / tokens with
#      backend="triton" as with backend="torch" from the same generator;
#   3. benchmarks.gpu_check_graphs: CUDA-graph plain decoding (sample_ar cuda_graph=True) vs eager
#      on the photos shapes: token mismatches (reported, not required 0) and ms per image;
#   4. spec_graphs: the CUDA tests of the captured steps (tests/test_jacobi_graph.py and
#      tests/test_ar_graph.py -k cuda: graph-replayed SJD / GSD / plain decoding draw the eager ids,
#      kept graphs replay from a clean state). Their speed: benchmarks.spec_sweep --cuda-graph (README).
# Writes benchmarks/results/gpu_check.json (one JSON: each step's exit code and results). On an
# H200 kernels and samplers took about 85 s together, graphs about 25 s; the timeouts below (540 s in all) keep the
# script inside one 10-minute device command.
#     bash benchmarks/gpu_check.sh     (PYTHON=... to choose the interpreter; vargen installed with
#                                      pip install -e ., which maps vargen_kernels to kernels/)
#     STEPS="graphs" bash benchmarks/gpu_check.sh   (only these steps; the other steps' results in
#                                      gpu_check.json are kept, each with its own <step>.date/.commit)
set -u
STEPS=${STEPS:-kernels samplers graphs spec_graphs}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels
mkdir -p benchmarks/results
tmp=$(mktemp -d)

run() {  # step name, timeout (s), module [args]: only the steps named in $STEPS
    case " $STEPS " in *" $1 "*) ;; *) return ;; esac
    timeout "$2" "$PY" -m "${@:3}" > "$tmp/$1.log" 2>&1
    echo $? > "$tmp/$1.rc"
}
run kernels 200 benchmarks.kernels
run samplers 150 benchmarks.gpu_check_samplers
run graphs 90 benchmarks.gpu_check_graphs
run spec_graphs 100 pytest -q -p no:cacheprovider tests/test_jacobi_graph.py tests/test_ar_graph.py -k cuda

"$PY" - "$tmp" <<'PYEOF'
import datetime, json, os, sys
from benchmarks.common import commit
tmp = sys.argv[1]
STEPS, out = ("kernels", "samplers", "graphs", "spec_graphs"), "benchmarks/results/gpu_check.json"
ran = [s for s in STEPS if os.path.exists(os.path.join(tmp, f"{s}.rc"))]
now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
res = {}
if len(ran) < len(STEPS) and os.path.exists(out):  # a partial run: keep the other steps' results
    old = json.load(open(out))
    res = {k: v for k, v in old.items() if k.split(".")[0] not in ran and k != "ok"}
    for s in STEPS:  # when and where each kept step ran
        if s not in ran and f"{s}.rc" in old:
            res.setdefault(f"{s}.date", old.get("date"))
            res.setdefault(f"{s}.commit", old.get("commit"))
res.update(date=now, commit=commit())
for step in ran:
    res[f"{step}.date"], res[f"{step}.commit"] = now, res["commit"]
    res[f"{step}.rc"] = int(open(os.path.join(tmp, f"{step}.rc")).read())
    log = open(os.path.join(tmp, f"{step}.log")).read()
    res[f"{step}.log_tail"] = log[-3000:]
    for line in log.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[len("RESULT "):]))
path = "benchmarks/results/kernels.json"
if "kernels" in ran and res["kernels.rc"] == 0 and os.path.exists(path):
    res.update({k: v for k, v in json.load(open(path)).items() if k.startswith("kernels.")})
# graphs: its rc is 1 only when a case raised; its token mismatches are reported, not gated
res["ok"] = all(res.get(f"{s}.rc") == 0 for s in STEPS) and all(
    v for k, v in res.items() if k.endswith(".equal")
)
json.dump(res, open(out, "w"), indent=2)
print(json.dumps({k: v for k, v in res.items() if not k.endswith("log_tail")}, indent=2))
PYEOF
rm -rf "$tmp"

#!/usr/bin/env bash
# The README's GPU tables in one call on one GPU: HyperStyle's two paths (Triton kernels, and without Triton) with
# the official code beside them, first calls with empty and warm caches, and StyleFeatureEditor against its official
# code, and where a generator pass spends its time. Run from the repository root:
#
#   bash benchmarks/gpu_tables.sh HYPERSTYLE_DIR SFE_DIR [OUT_DIR]
#
# HYPERSTYLE_DIR / SFE_DIR: checkouts of yuval-alaluf/hyperstyle and AIRI-Institute/StyleFeatureEditor ("-" skips
# that comparison). JSON lines go to OUT_DIR (default: a new temporary folder); stdout gets the tables. Each step has
# a time limit (seconds, from the environment: PIPELINE_S, FRESH_S, GENERATOR_S, SFE_S) so one slow step cannot take
# the others' time; REPS and WARMUP set the timing (default 5 and 2). About 8 minutes on an H100 before the generator
# step was added (the first-call step alone took 119 s there; tables print at the end of each step, so a step cut by
# its limit prints what finished below them).
set -u
hs_dir=${1:?give the HyperStyle checkout (or -)}
sfe_dir=${2:?give the StyleFeatureEditor checkout (or -)}
out=${3:-$(mktemp -d)}
py=${PYTHON:-python3}
reps=${REPS:-5}
warmup=${WARMUP:-2}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
step() { echo "== $1 (t+$(( $(date +%s) - start )) s)"; }

"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
official=()
[ "$hs_dir" != "-" ] && official=(--official "$hs_dir")

step "HyperStyle, default path (Triton kernels), official code beside it"
timeout "${PIPELINE_S:-200}" "$py" benchmarks/bench_pipeline.py --precisions fp32,tf32,bf16 --batches 1,8 \
    --reps "$reps" --warmup "$warmup" --parity --label default ${official[@]+"${official[@]}"} --out "$out/pipeline.jsonl" --table \
    2> "$out/default.log" | grep '^|'
step "HyperStyle without Triton (HYPERSTYLE_COMPILE=0)"
timeout "${PIPELINE_S:-200}" "$py" benchmarks/bench_pipeline.py --no-compile --precisions fp32,tf32,bf16 --batches 1,8 \
    --reps "$reps" --warmup "$warmup" --parity --label no-triton --out "$out/pipeline.jsonl" --table \
    2> "$out/no-triton.log" | grep '^|'
step "HyperStyle first calls (empty caches, then a restart)"
timeout "${FRESH_S:-240}" "$py" benchmarks/bench_pipeline.py --fresh-process --paths default --precisions tf32,bf16 \
    --batches 1,8 --out "$out/fresh.jsonl" --table 2> "$out/fresh.log" | grep '^|'
"$py" - "$out/pipeline.jsonl" "$out/fresh.jsonl" <<'PY'
import json, os, sys
rows = [json.loads(line) for path in sys.argv[1:] if os.path.exists(path) for line in open(path)]
for r in rows:
    if r["kind"] == "first_call":
        print("first call", r["path"], r["precision"], "batch", r["batch"], r["cache"], r["first_call_s"], "s")
    elif r["kind"] == "parity":
        print("parity", r.get("label"), r["precision"], "images", r["images_max_abs_diff"], "codes", r["codes_max_abs_diff"])
    elif r["kind"] in ("official_ops", "official") and (r.get("error") or r["kind"] == "official_ops"):
        print(r["kind"], r.get("ops"), r.get("precision", ""), r.get("error", ""))
PY
step "HyperStyle generator pass by kernel family (default path)"
timeout "${GENERATOR_S:-90}" "$py" benchmarks/bench_generator.py --precisions bf16,tf32 --batches 1,8 \
    --out "$out/generator.jsonl" --table 2> "$out/generator.log" | grep '^|'
if [ "$sfe_dir" != "-" ]; then
    step "StyleFeatureEditor against its official code"
    timeout "${SFE_S:-300}" "$py" benchmarks/bench_sfe.py --official "$sfe_dir" --batches 1,8 --precisions tf32,bf16 \
        --reps "$reps" --warmup "$warmup" --out "$out/sfe.jsonl" --table 2> "$out/sfe.log" | grep '^|'
fi
step "done; JSON lines in $out"

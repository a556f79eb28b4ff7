#!/usr/bin/env bash
# The lifelong benchmarks of docs/RESULTS.md (WISE protocol), on the embedded model and shipped SAE.
# Usage: bash benchmarks/run_lifelong.sh [zsre|zsre-noscope|zsre-allpositions|zsre-sweep|zsre-small|hallucination|hallucination-sweep|hallucination-T1|
#        hallucination-T10|hallucination-T100|hallucination-table|hallucination-small|counterfact|counterfact-T1000] [OUT_DIR]
# zsre = the T=1000 stream (zsre-noscope: without keep_scope, the default before session 13;
# zsre-allpositions: keep_scope with every position of a held edit, session 12's option); zsre-sweep = T=1,10,100 over the same 1000 records; counterfact = one 5000-edit
# stream scored after edit 3000 (T=3000) and 5000 (T=5000); counterfact-T1000 = the first 1000 records as one stream. hallucination-T1/T10/T100 are the sweep's T
# values one per process (run two side by side on 2 cores, OMP_NUM_THREADS=1 each); hallucination-table
# merges them with T=600 into one table. Every run checkpoints and resumes (same command).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${MICROEDIT_DATA:-../shared/data}
OUT=${2:-benchmarks/results}
mkdir -p "$OUT"
ZSRE_REF="$D/zsre/zsre_mend_train-1k.json"
HALLU_REF="$D/hallucination/hallucination-train.json"
CF_REF="$D/counterfact/counterfact-train.json"
run() { .venv/bin/microedit eval "$@"; }
case "${1:-zsre}" in
  zsre)          run --data "$D/zsre/zsre_mend_eval_portability_gpt4.json" --limit 1000 --T 1000 --reference "$ZSRE_REF" \
                     --checkpoint-dir "$OUT/ckpt_zsre" --keep-editor --out "$OUT/zsre_T1000.json" ;;
  zsre-noscope)  run --data "$D/zsre/zsre_mend_eval_portability_gpt4.json" --limit 1000 --T 1000 --reference "$ZSRE_REF" \
                     --config '{"keep_scope": null}' --checkpoint-dir "$OUT/ckpt_zsre_noscope" --out "$OUT/zsre_T1000_noscope.json" ;;
  zsre-allpositions) run --data "$D/zsre/zsre_mend_eval_portability_gpt4.json" --limit 1000 --T 1000 --reference "$ZSRE_REF" \
                     --config '{"scope_positions": null}' --checkpoint-dir "$OUT/ckpt_zsre_allpos" --out "$OUT/zsre_T1000_allpositions.json" ;;
  zsre-sweep)    run --data "$D/zsre/zsre_mend_eval_portability_gpt4.json" --limit 1000 --T 1 10 100 --reference "$ZSRE_REF" \
                     --checkpoint-dir "$OUT/ckpt_zsre_sweep" --out "$OUT/zsre_T1_10_100_n1000.json" ;;
  zsre-small)    run --data "$D/zsre/zsre_mend_eval_portability_gpt4.json" --limit 100 --T 1 10 100 --reference "$ZSRE_REF" \
                     --out "$OUT/zsre_T1_10_100.json" ;;
  hallucination) run --data "$D/hallucination/hallucination-edit.json" --limit 600 --T 600 --reference "$HALLU_REF" \
                     --checkpoint-dir "$OUT/ckpt_hallu" --keep-editor --out "$OUT/hallucination_T600.json" ;;
  hallucination-sweep) run --data "$D/hallucination/hallucination-edit.json" --limit 600 --T 1 10 100 --reference "$HALLU_REF" \
                     --checkpoint-dir "$OUT/ckpt_hallu_sweep" --out "$OUT/hallucination_T1_10_100.json" ;;
  hallucination-T1|hallucination-T10|hallucination-T100)
                 T=${1#hallucination-T}
                 run --data "$D/hallucination/hallucination-edit.json" --limit 600 --T "$T" --reference "$HALLU_REF" \
                     --checkpoint-dir "$OUT/ckpt_hallu_T$T" --out "$OUT/hallucination_T$T.json" ;;
  hallucination-table) .venv/bin/python benchmarks/merge_results.py "$OUT/hallucination_T1_10_100_600.json" --ppl \
                     "$OUT"/hallucination_T{1,10,100,600}.json ;;
  hallucination-small) run --data "$D/hallucination/hallucination-edit.json" --limit 100 --T 1 10 100 --reference "$HALLU_REF" \
                     --out "$OUT/hallucination_T1_10_100.json" ;;
  counterfact)   run --data "$D/counterfact/counterfact-edit.json" --limit 5000 --T 3000 5000 --reference "$CF_REF" \
                     --checkpoint-dir "$OUT/ckpt_cf" --keep-editor --out "$OUT/counterfact_T3000_5000.json" ;;
  counterfact-T1000) run --data "$D/counterfact/counterfact-edit.json" --limit 1000 --T 1000 --reference "$CF_REF" \
                     --checkpoint-dir "$OUT/ckpt_cf1000" --keep-editor --out "$OUT/counterfact_T1000.json" ;;
  *) echo "unknown benchmark $1" >&2; exit 2 ;;
esac

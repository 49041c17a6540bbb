#!/usr/bin/env bash
# The ML-1M DPO study (issue 6): every row of its benchmarks/RESULTS.md tables, one command each.
#   bash benchmarks/study_ml1m.sh                        # all rows, seed 0
#   SEED=1 REF_EPOCHS=200 bash benchmarks/study_ml1m.sh  # another seed, a longer reference
#   SEED=1 ART=artifacts/study-ml1m-seed1 REF=<ckpt> ROWS="dpo-sft-hard-skip" bash ...  # some rows
#   MODEL=two_tower ART=artifacts/study-ml1m-two-tower bash benchmarks/study_ml1m.sh    # two-tower
#   DATA=synthetic ART=/tmp/s REF_EPOCHS=1 bash benchmarks/study_ml1m.sh  # a dry run, minutes
#   OUT=x.json ...                                       # where the table's JSON goes
# Several at once on one CPU box: OMP_NUM_THREADS=1 each (README, "GPU and several GPUs").
# The reference: SASRec (dim 64, 2 blocks, 1 head, dropout 0.2, max_len 200) or the two-tower
# model (dim 64, one hidden layer of 128, mean of the last 50 history items, batch 1024), with
# full-catalog cross-entropy. Each preference row fine-tunes it on next-item pairs (each user's
# latest PAIRS_PER_USER train events) for PREF_EPOCHS; the control trains the reference further
# with its own loss for as many epochs. Every model is evaluated on the test split (leave-one-out,
# full catalog, seen items removed) against the reference and the control.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEED=${SEED:-0}
ART=${ART:-artifacts/study-ml1m}
REF_EPOCHS=${REF_EPOCHS:-34}
PREF_EPOCHS=${PREF_EPOCHS:-1}
PAIRS_PER_USER=${PAIRS_PER_USER:-2}
HARD=${HARD:-16}
HARD_SKIP=${HARD_SKIP:-10}
FAR_SKIP=${FAR_SKIP:-50}
BETAS=${BETAS:-0.03 0.3 1.0 3.0}
ROWS=${ROWS:-all}
DATA=${DATA:-ml1m_sas}
MODEL=${MODEL:-sasrec}
case $MODEL in
  sasrec) MODEL_ARGS=(model=sasrec model.n_heads=1 model.dropout=0.2); REF_BATCH=128
          TAG=$DATA ;;
  two_tower) MODEL_ARGS=(model=two_tower model.max_len=50); REF_BATCH=1024; TAG=${DATA}_two_tower ;;
  *) echo "MODEL=$MODEL: expected sasrec or two_tower" >&2; exit 2 ;;
esac
COMMON=("data=$DATA" "paths.artifacts=$ART" "seed=$SEED" progress=false "${MODEL_ARGS[@]}"
        train.batch_size=128)
# Older checkpoint names hold "=" (best-epoch=3-step=...), so ckpt overrides are quoted.
run_dir() { ls -d "$ART/runs/$1"/*/*/ | head -1; }

$PY pipelines/prepare.py "${COMMON[@]}"
# The reference: REF=<ckpt> reuses one, else it is trained here (best valid NDCG@10 kept).
if [ -z "${REF:-}" ]; then
  [ -n "$(ls -d "$ART/runs/ref"/*/*/ 2>/dev/null)" ] ||
    $PY pipelines/train_reference.py "${COMMON[@]}" train.lr=1e-3 \
      "train.batch_size=$REF_BATCH" "trainer.max_epochs=$REF_EPOCHS" "paths.runs=$ART/runs/ref"
  REF=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['best_ckpt'])" \
        "$(run_dir ref)result.json")
fi

# The compute-matched control: the reference trained further with its own loss.
[ -n "$(ls -d "$ART/runs/control"/*/*/ 2>/dev/null)" ] ||
  $PY pipelines/train_reference.py "${COMMON[@]}" mode=continue "reference.ckpt='$REF'" \
    train.lr=1e-3 "train.batch_size=$REF_BATCH" "trainer.max_epochs=$PREF_EPOCHS" \
    "paths.runs=$ART/runs/control"
CONTROL="$(run_dir control)last.ckpt"

evaluate() {  # name, model ckpt, baseline name, baseline ckpt (skipped when already done)
  [ -f "$ART/eval/$1-vs-$3/metrics.json" ] ||
    $PY pipelines/evaluate.py "${COMMON[@]}" "eval.ckpt='$2'" "reference.ckpt='$4'" \
      "eval.name=$1-vs-$3"
}
evaluate control "$CONTROL" ref "$REF"

preference() {  # name, overrides...
  local name=$1; shift
  [ "$ROWS" = all ] || [[ " $ROWS " == *" $name "* ]] || return 0
  [ -n "$(ls -d "$ART/runs/$name"/*/*/ 2>/dev/null)" ] ||
    $PY pipelines/train_preference.py "${COMMON[@]}" "reference.ckpt='$REF'" train.lr=1e-4 \
      "trainer.max_epochs=$PREF_EPOCHS" "train.max_pairs_per_user=$PAIRS_PER_USER" \
      "paths.runs=$ART/runs/$name" "$@"
  evaluate "$name" "$(run_dir "$name")last.ckpt" ref "$REF"
  evaluate "$name" "$(run_dir "$name")last.ckpt" control "$CONTROL"
}
preference dpo-popularity objective=dpo objective.beta=0.1
preference dpo-hard objective=dpo objective.beta=0.1 "reference.hard_negatives=$HARD"
preference sdpo-hard objective=sdpo objective.beta=0.1 "reference.hard_negatives=$HARD"
preference ipo-hard objective=ipo objective.beta=0.1 "reference.hard_negatives=$HARD"
preference dpo-sft-hard objective=dpo objective.beta=0.1 objective.sft_alpha=1.0 \
  "reference.hard_negatives=$HARD"
# The same with the reference's first HARD_SKIP ranks skipped (its likeliest false negatives).
preference dpo-hard-skip objective=dpo objective.beta=0.1 "reference.hard_negatives=$HARD" \
  "reference.hard_negatives_skip=$HARD_SKIP"
preference dpo-sft-hard-skip objective=dpo objective.beta=0.1 objective.sft_alpha=1.0 \
  "reference.hard_negatives=$HARD" "reference.hard_negatives_skip=$HARD_SKIP"
# The SFT term alone on the same chosen items: what fine-tuning on recent events gives by itself.
preference sft objective=sft
# Skipping FAR_SKIP ranks: fewer false negatives (benchmarks/hard_negative_hits.py counts them).
preference dpo-hard-skip$FAR_SKIP objective=dpo objective.beta=0.1 \
  "reference.hard_negatives=$HARD" "reference.hard_negatives_skip=$FAR_SKIP"
# The beta grid of the best row (beta 0.1 above).
for beta in $BETAS; do
  preference "dpo-sft-hard-skip-beta$beta" objective=dpo "objective.beta=$beta" \
    objective.sft_alpha=1.0 "reference.hard_negatives=$HARD" "reference.hard_negatives_skip=$HARD_SKIP"
done

$PY benchmarks/study_table.py "$ART/eval" --out "${OUT:-benchmarks/results/study_${TAG}_seed$SEED.json}"

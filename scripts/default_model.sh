#!/usr/bin/env bash
# Rebuild dota's default model from scratch: Monte Carlo data, training, evaluation, shipping.
#
#   bash scripts/default_model.sh            # every step; each one resumes where it stopped
#   DATA=/big/disk bash scripts/default_model.sh
#
# Hours of CPU on 2 cores (measured: MC training set 25-55 min, each 1e6 set 15-35 min, the 20 training
# epochs 1.2 h, each plan-block set 25-60 min, the fine-tuning stages 2 h); every step is checkpointed, so an
# interrupted run continues when started again. Patients never cross splits (dota.data.splits.PATIENT_SPLIT).
# Data go to $DATA (default data/mc, about 5 GB); runs to runs/default* and runs/ft-*.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/mc}
RUNS=${RUNS:-runs}
WORKERS=${WORKERS:-2}
mkdir -p "$DATA" "$RUNS"
D=".venv/bin/dota"
GEN="$D generate --engine mcsquare --ct all --energy-range 70:220 --balance-sites --workers $WORKERS --resume"

# 1. Monte Carlo: validation and test at 1e6 primaries, training at 2e4 (unbiased noise averages out under MSE)
$GEN --split val -n 40 --primaries 1000000 --seed 1002 --out "$DATA/mc_val_1e6.h5"
$GEN --phantom heterogeneous,lung,bone --split train -n 4000 --primaries 20000 --seed 1001 --out "$DATA/mc_train_2e4.h5"
$GEN --split test -n 100 --primaries 1000000 --seed 1003 --out "$DATA/mc_test_1e6.h5"

# 2. Training: the small preset learning the correction to the analytic pencil beam
if [ -f "$RUNS/default/state.pt" ]; then
  $D train "$DATA/mc_train_2e4.h5" --val-data "$DATA/mc_val_1e6.h5" --out "$RUNS/default" --resume
else
  $D train "$DATA/mc_train_2e4.h5" --val-data "$DATA/mc_val_1e6.h5" --out "$RUNS/default" --preset small-pb \
    --optimizer adamw --lr 2e-3 --epochs 20 --lr-halving-epochs 5 --seed 0
fi

# 2b. Fine-tuning on blocks cut as plans cut them (scripts/plan_blocks.py: PTV70 plans of the head-and-neck
#     training patients, 6 mm spots and layers, two opposed beams; MCsquare at 2e4), validated on such blocks of the
#     validation patient at 1e5: with the paper's rotations (7,500 blocks, 4 epochs, best 3), then without them
#     (3,000 new blocks, 3 epochs: the beam model's spot is wider along rows than columns, which rotations swap),
#     then on those and the general set together (3 epochs), then 2 epochs on 3,000 more blocks (lr 2.5e-4), then 2
#     on those and the general set together. Each stage resumes; epochs and seeds as shipped.
[ -f "$DATA/hn_planblocks_val_geom.h5" ] || .venv/bin/python scripts/plan_blocks.py "$DATA/hn_planblocks_val_geom.h5" \
  --split val --per-patient 300 --seed 9010
$D generate --engine mcsquare --geometry "$DATA/hn_planblocks_val_geom.h5" --primaries 100000 --workers $WORKERS \
  --resume --seed 1010 --out "$DATA/hn_planblocks_val_1e5.h5"
[ -f "$DATA/hn_planblocks_geom.h5" ] || .venv/bin/python scripts/plan_blocks.py "$DATA/hn_planblocks_geom.h5" \
  --per-patient 750 --seed 9009
$D generate --engine mcsquare --geometry "$DATA/hn_planblocks_geom.h5" --primaries 20000 --workers $WORKERS \
  --resume --seed 1009 --out "$DATA/hn_planblocks_2e4.h5"
[ -f "$DATA/hn_planblocks_c_geom.h5" ] || .venv/bin/python scripts/plan_blocks.py "$DATA/hn_planblocks_c_geom.h5" \
  --per-patient 300 --seed 9012
$D generate --engine mcsquare --geometry "$DATA/hn_planblocks_c_geom.h5" --primaries 20000 --workers $WORKERS \
  --resume --seed 1012 --out "$DATA/hn_planblocks_c_2e4.h5"
[ -f "$DATA/hn_planblocks_d_geom.h5" ] || .venv/bin/python scripts/plan_blocks.py "$DATA/hn_planblocks_d_geom.h5" \
  --per-patient 300 --seed 9013
$D generate --engine mcsquare --geometry "$DATA/hn_planblocks_d_geom.h5" --primaries 20000 --workers $WORKERS \
  --resume --seed 1013 --out "$DATA/hn_planblocks_d_2e4.h5"
FT="--val-data $DATA/hn_planblocks_val_1e5.h5 --optimizer adamw --lr 5e-4 --lr-halving-epochs 1 --ema 0.999"
finetune() {  # finetune RUN INIT "DATA..." "OPTIONS"
  if [ -f "$RUNS/$1/state.pt" ]; then $D train $3 --out "$RUNS/$1" --resume
  else $D train $3 --out "$RUNS/$1" --init "$2" $FT $4; fi
}
finetune ft-planblocks "$RUNS/default/best.safetensors" "$DATA/hn_planblocks_2e4.h5" "--epochs 4"
finetune ft-flips "$RUNS/ft-planblocks/best.safetensors" "$DATA/hn_planblocks_c_2e4.h5" "--epochs 3 --no-augment --flips"
finetune ft-mix "$RUNS/ft-flips/best.safetensors" "$DATA/mc_train_2e4.h5 $DATA/hn_planblocks_c_2e4.h5" \
  "--epochs 3 --no-augment --flips"
FT="--val-data $DATA/hn_planblocks_val_1e5.h5 --optimizer adamw --lr 2.5e-4 --lr-halving-epochs 1 --ema 0.999"
finetune ft-d "$RUNS/ft-mix/best.safetensors" "$DATA/hn_planblocks_d_2e4.h5" "--epochs 2 --no-augment --flips"
finetune ft-e "$RUNS/ft-d/best.safetensors" "$DATA/mc_train_2e4.h5 $DATA/hn_planblocks_d_2e4.h5" \
  "--epochs 2 --no-augment --flips"

# 2c. Range support: the same weights, the dose zero 10 mm past the base dose's 1e-3 extent (exact truncation)
.venv/bin/python scripts/set_support.py "$RUNS/ft-e/best.safetensors" "$RUNS/default/best-support.safetensors" \
  --fraction 1e-3 --margin-mm 10

# 2d. Lateral calibration: the model's width excess over MCsquare on the validation patient's plan blocks
#     (dota.plan.lateral; plans sharpen its spots by it). Its beamlets are unchanged, so evaluation uses 2c's file.
.venv/bin/python scripts/fit_lateral.py "$RUNS/default/best-support.safetensors" "$DATA/hn_planblocks_val_1e5.h5" \
  --out "$RUNS/default/best-lateral.safetensors" --json "$RUNS/default/lateral.json"

# 3. Evaluation on held-out patients (paper protocol, gamma 1%/3mm), DoTA and the analytic engine
for split in val test; do
  $D evaluate "$DATA/mc_${split}_1e6.h5" --engine dota --model "$RUNS/default/best-support.safetensors" \
    --criteria 1%/3mm,2%/2mm --out "$RUNS/eval-$split-dota" --overwrite
  $D evaluate "$DATA/mc_${split}_1e6.h5" --engine analytic --criteria 1%/3mm,2%/2mm \
    --out "$RUNS/eval-$split-analytic" --overwrite
done

# 4. Ship: bf16 error, then weights, record, golden set and model card into src/dota/resources/models/
.venv/bin/python scripts/measure_bf16.py --model "$RUNS/default/best-support.safetensors" --data "$DATA/mc_test_1e6.h5" \
  --n 20 --out "$RUNS/bf16.json"
.venv/bin/python scripts/ship_model.py --checkpoint "$RUNS/default/best-lateral.safetensors" --train "$RUNS/default" \
  --fine-tune "$RUNS/ft-planblocks" --fine-tune "$RUNS/ft-flips" --fine-tune "$RUNS/ft-mix" --fine-tune "$RUNS/ft-d" --fine-tune "$RUNS/ft-e" \
  --eval-dota "$RUNS/eval-test-dota" --eval-analytic "$RUNS/eval-test-analytic" \
  --val-dota "$RUNS/eval-val-dota" --val-analytic "$RUNS/eval-val-analytic" \
  --manifest "$DATA/mc_train_2e4.manifest.json" --manifest "$DATA/mc_val_1e6.manifest.json" \
  --manifest "$DATA/mc_test_1e6.manifest.json" --manifest "$DATA/hn_planblocks_2e4.manifest.json" \
  --manifest "$DATA/hn_planblocks_c_2e4.manifest.json" --manifest "$DATA/hn_planblocks_d_2e4.manifest.json" --manifest "$DATA/hn_planblocks_val_1e5.manifest.json" --golden-from "$DATA/mc_test_1e6.h5" --bf16 "$RUNS/bf16.json"

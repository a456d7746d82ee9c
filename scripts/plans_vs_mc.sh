#!/usr/bin/env bash
# The README's plan table: two plans on patients held out from the default model's training, each made by
# `dota plan`, computed by MCsquare's own full-plan simulation (the reference) and by the default model and
# the analytic engine, with gamma 2%/2mm (10 % cutoff) against MCsquare, DVHs and plan pages.
#
#   bash scripts/plans_vs_mc.sh                 # both plans (about 2 h on 2 cores, nearly all of it MCsquare)
#   PRIMARIES=20000000 bash scripts/plans_vs_mc.sh
#
# Outputs under $RUNS/plans/{liver,hn26}/ (default runs/plans); each step is skipped when its output exists
# (a step that runs again replaces what an interrupted run of it left: --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
PRIMARIES=${PRIMARIES:-5000000}
THREADS=${THREADS:-1}
D=".venv/bin/dota"
CTS=../shared/data/ct
K=$CTS/head_neck_openkbp

run_plan() {  # name ct "plan options" "structures"
  local name=$1 ct=$2 opts=$3 structs=$4 out=$RUNS/plans/$1
  mkdir -p "$out"
  # scripts/plans/NAME.dcm, where there is one, is the plan this command made once and the README's figures
  # use: the same command places the same spots on one machine but not across machines (1,908 / 1,934 / 1,953
  # spot-energies on three session machines), so figures from different sessions compare on that file
  if [ ! -f "$out/plan.dcm" ] && [ -f "scripts/plans/$name.dcm" ]; then cp "scripts/plans/$name.dcm" "$out/plan.dcm"; fi
  [ -f "$out/plan.dcm" ] || $D plan --ct "$ct" $opts --dose 2 --out "$out/plan.dcm" --out "$out/plan.json" \
    --summary "$out/plan_summary.json" --overwrite --no-progress
  [ -f "$out/dose_mcsquare.mhd" ] || $D dose --ct "$ct" --plan "$out/plan.dcm" --engine mcsquare-plan \
    --primaries "$PRIMARIES" --threads "$THREADS" --out "$out/dose_mcsquare.mhd" \
    --summary "$out/dose_mcsquare_summary.json" --overwrite --no-progress
  # Monte Carlo against itself: a second, independent MCsquare run (seed 2) scored against the reference is
  # the pass rate MCsquare's own noise allows (the ceiling of every engine's figure)
  [ -f "$out/dose_mcsquare_seed2.mhd" ] || $D dose --ct "$ct" --plan "$out/plan.dcm" --engine mcsquare-plan \
    --primaries "$PRIMARIES" --threads "$THREADS" --seed 1 --out "$out/dose_mcsquare_seed2.mhd" \
    --reference "$out/dose_mcsquare.mhd" --summary "$out/dose_mcsquare_seed2_summary.json" --overwrite --no-progress
  for eng in dota analytic; do
    [ -f "$out/dose_$eng.mhd" ] || $D dose --ct "$ct" --plan "$out/plan.dcm" --engine "$eng" \
      --out "$out/dose_$eng.mhd" --reference "$out/dose_mcsquare.mhd" $structs --prescription 2 \
      --dvh "$out/dvh_$eng.csv" --summary "$out/dose_${eng}_summary.json" --report "$out/report_$eng" --overwrite --no-progress
  done
}

run_plan liver "$CTS/liver_cort_dicom" \
  "--target sphere:-100,-70,-13,18 --oar sphere:-1,35,-13,10 --angles 270,0 --spot-spacing 4" \
  "--structure sphere:-100,-70,-13,18 --structure sphere:-1,35,-13,10"
run_plan hn26 "$K/pt_26_ct.csv" \
  "--target $K/pt_26_PTV70.csv --oar $K/pt_26_SpinalCord.csv --oar $K/pt_26_Brainstem.csv --angles 90,270 --spot-spacing 6 --layer-spacing 6" \
  "--structure $K/pt_26_PTV70.csv --structure $K/pt_26_SpinalCord.csv --structure $K/pt_26_Brainstem.csv"
$D report --plan "$RUNS/plans/liver/report_dota" --plan "$RUNS/plans/liver/report_analytic" \
  --plan "$RUNS/plans/hn26/report_dota" --plan "$RUNS/plans/hn26/report_analytic" --out "$RUNS/plans/report" --overwrite

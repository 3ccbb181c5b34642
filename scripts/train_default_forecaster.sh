#!/usr/bin/env bash
# Reproduces the forecaster shipped with sleepbot (sleepbot/assets/forecaster.pt) and its evaluation table.
#
#   bash scripts/train_default_forecaster.sh            # from the repository root, with the package installed
#
# 1. collect: the meta-training corpus, configs/collect_meta.yaml (288 runs: digits and MNIST-1D; five and three
#    architectures; Adam, AdamW, SGD, SGD+momentum, Schedule-Free AdamW, Adam with warm-up+cosine, three lrs of
#    each one's band; batch sizes 32 and 128; budgets 300-1,200 steps; a snapshot every 10 steps); skipped when
#    complete (a rerun resumes);
# 2. train: the LSTM forecaster (no step / max_steps input; targets smoothed over the last 5 snapshots up to each
#    horizon) and the WNN-style MLP baseline, on the training runs of a split by run (per dataset, arch and
#    optimizer: about 70% train, 15% val, 15% test), recorded in the checkpoint;
# 3. evaluate: R2_disp on the held-out test runs, against the point future and the smoothed one, per optimizer.
#
# THREADS=1 gives the same forecaster on every machine (see ForecasterTrainConfig.threads).
set -euo pipefail
SLEEPBOT=${SLEEPBOT:-sleepbot}
META=${META:-trajectories/meta}
OUT=${OUT:-sleepbot/assets/forecaster.pt}
THREADS=${THREADS:-1}
STEPS=${STEPS:-2000}

$SLEEPBOT collect --config configs/collect_meta.yaml --out "$META"
$SLEEPBOT train-forecaster --data "$META" --out "$OUT" --max-steps "$STEPS" --target-smooth 5 \
    --threads "$THREADS" --overwrite
$SLEEPBOT evaluate-forecaster --forecaster "$OUT" --data "$META" --stride 2 --by optimizer \
    --json "${OUT%.pt}_test.json" --overwrite
$SLEEPBOT evaluate-forecaster --forecaster "$OUT" --data "$META" --stride 2 --smooth 5 \
    --json "${OUT%.pt}_test_smooth.json" --overwrite

#!/usr/bin/env bash
# Reproduces the forecaster shipped with sleepbot (sleepbot/assets/forecaster.pt) and its evaluation tables.
#
#   bash scripts/train_default_forecaster.sh            # from the repository root, with the package installed
#
# 1. collect: 36 recorded digits runs (configs/collect_digits.yaml: small_cnn, lenet5, mlp x Adam lr 1e-3, 3e-3,
#    1e-2 x 4 seeds, 600 steps, a snapshot every 10 steps), about 3.5 minutes on 2 cores; skipped if present;
# 2. train: the LSTM forecaster and the MLP baseline, 3,000 steps each, on the training runs of a split by run
#    (per dataset, arch and lr: 2 train, 1 val, 1 test of the 4 seeds), recorded in the checkpoint;
# 3. evaluate: on the held-out test runs of digits, and on MNIST-1D (configs/collect_mnist1d.yaml), a dataset,
#    architecture (cnn1d) and layer kind (conv1d) it never saw; tables per lr as JSON next to the checkpoint.
#
# THREADS=1 is the right choice on a 2-core machine shared with other work; use 2 on a quiet one.
set -euo pipefail
SLEEPBOT=${SLEEPBOT:-sleepbot}
DIGITS=${DIGITS:-trajectories/digits}
MNIST1D=${MNIST1D:-trajectories/mnist1d}
OUT=${OUT:-sleepbot/assets/forecaster.pt}
THREADS=${THREADS:-2}

[ -f "$DIGITS/manifest.json" ] || $SLEEPBOT collect --config configs/collect_digits.yaml --out "$DIGITS"
$SLEEPBOT train-forecaster --data "$DIGITS" --out "$OUT" --max-steps 3000 --threads "$THREADS" --overwrite
$SLEEPBOT evaluate-forecaster --forecaster "$OUT" --data "$DIGITS" --by lr --json "${OUT%.pt}_digits_test.json" --overwrite
[ -f "$MNIST1D/manifest.json" ] || $SLEEPBOT collect --config configs/collect_mnist1d.yaml --out "$MNIST1D"
$SLEEPBOT evaluate-forecaster --forecaster "$OUT" --data "$MNIST1D" --by lr --json "${OUT%.pt}_mnist1d.json" --overwrite

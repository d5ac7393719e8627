#!/usr/bin/env bash
# The whole pipeline, offline, on scikit-learn's bundled 8x8 digits with a narrow ResNet-18:
#   phase 1 clean (CC) and adversarial (AC) training with constant saves,
#   phase 2 centered benign training on the AT kernel,
#   clean + PGD evaluation of the three models, transfer attacks between the phase-1 models,
#   the class-0 NTK, its eigen-feature images, kernel motion and eigen-feature analyses,
# then a table of clean / PGD accuracy and the paths of the figures.
#
#   bash demo.sh                  # about 5 minutes on a 2-core CPU (4 with a warm compilation cache)
#   DEMO_JOBS=1 bash demo.sh      # the steps one after the other instead of two chains side by side
#   DEMO_QUICK=1 bash demo.sh     # a few epochs on a subset: checks the plumbing (tests use it)
#   DEMO_OUT=/some/dir bash demo.sh
set -euo pipefail
cd "$(dirname "$0")"

OUT=${DEMO_OUT:-demo_out}
PY=${PYTHON:-python}
# eps = 32/255 ~ 0.125: digits pixels take 17 grey levels (steps of 1/16 = 0.0625), so this is a
# change of two grey levels per pixel: invisible as a digit, yet it takes a clean-trained
# network's PGD accuracy close to zero while an adversarially trained one keeps most of it.
EPS=32
if [[ "${DEMO_QUICK:-0}" == 1 ]]; then
  E1=2; E2=1; SAVE_EPOCH=1; TRAIN="--train_size 200 --test_size 100"; STEPS=3; N_KERNEL=20; DYN_N=20
  FEAT="--n_train 20 --n_test 10 --n_features 4 --n_tail 2 --steps 2"; VIS="--n_images 2 --steps 5 --step_size 0.01"
else
  E1=20; E2=10; SAVE_EPOCH=10; TRAIN=""; STEPS=20; N_KERNEL=100; DYN_N=50
  FEAT="--n_train 100 --n_test 100 --n_features 10 --n_tail 5 --steps 10"; VIS="--n_images 4 --steps 100 --step_size 0.01"
fi
COMMON="--dataset digits --model resnet18 --width 8 --random_seed 0"
TEST="--eps $EPS --pgd_steps $STEPS --save_examples --bonus_dir eval"
[[ "${DEMO_QUICK:-0}" == 1 ]] && TEST="$TEST --test_size 100"
# A rerun of the same demo replaces its outputs; the scripts refuse to replace outputs made with
# other flags, so a quick demo never overwrites a full one (or the reverse) in the same folder.
MODE=$([[ "${DEMO_QUICK:-0}" == 1 ]] && echo quick || echo full)
if [[ -f "$OUT/.demo_mode" && "$(cat "$OUT/.demo_mode")" != "$MODE" ]]; then
  echo "error: $OUT holds the outputs of the $(cat "$OUT/.demo_mode") demo: set DEMO_OUT to another folder, or delete $OUT" >&2
  exit 2
fi
JOBS=${DEMO_JOBS:-2}
[[ "$JOBS" == 1 || "$JOBS" == 2 ]] || { echo "error: DEMO_JOBS must be 1 or 2 (got $JOBS)" >&2; exit 2; }

# Every step appends its command and output to $OUT/logs/<chain>.log and prints one line here
# when it starts and when it ends; `tail -f $OUT/logs/*.log` follows them. A step that needs
# another chain's result waits for it (`after`).
LOGS="$OUT/logs"
DONE="$LOGS/.done"
mkdir -p "$LOGS"
rm -rf "$DONE" "$LOGS"/*.log
mkdir -p "$DONE"
echo "$MODE" > "$OUT/.demo_mode"
T0=$SECONDS
run() {  # run CHAIN STEP COMMAND...
  local chain=$1 step=$2 t=$SECONDS
  shift 2
  [[ -e "$DONE/.failed" ]] && exit 1   # the other chain failed: stop after its current step
  printf '[%4ds] %s  %-22s started\n' $((SECONDS - T0)) "$chain" "$step"
  echo "+ $*" >> "$LOGS/$chain.log"
  if ! "$@" >> "$LOGS/$chain.log" 2>&1; then
    printf '[%4ds] %s  %-22s FAILED; the end of %s:\n' $((SECONDS - T0)) "$chain" "$step" "$LOGS/$chain.log"
    tail -n 25 "$LOGS/$chain.log"
    touch "$DONE/.failed"
    exit 1
  fi
  printf '[%4ds] %s  %-22s done in %ds\n' $((SECONDS - T0)) "$chain" "$step" $((SECONDS - t))
  touch "$DONE/$step"
}
after() {  # after STEP: wait until the other chain has finished STEP
  until [[ -e "$DONE/$1" ]]; do
    [[ -e "$DONE/.failed" ]] && exit 1
    sleep 1
  done
}

# Chain A: the adversarially trained (AT) network and what is built on it.
chain_A() {
  # phase 1, adversarial training (AC), constant saves for the kernel motion. --skip_first_test
  # (here and below): the evaluations below attack the same test images; run_exp's own clean +
  # L-inf + L2 evaluation would repeat that work and the table does not use it.
  run A phase1_AC $PY run_exp.py $COMMON $TRAIN --loaders AC --standard_epochs $E1 --linear_epochs 0 \
    --eps $EPS --skip_first_test --save_models --constant_save --save_path "$OUT/phase1_AC"
  # phase 2: centered (linearized) benign training on the kernel of the AT network at epoch SAVE_EPOCH
  run A phase2_centered $PY run_exp.py $COMMON $TRAIN \
    --base_model_path "$OUT/phase1_AC/parameters_checkpoint_$SAVE_EPOCH.pkl" --loaders CC --linear_epochs $E2 \
    --second_lr 0.01 --centering --eps $EPS --skip_first_test --skip_second_test --save_models \
    --save_path "$OUT/phase2_centered_on_AT"
  # clean and PGD accuracy, saving the adversarial examples
  run A eval_AC $PY eval_and_make_adv.py --model_path "$OUT/phase1_AC/parameters_final.pkl" $TEST
  run A eval_phase2 $PY eval_and_make_adv.py --model_path "$OUT/phase2_centered_on_AT/parameters_final.pkl" \
    --linear --centering $TEST
  # Tsilivis & Kempe: usefulness and robustness of the NTK eigen-features
  run A features_AC $PY analyze_ntk.py features --model_path "$OUT/phase1_AC/parameters_final.pkl" --eps $EPS \
    $FEAT --out_dir "$OUT/analysis/features_AC"
}

# Chain B: the clean-trained network, then the analyses that need both networks.
chain_B() {
  run B phase1_CC $PY run_exp.py $COMMON $TRAIN --loaders CC --standard_epochs $E1 --linear_epochs 0 \
    --eps $EPS --skip_first_test --save_models --constant_save --save_path "$OUT/phase1_CC"
  run B eval_CC $PY eval_and_make_adv.py --model_path "$OUT/phase1_CC/parameters_final.pkl" $TEST
  run B features_CC $PY analyze_ntk.py features --model_path "$OUT/phase1_CC/parameters_final.pkl" --eps $EPS \
    $FEAT --out_dir "$OUT/analysis/features_CC"
  # the class-0 NTK of the AT network on training images, and its eigen-feature images
  after phase1_AC
  run B kernel_AC $PY calculate_kernel.py --model_path "$OUT/phase1_AC/parameters_final.pkl" \
    --dataset_size $N_KERNEL --class_index 0 --random_seed 0 --bonus_dir ntk
  run B eigen_images_AC $PY visualize_ntk_features.py --model_path "$OUT/phase1_AC/parameters_final.pkl" \
    --kernel_path "$OUT/phase1_AC/ntk/saved_kernel_class_0_$N_KERNEL.pkl" $VIS --bonus_dir ntk
  # Tsilivis & Kempe: kernel motion across the constant saves of both runs
  run B kernel_dynamics $PY analyze_ntk.py dynamics --runs "$OUT/phase1_CC" "$OUT/phase1_AC" --labels CC AC \
    --dataset_size $DYN_N --out_dir "$OUT/analysis/dynamics"
  # transfer: each phase-1 model on the other's adversarial examples (no further attack)
  after eval_AC
  run B transfer_AC_to_CC $PY eval_and_make_adv.py --model_path "$OUT/phase1_CC/parameters_final.pkl" --no_adv \
    --bonus_dir eval --test_path "$OUT/phase1_AC/eval/adv_examples_test_results.pkl" --save_name transfer_from_AC
  run B transfer_CC_to_AC $PY eval_and_make_adv.py --model_path "$OUT/phase1_AC/parameters_final.pkl" --no_adv \
    --bonus_dir eval --test_path "$OUT/phase1_CC/eval/adv_examples_test_results.pkl" --save_name transfer_from_CC
}

echo "logs: $LOGS/A.log (adversarially trained network), $LOGS/B.log (clean network, kernel analyses)"
if [[ "$JOBS" == 2 ]]; then  # the two chains side by side, one per core
  chain_A & A=$!
  chain_B & B=$!
  status=0
  wait $A || status=1
  wait $B || status=1
  [[ $status == 0 ]] || { echo "demo failed: see $LOGS" >&2; exit 1; }
else
  chain_A
  chain_B
fi
echo "[$((SECONDS - T0))s] all steps done"

# The table and the figures
$PY - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
def acc(path):
    s = json.load(open(path))
    return s["acc_clean"], s["acc_robust"], s
rows = [("phase-1 CC", "phase1_CC"), ("phase-1 AC", "phase1_AC"),
        ("phase-2 centered on AT kernel", "phase2_centered_on_AT")]
print("\n| model | clean acc | PGD acc |\n|---|---|---|")
for name, d in rows:
    clean, robust, s = acc(os.path.join(out, d, "eval", "test_results_test_results.json"))
    print(f"| {name} | {clean:.3f} | {robust:.3f} |")
print(f"\nPGD: L-inf eps {s['eps_255']}/255, {s['steps']} steps, on {s['n_images']} digits test images")
for src, dst in (("AC", "CC"), ("CC", "AC")):
    clean, _, _ = acc(os.path.join(out, f"phase1_{dst}", "eval", f"test_results_transfer_from_{src}.json"))
    print(f"transfer: phase-1 {dst} on phase-1 {src}'s PGD examples: {clean:.3f}")
print("\nfigures:")
for f in sorted(glob.glob(os.path.join(out, "**", "*.png"), recursive=True)):
    print("  " + f)
EOF

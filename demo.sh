#!/usr/bin/env bash
# The whole pipeline, offline, on scikit-learn's bundled 8x8 digits with a narrow ResNet-18:
#   phase 1 clean (CC) and adversarial (AC) training with constant saves,
#   phase 2 centered benign training on the AT kernel,
#   clean + PGD evaluation of the three models, transfer attacks between the phase-1 models,
#   the class-0 NTK, its eigen-feature images, kernel motion and eigen-feature analyses,
# then a table of clean / PGD accuracy and the paths of the figures.
#
#   bash demo.sh                  # about 10 minutes on a 2-core CPU
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

run() { echo; echo "+ $*"; "$@"; }
# A rerun of the same demo replaces its outputs; the scripts refuse to replace outputs made with
# other flags, so a quick demo never overwrites a full one (or the reverse) in the same folder.
MODE=$([[ "${DEMO_QUICK:-0}" == 1 ]] && echo quick || echo full)
if [[ -f "$OUT/.demo_mode" && "$(cat "$OUT/.demo_mode")" != "$MODE" ]]; then
  echo "error: $OUT holds the outputs of the $(cat "$OUT/.demo_mode") demo: set DEMO_OUT to another folder, or delete $OUT" >&2
  exit 2
fi
mkdir -p "$OUT"
echo "$MODE" > "$OUT/.demo_mode"

# 1-2. phase 1: clean (CC) and adversarial (AC) training, constant saves for the kernel motion
for L in CC AC; do
  run $PY run_exp.py $COMMON $TRAIN --loaders $L --standard_epochs $E1 --linear_epochs 0 --eps $EPS \
    --pgd_eval_steps $STEPS --save_models --constant_save --save_path "$OUT/phase1_$L"
done

# 3. phase 2: centered (linearized) benign training on the kernel of the AT network
run $PY run_exp.py $COMMON $TRAIN --base_model_path "$OUT/phase1_AC/parameters_checkpoint_$SAVE_EPOCH.pkl" \
  --loaders CC --linear_epochs $E2 --second_lr 0.01 --centering --eps $EPS --pgd_eval_steps $STEPS \
  --save_models --save_path "$OUT/phase2_centered_on_AT"

# 4. clean and PGD evaluation of the three models, saving the adversarial examples
TEST="--eps $EPS --pgd_steps $STEPS --save_examples --bonus_dir eval"
[[ "${DEMO_QUICK:-0}" == 1 ]] && TEST="$TEST --test_size 100"
run $PY eval_and_make_adv.py --model_path "$OUT/phase1_CC/parameters_final.pkl" $TEST
run $PY eval_and_make_adv.py --model_path "$OUT/phase1_AC/parameters_final.pkl" $TEST
run $PY eval_and_make_adv.py --model_path "$OUT/phase2_centered_on_AT/parameters_final.pkl" --linear --centering $TEST
# transfer: each phase-1 model on the other's adversarial examples (no further attack)
run $PY eval_and_make_adv.py --model_path "$OUT/phase1_CC/parameters_final.pkl" --no_adv --bonus_dir eval \
  --test_path "$OUT/phase1_AC/eval/adv_examples_test_results.pkl" --save_name transfer_from_AC
run $PY eval_and_make_adv.py --model_path "$OUT/phase1_AC/parameters_final.pkl" --no_adv --bonus_dir eval \
  --test_path "$OUT/phase1_CC/eval/adv_examples_test_results.pkl" --save_name transfer_from_CC

# 5-6. the class-0 NTK of the AT network and its eigen-feature images
run $PY calculate_kernel.py --model_path "$OUT/phase1_AC/parameters_final.pkl" --dataset_size $N_KERNEL \
  --class_index 0 --random_seed 0 --bonus_dir ntk
run $PY visualize_ntk_features.py --model_path "$OUT/phase1_AC/parameters_final.pkl" \
  --kernel_path "$OUT/phase1_AC/ntk/saved_kernel_class_0_$N_KERNEL.pkl" $VIS --bonus_dir ntk

# 7. Tsilivis & Kempe analyses: kernel motion across the constant saves, eigen-features
run $PY analyze_ntk.py dynamics --runs "$OUT/phase1_CC" "$OUT/phase1_AC" --labels CC AC \
  --dataset_size $DYN_N --out_dir "$OUT/analysis/dynamics"
for L in CC AC; do
  run $PY analyze_ntk.py features --model_path "$OUT/phase1_$L/parameters_final.pkl" --eps $EPS $FEAT \
    --out_dir "$OUT/analysis/features_$L"
done

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

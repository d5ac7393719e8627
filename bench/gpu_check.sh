#!/usr/bin/env bash
# One bounded check of a GPU machine (at most --budget_s, 420 s by default, plus a few seconds):
# the project's digits pipeline, bench_train at batch 128 and 512, a PGD-100 evaluation of 1,000
# CIFAR-shaped images, bench_ntk at n=500 and 2,000, peak GPU memory, and estimated wall times
# of the reference README's examples 1-4. Writes $OUT/gpu_check.jsonl (one JSON line per stage,
# a `summary` line last) and $OUT/gpu_check.log (the stages' output). See bench/gpu_check.py.
#
#   bench/gpu_check.sh [--wheels DIR] [--cpu-smoke] [--out DIR] [--budget_s S] [other gpu_check.py flags]
#
# --wheels DIR (or GPU_CHECK_WHEELS=DIR): install every *.whl in DIR first (pip, no index, no
# dependencies) into a private folder put first on PYTHONPATH. For a machine without dm-haiku,
# build DIR here, once, from the repository root:
#   mkdir -p wheels    # ignored by .gitignore, so carried only when asked
#   python3 -m pip download dm-haiku==0.0.17 jmp==0.0.4 --no-deps -d wheels
# (both are pure-Python wheels; jmp is haiku's one dependency that such an image may lack).
# --cpu-smoke: every stage on the CPU with tiny sizes, to check this script (tests/test_gpu_check.py).
# PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-}
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "error: --wheels needs a folder" >&2; exit 2; }; WHEELS=$2; shift 2 ;;
    --wheels=*) WHEELS=${1#--wheels=}; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; echo; exec "$PY" bench/gpu_check.py --help ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  whls=("$WHEELS"/*.whl)
  shopt -u nullglob
  [ ${#whls[@]} -gt 0 ] || { echo "error: no *.whl in --wheels folder $WHEELS" >&2; exit 2; }
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
  trap 'rm -rf "$SITE"' EXIT
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "${whls[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export GPU_CHECK_WHEELS_INSTALLED="$(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
fi
if ! "$PY" -c "import haiku" 2>/dev/null; then
  # Go on: the probe still records the device, and says why haiku failed; the stages that
  # need it fail and are logged as failed.
  echo "warning: dm-haiku is not importable by $PY: pass --wheels DIR (see the top of $0)" >&2
fi
"$PY" bench/gpu_check.py --python "$PY" ${ARGS[@]+"${ARGS[@]}"}

#!/usr/bin/env bash
# `make demo`: the README's pipeline, offline, on the synthetic corpus: the same commands on the
# same paths (data/, out/demo/). Each stage prints its command and its wall and CPU time; the
# timings, the validation loss reached and where the loss curves are come at the end.
set -euo pipefail
export PYTHONUNBUFFERED=1  # show progress as it happens, also when piped
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PROMPT="Once upon a time"

# data/ holding the real TinyStories (a download) is left alone: the demo then works in data/demo/.
DATA=data DATA_FLAG=() TRAIN_FLAG=()
if [ -d data/TinyStories_all_data ] && [ ! -f data/TinyStories_all_data/SYNTHETIC.txt ]; then
  echo "data/ holds the downloaded TinyStories; the demo leaves it alone and works in data/demo/"
  DATA=data/demo DATA_FLAG=(--data_dir data/demo) TRAIN_FLAG=(--data_dir=data/demo)
fi

now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
seconds_since() { local ms=$(($(now_ms) - $1)); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

STAGES=()
stage() {
  local name=$1; shift
  echo
  echo "=== $name"
  local shown=() arg
  for arg in "$@"; do [[ $arg == *" "* ]] && shown+=("\"$arg\"") || shown+=("$arg"); done
  echo "    \$ ${shown[*]}"
  local t0 TIMEFORMAT="--- $name: %R s (CPU: %U s user, %S s system)"
  t0=$(now_ms)
  time "$@"
  STAGES+=("$(printf '%7s s  %s' "$(seconds_since "$t0")" "$name")")
}

total0=$(now_ms)
stage "1/7 synthesise a TinyStories-like corpus (offline, NOT the real TinyStories)" \
  $PY tinystories.py synth "${DATA_FLAG[@]}"
stage "2/7 train a 512-piece SentencePiece vocabulary" \
  $PY tinystories.py train_vocab "${DATA_FLAG[@]}"
stage "3/7 pretokenize the stories" \
  $PY tinystories.py pretokenize "${DATA_FLAG[@]}"
rm -rf out/demo  # a fresh run: train.py never overwrites a checkpoint
stage "4/7 train configs/demo.toml on the CPU" \
  $PY train.py "${TRAIN_FLAG[@]}"
stage "5/7 export llama2.c's model.bin" \
  $PY export.py out/demo out/demo/model.bin
stage "6/7 a story from PyTorch (sample.py)" \
  $PY sample.py --checkpoint out/demo/model.bin --prompt "Once upon a time"
stage "7/7 a story from the C runtime (./run)" \
  bash -c "make -s runomp && OMP_NUM_THREADS=2 ./run out/demo/model.bin -z $DATA/tok512.bin -i '$PROMPT'"

echo
echo "demo finished in $(seconds_since "$total0") s:"
printf '  %s\n' "${STAGES[@]}"
$PY -c 'import json; e = [r for r in map(json.loads, open("out/demo/log.jsonl")) if "val_loss" in r][-1]
print("validation loss %.3f at iteration %d" % (e["val_loss"], e["iter"]))'
echo "loss curves: out/demo/loss.png   model: out/demo/model.bin   tokenizer: $DATA/tok512.bin"

#!/usr/bin/env bash
# `make demo`: the whole pipeline, offline, on the embedded synthetic corpus.
# Each stage says what it does and how long it took.
set -euo pipefail
export PYTHONUNBUFFERED=1  # show progress as it happens, also when piped
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DEMO_DATA:-data/demo}
OUT=${DEMO_OUT:-out/demo}
PROMPT=${DEMO_PROMPT:-Once upon a time}

stage() {
  local name=$1; shift
  echo
  echo "=== $name"
  echo "    \$ $*"
  local t0=$SECONDS
  "$@"
  echo "--- $name: $((SECONDS - t0)) s"
}

total0=$SECONDS
stage "1/6 synthesise a TinyStories-like corpus (synthetic, offline)" \
  $PY tinystories.py synth --data_dir "$DATA" --force
stage "2/6 train a 512-token SentencePiece vocabulary" \
  $PY tinystories.py train_vocab --vocab_size=512 --data_dir "$DATA"
stage "3/6 pretokenize the shards" \
  $PY tinystories.py pretokenize --vocab_size=512 --data_dir "$DATA"
rm -rf "$OUT"  # a fresh run: train.py never overwrites an existing checkpoint
stage "4/6 train the model on the CPU (configs/demo.toml)" \
  $PY train.py configs/demo.toml --data_dir="$DATA" --out_dir="$OUT"
stage "5/6 sample a story with PyTorch (sample.py)" \
  $PY sample.py --checkpoint "$OUT/model.bin" --tokenizer "$DATA/tok512.model" --prompt "$PROMPT" \
    --temperature 0.8 --seed 42 --max_new_tokens 200
if [ -f runtimes/c/run.c ]; then
  stage "6/6 sample a story with the C runtime (./run)" \
    bash -c "make -s runomp >/dev/null && OMP_NUM_THREADS=2 ./run '$OUT/model.bin' -z '$DATA/tok512.bin' -t 0.8 -s 42 -n 200 -i '$PROMPT'"
fi
echo
echo "demo finished in $((SECONDS - total0)) s; model: $OUT/model.bin, tokenizer: $DATA/tok512.bin"

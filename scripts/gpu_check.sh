#!/usr/bin/env bash
# The CUDA paths, checked in one short run on a GPU machine (not part of `make test`):
# bf16 autocast, torch.compile, DDP over NCCL through torchrun, exact resume, and
# training throughput / MFU for the 260K and 15M shapes. Writes logs under $OUT (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
D=/tmp/gpu_data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
step() { echo; echo "=== $*"; local t0=$SECONDS; "$@"; echo "--- rc=$? in $((SECONDS - t0)) s"; }

step $PY tinystories.py synth --data_dir $D --n_shards 8 --stories_per_shard 2500 >/dev/null
step $PY tinystories.py train_vocab --vocab_size=512 --data_dir $D
step $PY tinystories.py pretokenize --vocab_size=512 --data_dir $D
if [ -f .gpu/tokenizer.model ]; then
  step $PY tinystories.py pretokenize --vocab_size=32000 --tokenizer .gpu/tokenizer.model --data_dir $D
fi

COMMON="--data_dir=$D --eval_interval=100 --eval_iters=5 --log_interval=20 --warmup_iters=10"
# 1) eager bf16 training, loss must fall
step $PY train.py configs/demo.toml $COMMON --out_dir=$OUT/eager --max_iters=200 --batch_size=64 --device=cuda
# 2) torch.compile
step $PY train.py configs/demo.toml $COMMON --out_dir=$OUT/compiled --max_iters=200 --batch_size=64 --compile=true
# 3) DDP over NCCL (one GPU: one process; the NCCL process group and DDP wrapper are exercised)
step torchrun --standalone --nproc_per_node=1 train.py configs/demo.toml $COMMON --out_dir=$OUT/ddp \
  --max_iters=100 --batch_size=64 --backend=nccl
# 4) exact resume on the GPU (fp32 to rule out autocast; cuDNN/cuBLAS may still be non-deterministic)
R="configs/demo.toml $COMMON --max_iters=40 --lr_decay_iters=40 --dtype=float32 --dropout=0.1"
step $PY train.py $R --out_dir=$OUT/straight
step $PY train.py $R --out_dir=$OUT/stopped --max_iters=20
step $PY train.py $R --out_dir=$OUT/stopped --init_from=resume
$PY - "$OUT" <<'PYEOF'
import json, sys
def last(d):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/{d}/log.jsonl") if '"loss"' in l]
    return rows[-1]["iter"], rows[-1]["loss"]
print("resume check:", "straight", last("straight"), "stopped+resumed", last("stopped"))
PYEOF
# 5) throughput of the presets (bf16, eager and compiled)
for preset in stories260K stories15M; do
  vocab=$(grep vocab_size configs/$preset.toml | tr -dc 0-9)
  [ "$vocab" = 32000 ] && [ ! -f .gpu/tokenizer.model ] && continue
  for c in false true; do
    step $PY train.py configs/$preset.toml $COMMON --out_dir=$OUT/tp_${preset}_$c --max_iters=60 \
      --gradient_accumulation_steps=1 --compile=$c --eval_iters=0
  done
done
grep -h "tok/s" $OUT/*/log.jsonl >/dev/null 2>&1; echo done

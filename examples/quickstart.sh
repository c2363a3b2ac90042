#!/usr/bin/env bash
# Quickstart: the whole path on this machine (CPU or GPU), in a few minutes on CPU.
#   1. a synthetic captioning set whose captions describe the images (shapes, colours, places)
#   2. a sentencepiece tokenizer with NaViL's special tokens (navil-tokenizer)
#   3. validated WebDataset shards + index (navil-preprocess)
#   4. pretraining of the debug model (navil-pretrain; the loss drops clearly)
#   5. a greedy caption of held-out images (navil-caption)
# Usage: bash examples/quickstart.sh [WORKDIR]   (default ./workdir). Re-running resumes.
# Leaves in WORKDIR: data/ (shards), tokenizer.model, checkpoints/, metrics.jsonl, captions.jsonl
set -euo pipefail
# One hardware queue per GPU: Megatron's TP comm/compute overlap needs it (harmless on CPU).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mkdir -p "${1:-$root/workdir}" && cd "${1:-$root/workdir}" && pwd)
shift $(( $# > 0 ? 1 : 0 ))  # the rest goes to navil-pretrain (e.g. --train-iters 50)
source "$root/scripts/setup_env.sh" >/dev/null
cd "$root"
nproc=${NPROC:-1}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nproc=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count())")}
  extra=(--bf16)
  # The GPU path wants Transformer Engine (the `te` extra); without a working one training
  # falls back to the slow local backend (navil-pretrain says so too). NAVIL_SKIP_TE=1 skips.
  if [[ ${NAVIL_SKIP_TE:-0} != 1 ]] && ! python -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
    echo "[quickstart] GPU found but Transformer Engine does not import: installing the 'te' extra"
    echo "[quickstart] (transformer_engine_torch compiles against this torch: needs nvcc, takes minutes)"
    if ! python -m pip install -q --no-build-isolation -c "$root/constraints.txt" -e "$root[te]"; then
      echo "[quickstart] could not install Transformer Engine; continuing on the local backend."
      echo "[quickstart] To get the fast path: pip install --no-build-isolation 'megatron-navil[te]'"
      echo "[quickstart] with the CUDA toolkit (nvcc) on PATH, or use an NGC PyTorch container."
    fi
  fi
else
  extra=()
fi

step() { echo; echo "== $*"; }

if [[ ! -f $work/raw/train.jsonl ]]; then
  step "1/5 synthetic captioning set -> $work/raw"
  navil-make-captions --output "$work/raw" --num-train 1200 --num-valid 32 --size 128
fi
if [[ ! -f $work/tokenizer/navil_tokenizer.json ]]; then
  step "2/5 tokenizer (500 pieces + 12 NaViL special tokens = the debug model's 512)"
  navil-tokenizer train --input "$work/raw/train.jsonl" --output "$work/tokenizer" --vocab-size 512
fi
cp "$work/tokenizer/tokenizer.model" "$work/tokenizer.model"
step "3/5 preprocess -> $work/data"
for split in train valid; do
  navil-preprocess --input "$work/raw/$split.jsonl" --image-root "$work/raw" \
    --output "$work/data/$split" --tokenizer "$work/tokenizer" --samples-per-shard 256 --num-workers 2
done
step "4/5 pretrain the debug model ($nproc process(es)) -> $work/checkpoints, $work/metrics.jsonl"
torchrun --standalone --nproc_per_node "$nproc" --no-python navil-pretrain \
  --config examples/configs/debug.yaml "${extra[@]}" \
  --data-path "$work/data/train" --valid-data-path "$work/data/valid" \
  --tokenizer-model "$work/tokenizer" --save "$work/checkpoints" \
  --metrics-file "$work/metrics.jsonl" --tensorboard-dir "$work/tensorboard" "$@"
# (the model's vocabulary follows the tokenizer: a tiny corpus may yield fewer than 500 pieces)
python - "$work/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first = {}; last = {}
for r in rows:
    first.setdefault(r["step"], r); last[r["step"]] = r
steps = sorted(last)
head = sum(last[s]["loss"] for s in steps[:10]) / min(10, len(steps))
tail = sum(last[s]["loss"] for s in steps[-10:]) / min(10, len(steps))
print(f"loss: first 10 steps {head:.3f} -> last 10 steps {tail:.3f}")
valid = [last[s]["valid_loss"] for s in steps if last[s].get("valid_loss") is not None]
if valid: print(f"valid loss: {' -> '.join(f'{v:.3f}' for v in valid)}")
PY
step "5/5 caption held-out images with greedy decoding"
navil-caption --load "$work/checkpoints" --tokenizer-model "$work/tokenizer" \
  --image "$work"/raw/images/valid_00000{0,1,2,3}.png | tee "$work/captions.jsonl"
python - "$work/raw/valid.jsonl" "$work/captions.jsonl" <<'PY'
import json, sys
truth = {json.loads(l)["image"]: json.loads(l)["text"] for l in open(sys.argv[1])}
for l in open(sys.argv[2]):
    r = json.loads(l); key = "images/" + r["image"].rsplit("/", 1)[-1]
    print(f"  truth: {truth.get(key)}\n  model: {r['caption']}")
PY

#!/usr/bin/env bash
# Prepared GPU check (well under 8 minutes on one modern GPU). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # results in $OUT if set, else benchmarks/results/
#     DEVICE=cpu SMALL=1 SKIP_INSTALL=1 bash benchmarks/gpu_check.sh   # a tiny CPU dry run of the same steps
#
# Assumes torch with CUDA is already installed; never installs or replaces torch.
#  (a) benchmarks/gpu_step.py: tune step (ReinforceLoss K=4, + coherent K=4 and K=16, + the local
#      estimator with scopes image and batch) vs CE step with
#      bf16 autocast, batch 8 at 512x1024, SegFormer-B0 (random init), 19 classes: ms/step, images/s,
#      peak memory -> gpu_step.json
#  (b) benchmarks/gpu_calibrate.py: calibration at the Cityscapes-val shape (19 classes, 1024x2048):
#      exact fit of 8 frames on the GPU vs one evaluation of the same logits, one streaming
#      histogram pass vs an evaluation pass, and a streaming fit with a 2-fold estimate (every path
#      on CUDA tensors) -> gpu_calibrate.json
#  (c) torchrun --nproc_per_node=min(2, #GPUs) -m segreward train on a tiny synthetic config
#      (NCCL on GPU, gloo on CPU) -> torchrun.log, and its scalars.json copied next to it.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$RESULTS/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
python -c 'import torch;print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(), "gpus:", torch.cuda.device_count())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

# Install the package (no deps: torch stays) and transformers pinned beside the installed torch.
TORCH_VER=$(python -c 'import torch;print(torch.__version__.split("+")[0])')
if [ -z "${SKIP_INSTALL:-}" ]; then
    timeout 120 pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e . failed; using PYTHONPATH=src"
    python -c 'import transformers' 2>/dev/null || timeout 150 pip install -q "torch==$TORCH_VER" transformers \
        || echo "transformers not installable here (offline?): gpu_step.py falls back to the built-in unet"
fi

# (a) step timing
if [ -n "${SMALL:-}" ]; then
    STEP_ARGS=(--device "$DEVICE" --size 64 128 --batch 2 --variant tiny --amp none --iters 2 --warmup 1)
else
    STEP_ARGS=(--device "$DEVICE")
fi
timeout 300 python benchmarks/gpu_step.py "${STEP_ARGS[@]}" --out-dir "$RESULTS" || echo "gpu_step.py FAILED (rc $?)"

# (b) calibration at the Cityscapes-val shape
if [ -n "${SMALL:-}" ]; then
    CAL_ARGS=(--device "$DEVICE" --images 2 --size 64 128 --reps 1)
else
    CAL_ARGS=(--device "$DEVICE")
fi
timeout 240 python benchmarks/gpu_calibrate.py "${CAL_ARGS[@]}" --out-dir "$RESULTS" || echo "gpu_calibrate.py FAILED (rc $?)"

# (c) multi-process sanity run of the trainer
if [ "$DEVICE" = cuda ]; then
    NGPU=$(python -c 'import torch;print(torch.cuda.device_count())')
    NPROC=$(( NGPU >= 2 ? 2 : 1 ))
    AMP=bf16
    [ "$NPROC" = 1 ] && echo "only $NGPU GPU: torchrun with 1 process (NCCL process group of size 1 is not formed by the trainer)"
else
    NPROC=2
    AMP=none
fi
WORK=$(mktemp -d)
timeout 180 torchrun --standalone --nproc_per_node="$NPROC" -m segreward train configs/synthetic_pretrain.yaml \
    train.iters=20 train.eval_every=20 train.checkpoint_every=20 train.log_every=5 train.batch_size=8 \
    train.progress=false train.device="$DEVICE" train.amp=$AMP data.train.n=32 data.val.dusk.n=16 data.val.day.n=16 \
    name=gpu_check_ddp --work-dir "$WORK/run" 2>&1 | tee "$RESULTS/torchrun.log"
echo "torchrun rc ${PIPESTATUS[0]} (nproc $NPROC, device $DEVICE)"
cp "$WORK/run/vis_data/scalars.json" "$RESULTS/torchrun_scalars.json" 2>/dev/null || echo "no scalars.json written"
rm -rf "$WORK"
echo "== done $(date -u +%FT%TZ); results in $RESULTS"

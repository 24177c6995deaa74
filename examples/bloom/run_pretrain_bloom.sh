#!/bin/bash
# Bloom continued pretraining: PAI-Megatron-Patch's examples/bloom/run_pretrain_megatron_bloom.sh,
# run by ember, with the same 21 positional arguments (MEGATRON_PATH and MEGATRON_PATCH_PATH are
# accepted and unused: ember is one installed package).
#
#   sh run_pretrain_bloom.sh dsw ${WORK_DIR}/Megatron-LM ${WORK_DIR}/PAI-Megatron-Patch/ 1.7B 4 32 256 \
#       1e-5 1e-6 bf16 1 1 sel true false 10000 ${WORK_DIR}/wudao/wudao_bloombpe_text_document \
#       ${WORK_DIR}/bloom-ckpts/bloomz-1b7-ember 1000000 100000 ${WORK_DIR}/output_megatron_bloom/
#   EMBER_TINY=1 sh run_pretrain_bloom.sh ...     # the same run, tiny, on this CPU
#
# ENV=dsw: this machine, GPUS_PER_NODE devices (default 8). ENV=dlc: a PAI-DLC job, whose WORLD_SIZE
# (nodes), RANK (this node), MASTER_ADDR, MASTER_PORT and KUBERNETES_CONTAINER_RESOURCE_GPU are set
# by the platform; NCCL_* variables pass through to every rank.
set -e
# `ember` from PATH, else from the .venv of this checkout (where the README's quick start installs it)
command -v ember >/dev/null 2>&1 || PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"
ENV=$1                             # dsw (one machine) or dlc (a multi-node PAI-DLC job)
MEGATRON_PATH=$2                   # unused
MEGATRON_PATCH_PATH=$3             # unused
MODEL_SIZE=$4                      # 1.1B, 1.7B, 7.1B (176B: bloomz)
BATCH_SIZE=$5                      # micro-batch per device: 4, 8
GLOBAL_BATCH_SIZE=$6               # 32, 64
SEQ_LEN=$7                         # 256, 512
LR=$8                              # 1e-5, 5e-5
MIN_LR=$9                          # 1e-6, 5e-6
PR=${10}                           # fp16, bf16
TP=${11}                           # tensor parallel size
PP=${12}                           # pipeline parallel size
AC=${13}                           # activation recomputation: full, sel, none
DO=${14}                           # ZeRO-1 distributed optimizer: true, false
SP=${15}                           # sequence parallel (with TP > 1): true, false
SAVE_INTERVAL=${16}                # iterations between checkpoints
DATASET_PATH=${17}                 # ember preprocess output prefix (PREFIX_text_document)
PRETRAIN_CHECKPOINT_PATH=${18}     # `ember convert --from hf --to ember` output, or none
TRAIN_TOKENS=${19}                 # training length in tokens
WARMUP_TOKENS=${20}                # warmup length in tokens
OUTPUT_BASEPATH=${21}              # checkpoint/, tensorboard/ and log/ go here

if [ "$#" -lt 21 ]; then
    echo "usage: $0 ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE SEQ_LEN LR MIN_LR PR TP PP AC DO SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH" >&2
    exit 2
fi
shift 21

if [ "$ENV" = dsw ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE-8}
    MASTER_ADDR=localhost
    MASTER_PORT=${MASTER_PORT-$(shuf -n 1 -i 10000-65535)}
    NNODES=1
    NODE_RANK=0
elif [ "$ENV" = dlc ]; then
    NNODES=${WORLD_SIZE}
    NODE_RANK=${RANK}
    GPUS_PER_NODE=${KUBERNETES_CONTAINER_RESOURCE_GPU}
    unset WORLD_SIZE RANK   # node-level values of the platform; the launcher sets the ranks' own
else
    echo "ENV must be dsw or dlc, got '$ENV'" >&2
    exit 2
fi
export GPUS_PER_NODE MASTER_ADDR MASTER_PORT NNODES NODE_RANK

case "$MODEL_SIZE" in
    1.1B) MODEL=bloom-1b1 ;;
    1.7B) MODEL=bloom-1b7 ;;
    7.1B) MODEL=bloom-7b1 ;;
    176B) MODEL=bloom-176b ;;   # bloomz (the seed's bloomz-to-megatron-tp8-pp10: TP=8 PP=10)
    *) echo "MODEL_SIZE must be 1.1B, 1.7B, 7.1B or 176B, got '$MODEL_SIZE'" >&2; exit 2 ;;
esac

case "$AC" in
    full) ac_options="--recompute-granularity full --recompute-method uniform" ;;
    sel) ac_options="--recompute-granularity selective" ;;
    none) ac_options="" ;;
esac
[ "$PR" = fp16 ] && pr_options="--fp16"
[ "$PR" = bf16 ] && pr_options="--bf16"
[ "$DO" = true ] && do_options="--use-distributed-optimizer"
[ "$SP" = true ] && [ "$TP" -gt 1 ] && sp_options="--sequence-parallel"
[ "$PRETRAIN_CHECKPOINT_PATH" != none ] && load_options="--load ${PRETRAIN_CHECKPOINT_PATH}"
# the tokenizer (for the end-of-document id): the converted checkpoint's own copy, if it has one
TOKENIZER_PATH=${TOKENIZER_PATH-${PRETRAIN_CHECKPOINT_PATH}/tokenizer}
[ -d "$TOKENIZER_PATH" ] && tokenizer_options="--tokenizer-name-or-path ${TOKENIZER_PATH}"

NAME="${ENV}-pretrain-megatron-bloom-${MODEL_SIZE}-lr-${LR}-bs-${BATCH_SIZE}-seqlen-${SEQ_LEN}-pr-${PR}-tp-${TP}-pp-${PP}-ac-${AC}-do-${DO}-sp-${SP}-tt-${TRAIN_TOKENS}-wt-${WARMUP_TOKENS}"
current_time=$(date "+%Y.%m.%d-%H.%M.%S")
mkdir -p "${OUTPUT_BASEPATH}/tensorboard/" "${OUTPUT_BASEPATH}/checkpoint/" "${OUTPUT_BASEPATH}/log/"

# TRAIN_TOKENS / WARMUP_TOKENS are token budgets: iterations = tokens / GLOBAL_BATCH_SIZE / SEQ_LEN,
# and the learning rate decays linearly over the whole run, as PAI's script computes them.
ember launch --log-dir "${OUTPUT_BASEPATH}/log/${NAME}_${current_time}" -- \
    --model ${MODEL} \
    --save "${OUTPUT_BASEPATH}/checkpoint/${NAME}" \
    --tensorboard-dir "${OUTPUT_BASEPATH}/tensorboard/${NAME}_${current_time}" \
    --split 98,2,0 \
    --data-path ${DATASET_PATH} \
    --lr ${LR} \
    --min-lr ${MIN_LR} \
    --lr-decay-style linear \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --weight-decay 0.1 \
    --clip-grad 1.0 \
    --init-method-std 0.006 \
    --train-tokens ${TRAIN_TOKENS} \
    --lr-warmup-tokens ${WARMUP_TOKENS} \
    --micro-batch-size ${BATCH_SIZE} \
    --global-batch-size ${GLOBAL_BATCH_SIZE} \
    --seq-length ${SEQ_LEN} \
    --log-interval 1 \
    --eval-interval 100 \
    --eval-iters 10 \
    --save-interval ${SAVE_INTERVAL} \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --no-load-optim \
    --no-load-rng \
    --num-workers 8 \
    --seed 1234 \
    ${ac_options} ${pr_options} ${do_options} ${sp_options} ${load_options} ${tokenizer_options} \
    "$@"

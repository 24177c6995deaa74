#!/bin/bash
# Bloom supervised fine-tuning: PAI-Megatron-Patch's examples/bloom/run_finetune_megatron_bloom.sh,
# run by ember, with the same 19 positional arguments (MEGATRON_PATH and MEGATRON_PATCH_PATH are
# accepted and unused).
#
#   sh run_finetune_bloom.sh dsw ${WORK_DIR}/Megatron-LM ${WORK_DIR}/PAI-Megatron-Patch/ 1.7B 4 256 1e-5 \
#       1e-6 bf16 1 1 sel true false ${WORK_DIR}/instruct_latest.json ${WORK_DIR}/dev.json \
#       ${WORK_DIR}/bloom-ckpts/bloomz-1b7-ember 16 ${WORK_DIR}/output_megatron_bloom/
#   EMBER_TINY=1 sh run_finetune_bloom.sh ...     # the same run, tiny, on this CPU
#
# TRAIN/VALID_DATASET_PATH are instruction json/jsonl files ({"instruction", "input", "output"}
# records); they are tokenized first (`ember preprocess`, Alpaca prompt, loss on the responses only)
# into OUTPUT_BASEPATH/data/, then trained on for EPOCH epochs from PRETRAIN_CHECKPOINT_PATH.
set -e
# `ember` from PATH, else from the .venv of this checkout (where the README's quick start installs it)
command -v ember >/dev/null 2>&1 || PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"
ENV=$1                          # dsw (one machine) or dlc (a multi-node PAI-DLC job)
MEGATRON_PATH=$2                # unused
MEGATRON_PATCH_PATH=$3          # unused
MODEL_SIZE=$4                   # 1.1B, 1.7B, 7.1B (176B: bloomz)
BATCH_SIZE=$5                   # micro-batch per device: 4, 8
SEQ_LEN=$6                      # 256, 512
LR=$7                           # 1e-5, 5e-5
MIN_LR=$8                       # 1e-6, 5e-6
PR=$9                           # fp16, bf16
TP=${10}                        # tensor parallel size
PP=${11}                        # pipeline parallel size
AC=${12}                        # activation recomputation: full, sel, none
DO=${13}                        # ZeRO-1 distributed optimizer: true, false
SP=${14}                        # sequence parallel (with TP > 1): true, false
TRAIN_DATASET_PATH=${15}        # training instructions (json/jsonl)
VALID_DATASET_PATH=${16}        # validation instructions (json/jsonl)
PRETRAIN_CHECKPOINT_PATH=${17}  # converted weights, or an ember training --save folder
EPOCH=${18}                     # epochs: 16
OUTPUT_BASEPATH=${19}           # checkpoint/, tensorboard/, log/ and data/ go here

if [ "$#" -lt 19 ]; then
    echo "usage: $0 ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE SEQ_LEN LR MIN_LR PR TP PP AC DO SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH" >&2
    exit 2
fi
shift 19

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
    unset WORLD_SIZE RANK
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
TOKENIZER_PATH=${TOKENIZER_PATH-${PRETRAIN_CHECKPOINT_PATH}/tokenizer}

FT_NAME="${ENV}-finetune-megatron-bloom-${MODEL_SIZE}-lr-${LR}-ep-${EPOCH}-bs-${BATCH_SIZE}-seqlen-${SEQ_LEN}-pr-${PR}--do-${DO}-tp-${TP}-ac-${AC}-sp-${SP}"
current_time=$(date "+%Y.%m.%d-%H.%M.%S")
mkdir -p "${OUTPUT_BASEPATH}/tensorboard/" "${OUTPUT_BASEPATH}/checkpoint/" "${OUTPUT_BASEPATH}/log/" "${OUTPUT_BASEPATH}/data/"

if [ -n "${EMBER_TINY}" ] && [ "${EMBER_TINY}" != 0 ]; then
    tiny_paths=$(ember tiny --shell)   # TINY_CORPUS, TINY_ALPACA, TINY_TOKENIZER, ...
    eval "${tiny_paths}"
    TRAIN_DATASET_PATH=${TINY_ALPACA}
    VALID_DATASET_PATH=${TINY_ALPACA}
    TOKENIZER_PATH=${TINY_TOKENIZER}
fi
for split in train valid; do
    [ $split = train ] && input=${TRAIN_DATASET_PATH} || input=${VALID_DATASET_PATH}
    ember preprocess --input "${input}" --output-prefix "${OUTPUT_BASEPATH}/data/${split}" \
        --handler-name AlpacaStyleInstructionHandler --tokenizer-type PretrainedFromHF \
        --tokenizer-name-or-path "${TOKENIZER_PATH}" --workers 4 --log-interval 1000 --overwrite
done

ember launch --log-dir "${OUTPUT_BASEPATH}/log/${FT_NAME}_${current_time}" -- \
    --model ${MODEL} \
    --finetune \
    --load ${PRETRAIN_CHECKPOINT_PATH} \
    --save "${OUTPUT_BASEPATH}/checkpoint/${FT_NAME}" \
    --tensorboard-dir "${OUTPUT_BASEPATH}/tensorboard/${FT_NAME}_${current_time}" \
    --train-data-path "${OUTPUT_BASEPATH}/data/train" \
    --valid-data-path "${OUTPUT_BASEPATH}/data/valid" \
    --tokenizer-name-or-path "${TOKENIZER_PATH}" \
    --seq-length ${SEQ_LEN} \
    --micro-batch-size ${BATCH_SIZE} \
    --train-epochs ${EPOCH} \
    --lr ${LR} \
    --min-lr ${MIN_LR} \
    --lr-decay-style cosine \
    --weight-decay 0.1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --init-method-std 0.01 \
    --num-workers 0 \
    --log-interval 1 \
    --eval-interval 1000 \
    --eval-iters 10 \
    --save-interval 1000000 \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --no-load-optim \
    --no-load-rng \
    --seed 1234 \
    ${ac_options} ${pr_options} ${do_options} ${sp_options} \
    "$@"

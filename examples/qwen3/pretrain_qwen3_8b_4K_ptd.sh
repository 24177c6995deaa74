#!/bin/bash
# Qwen3-8B pretraining, 4K sequences: MindSpeed-LLM's examples/mcore/qwen3/pretrain_qwen3_8b_4K_ptd.sh,
# run by ember. One node of 8 devices, TP=1 PP=4.
#
#   bash examples/qwen3/pretrain_qwen3_8b_4K_ptd.sh
#   EMBER_TINY=1 bash examples/qwen3/pretrain_qwen3_8b_4K_ptd.sh   # the same layout, tiny, on this CPU
#
# DATA_PATH is the prefix `ember preprocess` printed (it ends in _text_document). CKPT_LOAD_DIR
# empty trains from random initialisation; otherwise it is the converted Hugging Face weights
# (`ember convert --from hf --to ember`). Multi-node: the same script on every node with
# MASTER_ADDR = the main node's address, NNODES, and NODE_RANK = 0 .. NNODES-1; without shared
# storage add --no-shared-storage. Rank logs: logs/worker_<rank>.log.
set -e
# `ember` from PATH, else from the .venv of this checkout (where the README's quick start installs it)
command -v ember >/dev/null 2>&1 || PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"

NPUS_PER_NODE=${NPUS_PER_NODE-${GPUS_PER_NODE-8}}
MASTER_ADDR=${MASTER_ADDR-localhost}
MASTER_PORT=${MASTER_PORT-6000}
NNODES=${NNODES-1}
NODE_RANK=${NODE_RANK-0}
WORLD_SIZE=$(($NPUS_PER_NODE * $NNODES))

CKPT_SAVE_DIR=${CKPT_SAVE_DIR-"./ckpt/qwen3-8b"}
DATA_PATH=${DATA_PATH-"./dataset/enwiki_text_document"}
TOKENIZER_PATH=${TOKENIZER_PATH-"./model_from_hf/qwen3_hf/"}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR-""}

TP=${TP-1}
PP=${PP-4}
CP=${CP-1}
MBS=${MBS-1}
GBS=${GBS-64}
SEQ_LENGTH=${SEQ_LENGTH-4096}
TRAIN_ITERS=${TRAIN_ITERS-2000}

GPUS_PER_NODE=${NPUS_PER_NODE}
export GPUS_PER_NODE MASTER_ADDR MASTER_PORT NNODES NODE_RANK WORLD_SIZE

# --model qwen3-8b is the seed's architecture (36 layers, 4096 wide, GQA 32/8, q/k RMSNorm, rope
# base 1e6, untied, vocab 151936). --recompute-granularity full is added because
# `ember plan qwen3-8b --gpu-mem 64GB --seq-length 4096 --tp 1 --pp 4 ...` needs it to fit 64 GB.
ember launch -- \
    --model qwen3-8b \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --max-position-embeddings ${SEQ_LENGTH} \
    --make-vocab-size-divisible-by 1 \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --lr 1.25e-6 \
    --lr-decay-style cosine \
    --min-lr 1.25e-7 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --init-method-std 0.01 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 4096 \
    --seed 42 \
    --bf16 \
    --train-iters ${TRAIN_ITERS} \
    --seq-length ${SEQ_LENGTH} \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --use-distributed-optimizer \
    --overlap-grad-reduce \
    --overlap-param-gather \
    --recompute-granularity full \
    --recompute-method uniform \
    --data-path ${DATA_PATH} \
    --split 100,0,0 \
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 0 \
    --no-load-optim \
    --no-load-rng \
    ${CKPT_LOAD_DIR:+--load ${CKPT_LOAD_DIR}} \
    --save ${CKPT_SAVE_DIR} \
    "$@"

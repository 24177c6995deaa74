#!/bin/bash
# Grok1-40B (MoE) pretraining: ModelLink's examples/mcore/grok1/pretrain_grok1_40b_ptd.sh, run by ember.
# 2 nodes x 8 devices, TP=4 PP=2 EP=2.
#
#   NODE_RANK=0 MASTER_ADDR=<node 0 address> bash examples/grok1/pretrain_grok1_40b_ptd.sh   # on node 0
#   NODE_RANK=1 MASTER_ADDR=<node 0 address> bash examples/grok1/pretrain_grok1_40b_ptd.sh   # on node 1
#   EMBER_TINY=1 bash examples/grok1/pretrain_grok1_40b_ptd.sh     # the same layout, tiny, on this CPU
#
# Without shared storage between the nodes, pass --no-shared-storage (every node then builds its
# own data-index cache). Rank logs: logs/worker_<rank>.log.
set -e
# `ember` from PATH, else from the .venv of this checkout (where the README's quick start installs it)
command -v ember >/dev/null 2>&1 || PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"

CKPT_SAVE_DIR=${CKPT_SAVE_DIR-"./ckpt/grok1-40B/"}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR-""}                                             # empty: random init
TOKENIZER_MODEL=${TOKENIZER_MODEL-"./model_from_hf/grok1-40B/tokenizer.model"}
DATA_PATH=${DATA_PATH-"./dataset/grok1-40B/alpaca_text_document"}

GPUS_PER_NODE=${GPUS_PER_NODE-8}
MASTER_ADDR=${MASTER_ADDR-localhost}        # the main node's address on every node
MASTER_PORT=${MASTER_PORT-6000}
NNODES=${NNODES-2}
NODE_RANK=${NODE_RANK-0}
WORLD_SIZE=$(($GPUS_PER_NODE * $NNODES))

TP=${TP-4}
PP=${PP-2}
EP=${EP-2}

export GPUS_PER_NODE MASTER_ADDR MASTER_PORT NNODES NODE_RANK WORLD_SIZE

# --model grok1-40b is the seed's 8-layer Grok-1 (sandwich norms, embedding/output multipliers,
# 8 experts top-2, aux loss 1e-2). The seed shards the optimizer (--use-distributed-optimizer);
# ember keeps fp32 master weights, and `ember plan grok1-40b --nodes 2 --gpu-mem 64GB --tp 4 --pp 2
# --ep 2 --recompute full` fits 64 GB only with the parameters sharded too: --use-torch-fsdp2.
ember launch -- \
    --model grok1-40b \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    $( [ "${TP}" -gt 1 ] && echo --sequence-parallel ) \
    --seq-length 8192 \
    --max-position-embeddings 8192 \
    --init-method-std 0.01 \
    --moe-router-topk 2 \
    --moe-aux-loss-coeff 1e-2 \
    --tokenizer-type Llama2Tokenizer \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --data-path ${DATA_PATH} \
    --split 99990,8,2 \
    --micro-batch-size 1 \
    --global-batch-size 128 \
    --lr 1e-5 \
    --train-iters 5000 \
    --lr-decay-iters 1280 \
    --lr-decay-style cosine \
    --min-lr 1.0e-6 \
    --weight-decay 0.1 \
    --lr-warmup-iters 2 \
    --clip-grad 1.0 \
    --bf16 \
    --use-torch-fsdp2 \
    --overlap-grad-reduce \
    --recompute-granularity full \
    --recompute-method uniform \
    --log-interval 1 \
    --save-interval 5000 \
    --eval-interval 5000 \
    --eval-iters 100 \
    --no-load-optim \
    --no-load-rng \
    ${CKPT_LOAD_DIR:+--load ${CKPT_LOAD_DIR}} \
    --save ${CKPT_SAVE_DIR} \
    "$@"

#!/bin/bash
# Llama2-7B pretraining: ModelLink's examples/mcore/llama2/pretrain_llama2_7b_ptd.sh, run by ember.
#
#   bash examples/llama2/pretrain_llama2_7b_ptd.sh                # the full model (8 devices, 64 GB each)
#   EMBER_TINY=1 bash examples/llama2/pretrain_llama2_7b_ptd.sh   # the same run, tiny, on this CPU
#
# Set the paths and the layout below (or in the environment). Multi-node: run this same script on
# every node with MASTER_ADDR = the main node's address and NODE_RANK = 0 .. NNODES-1; without
# shared storage add --no-shared-storage. Rank logs: logs/worker_<rank>.log.
set -e
# `ember` from PATH, else from the .venv of this checkout (where the README's quick start installs it)
command -v ember >/dev/null 2>&1 || PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"

# paths (quote them)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR-"./ckpt/llama-2-7b"}                        # checkpoints are written here
CKPT_LOAD_DIR=${CKPT_LOAD_DIR-"./model_weights/llama-2-7b-ember/"}       # `ember convert --from hf --to ember` output; empty: random init
TOKENIZER_MODEL=${TOKENIZER_MODEL-"./model_from_hf/llama-2-7b-hf/tokenizer.model"}
# one dataset, or several: "0.5 ./dataset/enwiki_text_document1 0.5 ./dataset/enwiki_text_document2"
# (weights given) or "./dataset/enwiki_text_document1 ./dataset/enwiki_text_document2" (weights from sizes)
DATA_PATH=${DATA_PATH-"./dataset/enwiki_text_document"}

GPUS_PER_NODE=${GPUS_PER_NODE-8}
MASTER_ADDR=${MASTER_ADDR-localhost}
MASTER_PORT=${MASTER_PORT-6000}
NNODES=${NNODES-1}
NODE_RANK=${NODE_RANK-0}
WORLD_SIZE=$(($GPUS_PER_NODE * $NNODES))

TP=${TP-1}
PP=${PP-2}

export GPUS_PER_NODE MASTER_ADDR MASTER_PORT NNODES NODE_RANK WORLD_SIZE

# The architecture is named by --model (the seed's --num-layers 32 --hidden-size 4096 ... flags are
# accepted too). Fused-kernel flags (--use-flash-attn, --use-fused-*) have no ember equivalent:
# ember picks SDPA and fused AdamW itself. --recompute-granularity full is added because
# `ember plan llama2-7b --gpus 8 --gpu-mem 64GB --tp 1 --pp 2 ...` needs it to fit 64 GB.
ember launch -- \
    --model llama2-7b \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    $( [ "${TP}" -gt 1 ] && echo --sequence-parallel ) \
    --tokenizer-type Llama2Tokenizer \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --seq-length 4096 \
    --max-position-embeddings 4096 \
    --micro-batch-size 1 \
    --global-batch-size 256 \
    --make-vocab-size-divisible-by 1 \
    --lr 1.25e-6 \
    --train-iters 5000 \
    --lr-decay-style cosine \
    --min-lr 1.25e-7 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --init-method-std 0.01 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 65536 \
    --use-distributed-optimizer \
    --overlap-grad-reduce \
    --recompute-granularity full \
    --bf16 \
    --data-path ${DATA_PATH} \
    --split 949,50,1 \
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 1000 \
    --eval-iters 10 \
    --no-load-optim \
    --no-load-rng \
    ${CKPT_LOAD_DIR:+--load ${CKPT_LOAD_DIR}} \
    --save ${CKPT_SAVE_DIR} \
    "$@"

#!/bin/bash
# Qwen3 pretraining data: MindSpeed-LLM's examples/mcore/qwen3/data_convert_qwen3_pretrain.sh, run by ember.
#
#   bash examples/qwen3/data_convert_qwen3_pretrain.sh
#   EMBER_TINY=1 bash examples/qwen3/data_convert_qwen3_pretrain.sh   # built-in corpus, tiny tokenizer
#
# --input is a file or a folder of .parquet/.csv/.json/.jsonl/.txt/.arrow (one format per folder);
# --json-keys text input output would write one dataset per column; --n-subs N splits a large input
# into N parts processed in parallel and merged (same bytes). Writes ${OUTPUT_PREFIX}_text_document.
set -e
# `ember` from PATH, else from the .venv of this checkout (where the README's quick start installs it)
command -v ember >/dev/null 2>&1 || PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"

INPUT=${INPUT-"./dataset/train-00000-of-00042-d964455e17e96d5a.parquet"}   # e.g. lsb/enwiki20230101
TOKENIZER_PATH=${TOKENIZER_PATH-"./model_from_hf/qwen3_hf/"}                # the Hugging Face folder
OUTPUT_PREFIX=${OUTPUT_PREFIX-"./dataset/enwiki"}

if [ -n "${EMBER_TINY}" ] && [ "${EMBER_TINY}" != 0 ]; then
    tiny_paths=$(ember tiny --shell)   # TINY_CORPUS, TINY_ALPACA, TINY_TOKENIZER, ...
    eval "${tiny_paths}"
    INPUT=${TINY_CORPUS}
    TOKENIZER_PATH=${TINY_TOKENIZER}
fi

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"
ember preprocess \
    --input ${INPUT} \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --tokenizer-type PretrainedFromHF \
    --handler-name GeneralPretrainHandler \
    --output-prefix ${OUTPUT_PREFIX} \
    --json-keys text \
    --workers 4 \
    --log-interval 1000 \
    "$@"

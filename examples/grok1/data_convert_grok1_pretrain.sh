#!/bin/bash
# Grok1-40B data: ModelLink's `python ./tools/preprocess_data.py` on the Alpaca parquet, run by ember.
#
#   bash examples/grok1/data_convert_grok1_pretrain.sh
#   EMBER_TINY=1 bash examples/grok1/data_convert_grok1_pretrain.sh   # built-in corpus, tiny tokenizer
#
# Writes ${OUTPUT_PREFIX}_text_document.bin/.idx: the DATA_PATH of pretrain_grok1_40b_ptd.sh.
set -e
# `ember` from PATH, else from the .venv of this checkout (where the README's quick start installs it)
command -v ember >/dev/null 2>&1 || PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"

INPUT=${INPUT-"./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet"}   # tatsu-lab/alpaca
TOKENIZER_PATH=${TOKENIZER_PATH-"./model_from_hf/grok1-40B/"}               # the Hugging Face folder
OUTPUT_PREFIX=${OUTPUT_PREFIX-"./dataset/grok1-40B/alpaca"}

if [ -n "${EMBER_TINY}" ] && [ "${EMBER_TINY}" != 0 ]; then
    tiny_paths=$(ember tiny --shell)   # TINY_CORPUS, TINY_ALPACA, TINY_TOKENIZER, ...
    eval "${tiny_paths}"
    INPUT=${TINY_ALPACA}
    TOKENIZER_PATH=${TINY_TOKENIZER}
fi

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"
ember preprocess \
    --input ${INPUT} \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --output-prefix ${OUTPUT_PREFIX} \
    --workers 4 \
    --log-interval 1000 \
    --tokenizer-type PretrainedFromHF \
    "$@"

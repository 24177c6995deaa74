"""Megatron's own GPT datasets (megatron-core), built the way Megatron's pretraining builds them,
for the tests that compare ember's samples with them."""

import warnings

import numpy as np


class _Tokenizer:
    """What Megatron's GPTDataset asks of a tokenizer when no masks are reset."""
    vocab_size = None
    eod = 0
    unique_identifiers = {"class": "TestTokenizer"}


def megatron_datasets(blend, split, seq_length, seed, sizes, per_split=None):
    """Megatron's train/valid/test datasets for a blend ([prefixes], weights|None)."""
    from megatron.core.datasets import gpt_dataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    config = gpt_dataset.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, blend_per_split=per_split,
        split=split, path_to_cache=None, tokenizer=_Tokenizer(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(gpt_dataset.GPTDataset, sizes, lambda: True, config).build()


def megatron_tokens(dataset, index):
    """The seq_length + 1 tokens of a Megatron sample: its inputs plus the last label."""
    sample = dataset[index]
    return np.concatenate([sample["tokens"].numpy(), sample["labels"][-1:].numpy()])


def assert_same_samples(reference, ours):
    """Megatron's (train, valid, test) datasets against ember's, sample for sample."""
    for theirs, mine in zip(reference, ours):
        if theirs is None:
            assert mine is None
            continue
        assert len(mine) == len(theirs)
        for i in range(len(theirs)):
            np.testing.assert_array_equal(mine[i]["tokens"], megatron_tokens(theirs, i), err_msg=f"sample {i}")

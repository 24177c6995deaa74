"""Which samples a run trains on: `--data-path` blends, `--split`, sample counts, blending indices.

Everything here follows Megatron-LM (`megatron/core/datasets/blended_megatron_dataset_builder.py`,
`blended_dataset.py`, `helpers.cpp`, `megatron/training/training.py`) so that the same flags give
the same samples in the same order:

- `--data-path "0.3 P1 0.7 P2"`: weights normalised to sum 1; each dataset is asked for
  `ceil(ceil(size * weight) * (1 + surplus))` samples and the blend interleaves them greedily.
- `--data-path "P1 P2"`: each dataset is one epoch of its split, and the weights are those
  datasets' sample counts (their token counts divided by the sequence length).
- `--split 969,30,1` cuts every dataset's documents into train/valid/test ranges.
- `--train-data-path/--valid-data-path/--test-data-path`: one blend per split, no `--split`.

`build_datasets` (at the end) assembles the three splits out of `GPTDataset`s or
`FinetuneDataset`s, with the on-disk index caches of `index_cache`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ember.config.data_spec import SPLIT_NAMES, normalize_weights, parse_data_path, parse_split
from ember.data.finetune_dataset import FinetuneDataset, FinetuneSource, is_finetune_prefix
from ember.data.gpt_dataset import GPTDataset, lengths_fingerprint
from ember.data.index_cache import IndexCache, build_on_one_rank_first
from ember.data.indexed import IndexedDataset, dataset_exists
from ember.errors import EmberError

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "969,30,1"  # Megatron-LM's default when --data-path is given without --split
DEFAULT_MID_LEVEL_SURPLUS = 0.005  # Megatron's --mid-level-dataset-surplus


# --------------------------------------------------------------------------------------------
# Parsing the flags


def blend_of(entries: list[tuple[float | None, str]]) -> tuple[list[str], list[float] | None]:
    """Parsed `--data-path` entries -> (prefixes, normalised weights or None)."""
    prefixes = [path for _, path in entries]
    weights = [w for w, _ in entries]
    if all(w is None for w in weights):
        return prefixes, None
    return prefixes, normalize_weights(weights)  # type: ignore[arg-type]


def split_matrix(fractions: Sequence[float]) -> list[tuple[float, float] | None]:
    """[0.969, 0.03, 0.001] -> [(0, 0.969), (0.969, 0.999), (0.999, 1.0)]; an empty part -> None."""
    bounds = [0.0]
    for fraction in fractions:
        bounds.append(bounds[-1] + fraction)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int] | None]:
    """The [begin, end) document range of each split, rounded as Megatron rounds them."""
    ranges: list[tuple[int, int] | None] = []
    for bookend in split_matrix(parse_split(split)):
        if bookend is None:
            ranges.append(None)
        else:
            ranges.append((int(round(bookend[0] * float(num_documents))),
                           int(round(bookend[1] * float(num_documents)))))
    return ranges


def train_valid_test_num_samples(
    train_iters: int | None = None,
    train_samples: int | None = None,
    *,
    global_batch_size: int,
    eval_interval: int | None,
    eval_iters: int,
    full_validation: bool = False,
) -> tuple[int, int | None, int]:
    """How many samples each split must provide, exactly as Megatron-LM computes it.

    The train/valid counts decide how many epochs the indices span, so they change the sample
    order: a run and a comparison tool must pass the same numbers. With `train_samples`,
    Megatron derives `train_iters = train_samples // global_batch_size` for the eval count.
    `full_validation` gives None for valid (one epoch of the valid split).
    """
    if train_samples:
        train = int(train_samples)
        iters = train // global_batch_size if not train_iters else int(train_iters)
    elif train_iters is not None:
        iters = int(train_iters)
        train = iters * global_batch_size
    else:
        raise EmberError("give --train-iters or --train-samples")
    if full_validation:
        valid = None
    elif eval_interval:
        valid = (iters // eval_interval + 1) * eval_iters * global_batch_size
    else:
        valid = 0
    return train, valid, eval_iters * global_batch_size


def samples_per_dataset(weights: Sequence[float], sizes: Sequence[int | None],
                        surplus: float = 0.0) -> list[list[int]]:
    """For each dataset, the samples to request per split: ceil(ceil(size * w) * (1 + surplus))."""
    for size in sizes:
        if size is None:
            raise EmberError("a weighted --data-path blend needs a sample count for every split "
                             "(full validation works only with unweighted blends)")
    return [[int(math.ceil(math.ceil(size * weight) * (1 + surplus))) for size in sizes]  # type: ignore[operator]
            for weight in weights]


# --------------------------------------------------------------------------------------------
# Blending indices (helpers.cpp's build_blending_indices / build_exhaustive_blending_indices)


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave datasets so that every prefix of the blend follows `weights` as closely as can be.

    Step s draws from the dataset whose deficit `weights[i] * max(s, 1) - drawn[i]` is largest
    (the lowest index on ties), with the float64 arithmetic of Megatron's C++ so that near-ties
    resolve the same way. The greedy choice depends on the whole history (it is the "smooth
    weighted round-robin"), so this is a plain loop: about 0.3 µs per sample for a few datasets,
    built once and then cached.
    Returns (dataset_index int16, dataset_sample_index int64).
    """
    weights = [float(w) for w in weights]
    count = len(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    if count == 1 or size == 0:
        sample_index[:] = np.arange(size)
        return dataset_index, sample_index
    drawn = [0] * count
    chosen = [0] * size
    others = range(1, count)
    first_weight = weights[0]
    for step in range(size):
        t = float(max(step, 1))
        best = 0
        best_error = first_weight * t - drawn[0]
        for i in others:
            error = weights[i] * t - drawn[i]
            if error > best_error:
                best_error = error
                best = i
        chosen[step] = best
        drawn[best] += 1
    dataset_index[:] = chosen
    _number_draws(dataset_index, sample_index, count)
    return dataset_index, sample_index


def exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw exactly `sizes[i]` samples from dataset i, in proportion to the sizes, until all are spent."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    weights = [s / float(total) for s in sizes]
    drawn = [0] * len(sizes)
    unspent = [i for i, s in enumerate(sizes) if s > 0]
    chosen = [0] * total
    for step in range(total):
        t = max(float(step), 1.0)
        best, best_error = -1, -math.inf
        for i in unspent:
            error = weights[i] * t - drawn[i]
            if error > best_error:
                best_error = error
                best = i
        chosen[step] = best
        drawn[best] += 1
        if drawn[best] == sizes[best]:
            unspent.remove(best)
    dataset_index = np.asarray(chosen, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    _number_draws(dataset_index, sample_index, len(sizes))
    return dataset_index, sample_index


def _number_draws(dataset_index: np.ndarray, sample_index: np.ndarray, count: int) -> None:
    """sample_index[k] = how many times dataset_index[k] was drawn before position k."""
    for i in range(count):
        where = np.flatnonzero(dataset_index == i)
        sample_index[where] = np.arange(where.size)


class BlendedDataset:
    """Megatron's BlendedDataset: sample k is sample `dataset_sample_index[k]` of dataset
    `dataset_index[k]`. With `size=None` every dataset contributes exactly `weights[i]` samples."""

    def __init__(self, datasets: list, weights: Sequence[float], size: int | None, split_name: str,
                 cache=None):
        if len(datasets) >= 32767:
            raise EmberError(f"cannot blend {len(datasets)} datasets (at most 32766)")
        if any(w <= 0 for w in weights):
            raise EmberError(f"{split_name} blend: every dataset needs a positive weight, got {list(weights)}")
        self.datasets = datasets
        self.split_name = split_name
        self.weights = normalize_weights(weights) if size is not None else [int(w) for w in weights]
        self.size = size
        description = {
            "kind": "BlendedDataset",
            "format": 1,
            "datasets": [d.description for d in datasets],
            "split": split_name,
            "weights": self.weights,
            "size": size,
        }
        self.description = description
        if cache is None:
            arrays = self._build()
        else:
            arrays = cache.get_or_build(f"BlendedDataset-{split_name}", description, self._build,
                                        validate=self._validate)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def _build(self) -> dict[str, np.ndarray]:
        if self.size is not None:
            dataset_index, sample_index = blending_indices(self.weights, self.size)
        else:
            dataset_index, sample_index = exhaustive_blending_indices(self.weights)
        drawn = np.bincount(dataset_index.astype(np.int64), minlength=len(self.datasets))
        for i, (dataset, wanted) in enumerate(zip(self.datasets, drawn)):
            if wanted > len(dataset):
                raise EmberError(
                    f"the {self.split_name} blend needs {wanted} samples from dataset {i} "
                    f"({getattr(dataset, 'path', '?')}) which has {len(dataset)}; raise "
                    f"--mid-level-dataset-surplus (e.g. to 0.05)")
        return {"dataset_index": dataset_index, "dataset_sample_index": sample_index}

    def _validate(self, arrays: dict[str, np.ndarray]) -> bool:
        dataset_index, sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        expected = self.size if self.size is not None else sum(self.weights)
        return (dataset_index.shape == (expected,) and sample_index.shape == (expected,)
                and (expected == 0 or (0 <= int(dataset_index.min()) and int(dataset_index.max()) < len(self.datasets)
                                       and int(sample_index.min()) >= 0)))

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        dataset = self.datasets[int(self.dataset_index[index])]
        return dataset[int(self.dataset_sample_index[index])]


# --------------------------------------------------------------------------------------------
# Building the train/valid/test datasets (BlendedMegatronDatasetBuilder)


@dataclass(frozen=True)
class _Blend:
    prefixes: list[str]
    weights: list[float] | None  # normalised, or None: weights from the datasets' sizes


def build_datasets(
    data_path: str | Sequence[str] | None,
    split: str | None,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    *,
    train_data_path: str | Sequence[str] | None = None,
    valid_data_path: str | Sequence[str] | None = None,
    test_data_path: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    shared_storage: bool = True,
    rank: int = 0,
    local_rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    eod_id: int | None = None,
    pad_id: int | None = None,
    pack: bool = True,
    finetune_epochs: int | None = None,
    mid_level_dataset_surplus: float = DEFAULT_MID_LEVEL_SURPLUS,
) -> tuple:
    """(train, valid, test): each None or a dataset with `len()` and `__getitem__(i) -> dict`.

    Pretraining prefixes (`PREFIX.bin/.idx`) give `GPTDataset`s: `{"tokens": int64[seq_length+1]}`
    in Megatron's order for the same seed/split/sequence length/sample counts. Fine-tuning
    prefixes (`PREFIX_packed_input_ids_document` + `PREFIX_packed_labels_document`) give
    `FinetuneDataset`s, packed (`pack=True`) or padded with `pad_id` (default `eod_id`, else 0).
    `finetune_epochs` sets the train split of fine-tuning data to that many epochs.

    Index caches go to `cache_dir` or to a `cache/` folder beside each dataset. On several ranks
    one rank builds them (every node's first rank with `shared_storage=False`) while the others
    wait in `barrier` (default: torch.distributed's), then load them. Call on every rank.
    """
    shared, per_split = _parse_blends(data_path, train_data_path, valid_data_path, test_data_path)
    sizes = list(num_samples) + [None] * (len(SPLIT_NAMES) - len(num_samples))
    if split is None and data_path:
        split = DEFAULT_SPLIT
    builder = _Builder(
        shared=shared, per_split=per_split, split=split, sizes=sizes, seq_length=int(seq_length), seed=int(seed),
        cache_dir=None if cache_dir is None else str(cache_dir),
        pad_id=pad_id if pad_id is not None else (eod_id if eod_id is not None else 0),
        pack=pack, finetune_epochs=finetune_epochs, surplus=float(mid_level_dataset_surplus),
    )
    builder.check_inputs()
    return build_on_one_rank_first(builder.build, rank=rank, local_rank=local_rank,
                                   world_size=world_size, shared_storage=shared_storage,
                                   barrier=barrier)


def _parse_blends(data_path, train_path, valid_path, test_path) -> tuple[_Blend | None, list | None]:
    """(one blend cut by --split, None) or (None, [train, valid, test] blends or None each)."""
    paths = [train_path, valid_path, test_path]
    if any(paths):
        if data_path:
            raise EmberError("give --data-path or --train-data-path/--valid-data-path/--test-data-path, "
                             "not both")
        return None, [(_Blend(*blend_of(parse_data_path(p))) if p else None) for p in paths]
    entries = parse_data_path(data_path)
    if not entries:
        raise EmberError("no training data: give --data-path PREFIX (or --train-data-path ...)")
    return _Blend(*blend_of(entries)), None


class _Builder:
    """One build of the three splits; `build(may_build_caches)` runs on every rank."""

    def __init__(self, *, shared, per_split, split, sizes, seq_length, seed, cache_dir, pad_id, pack,
                 finetune_epochs, surplus):
        self.shared: _Blend | None = shared
        self.per_split: list[_Blend | None] | None = per_split
        self.split = split
        self.sizes = sizes
        self.seq_length = seq_length
        self.seed = seed
        self.cache_dir = cache_dir
        self.pad_id = pad_id
        self.pack = pack
        self.finetune_epochs = finetune_epochs
        self.surplus = surplus
        self._low_level: dict[str, IndexedDataset | FinetuneSource] = {}
        self._fingerprints: dict[str, str] = {}
        self.may_build = True
        self.finetune = False

    # -- checks that must fail before any rank waits on another

    def all_prefixes(self) -> list[str]:
        blends = [self.shared] if self.shared else [b for b in self.per_split or [] if b]
        return [p for blend in blends for p in blend.prefixes]

    def check_inputs(self) -> None:
        if self.seq_length < 1:
            raise EmberError(f"--seq-length must be positive, got {self.seq_length}")
        kinds = set()
        for prefix in self.all_prefixes():
            if is_finetune_prefix(prefix):
                kinds.add("finetune")
            elif dataset_exists(prefix):
                kinds.add("pretrain")
            else:
                raise EmberError(f"dataset {prefix}: neither {prefix}.bin/.idx nor "
                                 f"{prefix}_packed_input_ids_document.bin/.idx exist; pass the prefix "
                                 f"that `ember preprocess` printed")
        if len(kinds) > 1:
            raise EmberError("--data-path mixes pretraining and fine-tuning datasets; use one kind")
        self.finetune = kinds == {"finetune"}
        if self.shared:
            parse_split(self.split)

    # -- the build itself

    def build(self, may_build_caches: bool) -> tuple:
        self.may_build = may_build_caches
        if self.shared:
            return tuple(self._build_shared(self.shared))
        return tuple(self._build_one_split(i, blend) if blend else None
                     for i, blend in enumerate(self.per_split or []))

    def _build_shared(self, blend: _Blend) -> list:
        """All splits from one distribution: every dataset cut by --split."""
        ranges_of = {p: split_document_ranges(self._num_documents(p), self.split) for p in blend.prefixes}
        if len(blend.prefixes) == 1 and blend.weights is None:
            prefix = blend.prefixes[0]
            return [self._mid_level(prefix, ranges_of[prefix][i], self.sizes[i], i) for i in range(3)]
        present = [i for i in range(3) if ranges_of[blend.prefixes[0]][i] is not None]
        return self._blend(blend, lambda prefix, i: ranges_of[prefix][i], present, self.sizes)

    def _build_one_split(self, i: int, blend: _Blend):
        """One split from its own blend (--train-data-path and friends): whole datasets."""
        whole = lambda prefix, _i: (0, self._num_documents(prefix))
        if len(blend.prefixes) == 1:
            return self._mid_level(blend.prefixes[0], whole(blend.prefixes[0], i), self.sizes[i], i)
        sizes = [0] * 3
        sizes[i] = self.sizes[i]
        return self._blend(blend, whole, [i], sizes)[i]

    def _blend(self, blend: _Blend, document_range, present: list[int], sizes) -> list:
        if blend.weights is None:
            requested = [[None] * 3 for _ in blend.prefixes]
        else:
            target = samples_per_dataset(blend.weights, [sizes[i] for i in range(3)])
            requested = samples_per_dataset(blend.weights, [sizes[i] for i in range(3)], self.surplus)
        result: list = [None] * 3
        for i in present:
            parts = [self._mid_level(p, document_range(p, i), requested[k][i], i)
                     for k, p in enumerate(blend.prefixes)]
            if any(part is None for part in parts):
                continue  # an empty split (warned about) leaves the whole blend empty
            if blend.weights is not None:
                weights, size = blend.weights, sum(target[k][i] for k in range(len(parts)))
            else:
                weights = [len(part) for part in parts]
                size = None if sizes[i] is None else min(sizes[i], sum(weights))
            result[i] = BlendedDataset(parts, weights, size, SPLIT_NAMES[i],
                                       cache=self._cache_for(blend.prefixes[0]))
        return result

    def _mid_level(self, prefix: str, document_range, num_samples, split_index: int):
        """One dataset over a document range: GPTDataset or FinetuneDataset (None if no range)."""
        if document_range is None:
            return None
        name = SPLIT_NAMES[split_index]
        begin, end = document_range
        if end <= begin:
            if split_index == 0:
                raise EmberError(f"the train split of {prefix} holds no documents (--split "
                                 f"{self.split} over {self._num_documents(prefix)} documents); "
                                 f"change --split or add data")
            logger.warning("the %s split of %s holds no documents (--split %s over %d documents): "
                           "no %s data", name, prefix, self.split, self._num_documents(prefix), name)
            return None
        if self.finetune:
            epochs = self.finetune_epochs if split_index == 0 else None
            return FinetuneDataset(prefix, self.seq_length, self.seed, document_range=document_range,
                                   num_samples=None if epochs else num_samples, num_epochs=epochs,
                                   pack=self.pack, pad_id=self.pad_id, split_name=name,
                                   indexed=self._low_level.get(prefix))
        if prefix not in self._fingerprints:  # hashing the lengths once serves every split
            self._fingerprints[prefix] = lengths_fingerprint(self._indexed(prefix))
        return GPTDataset(self._indexed(prefix), document_range, num_samples, self.seq_length,
                          self.seed, name, cache=self._cache_for(prefix), fingerprint=self._fingerprints[prefix])

    def _indexed(self, prefix: str) -> IndexedDataset:
        if prefix not in self._low_level:
            self._low_level[prefix] = IndexedDataset(prefix)
        return self._low_level[prefix]  # type: ignore[return-value]

    def _num_documents(self, prefix: str) -> int:
        if self.finetune:
            if prefix not in self._low_level:
                self._low_level[prefix] = FinetuneSource(prefix)
            return len(self._low_level[prefix])  # type: ignore[arg-type]
        return len(self._indexed(prefix))

    def _cache_for(self, prefix: str) -> IndexCache:
        directory = self.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
        return IndexCache(directory, may_build=self.may_build)

"""EMBER_TINY=1: run any example script or config as a tiny model of the same family, on this CPU.

    EMBER_TINY=1 bash examples/qwen3/pretrain_qwen3_8b_4K_ptd.sh

The script runs unchanged — its variables, flags and parallel layout — with these swaps made
where its configuration is resolved (`ember.config.config_from_args`):

- model: `tiny-<family>` of the named (or flag-described) model, with as many layers, heads and
  experts as the layout needs (PP stages, TP shards, EP groups);
- data: ember's built-in corpus (standard-library docstrings), tokenized once by a byte-level BPE
  tokenizer trained on it — pretraining prefixes for `--data-path` (a blend keeps its weights and
  gets as many distinct parts), instruction data for fine-tuning runs;
- processes: gloo on CPU; TP, PP, CP and EP as the script says, data parallelism shrunk to the
  least the layout allows (at least two processes in all, so something is always distributed);
- length: a few iterations (`EMBER_TINY_ITERS`, default 3) of short sequences, fp32 or as given.

Checkpoint folders are kept (so a tiny pretrain feeds a tiny fine-tune); a `--load` that does not
exist is dropped. The built-in assets are made once into `EMBER_TINY_CACHE` (default
`~/.cache/ember/tiny`) under a file lock, so many ranks or runs may ask at once. Data-preparation
scripts use `ember tiny --shell`, which prints the assets' paths as shell variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

TINY_ENV = "EMBER_TINY"
CACHE_ENV = "EMBER_TINY_CACHE"
ITERS_ENV = "EMBER_TINY_ITERS"

SEQ_LENGTH = 64
MICRO_BATCH = 2
VOCAB_SIZE = 512
CORPUS_MB = 0.3
PRETRAIN_PARTS = 4  # distinct datasets available to a blended --data-path
# Bumped whenever the assets change, so an old cache is never mistaken for a current one.
ASSETS_VERSION = "1"

# tiny-<family> registry entries; their size is what every layout below starts from.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "grok1", "bloom", "gpt2")


def enabled() -> bool:
    return os.environ.get(TINY_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def tiny_iterations() -> int:
    text = os.environ.get(ITERS_ENV, "3")
    try:
        value = int(text)
    except ValueError:
        raise EmberError(f"{ITERS_ENV}={text!r} is not an integer") from None
    if value < 1:
        raise EmberError(f"{ITERS_ENV} must be >= 1, got {value}")
    return value


# --------------------------------------------------------------------------- built-in assets


@dataclass(frozen=True)
class TinyAssets:
    root: Path

    @property
    def corpus(self) -> Path:  # {"text": ...} per line
        return self.root / "corpus.jsonl"

    @property
    def alpaca(self) -> Path:  # {"instruction", "input", "output", "text"} per line
        return self.root / "alpaca.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrain(self) -> str:
        return str(self.root / "data" / "corpus_text_document")

    def pretrain_part(self, index: int) -> str:
        return str(self.root / "data" / f"part{index % PRETRAIN_PARTS}_text_document")

    @property
    def finetune(self) -> str:
        """Prefix of `PREFIX_packed_{input_ids,labels}_document` (what --train-data-path takes)."""
        return str(self.root / "data" / "alpaca")

    def shell(self) -> str:
        names = {"TINY_DIR": self.root, "TINY_CORPUS": self.corpus, "TINY_ALPACA": self.alpaca,
                 "TINY_TOKENIZER": self.tokenizer, "TINY_DATA_PATH": self.pretrain,
                 "TINY_FINETUNE_DATA_PATH": self.finetune}
        return "".join(f"{name}={shlex.quote(str(value))}\n" for name, value in names.items())


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ember", "tiny")
    return Path(base) / f"v{ASSETS_VERSION}"


def prepare(root: str | os.PathLike | None = None) -> TinyAssets:
    """The built-in tiny assets, made on first use. Safe to call from many processes at once:
    the first takes a lock and builds, the others wait and then find a finished marker."""
    assets = TinyAssets(Path(root) if root is not None else cache_root())
    marker = assets.root / "complete"
    if marker.is_file():
        return assets
    try:
        assets.root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmberError(f"cannot create the tiny-assets folder {assets.root} ({err.strerror}); "
                         f"set {CACHE_ENV} to a writable folder") from None
    with open(assets.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            _build(assets)
            marker.write_text("ok\n")
    return assets


def _ember(argv: list[str], log) -> None:
    """One `ember` stage, as a user would run it, its console output kept in the build log."""
    from ember.cli import main

    log.write(f"$ ember {shlex.join(argv)}\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    log.write(out.getvalue())
    if code:
        raise EmberError(f"preparing the tiny assets: `ember {shlex.join(argv)}` failed ({code}); "
                         f"see {log.name}")


def _build(assets: TinyAssets) -> None:
    import orjson

    from ember.data.corpus import write_jsonl

    (assets.root / "data").mkdir(exist_ok=True)
    with open(assets.root / "build.log", "w", encoding="utf-8") as log:
        write_jsonl(assets.corpus, max_bytes=int(CORPUS_MB * 1e6))
        documents = [orjson.loads(line)["text"] for line in assets.corpus.read_bytes().splitlines()]
        parts = [[] for _ in range(PRETRAIN_PARTS)]
        for index, text in enumerate(documents):
            parts[index % PRETRAIN_PARTS].append(text)
        for index, texts in enumerate(parts):
            path = assets.root / f"part{index}.jsonl"
            path.write_bytes(b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts))
        assets.alpaca.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _instruction_records(documents)))
        _ember(["tokenizer", "train", "--input", str(assets.corpus), "--output", str(assets.tokenizer),
                "--vocab-size", str(VOCAB_SIZE)], log)
        common = ["--tokenizer-name-or-path", str(assets.tokenizer), "--workers", "1", "--overwrite"]
        _ember(["preprocess", "--input", str(assets.corpus), "--output-prefix",
                str(assets.root / "data" / "corpus"), "--append-eod", *common], log)
        for index in range(PRETRAIN_PARTS):
            _ember(["preprocess", "--input", str(assets.root / f"part{index}.jsonl"), "--output-prefix",
                    str(assets.root / "data" / f"part{index}"), "--append-eod", *common], log)
        _ember(["preprocess", "--input", str(assets.alpaca), "--output-prefix", assets.finetune,
                "--handler-name", "AlpacaStyleInstructionHandler", *common], log)


def _instruction_records(documents: list[str]) -> list[dict[str, str]]:
    """Alpaca-style records from the corpus: continue a docstring from its first paragraph."""
    records = []
    for text in documents:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        for first, second in zip(paragraphs[0::2], paragraphs[1::2]):
            prompt, answer = first[:200], second[:300]
            records.append({"instruction": "Continue this passage of Python documentation.",
                            "input": prompt, "output": answer,
                            "text": f"{prompt}\n{answer}"})
    return records


# --------------------------------------------------------------------------- the layout


def data_parallel_size(config) -> int:
    """The least data parallelism the layout allows: expert parallelism spreads experts over
    data x context parallel ranks, so EP needs dp x cp to be a multiple of it."""
    p = config.parallel
    ep, cp = p.expert_model_parallel_size, p.context_parallel_size
    return ep // math.gcd(ep, cp) if ep > 1 else 1


def world_size(config) -> int:
    """Processes a tiny run of this layout uses: TP x PP x CP x the least DP, at least two."""
    p = config.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    world = model_parallel * data_parallel_size(config)
    return world if world > 1 else 2


def _family(config) -> str:
    from ember.models.registry import get_model_family

    m = config.model
    if m.name:
        return get_model_family(m.name)
    # Described by Megatron flags: the family whose features they name.
    if m.num_experts:
        return "mixtral"
    kind = (m.position_embedding_type or "").lower()
    if kind == "alibi":
        return "bloom"
    if kind.startswith("learned"):
        return "gpt2"
    if m.qk_layernorm:
        return "qwen3"
    if m.add_qkv_bias:
        return "qwen2"
    if m.swiglu or (m.normalization or "").lower() == "rmsnorm" or kind == "rope":
        return "llama"
    return "gpt2"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _tiny_model(config) -> None:
    """Swap in tiny-<family>, sized so the script's TP/PP/EP split it evenly."""
    import dataclasses

    from ember.config import ModelConfig
    from ember.models.registry import get_model_args

    family = _family(config)
    if family not in FAMILIES:
        raise EmberError(f"EMBER_TINY: no tiny model for the {family} family")
    name = f"tiny-{family}"
    base = get_model_args(name)
    p = config.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    fresh = ModelConfig(name=name)
    # every architecture flag of the script belongs to the full-size model: drop them all
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("name", "make_vocab_size_divisible_by"):
            setattr(config.model, f.name, getattr(fresh, f.name))
    config.model.name = name
    if base.n_layers % pp:
        config.model.num_layers = _round_up(base.n_layers, pp)
    kv_heads = base.n_kv_heads or base.n_heads
    if base.n_heads % tp or kv_heads % tp:
        heads = _round_up(base.n_heads, tp)
        config.model.num_attention_heads = heads
        config.model.num_query_groups = _round_up(kv_heads, tp) if base.n_kv_heads else heads
        if base.head_dim is None and base.dim % heads:
            raise EmberError(f"EMBER_TINY: {name} (width {base.dim}) cannot split into {heads} heads for "
                             f"tensor parallel {tp}")
    if base.num_experts and base.num_experts % ep:
        config.model.num_experts = _round_up(base.num_experts, ep)


def _tiny_data(config, assets: TinyAssets, finetune: bool) -> None:
    """Built-in data of the kind the run trains on: instruction data for a fine-tune, else text."""
    from ember.data.blending import parse_data_path

    d = config.data

    def swap(spec: list[str], finetune_data: bool) -> list[str]:
        entries = parse_data_path(spec)
        if finetune_data:
            return [assets.finetune]
        if len(entries) == 1:
            return [assets.pretrain]
        words = []
        for index, (weight, _) in enumerate(entries):
            words += ([] if weight is None else [repr(weight)]) + [assets.pretrain_part(index)]
        return words

    if d.data_path:
        d.data_path = swap(d.data_path, finetune)
    for name in ("train_data_path", "valid_data_path", "test_data_path"):
        if getattr(d, name):
            setattr(d, name, swap(getattr(d, name), finetune))
    d.seq_length = SEQ_LENGTH
    d.tokenizer_type = "PretrainedFromHF"
    d.tokenizer_name_or_path = str(assets.tokenizer)
    d.tokenizer_model = d.vocab_file = d.merge_file = None
    d.num_workers = 0


def _tiny_schedule(config, data_parallel: int) -> None:
    t, lg = config.train, config.logging
    iterations = tiny_iterations()
    pp = config.parallel.pipeline_model_parallel_size
    t.micro_batch_size = MICRO_BATCH
    # as many micro-batches per step as pipeline stages, so a pipeline schedule has work to overlap
    t.global_batch_size = MICRO_BATCH * data_parallel * pp
    t.train_iters, t.train_tokens, t.train_epochs = iterations, None, None
    t.lr_warmup_iters, t.lr_warmup_fraction, t.lr_warmup_tokens = 0, None, None
    t.lr_decay_iters = t.lr_decay_tokens = None
    if t.lr_decay_style == "WSD":
        t.lr_wsd_decay_iters = 1
    t.eval_interval = iterations
    t.eval_iters = min(t.eval_iters, 1)
    t.exit_interval = None
    t.compile = False
    lg.log_interval = 1
    lg.tensorboard = False


def apply_tiny(config) -> None:
    """The EMBER_TINY swaps, in place, on a configuration resolved from a script's arguments."""
    assets = prepare()
    p, c = config.parallel, config.checkpoint
    # CPU processes: keep CUDA out of sight before anything asks torch for a device
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    p.backend = "gloo"
    p.dp_replicate = 1
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE") or world_size(config))
    data_parallel = max(world // model_parallel, 1)
    # a fine-tune (--finetune, or PAI's --train-epochs over --train-data-path) trains on
    # instruction data even when its --load is dropped below
    finetune = config.train.finetune or (config.train.train_epochs is not None and bool(config.data.train_data_path))
    if c.load:
        from ember.train.checkpoint import find_checkpoint

        if not os.path.exists(c.load) or find_checkpoint(c.load) is None:
            print(f"EMBER_TINY: --load {c.load} holds no checkpoint; starting from random weights",
                  file=sys.stderr)
            c.load = None
            config.train.finetune = False
    _tiny_data(config, assets, finetune)
    _tiny_model(config)
    _tiny_schedule(config, data_parallel)
    if c.save_interval is not None:
        c.save_interval = min(c.save_interval, config.train.train_iters)


# --------------------------------------------------------------------------- `ember tiny`


def add_arguments(parser) -> None:
    parser.description = ("prepare the EMBER_TINY assets (built-in corpus, tiny tokenizer, datasets) "
                          "and print where they are")
    parser.add_argument("--shell", action="store_true",
                        help="print NAME=PATH lines for `eval \"$(ember tiny --shell)\"` in scripts")
    parser.add_argument("--cache-dir", default=None,
                        help=f"assets folder (default: ${CACHE_ENV} or ~/.cache/ember/tiny)")


def run(args) -> int:
    assets = prepare(args.cache_dir)
    if args.shell:
        print(assets.shell(), end="")
        return 0
    print(f"tiny assets in {assets.root}:")
    print(assets.shell(), end="")
    return 0

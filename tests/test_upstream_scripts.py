"""The seeds' own upstream scripts, run by ember with only their launcher line changed (issue 16).

tests/upstream/*.txt hold the flags of MindSpeed-LLM's llama2/qwen3 pretraining scripts, ModelLink's
Grok-1 script (and MindSpeed-LLM's newer one, with --moe-layer-freq/--first-k-dense-replace) and PAI-Megatron-Patch's Bloom scripts (repository, path and commit in each file's
header; only the flags are kept, with the settings they read). Here:

- every flag is answered: honoured (a setting of ember's config), or accepted and named in the one
  notice line with what ember does instead (`ember.compat.megatron.NOTICE_FLAGS`); an unknown flag
  is an error;
- each script's flags, expanded by bash exactly as the script passes them, resolve to the config
  and the architecture the upstream flags mean (Megatron's dropout defaults where the script gives
  none, ModelLink's store_false --input-jitter, --padded-vocab-size, PAI's --extra-vocab-size ...);
- two scripts run tiny end to end (EMBER_TINY) with `torchrun $DISTRIBUTED_ARGS pretrain_gpt.py`
  replaced by `ember launch $DISTRIBUTED_ARGS --`: MindSpeed's llama2 and PAI's Bloom fine-tune;
- the model features the flags turn on match their references: dropout (train and eval mode)
  against transformers' Bloom, Grok-1's multipliers and post-norm against ModelLink's formulas.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import free_port
from ember.compat import megatron
from ember.config import Config

UPSTREAM = Path(__file__).resolve().parent / "upstream"
BIN = str(Path(sys.executable).parent)
TRAINING_SCRIPTS = ("mindspeed_llama2_pretrain_llama2_7b_ptd", "mindspeed_qwen3_pretrain_qwen3_8b_4K_ptd",
                    "modellink_grok1_pretrain_grok1_40b_ptd", "mindspeed_grok1_pretrain_grok1_40b_ptd",
                    "pai_bloom_run_pretrain_megatron_bloom",
                    "pai_bloom_run_finetune_megatron_bloom")
DATA_SCRIPTS = ("mindspeed_qwen3_data_convert_qwen3_pretrain", "modellink_grok1_data_convert_grok1_pretrain")
# the paths the scripts leave for the user to fill in
PATHS = dict(CKPT_SAVE_DIR="save", CKPT_LOAD_DIR="missing-load", SAVE_PATH="save", LOAD_PATH="missing-load",
             SAVED_PRETRAIN_CHECKPOINT_PATH="save", FINETUNE_CHECKPOINT_PATH="save",
             PRETRAIN_CHECKPOINT_PATH="missing-load",
             DATA_PATH="dataset/enwiki_text_document", DATASET_PATH="dataset/wudao_bloombpe_text_document",
             TOKENIZER_MODEL="model_from_hf/tokenizer.model", TOKENIZER_PATH="model_from_hf",
             TENSORBOARD_DIR="tensorboard", TRAIN_DATASET_PATH="dataset/train", VALID_DATASET_PATH="dataset/valid")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """ember's tiny assets (corpus, tokenizer, datasets), built once for this module."""
    from ember.compat.tiny_assets import prepare

    root = tmp_path_factory.mktemp("tiny-cache")
    prepare(root / "v1")
    return root


def read_list(name: str) -> tuple[list[str], list[str], list[str]]:
    """(settings `VAR=value`, flags every run passes, flags one branch passes) of one script."""
    settings, always, branch = [], [], []
    for line in (UPSTREAM / f"{name}.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("?"):
            branch.append(line[1:])
        elif line.startswith("-"):
            always.append(line)
        else:
            settings.append(line)
    return settings, always, branch


def flag_name(line: str) -> str:
    return line.split()[0]


def expand(settings: list[str], flags: list[str], cwd: Path, **extra: str) -> list[str]:
    """The words the script passes: bash expands the flags with the script's settings."""
    lines = settings + [f"{k}={cwd / v}" for k, v in PATHS.items()] + [f"{k}={v}" for k, v in extra.items()]
    script = "\n".join(lines + ["printf '%s\\n' " + " ".join(flags)])
    return subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout.splitlines()


def training_parser() -> argparse.ArgumentParser:
    from ember.commands.train import add_arguments

    parser = argparse.ArgumentParser(prog="ember train", exit_on_error=False)
    add_arguments(parser)
    return parser


def honoured_flags() -> set[str]:
    """Flags that set a setting of ember's config (or, for --data-impl, check the one format)."""
    return {name for flag in megatron.FLAGS for name in flag.names} | {"--data-impl", "--max-padding-length"}


def answer(flag: str) -> str | None:
    if flag in megatron.NOTICE_FLAGS:
        return "notice"
    if flag in honoured_flags():
        return "honoured"
    return None


# --------------------------------------------------------------------------- every flag answered


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_every_flag_is_honoured_or_in_the_notice(name):
    _, always, branch = read_list(name)
    flags = [flag_name(line) for line in always + branch]
    unanswered = sorted({f for f in flags if answer(f) is None})
    assert not unanswered, f"{name}: flags neither honoured nor in the notice list: {unanswered}"
    both = sorted(f for f in megatron.NOTICE_FLAGS if f in honoured_flags())
    assert not both, f"flags both honoured and in the notice list: {both}"


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_the_notice_is_one_line_naming_each_notice_flag_once(name, tmp_path):
    _, always, branch = read_list(name)
    _, _, notice = resolve(name, tmp_path, branch=tuple(flag_name(line) for line in branch
                                                        if flag_name(line) in megatron.NOTICE_FLAGS))
    words = notice.replace("(", " ").replace(")", " ").replace(";", " ").split()
    for flag in {flag_name(line) for line in always + branch if answer(flag_name(line)) == "notice"}:
        assert words.count(flag) == 1, (flag, notice)
    assert notice.startswith(megatron.NOTICE_PREFIX) and "\n" not in notice


def test_an_unknown_flag_is_an_error_and_unanswered():
    assert answer("--use-fused-everything") is None
    result = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--use-fused-everything"],
                            capture_output=True, text=True, env=dict(os.environ, EMBER_TINY="0"))
    assert result.returncode != 0 and "--use-fused-everything" in result.stderr


def test_launcher_reads_torchruns_spelling(monkeypatch):
    """`torchrun $DISTRIBUTED_ARGS` -> `ember launch $DISTRIBUTED_ARGS --`: torchrun's underscores."""
    from ember.commands import launch

    for name in ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "EMBER_TINY"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    args = parser.parse_args("--nproc_per_node 4 --nnodes 1 --node_rank 0 --master_addr localhost "
                             "--master_port 6123 -- --model tiny-llama".split())
    plan = launch.plan_from_args(args)
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank, plan.master_addr, plan.master_port) == (
        4, 1, 0, "localhost", 6123)
    assert plan.train_args == ["--model", "tiny-llama"]


@pytest.mark.parametrize("name", DATA_SCRIPTS)
def test_data_script_flags_are_ember_preprocess_flags(name, tmp_path):
    from ember.commands import preprocess

    parser = argparse.ArgumentParser(exit_on_error=False)
    preprocess.add_arguments(parser)
    settings, always, _ = read_list(name)
    args = parser.parse_args(expand(settings, always, tmp_path))
    assert (args.handler_name, args.tokenizer_type, args.json_keys, args.workers) == (
        "GeneralPretrainHandler", "PretrainedFromHF", ["text"], 4)


# --------------------------------------------------------------------------- what the flags resolve to


def resolve(name: str, tmp_path: Path, branch: tuple[str, ...] = (), tokenizer_vocab: int = 1000, **extra):
    """(Config, ModelArgs, notice line) of a script's flags, as `ember launch` resolves them."""
    from ember.commands.launch import training_config
    from ember.models.from_config import model_args_from_config

    settings, always, branch_flags = read_list(name)
    chosen = [line for line in branch_flags if flag_name(line) in branch]
    words = expand(settings, always + chosen, tmp_path, **extra)
    config, args = training_config(words)
    return config, model_args_from_config(config, None, lambda: tokenizer_vocab), megatron.notice_line(args)


def test_mindspeed_llama2_flags(tmp_path):
    c, m, notice = resolve("mindspeed_llama2_pretrain_llama2_7b_ptd", tmp_path, tokenizer_vocab=32000)
    p, t = c.parallel, c.train
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel) == (1, 2, True)
    assert (p.dp_mode, p.overlap_grad_reduce, p.backend) == ("zero1", True, "nccl")
    assert (t.precision, t.initial_loss_scale, t.lr, t.min_lr, t.lr_warmup_fraction) == ("bf16", 65536, 1.25e-6,
                                                                                          1.25e-7, 0.01)
    assert (c.data.tokenizer_type, c.data.split, c.checkpoint.load_optim, c.checkpoint.load_rng) == (
        "Llama2Tokenizer", "949,50,1", False, False)
    # Llama-2-7B, with the script's explicit 0.0 dropout and no vocabulary padding
    assert (m.n_layers, m.dim, m.ffn_dim, m.n_heads, m.vocab_size, m.max_seq_len) == (32, 4096, 11008, 32, 32000, 4096)
    assert (m.norm_type, m.mlp_type, m.activation, m.position_type, m.tie_embeddings) == (
        "rmsnorm", "gated", "silu", "rope", False)
    assert (m.qkv_bias, m.mlp_bias, m.attention_dropout, m.hidden_dropout, m.init_std) == (False, False, 0, 0, 0.01)
    assert notice.count("--use-flash-attn") == 1 and "--transformer-impl" in notice and "\n" not in notice


def test_mindspeed_qwen3_flags(tmp_path):
    c, m, notice = resolve("mindspeed_qwen3_pretrain_qwen3_8b_4K_ptd", tmp_path, tokenizer_vocab=151669)
    # --padded-vocab-size: Qwen3's 151936 rows, not the tokenizer's 151669
    assert m.vocab_size == 151936
    assert (m.n_layers, m.dim, m.n_kv_heads, m.qk_norm, m.rope_theta, m.norm_eps) == (36, 4096, 8, True, 1e6, 1e-6)
    assert (m.position_type, m.attention_dropout, m.hidden_dropout) == ("rope", 0, 0)
    assert (c.parallel.overlap_param_gather, c.parallel.dp_mode, c.train.seed) == (True, "zero1", 42)
    for flag in ("--use-ascend-coc", "--reuse-fp32-param", "--spec", "--enable-hf2mg-convert", "--handler-name"):
        assert notice.count(flag) == 1, flag


def test_modellink_grok1_flags(tmp_path):
    c, m, notice = resolve("modellink_grok1_pretrain_grok1_40b_ptd", tmp_path, tokenizer_vocab=131072)
    assert (m.num_experts, m.moe_top_k, m.moe_aux_loss_coef, m.n_layers, m.vocab_size) == (8, 2, 0.01, 12, 131072)
    assert m.sandwich_norm  # --post-norm
    assert (m.embedding_multiplier, m.output_multiplier) == (78.38367176906169, 0.5773502691896257)
    # ModelLink's --input-jitter is action='store_false' (modellink/training/arguments.py): given, no jitter
    assert m.moe_input_jitter == 0.0
    assert (c.parallel.expert_model_parallel_size, c.parallel.tensor_model_parallel_size) == (2, 8)
    assert not c.data.shared_storage
    assert "--use-mc2" in notice and "--moe-token-dispatcher-type" in notice and "--no-rope-fusion" in notice


def test_mindspeed_grok1_flags(tmp_path):
    """The newer MindSpeed-LLM Grok-1 script: --moe-layer-freq -1 --first-k-dense-replace -1 is
    MindSpeed's `i >= -1 and i % -1 == 0`, every layer MoE (H6)."""
    c, m, notice = resolve("mindspeed_grok1_pretrain_grok1_40b_ptd", tmp_path, tokenizer_vocab=131072)
    assert (m.num_experts, m.moe_top_k, m.moe_aux_loss_coef, m.n_layers, m.vocab_size) == (8, 2, 0.01, 12, 131072)
    assert m.moe_layer_pattern is None and m.n_moe_layers == 12
    assert m.sandwich_norm and (m.embedding_multiplier, m.output_multiplier) == (78.38367176906169, 0.5773502691896257)
    assert (m.moe_input_jitter, m.init_std) == (0.0, 0.02)
    assert (c.model.moe_layer_freq, c.model.first_k_dense_replace) == ("-1", -1)
    assert (c.parallel.expert_model_parallel_size, c.parallel.tensor_model_parallel_size) == (2, 8)
    assert "--context-parallel-algo" in notice and "--spec" in notice


def test_input_jitter_flags(tmp_path):
    from ember.models.from_config import megatron_overrides

    parser = training_parser()

    def jitter(*words):
        config = Config()
        megatron.apply_flags(config, parser.parse_intermixed_args(list(words)))
        return megatron_overrides(config).get("moe_input_jitter")

    assert jitter() is None
    assert jitter("--moe-input-jitter-eps", "0.01") == 0.01
    assert jitter("--input-jitter") == 0.0
    assert jitter("--input-jitter", "--moe-input-jitter-eps", "0.01") == 0.0


def test_pai_bloom_pretrain_flags(tmp_path):
    c, m, notice = resolve("pai_bloom_run_pretrain_megatron_bloom", tmp_path, tokenizer_vocab=250680,
                           branch=("--load", "--recompute-activations", "--fp16", "--use-distributed-optimizer"),
                           EXTRA_VOCAB_SIZE="200")
    # PAI passes no dropout flags, so Megatron's defaults apply: 0.1 each
    assert (m.attention_dropout, m.hidden_dropout) == (0.1, 0.1)
    # PAI: padded vocabulary = tokenizer's + --extra-vocab-size, not padded further (Bloom's 250880)
    assert m.vocab_size == 250880
    assert (m.position_type, m.embedding_norm, m.norm_type, m.mlp_type, m.tie_embeddings, m.qkv_bias) == (
        "alibi", True, "layernorm", "plain", True, True)
    assert (c.train.recompute_granularity, c.train.precision, c.parallel.dp_mode) == ("selective", "fp16", "zero1")
    assert (c.data.tokenizer_type, c.train.train_iters, c.train.lr_decay_style) == (
        "BloomTokenizerFromHF", 6103, "linear")
    assert c.logging.tensorboard_dir.endswith("tensorboard")
    assert "--DDP-impl" in notice and "--log-timers-to-tensorboard" in notice


def test_pai_bloom_full_recompute_branch(tmp_path):
    c, m, _ = resolve("pai_bloom_run_pretrain_megatron_bloom", tmp_path,
                      branch=("--recompute-method", "--recompute-granularity", "--bf16", "--use-flash-attn",
                              "--sequence-parallel"), TP="2")
    assert (c.train.recompute_granularity, c.train.recompute_method, c.train.precision) == ("full", "uniform", "bf16")
    assert c.parallel.sequence_parallel and c.parallel.tensor_model_parallel_size == 2


def test_pai_bloom_finetune_flags(tmp_path):
    c, m, notice = resolve("pai_bloom_run_finetune_megatron_bloom", tmp_path, tokenizer_vocab=250680,
                           branch=("--recompute-activations", "--fp16"))
    assert c.data.seq_length == 128  # --max-padding-length: PAI's samples are examples padded to it
    assert (c.train.finetune, c.train.train_epochs, c.checkpoint.keep_last) == (True, 2, None)
    assert c.data.train_data_path == [str(tmp_path / "dataset/train")]
    assert m.vocab_size == 250681 and (m.attention_dropout, m.hidden_dropout) == (0.1, 0.1)
    assert "--keep-last" in notice  # bare: PAI's keep-the-last-incomplete-batch switch


@pytest.mark.parametrize("name, model", [("modellink_grok1_pretrain_grok1_40b_ptd", "tiny-grok1"),
                                         ("mindspeed_grok1_pretrain_grok1_40b_ptd", "tiny-grok1"),
                                         ("pai_bloom_run_pretrain_megatron_bloom", "tiny-bloom"),
                                         ("mindspeed_qwen3_pretrain_qwen3_8b_4K_ptd", "tiny-qwen3")])
def test_tiny_runs_keep_the_family_and_the_training_settings(name, model, tmp_path, tiny_cache):
    """EMBER_TINY picks the family the flags describe (Grok-1: post-norm and multipliers, not just
    experts; Bloom: ALiBi and the embedding LayerNorm) and keeps dropout and router settings."""
    from ember.compat.tiny import apply_tiny
    from ember.compat.tiny_assets import TinyAssets

    config, _, _ = resolve(name, tmp_path)
    dropout = (config.model.attention_dropout, config.model.hidden_dropout)
    apply_tiny(config, TinyAssets(tiny_cache / "v1"))
    assert config.model.name == model
    assert (config.model.attention_dropout, config.model.hidden_dropout) == dropout
    assert config.model.padded_vocab_size is None  # sizes are the tiny model's
    assert config.model.moe_layer_freq is None  # so is the layer pattern (the tiny model's layer count)


def test_pai_raw_json_training_data_is_tokenized_once_or_a_one_line_error(tmp_path, monkeypatch):
    """PAI's --train-data X.json is tokenized before training (tests/test_pai_json_data.py); a
    missing one is a one-line error naming it."""
    from ember.errors import EmberError

    monkeypatch.delenv("EMBER_TINY", raising=False)
    with pytest.raises(EmberError, match=r"^--train-data-path \S*instruct.json: no such file [^\n]*$"):
        resolve("pai_bloom_run_finetune_megatron_bloom", tmp_path, TRAIN_DATASET_PATH=str(tmp_path / "instruct.json"))


def test_refused_values_are_one_line_errors(tmp_path):
    from ember.data.tokenizers import build_tokenizer
    from ember.errors import EmberError
    from ember.models.from_config import megatron_overrides

    parser = training_parser()
    for words, message in ((["--data-impl", "lazy"], "reads only mmap"),
                           (["--moe-router-load-balancing-type", "sinkhorn"], "implements aux_loss")):
        config = Config()
        with pytest.raises(EmberError, match=message):
            megatron.apply_flags(config, parser.parse_intermixed_args(words))
            megatron_overrides(config)
    with pytest.raises(EmberError, match="tiktoken"):
        build_tokenizer("TikTokenizer")
    config = Config()
    megatron.apply_flags(config, parser.parse_intermixed_args(["--moe-router-load-balancing-type", "none",
                                                               "--moe-aux-loss-coeff", "0.01"]))
    assert megatron_overrides(config)["moe_aux_loss_coef"] == 0.0


def test_overlap_param_gather_needs_a_sharded_optimizer(tmp_path):
    from ember.config.validate import validate
    from ember.errors import EmberError

    config = Config()
    config.model.name, config.train.train_iters, config.data.data_path = "tiny-llama", 1, ["x"]
    config.parallel.overlap_param_gather = True
    with pytest.raises(EmberError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        validate(config, 1, check_paths=False)
    config.parallel.dp_mode = "zero1"
    validate(config, 1, check_paths=False)


def test_registry_models_keep_no_dropout(tmp_path):
    """The rule: Megatron's 0.1 only for a model described by flags alone; --model keeps 0."""
    parser = training_parser()
    config = Config()
    megatron.apply_flags(config, parser.parse_intermixed_args(["--model", "llama2-7b", "--num-layers", "4"]))
    assert (config.model.attention_dropout, config.model.hidden_dropout) == (None, None)
    config = Config()
    megatron.apply_flags(config, parser.parse_intermixed_args(["--num-layers", "4", "--hidden-dropout", "0.2"]))
    assert (config.model.attention_dropout, config.model.hidden_dropout) == (0.1, 0.2)


def test_tokenizer_types(tiny_cache):
    from ember.compat.tiny_assets import TinyAssets
    from ember.data.tokenizers import build_tokenizer

    tokenizer_dir = TinyAssets(tiny_cache / "v1").tokenizer

    hf = build_tokenizer("PretrainedFromHF", name_or_path=str(tokenizer_dir))
    # MindSpeed's docs point Qwen3Tokenizer's --tokenizer-model at a file of the model folder
    qwen3 = build_tokenizer("Qwen3Tokenizer", model_file=str(Path(tokenizer_dir) / "tokenizer.json"))
    text = "def resolve(self, key):"
    assert qwen3.encode(text) == hf.encode(text) and qwen3.vocab_size == hf.vocab_size
    bloom = build_tokenizer("BloomTokenizerFromHF", name_or_path=str(tokenizer_dir))
    assert bloom.encode(text) == hf.encode(text)
    null = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (null.vocab_size, null.eod, null.encode("3 4 5")) == (101, 100, [3, 4, 5])


# --------------------------------------------------------------------------- models vs references


def _bloom_pair(hidden: float, attention: float):
    """An ember tiny Bloom and transformers' BloomForCausalLM with the same weights and dropouts."""
    transformers = pytest.importorskip("transformers")
    from ember.models import Transformer
    from ember.models.hf import TensorMapper, hf_config_from_args
    from ember.models.registry import get_model_args

    args = get_model_args("tiny-bloom", vocab_size=96, hidden_dropout=hidden, attention_dropout=attention)
    torch.manual_seed(0)
    ember = Transformer(args)
    mapper = TensorMapper("bloom", args)
    state = {hf_name: t for name, tensor in ember.state_dict().items() for hf_name, t in mapper.to_hf(name, tensor)}
    values = {k: v for k, v in hf_config_from_args(args, "bloom").items() if k not in ("architectures", "model_type")}
    config = transformers.BloomConfig(**values, hidden_dropout=hidden, attention_dropout=attention)
    config._attn_implementation = "eager"
    hf = transformers.BloomForCausalLM(config)
    hf.load_state_dict(state, strict=False)
    return ember, hf


def test_dropout_matches_transformers_bloom_in_train_and_eval_mode():
    """Megatron's (and HF Bloom's) dropout: on the attention probabilities, and on each branch
    output before its residual add; Megatron also drops from the embeddings, which HF Bloom does
    not, so a hook adds that on the HF side. Same seed, same draws: the same logits."""
    p_hidden, p_attention = 0.3, 0.2
    ember, hf = _bloom_pair(p_hidden, p_attention)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    ember.eval(), hf.eval()
    torch.testing.assert_close(ember(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
    ember.train(), hf.train()
    torch.manual_seed(5)
    dropped = ember(tokens)
    torch.manual_seed(5)
    without_embedding_dropout = hf(tokens).logits
    assert (dropped - without_embedding_dropout).abs().max() > 1e-2  # the comparison can fail
    hf.transformer.word_embeddings_layernorm.register_forward_hook(
        lambda module, inputs, out: torch.nn.functional.dropout(out, p_hidden, module.training))
    torch.manual_seed(5)
    reference = hf(tokens).logits
    torch.testing.assert_close(dropped, reference, rtol=0, atol=1e-5)
    torch.manual_seed(6)
    assert (ember(tokens) - dropped).abs().max() > 1e-2  # another draw, other units dropped


def test_recomputation_replays_the_same_dropout():
    """--recompute-activations with dropout: the recomputed forward draws the same masks, so the
    gradients are those of the run without recomputation (bit for bit)."""
    import copy

    from ember.models import Transformer
    from ember.models.registry import get_model_args
    from ember.parallel.recompute import apply_recompute

    torch.manual_seed(0)
    base = Transformer(get_model_args("tiny-llama", vocab_size=96, hidden_dropout=0.3, attention_dropout=0.2)).train()
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))

    def gradients(granularity, seed=7):
        model = copy.deepcopy(base)
        apply_recompute(model, granularity)
        torch.manual_seed(seed)
        model(tokens).pow(2).mean().backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}

    reference = gradients(None)
    for granularity in ("selective", "full"):
        got = gradients(granularity)
        assert all(torch.equal(got[name], reference[name]) for name in reference), granularity
    other_draw = gradients(None, seed=8)
    assert not all(torch.equal(other_draw[name], reference[name]) for name in reference)


def test_grok_multipliers_and_post_norm_follow_modellink():
    """ModelLink (no transformers Grok-1): embeddings = word_embeddings(x) * embedding_multiplier_scale
    (core/tensor_parallel/layers.py); logits = output_layer(h) * output_multiplier_scale
    (core/models/gpt/gpt_model.py); --post-norm: h = x + post_attn_norm(attn(norm(x))), and the
    same for the MLP (core/transformer/transformer_layer.py)."""
    from ember.models import Transformer
    from ember.models.registry import get_model_args

    args = get_model_args("tiny-grok1", vocab_size=96)
    plain = args.replace(embedding_multiplier=1.0, output_multiplier=1.0)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    reference = Transformer(plain).eval()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference.tok_embeddings.weight.mul_(args.embedding_multiplier)  # lookup then scale = scaled table
        expected = reference(tokens) * args.output_multiplier
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
        block = model.layers["0"]
        x = torch.randn(2, 16, args.dim)
        rope = model._rope(torch.arange(16), x.dtype)
        from ember.models.positions import build_attention_mask

        mask = build_attention_mask(args, 16, 0, x.device, x.dtype, None)
        h = x + block.post_attention_norm(block.attention(block.attention_norm(x), rope, mask))
        out = h + block.post_ffn_norm(block.moe(block.ffn_norm(h)))
        torch.testing.assert_close(block(x, rope, mask), out)


# --------------------------------------------------------------------------- end to end, tiny


def _run_tiny(script: str, cwd: Path, tiny_cache: Path, *args: str) -> str:
    (cwd / "run.sh").write_text(script)
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), EMBER_TINY="1",
               EMBER_TINY_CACHE=str(tiny_cache), EMBER_TINY_ITERS="3", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    result = subprocess.run(["bash", "run.sh", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def _state(save: Path) -> dict:
    latest = (save / "latest").read_text().strip()
    return json.loads((save / latest / "train_state.json").read_text())


@pytest.mark.slow
def test_mindspeed_llama2_script_runs_with_only_its_launcher_line_changed(tmp_path, tiny_cache):
    settings, always, _ = read_list("mindspeed_llama2_pretrain_llama2_7b_ptd")
    settings = [s if not s.startswith("MASTER_PORT=") else f"MASTER_PORT={free_port()}" for s in settings]
    lines = settings + [f"{k}={tmp_path / v}" for k, v in PATHS.items()] + [
        # the script's DISTRIBUTED_ARGS, and its launcher line with `torchrun ... pretrain_gpt.py` replaced
        'DISTRIBUTED_ARGS="--nproc_per_node $NPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK '
        '--master_addr $MASTER_ADDR --master_port $MASTER_PORT"',
        "ember launch $DISTRIBUTED_ARGS -- " + " \\\n    ".join(always)]
    output = _run_tiny("\n".join(lines) + "\n", tmp_path, tiny_cache)
    assert output.count(megatron.NOTICE_PREFIX) == 1  # once, from the launcher
    state = _state(tmp_path / "save")
    config = state["config"]
    assert state["state"]["iteration"] == 3 and config["model"]["name"] == "tiny-llama"
    assert config["parallel"]["pipeline_model_parallel_size"] == 2 and config["parallel"]["dp_mode"] == "zero1"
    assert (config["model"]["attention_dropout"], config["model"]["hidden_dropout"]) == (0.0, 0.0)


@pytest.mark.slow
def test_pai_bloom_finetune_script_runs_with_only_its_launcher_line_changed(tmp_path, tiny_cache):
    settings, always, _ = read_list("pai_bloom_run_finetune_megatron_bloom")
    lines = settings + [f"{k}={tmp_path / v}" for k, v in PATHS.items()] + [
        f'DISTRIBUTED_ARGS="--nproc_per_node 8 --nnodes 1 --node_rank 0 --master_addr localhost '
        f'--master_port {free_port()}"',
        'activation_checkpoint_options=" --recompute-activations"',
        'pr_options=" --fp16"',
        'do_options=" --use-distributed-optimizer"',
        'megatron_options="  ' + " \\\n        ".join(always) + '"',
        # PAI's launcher line, `run_cmd="torchrun $DISTRIBUTED_ARGS finetune_megatron_bloom.py`, replaced
        'run_cmd="ember launch $DISTRIBUTED_ARGS --',
        '${megatron_options} ${activation_checkpoint_options} ${do_options} ${pr_options}"',
        "eval ${run_cmd}"]
    output = _run_tiny("\n".join(lines) + "\n", tmp_path, tiny_cache)
    assert "--keep-last (PAI's keep-the-last-incomplete-batch" in output
    state = _state(tmp_path / "save")
    config = state["config"]
    assert config["model"]["name"] == "tiny-bloom" and config["train"]["recompute_granularity"] == "selective"
    # Megatron's dropout defaults (PAI passes none) reach the tiny run
    assert (config["model"]["attention_dropout"], config["model"]["hidden_dropout"]) == (0.1, 0.1)

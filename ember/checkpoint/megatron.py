"""Megatron-LM checkpoints -> ember weight folders, streamed (`ember convert --from megatron`).

What a Megatron save folder holds (SRC: the folder with `latest_checkpointed_iteration.txt`, or one
`iter_XXXXXXX` / `release` folder in it):

- legacy per-rank files (`--ckpt-format torch`): `iter_XXXXXXX/mp_rank_TT/model_optim_rng.pt`
  (tensor parallel only) or `mp_rank_TT_PPP/...` (with pipeline parallelism); each holds that rank's
  slices, with the layer numbers local to its pipeline stage;
- Megatron-Core distributed checkpoints (`--ckpt-format torch_dist`): `iter_XXXXXXX/.metadata`,
  `__R_K.distcp`, `common.pt`, `metadata.json`: torch DCP underneath, every tensor with its global
  shape and the layers stacked on a leading dimension (`decoder.layers.X` is [num_layers, ...]).

Both model namings are read: Megatron-Core's (`decoder.layers.N.self_attention.linear_qkv.weight`,
norms fused into the next linear or not) and the legacy model's
(`language_model.encoder.layers.N.self_attention.query_key_value.weight`, nested dicts). The two
lay their tensors out alike: q/k/v rows interleaved per query group ([q heads of group g, k of g,
v of g] for each g, the groups split over tensor-parallel ranks), and SwiGLU's fc1 as [gate; up]
per tensor-parallel rank in the per-rank files (the distributed format stores [all gate; all up]).

Bloom as PAI-Megatron-Patch saves it (its legacy-model `megatron_patch/model/bloom/`, and its HF ->
Megatron converter `toolkits/model_checkpoints_convertor/bloom/checkpoint_reshaping_and_interoperability.py`):
the legacy names, plus the embedding LayerNorm `language_model.embedding.word_embeddings.norm.weight/bias`
(replicated on every tensor-parallel rank of the first stage) and ALiBi, which has no tensor. Its
q/k/v rows are [per head: q, k, v] (checkpoint_version >= 2, the per-group layout with one head a
group); the output head is tied (`word_embeddings_for_head` on the last stage). PAI's training saves
`--position-embedding-type alibi --embed-layernorm` in its args; the converter's release checkpoint
has a `types.SimpleNamespace` with only sizes and `tokenizer_type='BloomTokenizer'`, which is read as
Bloom (ALiBi, embedding LayerNorm, as PAI's Bloom scripts always pass).

Mixture of experts (Mixtral style: `--num-experts`, top-k softmax or sigmoid router, SwiGLU
experts): `mlp.router.weight` and per expert `linear_fc1` / `linear_fc2`, split
over tensor-parallel ranks like the dense MLP; per-rank files name experts locally
(`mlp.experts.local_experts.L.` or TE's grouped `mlp.experts.linear_fc1.weightL`) and, with expert
parallelism, hold one expert rank's experts each (`mp_rank_TT[_PPP]_EEE`: global expert
EEE * local experts + L); the distributed format stacks them [layers, experts, ...]
(`decoder.layers.mlp.experts.experts.linear_fc1.weight`). ember stacks each layer's experts into
`layers.N.moe.experts.w1/w3/w2` [E, ...]. Shared experts, expert bias, group-limited routing,
top-k scaling, expert biases and the legacy GroupedMLP layout are refused. Dense and MoE layers may
mix (--moe-layer-freq, --first-k-dense-replace): a dense layer's `mlp.linear_fc1/fc2` become its
`feed_forward`, as in a dense model.

The architecture comes from the checkpoint's saved `args` (an argparse Namespace), read by
`torch.load(weights_only=True)` with an allow-list: the Namespace itself, and inert stand-ins for
the Megatron enums, optimizer config and numpy RNG state a checkpoint also holds. Anything else is
refused with a one-line error; nothing in a checkpoint is ever executed. DCP's `.metadata` is read
with a restricted unpickler that only builds DCP's own metadata records.

Adam's state (`--load-optim`, `ember train --load` resuming an `iter_N`) is `ember.checkpoint.
megatron_optim`'s: the same readers (a torch_dist name prefix, a per-rank selection of tensors) and
the same `ember_tensors` transforms, since the moments are elementwise per parameter.

Memory: a distributed checkpoint is read one layer's tensor at a time (only the chunks of that
layer); per-rank files are memory-mapped and each output tensor is concatenated from its ranks'
slices, so the peak is about one tensor group (q/k/v, gate/up), not the model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint import weights as io_weights
from ember.checkpoint.foreign import MEGATRON_TRACKER, foreign_checkpoint
from ember.errors import EmberError
from ember.models.args import ModelArgs

TRACKER_FILE = MEGATRON_TRACKER  # latest_checkpointed_iteration.txt
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


# =============================================================================================
# finding the checkpoint
# =============================================================================================
@dataclass(frozen=True)
class MegatronCheckpoint:
    """One iteration of a Megatron save folder."""

    folder: Path  # the iter_XXXXXXX (or release) folder
    iteration: int | str  # "release" for a release folder
    format: str  # "torch_dist" or "legacy"


def _format_of(folder: Path) -> str | None:
    if (folder / ".metadata").is_file():
        return "torch_dist"
    if any(_RANK_DIR.match(p.name) for p in folder.iterdir() if p.is_dir()):
        return "legacy"
    return None


def is_megatron_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a Megatron save folder or one iteration of it (`ember.checkpoint.foreign`'s
    recognition, the one `ember train --load` uses; no file is read beyond directory listings)."""
    return Path(path).is_dir() and foreign_checkpoint(path) == "megatron"


def locate_megatron_checkpoint(src: str | Path, iteration: int | None = None) -> MegatronCheckpoint:
    """The iteration folder to read: `iteration`, else the one the tracker file names, else `src`
    itself when it is an iteration folder."""
    src = Path(src)
    if not src.is_dir():
        raise EmberError(f"{src} is not a folder; point SRC at a Megatron save folder (the one holding {TRACKER_FILE})")
    own = _format_of(src)
    if own is not None:
        if iteration is not None and _iteration_of(src.name) not in (iteration, None):
            raise EmberError(f"{src} is iteration {src.name}, not --iteration {iteration}; "
                             "point SRC at the save folder above it to pick another")
        return MegatronCheckpoint(src, _iteration_of(src.name) or src.name, own)
    if iteration is None:
        tracker = src / TRACKER_FILE
        if not tracker.is_file():
            found = _iterations(src)
            hint = f" (it holds {', '.join(found[-5:])}; pass --iteration N)" if found else ""
            raise EmberError(f"{src} is not a Megatron checkpoint: no {TRACKER_FILE} and no iter_* "
                             f"data in it{hint}")
        text = tracker.read_text().strip()
        if text == "release":
            name = "release"
        elif text.isdigit():
            name = f"iter_{int(text):07d}"
        else:
            raise EmberError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
    else:
        name = f"iter_{iteration:07d}"
    folder = src / name
    if not folder.is_dir():
        found = _iterations(src)
        raise EmberError(f"{folder} does not exist; {src} holds "
                         f"{', '.join(found) if found else 'no iter_* folders'}")
    kind = _format_of(folder)
    if kind is None:
        raise EmberError(f"{folder} holds neither a distributed checkpoint (.metadata) nor per-rank "
                         "mp_rank_* folders; was the save interrupted?")
    return MegatronCheckpoint(folder, _iteration_of(name) or name, kind)


def _iteration_of(name: str) -> int | None:
    found = re.fullmatch(r"iter_(\d+)", name)
    return int(found.group(1)) if found else None


def _iterations(src: Path) -> list[str]:
    return sorted(p.name for p in src.iterdir() if p.is_dir() and (_iteration_of(p.name) is not None or p.name == "release"))


# =============================================================================================
# reading pickles without running code from them
# =============================================================================================
class _Inert:
    """Stands in for a class a Megatron checkpoint pickles but a converter has no use for
    (Megatron enums, its optimizer config, numpy RNG state): accepts any construction and state,
    keeps them for inspection, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.args!r}"


_MEGATRON_CLASSES = (
    # what megatron.core.safe_globals registers for Megatron-LM's own weights_only loads
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.optimizer.OptimizerConfig",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    # numpy's RNG state in `rng_state` (np.random.get_state())
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
    *(f"numpy.dtypes.{kind}DType" for kind in ("UInt32", "UInt64", "Int32", "Int64", "Float32", "Float64", "Bool")),
)


def _stand_ins() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[-1], (_Inert,), {"qualified_name": name}), name) for name in _MEGATRON_CLASSES]


def _real_safe_classes() -> list[Any]:
    import pathlib
    import signal
    import types

    return [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, signal.Signals, io.BytesIO]


@contextlib.contextmanager
def _only_safe_globals(globals_: list[Any]) -> Iterator[None]:
    """Exactly these classes beyond torch's own for the load: what other code registered
    process-wide (megatron.core registers the real Megatron and numpy classes on import) neither
    widens the allow-list nor clashes with the stand-ins; restored afterwards."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        torch.serialization.add_safe_globals(globals_)
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load_megatron_pickle(path: Path, mmap: bool = True) -> Any:
    """A torch.save'd Megatron file (per-rank model_optim_rng.pt, common.pt), tensors memory-mapped,
    with only the allow-listed classes; anything else is refused in one line."""
    try:
        with _only_safe_globals(_real_safe_classes() + _stand_ins()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a {found.group(1)} object" if found else f"something it cannot read ({str(err).splitlines()[0]})"
        raise EmberError(f"{path}: holds {what}, which is not among the classes a Megatron checkpoint "
                         "holds; ember does not unpickle it (no code from a checkpoint is run)") from None
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise EmberError(f"{path}: cannot be read as a torch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def read_dcp_metadata(folder: Path) -> Any:
    """A torch_dist checkpoint's `.metadata`, through the restricted reader ember's own checkpoints
    use (DCP's classes only; nothing from the file runs)."""
    from ember.checkpoint.training import read_dcp_metadata as read_restricted

    path = folder / ".metadata"
    try:
        with open(path, "rb") as f:
            return read_restricted(f, path)
    except OSError as err:
        raise EmberError(f"{path}: cannot be read ({err.strerror or err})") from None


# =============================================================================================
# saved args -> ModelArgs
# =============================================================================================
def saved_args_dict(args: Any, where: str) -> dict[str, Any]:
    """The fields of a checkpoint's saved `args` (a Namespace, or a dict in some converters' files)."""
    if isinstance(args, (argparse.Namespace, types.SimpleNamespace)):  # SimpleNamespace: PAI's Bloom converter
        return vars(args)
    if isinstance(args, dict):
        return args
    raise EmberError(f"{where}: 'args' is a {type(args).__name__}, expected Megatron-LM's argparse Namespace")


def model_args_from_megatron(saved: Any, where: str = "the checkpoint") -> tuple[str, ModelArgs]:
    """(family, ModelArgs) for the model Megatron-LM's saved `args` describe; the Megatron flag ->
    ModelArgs field translation is `ember.models.from_config.megatron_overrides`, shared with
    `ember train`'s Megatron flags."""
    from ember.config import Config
    from ember.models.from_config import megatron_default_args, megatron_overrides

    a = saved_args_dict(saved, where)

    def get(name: str, default: Any = None) -> Any:
        value = a.get(name, default)
        return default if value is None else value

    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if get(name) is None:
            raise EmberError(f"{where}: the saved args have no {name}; is this a GPT model checkpoint?")
    unsupported = [
        (get("num_experts") and get("moe_shared_expert_intermediate_size"),
         "shared experts (--moe-shared-expert-intermediate-size)"),
        (get("num_experts") and get("moe_router_enable_expert_bias", False), "routers with expert bias"),
        (get("num_experts") and get("add_bias_linear", True), "experts with biases (MoE without --disable-bias-linear)"),
        (get("num_experts") and get("moe_router_num_groups"), "group-limited routing (--moe-router-num-groups)"),
        (get("num_experts") and get("moe_router_topk_scaling_factor", 1.0) != 1.0,
         f"router top-k scaling (--moe-router-topk-scaling-factor {get('moe_router_topk_scaling_factor')})"),
        (get("num_experts") and str(get("moe_router_score_function", "softmax")) not in ("softmax", "sigmoid"),
         f"router score function {get('moe_router_score_function')}"),
        (get("multi_latent_attention", False), "multi-latent attention"),
        (get("rotary_interleaved", False), "interleaved RoPE (--rotary-interleaved)"),
        (get("rotary_percent", 1.0) != 1.0, f"partial RoPE (--rotary-percent {get('rotary_percent')})"),
        (get("squared_relu", False), "squared-ReLU MLPs"),
        (get("apply_layernorm_1p", False) or get("layernorm_zero_centered_gamma", False), "zero-centred norms (--apply-layernorm-1p)"),
        (get("mtp_num_layers"), "multi-token prediction layers"),
        (get("attention_output_gate", False), "gated attention output"),
        (get("apply_residual_connection_post_layernorm", False),
         "residual connections taken after the layernorm (--apply-residual-connection-post-layernorm)"),
    ]
    for present, what in unsupported:
        if present:
            raise EmberError(f"{where}: {what} are not supported by ember's Megatron import yet")
    pai_bloom_release = get("tokenizer_type") == "BloomTokenizer" and get("position_embedding_type") is None
    position = "alibi" if pai_bloom_release else str(get("position_embedding_type", "learned_absolute"))
    if position not in ("rope", "learned_absolute", "alibi", "none"):
        raise EmberError(f"{where}: --position-embedding-type {position} is not supported "
                         "(rope, learned_absolute, alibi, none)")
    embedding_norm = pai_bloom_release or bool(get("embed_layernorm", False))
    normalization = str(get("normalization", "LayerNorm"))
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise EmberError(f"{where}: --normalization {normalization} is not supported (LayerNorm, RMSNorm)")
    if embedding_norm and normalization != "LayerNorm":
        raise EmberError(f"{where}: an embedding layernorm (--embed-layernorm) with --normalization {normalization} "
                         "is not PAI's Bloom (its embedding norm is a LayerNorm); ember cannot map it")
    vocab = get("padded_vocab_size")
    if vocab is None:
        raise EmberError(f"{where}: the saved args have no padded_vocab_size (the embedding's row count)")

    config = Config()
    m = config.model
    m.make_vocab_size_divisible_by = None
    m.num_layers, m.hidden_size = int(get("num_layers")), int(get("hidden_size"))
    m.num_attention_heads = int(get("num_attention_heads"))
    m.ffn_hidden_size = int(get("ffn_hidden_size", 4 * m.hidden_size))
    if get("group_query_attention", False):
        m.num_query_groups = int(get("num_query_groups", 1))
    m.kv_channels = get("kv_channels")
    m.position_embedding_type = position
    m.embed_layernorm = embedding_norm
    m.normalization = normalization
    m.norm_epsilon = float(get("norm_epsilon", get("layernorm_epsilon", 1e-5)))
    m.swiglu = bool(get("swiglu", False))
    m.untie_embeddings_and_output_weights = bool(get("untie_embeddings_and_output_weights", False))
    m.disable_bias_linear = not bool(get("add_bias_linear", True))
    m.add_qkv_bias = bool(get("add_qkv_bias", False))
    m.qk_layernorm = bool(get("qk_layernorm", False))
    m.max_position_embeddings = get("max_position_embeddings")
    if position == "rope":
        m.rotary_base = float(get("rotary_base", 10000))
    m.vocab_size = int(vocab)
    m.init_method_std = get("init_method_std")
    config.data.seq_length = int(get("seq_length", get("max_position_embeddings", 2048)))
    if get("num_experts"):
        m.num_experts = int(get("num_experts"))
        m.moe_router_topk = int(get("moe_router_topk", 2))
        m.moe_ffn_hidden_size = int(get("moe_ffn_hidden_size", m.ffn_hidden_size))
        m.moe_aux_loss_coeff = _aux_loss_coefficient(get, where)
        if get("moe_expert_capacity_factor") is not None:
            m.moe_expert_capacity_factor = float(get("moe_expert_capacity_factor"))
            m.moe_token_drop_policy = str(get("moe_token_drop_policy", "probs"))
        if get("moe_z_loss_coeff"):
            m.moe_z_loss_coeff = float(get("moe_z_loss_coeff"))
        # dense and MoE layers mixed: Megatron's parsed --moe-layer-freq (an int or a 0/1 list), and
        # MindSpeed's --first-k-dense-replace; the dense layers' MLP is ffn_hidden_size wide
        m.moe_layer_freq = get("moe_layer_freq")
        m.first_k_dense_replace = get("first_k_dense_replace")
    fields = megatron_default_args(config, megatron_overrides(config))
    if get("num_experts"):
        # Megatron's softmax router: top-k of the logits, softmax over those k (= ember's softmax,
        # top-k, renormalized), or with --moe-router-pre-softmax softmax over all then top-k (not
        # renormalized); sigmoid: top-k of the sigmoids, normalized to sum 1 when k > 1.
        sigmoid = str(get("moe_router_score_function", "softmax")) == "sigmoid"
        fields["moe_gating"] = "sigmoid" if sigmoid else "softmax"
        fields["moe_renormalize"] = fields["moe_top_k"] > 1 if sigmoid else not get("moe_router_pre_softmax", False)
        if get("moe_input_jitter_eps"):
            fields["moe_input_jitter"] = float(get("moe_input_jitter_eps"))
    if not m.swiglu and get("openai_gelu", False):
        fields["activation"] = "gelu_tanh"
    elif position == "alibi" or embedding_norm:
        # PAI's Bloom MLP: Megatron's fused bias-GELU (the tanh approximation, as HF Bloom's) unless
        # --no-bias-gelu-fusion, then torch's exact GELU
        fields["activation"] = "gelu_tanh" if get("bias_gelu_fusion", True) else "gelu"
    if position == "rope" and get("use_rope_scaling", False):
        # Megatron's Llama-3.1 scaling: only the factor is a flag; the rest are fixed in its code
        fields["rope_scaling"] = {"type": "llama3", "factor": float(get("rope_scaling_factor", 8.0)),
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
    if get("softmax_scale") is not None:
        fields["attn_scale"] = float(get("softmax_scale"))
    args = ModelArgs(**fields)
    return _family_of(args), args


def _aux_loss_coefficient(get: Callable[..., Any], where: str) -> float:
    """ember's load-balancing loss is Megatron's 'aux_loss' (Switch, over the micro-batch)."""
    kinds, coefficients = get("moe_router_load_balancing_type", "aux_loss"), get("moe_aux_loss_coeff", 0.0)
    kinds = list(kinds) if isinstance(kinds, (list, tuple)) else [kinds]
    coefficients = list(coefficients) if isinstance(coefficients, (list, tuple)) else [coefficients] * len(kinds)
    total = 0.0
    for kind, coefficient in zip(kinds, coefficients):
        if kind == "none" or not coefficient:
            continue
        if kind != "aux_loss":
            raise EmberError(f"{where}: --moe-router-load-balancing-type {kind} is not supported by ember's "
                             "mixture of experts (aux_loss, or none)")
        total += float(coefficient)
    return total


def _family_of(args: ModelArgs) -> str:
    if args.num_experts:  # Qwen3-MoE: q/k norm, dense and MoE layers may mix
        return "qwen3_moe" if args.qk_norm and not args.sandwich_norm else "mixtral"
    """The Hugging Face family an `ember convert --to hf` of the result would write."""
    if args.qk_norm:
        return "qwen3"
    if args.position_type == "alibi" or args.embedding_norm:
        return "bloom"
    if args.norm_type == "layernorm" and args.position_type == "learned":
        return "gpt2"
    if args.qkv_bias and not args.attn_out_bias:
        return "qwen2"
    return "llama"


# =============================================================================================
# Megatron tensor names -> one canonical (Megatron-Core) naming
# =============================================================================================
# Legacy model names (megatron.legacy.model.GPTModel) -> Megatron-Core names.
_LEGACY_LAYER = {
    "input_layernorm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm": "pre_mlp_layernorm",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
# Norms Megatron-Core fuses into the linear after them (TE specs, and every sharded_state_dict).
_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
LAYER_TENSORS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
    "mlp.router.weight",
)
# Mixture-of-experts expert tensors, canonically `mlp.experts.{E}.linear_fc1.weight` (E: the global
# expert index). Stored as:
# - per-rank SequentialMLP (local spec / TE non-grouped): mlp.experts.local_experts.{L}.linear_fc1.weight
# - per-rank TEGroupedMLP: mlp.experts.linear_fc1.weight{L}
#   (L: the index local to the expert-parallel rank; the reader makes it global)
# - distributed: decoder.layers.mlp.experts.experts.linear_fc1.weight, stacked [layers, experts, ...]
#   (or, saved with singleton_local_shards, ...experts.experts.{E}.linear_fc1.weight)
_LOCAL_EXPERT = re.compile(r"mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)"
                           r"|(linear_fc[12])\.(weight|bias)(\d+))$")
_DIST_EXPERT = re.compile(r"mlp\.experts\.experts\.(?:(\d+)\.)?(linear_fc[12])\.(weight|bias)$")
_EXPERT_KEY = re.compile(r"mlp\.experts\.(\*|\d+|local\d+)\.(linear_fc[12])\.(weight|bias)$")
TOP_TENSORS = (
    "embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
    "embedding.word_embeddings.norm.weight", "embedding.word_embeddings.norm.bias",  # PAI Bloom
    "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight",
)
# Tensor-parallel split dimension of each tensor in the per-rank files (None: replicated).
_COLUMN_PARALLEL = {"self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
                    "mlp.linear_fc1.bias", "embedding.word_embeddings.weight", "output_layer.weight"}
_ROW_PARALLEL = {"self_attention.linear_proj.weight", "mlp.linear_fc2.weight"}
_IGNORED = re.compile(r"(^|\.)_extra_state(/.*)?$|(^|\.)inv_freq$|^rotary_pos_emb\.")
_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")
_STACKED_NAME = re.compile(r"decoder\.layers\.(?!\d+\.)(.+)$")


def expert_key(expert: int | str, linear: str, part: str) -> str:
    """The canonical name of expert `expert`'s `linear` ("linear_fc1") `part` ("weight")."""
    return f"mlp.experts.{expert}.{linear}.{part}"


def dense_key(key: str) -> str:
    """An expert tensor's name as the dense MLP's (its tensor-parallel split and SwiGLU layout are
    the same); other names unchanged."""
    found = _EXPERT_KEY.match(key)
    return f"mlp.{found.group(2)}.{found.group(3)}" if found else key


def split_dim(key: str) -> int | None:
    key = dense_key(key)
    if key in _COLUMN_PARALLEL:
        return 0
    if key in _ROW_PARALLEL:
        return 1
    return None


def canonical_name(name: str) -> tuple[int | None, str] | None:
    """(layer number or None, Megatron-Core name relative to the layer or the model) for a tensor
    name of either naming; None for what is not a weight (TE/_extra_state, RoPE buffers). Layer
    numbers are as stored (per pipeline stage in per-rank files). Stacked distributed names
    (`decoder.layers.X`) come back with layer -1. Unknown names raise."""
    if _IGNORED.search(name):
        return None
    original = name
    if name == "word_embeddings_for_head.weight":  # legacy: the tied head's copy on the last stage
        return None, "output_layer.weight"
    if name.startswith("language_model."):
        name = name[len("language_model."):]
        name = re.sub(r"^(encoder|transformer)\.", "decoder.", name)
        layer = re.match(r"decoder\.layers\.(\d+)\.(.+?)\.(weight|bias)$", name)
        if layer:
            number, module, kind = layer.groups()
            if module not in _LEGACY_LAYER:
                raise EmberError(f"Megatron tensor {original} is not part of a GPT model ember can import")
            name = f"decoder.layers.{number}.{_LEGACY_LAYER[module]}.{kind}"
    found = _LAYER_NAME.match(name)
    if found:
        layer, key = int(found.group(1)), found.group(2)
    else:
        stacked = _STACKED_NAME.match(name)
        layer, key = (-1, stacked.group(1)) if stacked else (None, name)
    if layer is not None:
        key = _FUSED_NORMS.get(key, key)
        if key in LAYER_TENSORS:
            return layer, key
        local = _LOCAL_EXPERT.match(key)
        if local:
            index, linear, part = (local.group(1), local.group(2), local.group(3)) if local.group(1) is not None \
                else (local.group(6), local.group(4), local.group(5))
            return layer, expert_key(f"local{int(index)}", linear, part)
        stacked_experts = _DIST_EXPERT.match(key)
        if stacked_experts:
            index, linear, part = stacked_experts.groups()
            return layer, expert_key("*" if index is None else int(index), linear, part)
        if re.fullmatch(r"mlp\.experts\.weight[12]", key):
            raise EmberError(f"Megatron tensor {original}: the legacy GroupedMLP layout (--moe-use-legacy-grouped-gemm) "
                             "is not supported; resave with the SequentialMLP or TE grouped-GEMM experts")
    elif key in TOP_TENSORS:
        return None, key
    raise EmberError(f"Megatron tensor {original} is not part of a GPT model ember can import "
                     "(supported: GPT/Llama/Qwen-style models, PAI's Bloom, Mixtral-style mixture of experts)")


def _naming_of(name: str) -> str:
    return "legacy" if name.startswith(("language_model.", "word_embeddings_for_head.")) else "mcore"


def flatten_state(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The legacy model saves nested dicts ({'language_model': {'embedding': {...}}})."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_state(value, name + ".")
        else:
            yield name, value


# =============================================================================================
# the two on-disk formats, behind one interface: global tensors by (layer, canonical name)
# =============================================================================================
class _Reader:
    """Global (tensor-parallel-merged) tensors of one checkpoint, by (global layer, name)."""

    format: str
    naming: str
    shapes: dict[tuple[int | None, str], tuple[tuple[int, ...], torch.dtype]]
    saved_args: Any
    extras: list[str]  # what else the checkpoint holds (optimizer state, RNG), reported as dropped

    def get(self, layer: int | None, key: str) -> torch.Tensor:
        raise NotImplementedError

    def meta(self, layer: int | None, key: str) -> torch.Tensor:
        shape, dtype = self.shapes[(layer, key)]
        return torch.empty(shape, dtype=dtype, device="meta")

    def close(self) -> None:
        pass


class TorchDistReader(_Reader):
    """A Megatron-Core distributed checkpoint: reads only the DCP chunks an output tensor needs,
    one layer at a time (each chunk file region is a torch.save'd tensor, loaded weights_only)."""

    format = "torch_dist"

    def __init__(self, folder: Path, prefix: str = ""):
        """`prefix`: read the tensors stored under it, named as the model's after it (the
        optimizer's moments: `optimizer.state.exp_avg.` + the model tensor's name)."""
        self.folder = folder
        self.metadata = read_dcp_metadata(folder)
        common = folder / "common.pt"
        state = load_megatron_pickle(common, mmap=False) if common.is_file() else {}
        self.saved_args = state.get("args") if isinstance(state, dict) else None
        self.iteration = state.get("iteration") if isinstance(state, dict) else None
        self.shapes = {}
        # (layer, key) -> (fqn, its indices on the stacked leading dimensions: layer[, expert])
        self._sources: dict[tuple[int | None, str], tuple[str, tuple[int, ...]]] = {}
        self.extras = []
        self._prefix_of: dict[str, str] = {}  # with a prefix: model name -> stored name
        naming = set()
        for fqn, item in self.metadata.state_dict_metadata.items():
            if not hasattr(item, "chunks"):  # bytes: TE extra state, RNG, optimizer step
                continue
            if prefix:
                if not fqn.startswith(prefix):
                    continue
                self._prefix_of[fqn[len(prefix):]] = fqn
                fqn = fqn[len(prefix):]
            if not fqn.startswith(("embedding.", "decoder.", "output_layer.", "language_model.")):
                self.extras.append(fqn)  # optimizer.* and the like
                continue
            found = canonical_name(fqn)
            if found is None:
                continue
            naming.add(_naming_of(fqn))
            layer, key = found
            shape = tuple(item.size)
            dtype = item.properties.dtype
            if layer == -1 and "*" in key:  # [layers, experts, ...]
                for i in range(shape[0]):
                    for e in range(shape[1]):
                        self._add((i, key.replace("*", str(e))), shape[2:], dtype, fqn, (i, e))
            elif layer == -1:
                for i in range(shape[0]):
                    self._add((i, key), shape[1:], dtype, fqn, (i,))
            elif "*" in key:  # one layer's [experts, ...]: mixed dense/MoE models save layer by layer
                for e in range(shape[0]):
                    self._add((layer, key.replace("*", str(e))), shape[1:], dtype, fqn, (e,))
            else:
                self._add((layer, key), shape, dtype, fqn, ())
        self.naming = "/".join(sorted(naming)) or "mcore"
        self._chunk_cache: tuple[Any, torch.Tensor] | None = None

    def _add(self, where: tuple[int | None, str], shape: tuple[int, ...], dtype: torch.dtype, fqn: str,
             index: tuple[int, ...]) -> None:
        if where in self.shapes:
            raise EmberError(f"{self.folder}: tensor {where[1]} of layer {where[0]} is stored twice (again as {fqn})")
        self.shapes[where] = (shape, dtype)
        self._sources[where] = (fqn, index)

    def get(self, layer: int | None, key: str) -> torch.Tensor:
        fqn, lead = self._sources[(layer, key)]
        fqn = self._prefix_of.get(fqn, fqn)
        item = self.metadata.state_dict_metadata[fqn]
        shape, dtype = self.shapes[(layer, key)]
        out = torch.empty(shape, dtype=dtype)
        filled = 0
        n = len(lead)
        for chunk_index, chunk in enumerate(item.chunks):
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if not all(o <= i < o + z for i, o, z in zip(lead, offsets, sizes)):
                continue
            # a chunk of stacked layers (or experts) is read again for the next ones; a tensor's own chunk is not
            data = self.read_chunk(fqn, offsets, chunk_index, keep=bool(n))
            if n:
                data = data[tuple(i - o for i, o in zip(lead, offsets))]
                offsets = offsets[n:]
            region = tuple(slice(o, o + s) for o, s in zip(offsets, data.shape))
            out[region] = data
            filled += data.numel()
        if filled != out.numel():
            raise EmberError(f"{self.folder}: the chunks of {fqn} cover {filled} of its {out.numel()} values "
                             "(an incomplete checkpoint?)")
        return out

    def read_chunk(self, fqn: str, offsets: tuple[int, ...], chunk_index: int, keep: bool = True) -> torch.Tensor:
        """One stored chunk of `fqn`; `keep`: hold it for the next call (a chunk read piece by piece), the
        only one held, so an import keeps at most one chunk per reader beside what it is writing."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        key = MetadataIndex(fqn, torch.Size(offsets))
        if self._chunk_cache is not None and self._chunk_cache[0] == key:
            return self._chunk_cache[1]
        info = self.metadata.storage_data.get(key) or self.metadata.storage_data.get(MetadataIndex(fqn, torch.Size(offsets), chunk_index))
        if info is None:
            raise EmberError(f"{self.folder}/.metadata lists a chunk of {fqn} at {list(offsets)} but not where it is stored")
        if getattr(info, "transform_descriptors", None):
            raise EmberError(f"{self.folder}: {fqn} is stored with transforms {info.transform_descriptors} "
                             "(compression?), which ember does not read")
        path = self.folder / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
        except OSError as err:
            raise EmberError(f"{path}: cannot read ({err.strerror}); the checkpoint is incomplete") from None
        if len(raw) != info.length:
            raise EmberError(f"{path}: truncated ({fqn} needs bytes {info.offset}..{info.offset + info.length})")
        try:
            data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for bad pickles
            raise EmberError(f"{path}: chunk of {fqn} is not a readable tensor ({type(err).__name__})") from None
        if not isinstance(data, torch.Tensor):
            raise EmberError(f"{path}: chunk of {fqn} is a {type(data).__name__}, not a tensor")
        self._chunk_cache = (key, data) if keep else None
        return data

    def close(self) -> None:
        self._chunk_cache = None


class LegacyReader(_Reader):
    """Per-rank `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` files, memory-mapped; a tensor is the
    concatenation of its tensor-parallel slices (SwiGLU's fc1: gates, then ups), and layer
    numbers are made global by counting the layers of the stages before. With expert parallelism
    (`_EEE`, Megatron-LM's name when --expert-model-parallel-size > 1) each expert rank's file holds
    its own experts (local index L is global expert EEE * local experts + L) and a copy of the
    rest, read from expert rank 0."""

    format = "legacy"

    def __init__(self, folder: Path,
                 tensors_of: Callable[[dict[str, Any], Path], Iterator[tuple[str, Any]]] | None = None):
        """`tensors_of(state, path)`: the (model tensor name, tensor) pairs to read from a rank
        file's state (default: its 'model'; the optimizer import passes its moments under the
        names of their parameters)."""
        self.folder = folder
        self._tensors_of = tensors_of or (lambda state, path: flatten_state(state["model"]))
        found_dirs = [(path, found) for path in sorted(folder.iterdir())
                      if (found := _RANK_DIR.match(path.name)) and path.is_dir()]
        # mp_rank_TT_XXX is TP x PP, or TP x EP when only expert parallelism is on: the saved args say which
        two_parts_are_ep = False
        if any(f.group(2) is not None and f.group(3) is None for _, f in found_dirs):
            peek = load_megatron_pickle(found_dirs[0][0] / RANK_FILE)
            saved = peek.get("args") if isinstance(peek, dict) else None
            if isinstance(saved, (argparse.Namespace, dict)):
                a = saved_args_dict(saved, str(folder))
                two_parts_are_ep = (a.get("expert_model_parallel_size") or 1) > 1 and (
                    a.get("pipeline_model_parallel_size") or 1) == 1
            del peek
        ranks: dict[tuple[int, int, int], Path] = {}
        for path, found in found_dirs:
            tp, second, third = int(found.group(1)), found.group(2), found.group(3)
            if third is not None:
                pp, ep = int(second), int(third)
            elif two_parts_are_ep:
                pp, ep = 0, int(second)
            else:
                pp, ep = int(second or 0), 0
            ranks[(tp, pp, ep)] = path / RANK_FILE
        tp_size = 1 + max(r[0] for r in ranks)
        pp_size = 1 + max(r[1] for r in ranks)
        ep_size = 1 + max(r[2] for r in ranks)

        def rank_name(tp: int, pp: int, ep: int) -> str:
            return (f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "")
                    + (f"_{ep:03d}" if ep_size > 1 else ""))

        missing = [rank_name(tp, pp, ep) for tp in range(tp_size) for pp in range(pp_size) for ep in range(ep_size)
                   if (tp, pp, ep) not in ranks]
        if missing:
            raise EmberError(f"{folder}: {missing[0]} is missing ({len(ranks)} of {tp_size * pp_size * ep_size} "
                             "rank folders found)")
        self.tp_size, self.pp_size, self.ep_size = tp_size, pp_size, ep_size
        self.saved_args = None
        self.iteration = None
        self.extras = []
        self.rank_files = ranks  # (tp, pp, ep) rank -> its model_optim_rng.pt
        self._naming: set[str] = set()
        layer_counts: dict[int, int] = {}
        local: dict[tuple[int, int], dict[tuple[int | None, str], torch.Tensor]] = {}
        for (tp, pp) in sorted({(tp, pp) for tp, pp, _ in ranks}):
            # memory-mapped: only the pickle is read here, no tensor data
            local[(tp, pp)] = tensors = self._load_rank(tp, pp)
            if tp == 0:
                layer_counts[pp] = len({layer for layer, _ in tensors if layer is not None})
        self.naming = "/".join(sorted(self._naming)) or "mcore"
        offsets = {pp: sum(layer_counts[q] for q in range(pp)) for pp in range(pp_size)}
        # (global layer, key) -> (pipeline stage, name in that stage's files)
        self._where: dict[tuple[int | None, str], tuple[int, tuple[int | None, str]]] = {}
        parts: dict[tuple[int | None, str], list[torch.Tensor]] = {}
        for (tp, pp), tensors in sorted(local.items(), key=lambda item: (item[0][1], item[0][0])):
            for (layer, key), tensor in tensors.items():
                where = (None if layer is None else layer + offsets[pp], key)
                if where in self._where and self._where[where][0] != pp:
                    continue  # a model-level tensor on two stages (a tied head): the first stage's wins
                self._where[where] = (pp, (layer, key))
                parts.setdefault(where, []).append(tensor)
        self.shapes = {}
        for where, slices in parts.items():
            if len(slices) != tp_size:
                raise EmberError(f"{folder}: {where[1]} of layer {where[0]} is in {len(slices)} of {tp_size} "
                                 "tensor-parallel ranks")
            dim = split_dim(where[1])
            shape = list(slices[0].shape)
            if dim is not None:
                shape[dim] = sum(p.shape[dim] for p in slices)
            self.shapes[where] = (tuple(shape), slices[0].dtype)
        del local, parts
        self._gated = bool(saved_args_dict(self.saved_args, str(folder)).get("swiglu")) if self.saved_args is not None else False
        if self.saved_args is not None:
            saved = saved_args_dict(self.saved_args, str(folder))
            etp = saved.get("expert_tensor_parallel_size")
            if saved.get("num_experts") and etp is not None and etp != tp_size:
                raise EmberError(f"{folder}: per-rank files with --expert-tensor-parallel-size {etp} != tensor-parallel "
                                 f"size {tp_size} are not supported; resave with --ckpt-format torch_dist")
        # The files of one pipeline stage at a time are mapped while tensors are read (ember's
        # writing order goes through the stages in order), so touched pages of the others go.
        self._stage: int | None = None
        self._stage_tensors: list[dict[tuple[int | None, str], torch.Tensor]] = []

    def _load_rank(self, tp: int, pp: int) -> dict[tuple[int | None, str], torch.Tensor]:
        """Tensor-parallel rank tp's tensors of stage pp: expert rank 0's file, plus the experts of
        the other expert ranks' files with global expert numbers."""
        tensors: dict[tuple[int | None, str], torch.Tensor] = {}
        for ep in range(self.ep_size):
            local = self._load_rank_file(self.rank_files[(tp, pp, ep)])
            experts = {key: found for _, key in local if (found := _EXPERT_KEY.match(key)) and found.group(1).startswith("local")}
            per_rank = len({found.group(1) for found in experts.values()})
            for (layer, key), tensor in local.items():
                if key in experts:
                    found = experts[key]
                    global_index = ep * per_rank + int(found.group(1)[len("local"):])
                    tensors[(layer, expert_key(global_index, found.group(2), found.group(3)))] = tensor
                elif ep == 0:
                    tensors[(layer, key)] = tensor
        return tensors

    def _load_rank_file(self, path: Path) -> dict[tuple[int | None, str], torch.Tensor]:
        if not path.is_file():
            raise EmberError(f"{path} is missing; the checkpoint is incomplete")
        state = load_megatron_pickle(path)
        if not isinstance(state, dict):
            raise EmberError(f"{path}: expected a dict, found {type(state).__name__}")
        if "model" not in state:
            virtual = sorted(k for k in state if re.fullmatch(r"model\d+", str(k)))
            if virtual:
                raise EmberError(f"{path}: virtual-pipeline checkpoints ({', '.join(virtual)}) are not supported yet")
            raise EmberError(f"{path}: no 'model' entry (found {sorted(map(str, state))[:6]})")
        version = state.get("checkpoint_version", 0)
        if float(version or 0) < 2.0:
            raise EmberError(f"{path}: checkpoint_version {version} lays q/k/v out differently; "
                             "resave it with a Megatron-LM from 2021 or later")
        if self.saved_args is None:
            self.saved_args, self.iteration = state.get("args"), state.get("iteration")
        if path == self.rank_files[(0, 0, 0)]:
            self.extras = [k for k in ("optimizer", "opt_param_scheduler", "rng_state") if state.get(k) is not None]
        tensors: dict[tuple[int | None, str], torch.Tensor] = {}
        for name, value in self._tensors_of(state, path):
            found = canonical_name(name)
            if found is None or not isinstance(value, torch.Tensor):
                continue
            self._naming.add(_naming_of(name))
            tensors[found] = value
        return tensors

    def get(self, layer: int | None, key: str) -> torch.Tensor:
        stage, local_name = self._where[(layer, key)]
        if stage != self._stage:
            self._stage_tensors = []  # unmaps the previous stage's files
            self._stage_tensors = [self._load_rank(tp, stage) for tp in range(self.tp_size)]
            self._stage = stage
        parts = [tensors[local_name] for tensors in self._stage_tensors]
        dim = split_dim(key)
        if dim is None:
            return parts[0].clone()
        if dense_key(key).startswith("mlp.linear_fc1.") and self._gated:
            # each rank holds [its gate rows; its up rows]: all gates first, then all ups
            halves = [p.chunk(2, dim=0) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(parts, dim=dim)

    def close(self) -> None:
        self._stage_tensors = []


def open_megatron_checkpoint(checkpoint: MegatronCheckpoint) -> _Reader:
    if checkpoint.format == "torch_dist":
        return TorchDistReader(checkpoint.folder)
    return LegacyReader(checkpoint.folder)


# =============================================================================================
# Megatron global tensors -> ember tensors
# =============================================================================================
def split_qkv(args: ModelArgs, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused q/k/v rows [groups * (heads_per_group + 2) * head_dim, ...], per query
    group [its q heads, its k head, its v head], -> ember's wq, wk, wv rows."""
    groups, head_dim = args.n_kv_heads, args.head_dim
    per_group = args.n_heads // groups
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(args.n_heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(groups * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *rest)
    return q, k, v


def fuse_qkv(args: ModelArgs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    groups, head_dim = args.n_kv_heads, args.head_dim
    per_group = args.n_heads // groups
    rest = q.shape[1:]
    parts = (q.reshape(groups, per_group, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
             v.reshape(groups, 1, head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def ember_tensors(args: ModelArgs, get: Callable[[int | None, str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """ember's tensors in writing order, each made from the Megatron global tensors `get(layer,
    name)` returns (real tensors, or meta ones for planning)."""
    layernorm = args.norm_type == "layernorm"
    norm_parts = ("weight", "bias") if layernorm else ("weight",)
    yield "tok_embeddings.weight", get(None, "embedding.word_embeddings.weight")
    if args.embedding_norm:
        for part in ("weight", "bias"):
            yield f"embedding_norm.{part}", get(None, f"embedding.word_embeddings.norm.{part}")
    if args.position_type == "learned":
        yield "pos_embeddings.weight", get(None, "embedding.position_embeddings.weight")
    for i in range(args.n_layers):
        prefix = f"layers.{i}."
        for part in norm_parts:
            yield prefix + f"attention_norm.{part}", get(i, f"input_layernorm.{part}")
        for part, present in (("weight", True), ("bias", args.qkv_bias)):
            if present:
                q, k, v = split_qkv(args, get(i, f"self_attention.linear_qkv.{part}"))
                yield prefix + f"attention.wq.{part}", q
                yield prefix + f"attention.wk.{part}", k
                yield prefix + f"attention.wv.{part}", v
                del q, k, v
        if args.qk_norm:
            for which in ("q", "k"):
                for part in norm_parts:
                    yield prefix + f"attention.{which}_norm.{part}", get(i, f"self_attention.{which}_layernorm.{part}")
        yield prefix + "attention.wo.weight", get(i, "self_attention.linear_proj.weight")
        if args.attn_out_bias:
            yield prefix + "attention.wo.bias", get(i, "self_attention.linear_proj.bias")
        for part in norm_parts:
            yield prefix + f"ffn_norm.{part}", get(i, f"pre_mlp_layernorm.{part}")
        if args.is_moe_layer(i):
            yield from _moe_tensors(args, prefix, lambda key, i=i: get(i, key))
            continue
        for part, present in (("weight", True), ("bias", args.mlp_bias)):
            if not present:
                continue
            fc1 = get(i, f"mlp.linear_fc1.{part}")
            if args.mlp_type == "gated":
                gate, up = fc1.chunk(2, dim=0)
                yield prefix + f"feed_forward.w1.{part}", gate
                yield prefix + f"feed_forward.w3.{part}", up
            else:
                yield prefix + f"feed_forward.w1.{part}", fc1
            del fc1
            yield prefix + f"feed_forward.w2.{part}", get(i, f"mlp.linear_fc2.{part}")
    for part in norm_parts:
        yield f"norm.{part}", get(None, f"decoder.final_layernorm.{part}")
    if not args.tie_embeddings:
        yield "output.weight", get(None, "output_layer.weight")


def _moe_tensors(args: ModelArgs, prefix: str, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """One MoE layer: the router, then each stacked expert tensor [E, ...] from the E experts' tensors."""
    yield prefix + "moe.router.weight", get("mlp.router.weight")
    fc1 = [get(expert_key(e, "linear_fc1", "weight")) for e in range(args.num_experts)]
    if args.mlp_type == "gated":
        yield prefix + "moe.experts.w1", torch.stack([t.chunk(2, dim=0)[0] for t in fc1])
        yield prefix + "moe.experts.w3", torch.stack([t.chunk(2, dim=0)[1] for t in fc1])
    else:
        yield prefix + "moe.experts.w1", torch.stack(fc1)
    del fc1
    yield prefix + "moe.experts.w2", torch.stack([get(expert_key(e, "linear_fc2", "weight")) for e in range(args.num_experts)])


def _json_safe(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def convert_megatron_to_ember(
    src: str | Path,
    out: str | Path,
    iteration: int | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = io_weights.DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Megatron save folder (or one iteration of it) -> ember weight folder, written atomically.

    Returns a report: family, format, naming, iteration, tensor/pipeline-parallel sizes of the
    source, tensors/bytes/shards written, and `dropped` (what the checkpoint holds besides the
    model weights: optimizer state, RNG states), which the caller should mention."""
    from ember.checkpoint.convert import check_output_folder
    from ember.models.hf import ember_state_shapes

    check_output_folder(Path(src), Path(out))
    checkpoint = locate_megatron_checkpoint(src, iteration)
    reader = open_megatron_checkpoint(checkpoint)
    where = str(checkpoint.folder)
    if reader.saved_args is None:
        raise EmberError(f"{where}: the checkpoint holds no saved 'args', so its architecture is unknown; "
                         "it was not written by Megatron-LM's training loop")
    family, args = model_args_from_megatron(reader.saved_args, where=f"{where} (saved args)")

    # 1. plan from shapes only: every tensor present, shapes right, nothing left over
    used: set[tuple[int | None, str]] = set()

    def planned(layer: int | None, key: str) -> torch.Tensor:
        if (layer, key) not in reader.shapes:
            what = key if layer is None else f"decoder.layers.{layer}.{key}"
            raise EmberError(f"{where}: tensor {what} is missing, but the saved args describe a model with it")
        used.add((layer, key))
        return reader.meta(layer, key)

    entries = [io_weights.TensorEntry(name, io_weights.cast_floating(t, dtype).dtype, tuple(t.shape)) for name, t in ember_tensors(args, planned)]
    leftover = sorted(set(reader.shapes) - used, key=str)
    tied_copy = ((None, "output_layer.weight"),) if args.tie_embeddings else ()
    leftover = [w for w in leftover if w not in tied_copy]
    if leftover:
        layer, key = leftover[0]
        what = key if layer is None else f"decoder.layers.{layer}.{key}"
        raise EmberError(f"{where}: tensor {what} is not part of the model the saved args describe "
                         f"({len(leftover)} such tensors); the args and the weights disagree")
    io_weights.check_tensor_set({e.name: (e.shape, e.dtype) for e in entries}, ember_state_shapes(args),
                                where=f"{where} (as read with its saved args)")

    # 2. stream: one output tensor (or q/k/v, gate/up group) at a time
    saved = saved_args_dict(reader.saved_args, where)
    source = {"kind": "megatron", "path": str(Path(src).resolve()), "iteration": checkpoint.iteration,
              "format": reader.format, "naming": reader.naming,
              "megatron_args": {k: _json_safe(v) for k, v in sorted(saved.items()) if isinstance(k, str)}}
    with io_weights.atomic_folder(Path(out), overwrite=overwrite) as tmp:
        writer = io_weights.ShardedWriter(tmp, entries, max_shard_bytes)
        for name, tensor in ember_tensors(args, reader.get):
            writer.write(name, io_weights.cast_floating(tensor, dtype))
        writer.close()
        io_weights.write_manifest(tmp, args, family, source)
    reader.close()
    return {
        "family": family, "format": reader.format, "naming": reader.naming, "iteration": checkpoint.iteration,
        "tensor_parallel": saved.get("tensor_model_parallel_size"),
        "pipeline_parallel": saved.get("pipeline_model_parallel_size"),
        "expert_parallel": saved.get("expert_model_parallel_size") or 1,
        "tensors": len(entries), "bytes": sum(e.nbytes for e in entries), "shards": len(writer.shards),
        "dropped": reader.extras, "model_args": args.to_dict(), "notes": _notes(args, saved),
    }


def _notes(args: ModelArgs, saved: dict[str, Any]) -> list[str]:
    """What the caller should tell the user about how the source ran that ember does not copy."""
    if args.position_type == "alibi" and saved.get("use_flash_attn"):
        return ["saved with --use-flash-attn, where PAI's Bloom attention leaves ALiBi out; ember applies ALiBi, "
                "as Hugging Face's Bloom and PAI's attention without flash do"]
    return []


def describe_megatron_source(report: dict[str, Any]) -> str:
    """One line for a command to print after `convert_megatron_to_ember`."""
    kinds = list(dict.fromkeys(name.split(".")[0] for name in report.get("dropped") or []))
    dropped = f"; not imported: {', '.join(kinds)}" if kinds else ""
    if "optimizer" in kinds:
        dropped += " (--load-optim imports Adam's state as an ember training checkpoint)"
    dropped += "".join(f"; note: {note}" for note in report.get("notes") or [])
    return (f"megatron {report['format']} ({report['naming']} names, iteration {report['iteration']}, "
            f"TP {report['tensor_parallel']} x PP {report['pipeline_parallel']}"
            f"{' x EP ' + str(report['expert_parallel']) if (report.get('expert_parallel') or 1) > 1 else ''}"
            f") -> ember {report['family']}: "
            f"{report['tensors']} tensors, {report['bytes'] / 1e6:.1f} MB{dropped}")


__all__ = [
    "MegatronCheckpoint", "convert_megatron_to_ember", "describe_megatron_source", "is_megatron_checkpoint",
    "load_megatron_pickle", "locate_megatron_checkpoint", "model_args_from_megatron", "read_dcp_metadata",
    "split_qkv", "fuse_qkv",
]

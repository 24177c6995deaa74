"""Real Megatron checkpoints for the conversion tests, written by megatron-core's own code.

Run as every rank of a gloo group (tests/dist_utils.run_ranks sets RANK, WORLD_SIZE, ...):

    python tests/megatron_checkpoints.py OUT --family llama --tp 2 --pp 2 --format both

Each rank builds its part of a small megatron-core `GPTModel` (local layer spec, CPU), gives every
weight random values (norm scales and biases too, so a norm or bias mapped to the wrong place shows
in the logits), runs megatron-core's forward on fixed tokens (the pipeline stages hand their
activations on with plain send/recv) and saves the model the way Megatron-LM's training loop does:

- torch_dist: `megatron.core.dist_checkpointing.save` of {'model': sharded_state_dict, 'args',
  'iteration', 'checkpoint_version'} into OUT/iter_0000007 (the non-sharded entries land in
  common.pt, as in Megatron-LM);
- legacy: torch.save of {'args', 'checkpoint_version': 3.0, 'iteration', 'model', 'rng_state'} per
  rank into OUT/iter_0000007/mp_rank_TT[_PPP]/model_optim_rng.pt.

--family mixtral is a mixture-of-experts model (SequentialMLP experts); --ep N adds expert
parallelism (world tp * pp * N, the expert ranks being data-parallel ranks; legacy files are then
mp_rank_TT[_PPP]_EEE as Megatron-LM names them).

--optim-steps K (tensor and pipeline parallelism, untied output) trains first, as Megatron-LM's train_step does, with
megatron-core's own optimizer: its parameter groups (`_get_param_groups`: no weight decay on biases
and 1-D weights), torch AdamW (megatron-core's fallback without apex/TE) in its FP32Optimizer, and
its OptimizerParamScheduler (constant LR, as fixed in OPTIM). get_megatron_optimizer itself needs
Megatron's DDP buffers, which need CUDA, so the optimizer is built from those parts the way it
builds it. K steps on fixed batches, then the save holds the optimizer the way Megatron-LM's
save_checkpoint writes it (torch_dist: `optimizer.sharded_state_dict(model_sharded_state_dict)`
under 'optimizer'; legacy: `optimizer.state_dict()`), 'opt_param_scheduler' and iteration K. Then
one MORE step on another fixed batch, and OUT/reference_optim.pt: {'train_tokens' (that batch),
'tokens', 'logits' (megatron-core's logits after the extra step), 'optim' (its hyper-parameters)}.
--bf16 makes the model bf16 (`model.bfloat16()`, as Megatron-LM's Float16Module) and the optimizer
megatron-core's Float16OptimizerWithFloat16Params (fp32 master weights, saved as `fp32_param` /
'fp32_from_fp16_params'); it sorts parameters by CUDA type names, which CPU tensors are shown as
while it is built. --with-bf16 adds that bf16 model to the same run, under OUT/bf16.

--distributed-optimizer --dp N (world tp * pp * N; with --optim-steps) trains with Megatron-LM's
--use-distributed-optimizer instead: megatron-core's DistributedDataParallel (DistributedDataParallelConfig
(use_distributed_optimizer=True, overlap_grad_reduce=False), so one gradient bucket, as Megatron-LM
without --overlap-grad-reduce) and get_megatron_optimizer itself, which builds its DistributedOptimizer
over DDP's buffers: each data-parallel rank takes its share of the batch, DDP reduce-scatters (averages)
the gradients, each rank's Adam updates its shard of the buffer and the parameters are all-gathered.
It saves as Megatron-LM 0.16's save_checkpoint: torch_dist with `optimizer.sharded_state_dict(state,
metadata={'distrib_optim_sharding_type': X, ...})` for X in DISTRIBUTED_SHARDINGS, one folder each
(OUT/torch_dist-X), and legacy with per-rank model_optim_rng.pt (written by data-parallel rank 0) plus
distrib_optim.pt from `optimizer.save_parameter_state(path)`. --with-distributed-optimizer adds such a
run of the GPT-2 family (TP as given, DP = world / TP, no pipeline) to the same processes, under
OUT/distributed, and the same run with --overlap-grad-reduce and a small --ddp-bucket-size (the buffer
in eleven buckets; DDP reduce-scatters each one as its gradients are ready) under OUT/distributed-buckets.
What is patched, in this process only, so that it runs on a CPU-only torch over gloo:
torch.cuda.current_device() answers "cpu" (below, in main), so DDP's param and grad buffers
(`device=torch.cuda.current_device()` in param_and_grad_buffer.py) and the gather in
save_parameter_state are CPU tensors; and while the optimizer is built and steps, torch.tensor /
torch.zeros calls asking for device="cuda" get the CPU (its loss scale of 1, found_inf, the grad norm's
accumulator and overflow flag: `cuda_scalars_on_cpu`). No CUDA stream or event is reached (no
overlapped parameter gather; the overlapped reduce-scatters are gloo's asynchronous work, waited for in
finalize_model_grads; one optimizer instance). Every value saved is still megatron-core's own: its buffer layout, shard
ranges, reduce-scatter, Adam step, gather and sharded_state_dict run unchanged; the patches only say
which device a tensor is allocated on.

With --format both the one model is saved both ways, into OUT/torch_dist and OUT/legacy. Each save
folder gets latest_checkpointed_iteration.txt, and reference.pt: {'tokens': [B, S], 'logits':
[B, S, V] fp32 (vocabulary gathered)} from the last stage. megatron-core 0.16.1 runs this on CPU
with the local spec, use_cpu_initialization and every fusion off; Megatron-LM's `megatron.training`
is not part of megatron-core, so its args Namespace is rebuilt here with the fields it holds.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import zlib
from pathlib import Path

ITERATION = 7
BATCH, SEQ = 2, 12
# the optimizer of --optim-steps: large enough a learning rate that the moments show in the logits
# the torch_dist forms of the distributed optimizer's state Megatron-LM 0.16 writes: 'dp_reshardable'
# (its default) and 'fully_reshardable' (--dist-ckpt-optim-fully-reshardable); the older default,
# 'fully_sharded_model_space', megatron-core 0.16.1 no longer writes ("flattened_range is not supported")
DISTRIBUTED_SHARDINGS = ("dp_reshardable", "fully_reshardable")
# --ddp-bucket-size of the bucketed distributed-optimizer run (see main)
BUCKETED = 8401
OPTIM = dict(lr=0.01, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)

# name -> (TransformerConfig fields, GPTModel fields, Megatron-LM args beyond those)
FAMILIES = {
    # Llama 2/3: RMSNorm, SwiGLU, RoPE, GQA, no biases, untied output
    "llama": dict(
        config=dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
                    normalization="RMSNorm", gated_linear_unit=True, activation_func="silu", add_bias_linear=False,
                    layernorm_epsilon=1e-5),
        model=dict(vocab_size=128, max_sequence_length=64, position_embedding_type="rope", rotary_base=50000,
                   share_embeddings_and_output_weights=False),
    ),
    # GPT-2: LayerNorm, GELU, learned positions, biases everywhere, tied output
    "gpt2": dict(
        config=dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                    normalization="LayerNorm", gated_linear_unit=False, activation_func="gelu", add_bias_linear=True,
                    layernorm_epsilon=1e-5),
        model=dict(vocab_size=128, max_sequence_length=32, position_embedding_type="learned_absolute",
                   share_embeddings_and_output_weights=True),
    ),
    # Qwen3: Llama plus RMSNorm on queries and keys, head_dim set apart from hidden/heads, tied
    "qwen3": dict(
        config=dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                    ffn_hidden_size=64, normalization="RMSNorm", gated_linear_unit=True, activation_func="silu",
                    add_bias_linear=False, qk_layernorm=True, layernorm_epsilon=1e-6),
        model=dict(vocab_size=128, max_sequence_length=64, position_embedding_type="rope", rotary_base=1000000,
                   share_embeddings_and_output_weights=True),
    ),
    # Mixtral-style MoE: the Llama layer with 4 SwiGLU experts (top-2, softmax, renormalized) in place
    # of the MLP, SequentialMLP (local spec, no grouped GEMM), all-gather token dispatch (the all-to-all
    # one makes a torch.cuda.Stream in its constructor, which a CPU-only torch refuses), aux loss 0
    "mixtral": dict(
        config=dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
                    normalization="RMSNorm", gated_linear_unit=True, activation_func="silu", add_bias_linear=False,
                    layernorm_epsilon=1e-5, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
                    moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
                    moe_router_load_balancing_type="aux_loss"),
        model=dict(vocab_size=128, max_sequence_length=64, position_embedding_type="rope", rotary_base=10000,
                   share_embeddings_and_output_weights=False),
    ),
    # dense and MoE layers mixed (--moe-layer-freq [0,1,1,0]): the mixtral layer where the pattern says 1,
    # a dense SwiGLU MLP of ffn_hidden_size elsewhere (megatron-core's get_gpt_decoder_block_spec)
    "mixed": dict(
        config=dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
                    normalization="RMSNorm", gated_linear_unit=True, activation_func="silu", add_bias_linear=False,
                    layernorm_epsilon=1e-5, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
                    moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
                    moe_router_load_balancing_type="aux_loss", moe_layer_freq=[0, 1, 1, 0]),
        model=dict(vocab_size=128, max_sequence_length=64, position_embedding_type="rope", rotary_base=10000,
                   share_embeddings_and_output_weights=False),
    ),
    # for measuring conversion time and memory (not used by the tests): Llama-style, ~0.86B parameters
    "llama1b": dict(
        config=dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=5632,
                    normalization="RMSNorm", gated_linear_unit=True, activation_func="silu", add_bias_linear=False,
                    layernorm_epsilon=1e-5),
        model=dict(vocab_size=32000, max_sequence_length=2048, position_embedding_type="rope", rotary_base=10000,
                   share_embeddings_and_output_weights=False),
    ),
}


def megatron_args(family: str, tp: int, pp: int, ckpt_format: str, ep: int = 1,
                  iteration: int = ITERATION, dp: int = 1) -> argparse.Namespace:
    """The args Namespace Megatron-LM's training loop saves, with the fields a converter reads and
    a few of the others it holds (enums, dtypes, lists) so the loader's allow-list is exercised."""
    import torch
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    spec = FAMILIES[family]
    c, m = spec["config"], spec["model"]
    heads = c["num_attention_heads"]
    return argparse.Namespace(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
        num_attention_heads=heads, group_query_attention="num_query_groups" in c,
        num_query_groups=c.get("num_query_groups", 1), kv_channels=c.get("kv_channels", c["hidden_size"] // heads),
        max_position_embeddings=m["max_sequence_length"], seq_length=16,
        position_embedding_type=m["position_embedding_type"], use_rotary_position_embeddings=m["position_embedding_type"] == "rope",
        rotary_base=m.get("rotary_base", 10000), rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
        normalization=c["normalization"], norm_epsilon=c["layernorm_epsilon"], apply_layernorm_1p=False,
        swiglu=c["gated_linear_unit"], squared_relu=False, openai_gelu=False, onnx_safe=None,
        untie_embeddings_and_output_weights=not m["share_embeddings_and_output_weights"],
        add_bias_linear=c["add_bias_linear"], add_qkv_bias=c["add_bias_linear"],
        qk_layernorm=c.get("qk_layernorm", False), num_experts=c.get("num_moe_experts"),
        moe_router_topk=c.get("moe_router_topk", 2), moe_ffn_hidden_size=c.get("moe_ffn_hidden_size"),
        moe_aux_loss_coeff=c.get("moe_aux_loss_coeff", 0.0), moe_grouped_gemm=c.get("moe_grouped_gemm", False),
        moe_router_load_balancing_type=c.get("moe_router_load_balancing_type", "aux_loss"),
        moe_router_score_function="softmax", moe_router_pre_softmax=False, moe_shared_expert_intermediate_size=None,
        moe_token_dispatcher_type=c.get("moe_token_dispatcher_type", "allgather"), moe_layer_freq=c.get("moe_layer_freq", 1),
        moe_router_topk_scaling_factor=None, moe_expert_capacity_factor=None, moe_input_jitter_eps=None,
        moe_z_loss_coeff=None, moe_router_enable_expert_bias=False, moe_router_num_groups=None,
        vocab_size=m["vocab_size"] - 3, padded_vocab_size=m["vocab_size"], make_vocab_size_divisible_by=32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        world_size=tp * pp * ep * dp, data_parallel_size=ep * dp, params_dtype=torch.float32, fp16=False, bf16=False,
        ckpt_format=ckpt_format, transformer_impl="local", attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder, init_method_std=0.02, attention_dropout=0.0, hidden_dropout=0.0,
        iteration=iteration, consumed_train_samples=iteration * BATCH, train_iters=100, lr=OPTIM["lr"],
        min_lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"], adam_beta1=OPTIM["adam_beta1"],
        adam_beta2=OPTIM["adam_beta2"], adam_eps=OPTIM["adam_eps"], clip_grad=0.0, optimizer="adam",
        use_distributed_optimizer=False, lr_decay_style="constant", global_batch_size=BATCH, micro_batch_size=BATCH,
        data_path=["/data/corpus_text_document"], load=None, save="/checkpoints", seed=1234,
    )


def build_model(family: str, dtype=None):
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = FAMILIES[family]
    c = dict(spec["config"])
    activation = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[c.pop("activation_func")]
    config = TransformerConfig(
        **c, activation_func=activation, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        use_cpu_initialization=True, params_dtype=dtype or torch.float32, pipeline_dtype=dtype or torch.float32,
        bf16=dtype == torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False, add_qkv_bias=c["add_bias_linear"],
    )
    layer_spec = get_gpt_layer_local_spec(num_experts=c.get("num_moe_experts"), moe_grouped_gemm=c.get("moe_grouped_gemm", False),
                                          normalization=c["normalization"], qk_layernorm=c.get("qk_layernorm", False))
    if c.get("moe_layer_freq", 1) != 1:  # dense and MoE layers: one spec per layer of this stage
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=c["normalization"])
    return GPTModel(config, layer_spec, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), parallel_output=False, **spec["model"])


def randomize(model, family: str) -> None:
    """Random values for every weight: a replicated tensor (norms, row-parallel biases) gets the same
    values on every tensor-parallel rank, a split one different values per rank. The tied output
    layer of the last stage gets the first stage's embedding, as Megatron keeps them equal."""
    import torch
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            shared = name in ("embedding.word_embeddings.weight", "output_layer.weight")
            split = getattr(param, "tensor_model_parallel", False)
            key = "word_embeddings" if shared and model.share_embeddings_and_output_weights else f"{pp_rank}:{name}"
            key = f"{family}:{key}:{tp_rank if split else '-'}"
            if ".experts." in name:  # expert-parallel ranks hold different experts
                key += f":ep{ep_rank}"
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("layer_norm_weight") or "layernorm.weight" in name or "norm.weight" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias") or name.endswith("layer_norm_bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.05 * noise)


def reference_forward(model, tokens):
    """Logits of megatron-core's forward over the pipeline stages (last stage returns them)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    hidden_shape = (tokens.shape[1], tokens.shape[0], model.config.hidden_size)  # megatron: [s, b, h]
    if not parallel_state.is_pipeline_first_stage():
        received = torch.empty(hidden_shape, dtype=model.config.params_dtype)
        dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    # megatron's mask convention: True = masked out (its default causal mask is made on "cuda")
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        out = model(tokens, positions, attention_mask=causal)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return out


def build_optimizer(model):
    """megatron-core's optimizer for `model`, as get_megatron_optimizer builds it without the
    distributed optimizer and without DDP: its parameter groups, torch AdamW, FP32Optimizer (a bf16
    model: Float16OptimizerWithFloat16Params, with fp32 master weights); and Megatron-LM's
    OptimizerParamScheduler over it."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import (
        OptimizerConfig,
        _get_megatron_optimizer_based_on_param_groups,
        _get_param_groups,
    )
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(optimizer="adam", lr=OPTIM["lr"], min_lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
                             adam_beta1=OPTIM["adam_beta1"], adam_beta2=OPTIM["adam_beta2"], adam_eps=OPTIM["adam_eps"],
                             clip_grad=0.0, params_dtype=model.config.params_dtype, bf16=model.config.bf16,
                             use_distributed_optimizer=False)
    groups = _get_param_groups([model], config, None)
    tensor, type_of = torch.tensor, torch.Tensor.type
    # The optimizers keep their (unused) loss scale of 1 on "cuda": on a CPU-only torch, the CPU;
    # Float16OptimizerWithFloat16Params sorts parameters by their CUDA type names: CPU ones pass as those.
    cuda_names = {"torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor", "torch.FloatTensor": "torch.cuda.FloatTensor"}
    torch.tensor = lambda *a, **k: tensor(*a, **{**k, "device": "cpu"} if k.get("device") == "cuda" else k)
    torch.Tensor.type = lambda self, *a, **k: type_of(self, *a, **k) if a or k else cuda_names.get(type_of(self), type_of(self))
    try:
        optimizer = _get_megatron_optimizer_based_on_param_groups(
            config, [model], groups, model_parallel_group=parallel_state.get_model_parallel_group())
    finally:
        torch.tensor, torch.Tensor.type = tensor, type_of
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=OPTIM["lr"], min_lr=OPTIM["lr"], lr_warmup_steps=0,
                                        lr_decay_steps=100 * BATCH, lr_decay_style="constant",
                                        start_wd=OPTIM["weight_decay"], end_wd=OPTIM["weight_decay"],
                                        wd_incr_steps=100 * BATCH, wd_incr_style="constant")
    return optimizer, scheduler


@contextlib.contextmanager
def cuda_scalars_on_cpu(type_names: bool = False):
    """The optimizers' small bookkeeping tensors megatron-core makes on "cuda" (the loss scale of 1,
    found_inf, the grad-norm accumulator and overflow flag) made on the CPU instead; with
    `type_names`, CPU parameters shown by their CUDA type names, by which megatron-core's optimizers
    sort them into fp32 and 16-bit groups. No tensor of the model or of Adam's state is touched."""
    import torch

    tensor, zeros, type_of = torch.tensor, torch.zeros, torch.Tensor.type
    cuda_names = {"torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor", "torch.FloatTensor": "torch.cuda.FloatTensor"}
    torch.tensor = lambda *a, **k: tensor(*a, **{**k, "device": "cpu"} if k.get("device") == "cuda" else k)
    torch.zeros = lambda *a, **k: zeros(*a, **{**k, "device": "cpu"} if k.get("device") == "cuda" else k)
    if type_names:
        torch.Tensor.type = lambda self, *a, **k: type_of(self, *a, **k) if a or k else cuda_names.get(type_of(self), type_of(self))
    try:
        yield
    finally:
        torch.tensor, torch.zeros, torch.Tensor.type = tensor, zeros, type_of


def build_distributed_optimizer(model, bucket_size: int | None = None):
    """Megatron-LM's --use-distributed-optimizer for `model`: megatron-core's DistributedDataParallel
    (its param/grad buffers, reduce-scatter of the gradients, all-gather of the parameters) and
    get_megatron_optimizer itself, which builds the DistributedOptimizer over DDP's buffers (each
    data-parallel rank owns a contiguous shard of every bucket and keeps Adam's state for it only);
    with Megatron-LM's OptimizerParamScheduler. `bucket_size`: Megatron-LM's --overlap-grad-reduce
    --ddp-bucket-size N (the buffer cut into buckets of about N elements, each reduce-scattered as soon
    as its gradients are ready). Returns (the DDP-wrapped model, optimizer, scheduler)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # Megatron-LM's defaults for --use-distributed-optimizer: without --overlap-grad-reduce one bucket
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True,
                                               overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size,
                                               overlap_param_gather=False, grad_reduce_in_fp32=False,
                                               check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    config = OptimizerConfig(optimizer="adam", lr=OPTIM["lr"], min_lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
                             adam_beta1=OPTIM["adam_beta1"], adam_beta2=OPTIM["adam_beta2"], adam_eps=OPTIM["adam_eps"],
                             clip_grad=0.0, params_dtype=model.config.params_dtype, bf16=model.config.bf16,
                             use_distributed_optimizer=True)
    with cuda_scalars_on_cpu(type_names=True):
        optimizer = get_megatron_optimizer(config, [ddp])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=OPTIM["lr"], min_lr=OPTIM["lr"], lr_warmup_steps=0,
                                        lr_decay_steps=100 * BATCH, lr_decay_style="constant",
                                        start_wd=OPTIM["weight_decay"], end_wd=OPTIM["weight_decay"],
                                        wd_incr_steps=100 * BATCH, wd_incr_style="constant")
    return ddp, optimizer, scheduler


def train_step(model, optimizer, scheduler, tokens) -> None:
    """Megatron-LM's train_step on one batch, one micro-batch (what its schedule does then): the
    mean next-token cross-entropy, backward (pipeline stages hand activations forward and their
    gradients back with plain send/recv), optimizer.step(), the scheduler advanced by the batch's
    samples. No tied embedding across stages (its gradient all-reduce is not done here)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
        finalize_model_grads,
    )

    ddp = hasattr(model, "finish_grad_sync")  # megatron-core's DDP (the distributed optimizer)
    samples = tokens.shape[0]
    if ddp:  # each data-parallel rank takes its share of the batch; DDP averages the gradients
        share = tokens.shape[0] // parallel_state.get_data_parallel_world_size()
        tokens = tokens[parallel_state.get_data_parallel_rank() * share:][:share]
        model.zero_grad_buffer()
    else:
        assert not (model.share_embeddings_and_output_weights and parallel_state.get_pipeline_model_parallel_world_size() > 1)
    model.train()
    optimizer.zero_grad()
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)[None, None]
    received = None
    if not parallel_state.is_pipeline_first_stage():
        received = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        received.requires_grad_()
        getattr(model, "module", model).set_input_tensor(received)  # DDP wraps the GPTModel
    out = model(tokens, positions, attention_mask=causal)
    if parallel_state.is_pipeline_last_stage():
        loss = torch.nn.functional.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
    else:
        dist.send(out.detach().contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(out)
        dist.recv(grad, src=parallel_state.get_pipeline_model_parallel_next_rank())
        torch.autograd.backward(out, grad)
    if received is not None:
        dist.send(received.grad.contiguous(), dst=parallel_state.get_pipeline_model_parallel_prev_rank())
    if ddp:  # what Megatron-LM's schedule calls after the backward: the reduce-scatter, and the rest
        finalize_model_grads([model])
    else:
        # finalize_model_grads' sum over tensor-parallel ranks of the qk-layernorm (and sequence-parallel
        # norm) gradients, megatron-core's own function; it reads the DDP wrapper's config
        model.ddp_config = DistributedDataParallelConfig()
        _allreduce_non_tensor_model_parallel_grads([model], model.config)
    with cuda_scalars_on_cpu():
        success, _, _ = optimizer.step()
    assert success
    scheduler.step(increment=samples)
    model.eval()


def train_tokens(family: str, step: int):
    import torch

    return torch.randint(0, FAMILIES[family]["model"]["vocab_size"], (BATCH, SEQ),
                         generator=torch.Generator().manual_seed(1000 + step))


def save_torch_dist(model, args, folder: Path, optimizer=None, scheduler=None, sharding: str | None = None) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # The writer logs its memory use through psutil, which megatron-core does not depend on;
    # the number is only logged, so without psutil it is 0.
    if not filesystem_async.HAVE_PSUTIL:
        filesystem_async._process_memory = lambda: 0

    metadata = None
    if sharding is not None:  # Megatron-LM's _build_sharded_state_dict_metadata with the distributed optimizer
        from megatron.core import parallel_state

        metadata = {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True,
                    "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        if sharding == "fully_reshardable":
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    model_state = model.sharded_state_dict(metadata=metadata) if metadata else model.sharded_state_dict()
    state = {"model": model_state, "args": args, "iteration": args.iteration, "checkpoint_version": 3.0}
    if optimizer is not None:  # Megatron-LM's generate_state_dict
        state["optimizer"] = (optimizer.sharded_state_dict(state, metadata=metadata) if metadata
                              else optimizer.sharded_state_dict(model_state))
        state["opt_param_scheduler"] = scheduler.state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    content = {k: v for k, v in metadata.items() if k != "dp_cp_group"} if metadata else None
    dist_checkpointing.save(state, str(folder), content_metadata=content)


def save_legacy(model, args, folder: Path, optimizer=None, scheduler=None) -> None:
    import numpy as np
    import torch
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" if args.pipeline_model_parallel_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    if args.expert_model_parallel_size > 1:  # Megatron-LM's get_checkpoint_name: _EEE for the expert rank
        name += f"_{parallel_state.get_expert_model_parallel_rank():03d}"
    rng_state = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                  "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None, "rng_tracker_states": {}}]
    state = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration,
             "model": model.state_dict_for_save_checkpoint(), "rng_state": rng_state}
    if optimizer is not None:  # Megatron-LM's save_checkpoint (the distributed optimizer: no tensors here)
        state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = scheduler.state_dict()
    (folder / name).mkdir(parents=True, exist_ok=True)
    if args.use_distributed_optimizer:  # every rank gathers, data-parallel rank 0 writes distrib_optim.pt
        optimizer.save_parameter_state(str(folder / name / "distrib_optim.pt"))
    if args.expert_model_parallel_size == 1 and parallel_state.get_data_parallel_rank() != 0:
        return  # Megatron-LM: data-parallel rank 0 writes the model's file
    torch.save(state, folder / name / "model_optim_rng.pt")


def load_saved(model, save_dir: Path, ckpt_format: str) -> None:
    """Load a Megatron save folder into this rank's model the way Megatron-LM's load_checkpoint
    does: torch_dist through dist_checkpointing.load of the model's sharded_state_dict, legacy by
    torch.load of this rank's mp_rank file; both with load_state_dict(strict=True)."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    folder = save_dir / f"iter_{int((save_dir / 'latest_checkpointed_iteration.txt').read_text()):07d}"
    if ckpt_format == "torch_dist":
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
        assert loaded["checkpoint_version"] == 3.0 and loaded["args"].num_layers == model.config.num_layers
        state = loaded["model"]
    else:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
        if parallel_state.get_expert_model_parallel_world_size() > 1:
            name += f"_{parallel_state.get_expert_model_parallel_rank():03d}"
        saved = torch.load(folder / name / "model_optim_rng.pt", weights_only=False)
        assert saved["checkpoint_version"] == 3.0 and saved["args"].tensor_model_parallel_size == \
            parallel_state.get_tensor_model_parallel_world_size()
        state = saved["model"]
    model.load_state_dict(state, strict=True)


def make_saves(opts, root: Path, bf16: bool) -> None:
    """Build, randomize, (train,) save in the formats asked for under `root`, write the references."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    model = build_model(opts.family, torch.bfloat16 if bf16 else None)
    if bf16:  # what Megatron-LM's Float16Module wrapper does to every parameter (norms too)
        model.bfloat16()
    randomize(model, opts.family)
    optimizer = scheduler = None
    iteration = ITERATION
    trained = model  # what trains and runs the forward: the model, or DDP around it
    if opts.optim_steps:
        assert opts.ep == 1, "--optim-steps: no expert parallelism"
        if opts.distributed_optimizer:
            trained, optimizer, scheduler = build_distributed_optimizer(model, opts.bucket_size)
        else:
            optimizer, scheduler = build_optimizer(model)
        for step in range(opts.optim_steps):
            train_step(trained, optimizer, scheduler, train_tokens(opts.family, step))
        iteration = opts.optim_steps
    trained.eval()
    tokens = torch.randint(0, FAMILIES[opts.family]["model"]["vocab_size"], (BATCH, SEQ),
                           generator=torch.Generator().manual_seed(99))
    logits = reference_forward(trained, tokens)
    formats = ["torch_dist", "legacy"] if opts.format == "both" else [opts.format]
    # the distributed optimizer: one torch_dist save per sharding type, in OUT/torch_dist-<type>
    shardings = DISTRIBUTED_SHARDINGS if opts.distributed_optimizer else (None,)
    saves = [(f, sharding) for f in formats for sharding in (shardings if f == "torch_dist" else (None,))]
    for ckpt_format, sharding in saves:
        out = root / (ckpt_format if sharding is None else f"{ckpt_format}-{sharding}") if opts.format == "both" else root
        args = megatron_args(opts.family, opts.tp, opts.pp, ckpt_format, opts.ep, iteration, opts.dp)
        if bf16:
            args.bf16, args.params_dtype = True, torch.bfloat16
        args.use_distributed_optimizer = bool(opts.distributed_optimizer)
        if opts.bucket_size:
            args.overlap_grad_reduce, args.ddp_bucket_size = True, opts.bucket_size
        args.dist_ckpt_optim_fully_reshardable = sharding == "fully_reshardable"
        folder = out / f"iter_{iteration:07d}"
        if ckpt_format == "torch_dist":
            save_torch_dist(model, args, folder, optimizer, scheduler, sharding)
        else:
            save_legacy(model, args, folder, optimizer, scheduler)
        dist.barrier()
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            torch.save({"tokens": tokens, "logits": logits.float()}, out / "reference.pt")
        if dist.get_rank() == 0:
            (out / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        dist.barrier()
    if optimizer is not None:  # the reference continuation: one more step, then the logits
        extra = train_tokens(opts.family, opts.optim_steps)
        train_step(trained, optimizer, scheduler, extra)
        after = reference_forward(trained, tokens)
        if after is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and \
                parallel_state.get_data_parallel_rank() == 0:
            torch.save({"train_tokens": extra, "tokens": tokens, "logits": after.float(), "optim": dict(OPTIM),
                        "iteration": iteration}, root / "reference_optim.pt")
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=list(FAMILIES), required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (world: tp * pp * ep, data-parallel ep)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (world: tp * pp * dp; not with --ep)")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="with --optim-steps: megatron-core's DDP and DistributedOptimizer (state sharded over dp)")
    parser.add_argument("--with-distributed-optimizer", action="store_true",
                        help="with --optim-steps: also, on the same ranks as TP x DP, a --distributed-optimizer run "
                             "saved under OUT/distributed")
    parser.add_argument("--bucket-size", type=int, default=None,
                        help="with --distributed-optimizer: --overlap-grad-reduce --ddp-bucket-size N")
    parser.add_argument("--format", choices=["torch_dist", "legacy", "both"], required=True,
                        help="both: the same model saved in OUT/torch_dist and OUT/legacy")
    parser.add_argument("--bf16", action="store_true", help="a bf16 model (with --optim-steps: fp32 master weights)")
    parser.add_argument("--with-bf16", action="store_true", help="also the same as a bf16 model, under OUT/bf16")
    parser.add_argument("--optim-steps", type=int, default=0,
                        help="train this many steps with megatron-core's optimizer first and save its state "
                             "(iteration = steps); then one more step for OUT/reference_optim.pt")
    parser.add_argument("--load", type=Path, default=None,
                        help="instead of saving: load this Megatron save folder (e.g. ember's export) into the "
                             "model at this layout (strict), run the forward on the tokens of OUT/reference.pt and "
                             "write its logits to OUT/loaded.pt")
    opts = parser.parse_args(argv)

    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # megatron-core 0.16.1 allocates some forward-time buffers (RoPE frequencies, gathered
    # tensor-parallel outputs) on torch.cuda.current_device(), moves the tied embedding to .cuda()
    # before syncing the pipeline's two copies, and its checkpoint writer calls
    # torch.cuda.synchronize(); on a CPU-only torch these become "cpu", no move, nothing to wait for.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    dist.init_process_group("gloo")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16.1's MoE router reads moe_utils.te_general_gemm, which it only defines
    # when Transformer Engine imports; without TE it means "no TE gemm" (the torch matmul path).
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    try:
        assert opts.dp == 1 or opts.ep == 1, "--dp with --ep: the expert ranks are the data-parallel ranks"
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=opts.tp, pipeline_model_parallel_size=opts.pp,
                                                 expert_model_parallel_size=opts.ep)
        megatron_random.initialize_rng_tracker(inference_rng_tracker=True)  # no CUDA RNG to fork; dropout is 0
        torch.manual_seed(1234)
        if opts.load is not None:
            model = build_model(opts.family)
            load_saved(model, opts.load, opts.format)
            model.eval()
            tokens = torch.load(opts.out / "reference.pt")["tokens"]
            logits = reference_forward(model, tokens)
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
                torch.save({"tokens": tokens, "logits": logits.float()}, opts.out / "loaded.pt")
            dist.barrier()
            return 0
        make_saves(opts, opts.out, bf16=opts.bf16)
        if opts.with_bf16:  # the same again as a bf16 model, in these processes (no second start-up)
            torch.manual_seed(1234)
            make_saves(opts, opts.out / "bf16", bf16=True)
        if opts.with_distributed_optimizer:  # these ranks again as TP x DP (no pipeline), under OUT/distributed
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=opts.tp)
            torch.manual_seed(1234)
            # GPT-2: its biases and norms are not multiples of the buffer's 64-element alignment, so
            # a layout without that alignment is caught (the Llama family's sizes all are)
            again = argparse.Namespace(**{**vars(opts), "family": "gpt2", "pp": 1, "dp": dist.get_world_size() // opts.tp,
                                          "distributed_optimizer": True, "format": "both"})
            make_saves(again, opts.out / "distributed", bf16=False)
            # again with --overlap-grad-reduce --ddp-bucket-size 8401: eleven buckets, two of them ending
            # after a 96-element q/k/v bias (off the buffer's 64-element alignment), under OUT/distributed-buckets
            torch.manual_seed(1234)
            make_saves(argparse.Namespace(**{**vars(again), "bucket_size": BUCKETED}), opts.out / "distributed-buckets",
                       bf16=False)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- for the tests
def build(out: Path, family: str, tp: int, pp: int, ckpt_format: str = "both", timeout: float = 300.0, ep: int = 1,
          optim_steps: int = 0, bf16: bool = False, with_bf16: bool = False, dp: int = 1,
          distributed_optimizer: bool = False, with_distributed_optimizer: bool = False) -> Path:
    """Run this script as tp * pp * ep * dp gloo ranks (free port, hard timeout, no process left behind)."""
    from dist_utils import run_ranks

    result = run_ranks([__file__, str(out), "--family", family, "--tp", str(tp), "--pp", str(pp), "--ep", str(ep),
                        "--dp", str(dp), "--format", ckpt_format, "--optim-steps", str(optim_steps),
                        *(["--bf16"] if bf16 else []), *(["--with-bf16"] if with_bf16 else []),
                        *(["--distributed-optimizer"] if distributed_optimizer else []),
                        *(["--with-distributed-optimizer"] if with_distributed_optimizer else [])],
                       nprocs=tp * pp * ep * dp,
                       timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"building the megatron-core {family} checkpoint failed "
                           f"(killed={result.killed}):\n{result.output[-8000:]}")
    return out


def load_with_megatron(out: Path, save_dir: Path, family: str, tp: int, pp: int, ckpt_format: str,
                       timeout: float = 300.0, ep: int = 1) -> dict:
    """megatron-core loads `save_dir` into a GPTModel at TP x PP and runs its forward on the tokens
    of out/reference.pt: {'tokens', 'logits'} (written to out/loaded.pt)."""
    import torch
    from dist_utils import run_ranks

    result = run_ranks([__file__, str(out), "--family", family, "--tp", str(tp), "--pp", str(pp),
                        "--ep", str(ep), "--format", ckpt_format, "--load", str(save_dir)], nprocs=tp * pp * ep,
                       timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"megatron-core could not load {save_dir} (killed={result.killed}):\n{result.output[-8000:]}")
    return torch.load(out / "loaded.pt")


_TO_LEGACY_LAYER = {
    "input_layernorm": "input_layernorm",
    "self_attention.linear_qkv": "self_attention.query_key_value",
    "self_attention.linear_proj": "self_attention.dense",
    "pre_mlp_layernorm": "post_attention_layernorm",
    "mlp.linear_fc1": "mlp.dense_h_to_4h",
    "mlp.linear_fc2": "mlp.dense_4h_to_h",
}


def with_legacy_model_names(save_dir: Path, out: Path) -> Path:
    """A copy of a per-rank save whose 'model' entries carry the legacy model's names and nesting
    (megatron.legacy.model.GPTModel's state_dict_for_save_checkpoint), same tensors. The legacy
    model class is not part of megatron-core 0.16.1, so the tensors come from megatron-core's own
    save and only the names are rewritten, the way Megatron-LM names them."""
    import re
    import shutil

    import torch

    shutil.copytree(save_dir, out)
    for path in out.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        embedding, encoder, output, tied_head = {}, {}, {}, None
        for name, tensor in state["model"].items():
            if name.endswith("_extra_state"):
                continue
            layer = re.match(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
            if layer:
                number, module, kind = layer.groups()
                encoder[f"layers.{number}.{_TO_LEGACY_LAYER[module]}.{kind}"] = tensor
            elif name.startswith("decoder.final_layernorm."):
                encoder[name.replace("decoder.", "")] = tensor
            elif name.startswith("embedding."):
                table, kind = name.split(".")[1:]
                embedding.setdefault(table, {})[kind] = tensor
            elif name == "output_layer.weight" and state["args"].untie_embeddings_and_output_weights:
                output["weight"] = tensor
            elif name == "output_layer.weight":  # the tied head's copy on the last pipeline stage
                tied_head = {"weight": tensor}
            else:
                raise AssertionError(f"no legacy name for {name}")
        language_model = {"embedding": embedding, "encoder": encoder}
        if output:
            language_model["output_layer"] = output
        state["model"] = {"language_model": language_model}
        if tied_head is not None:
            state["model"]["word_embeddings_for_head"] = tied_head
        torch.save(state, path)
    return out

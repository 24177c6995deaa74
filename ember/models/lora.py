"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al. 2021, PEFT's layout).

An adapted layer y = W x + b keeps W and b frozen and adds (alpha / r) * B A dropout(x), with
A [r, in] and B [out, r] the only weights that train. They live under the layer as
`lora_A.weight` / `lora_B.weight`, PEFT's names: `layers.0.attention.wq.lora_A.weight` maps to
`model.layers.0.self_attn.q_proj.lora_A.weight` through the same table as the base weight
(`ember.checkpoint.peft_adapter`). A forward hook on the layer adds the update, so the layer stays
an `nn.Linear` with its own parameter names and every parallel style still applies to it.

Adapters are added from outside, after tensor parallelism (whose styles would shard them as if
they were the layer's own weight) and before data parallelism (FSDP2 then sees frozen base weights
and trained adapters). Each adapter follows its base weight's layout: a column-parallel weight
(split over its outputs) gets B split the same way and A whole; a row-parallel one (split over its
inputs) gets A split over the inputs and B whole, so every rank computes its slice of the update
and the base layer's own communication carries it (Megatron's LoRA split).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import EmberError
from ember.models.args import ModelArgs

# What `--lora-target-modules` accepts, as the ember layers each name adapts. MindSpeed-LLM (Megatron
# core) fuses q/k/v into linear_qkv and gate/up into linear_fc1; ember keeps them apart, so those
# names adapt each part with its own A and B (PEFT's layout on the Hugging Face model).
ATTENTION_LEAVES = ("wq", "wk", "wv", "wo")
MLP_LEAVES = ("w1", "w2", "w3")
TARGET_NAMES: dict[str, tuple[str, ...]] = {
    # ember's own
    **{leaf: (leaf,) for leaf in ATTENTION_LEAVES + MLP_LEAVES},
    "attention": ATTENTION_LEAVES, "feed_forward": MLP_LEAVES, "all-linear": ATTENTION_LEAVES + MLP_LEAVES,
    # MindSpeed-LLM / Megatron-core
    "linear_qkv": ("wq", "wk", "wv"), "linear_proj": ("wo",), "linear_fc1": ("w1", "w3"), "linear_fc2": ("w2",),
    # Hugging Face: Llama, Mistral, Qwen2/3, Mixtral
    "q_proj": ("wq",), "k_proj": ("wk",), "v_proj": ("wv",), "o_proj": ("wo",),
    "gate_proj": ("w1",), "up_proj": ("w3",), "down_proj": ("w2",),
    # Hugging Face: Bloom, GPT-2 (fused q/k/v; GPT-2's c_proj is both attn.c_proj and mlp.c_proj)
    "query_key_value": ("wq", "wk", "wv"), "dense": ("wo",), "dense_h_to_4h": ("w1",), "dense_4h_to_h": ("w2",),
    "c_attn": ("wq", "wk", "wv"), "c_fc": ("w1",), "c_proj": ("wo", "w2"),
}


@dataclass(frozen=True)
class LoRASpec:
    """Rank, scaling alpha / r, input dropout and the adapted layers (ember leaf names)."""

    r: int
    alpha: float
    dropout: float
    leaves: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def resolve_targets(names: Iterable[str], where: str = "--lora-target-modules") -> tuple[str, ...]:
    """ember leaf names (wq ... w3) for target names in any of the accepted spellings."""
    leaves: list[str] = []
    for name in names:
        key = str(name).rsplit(".", 1)[-1] if str(name) not in TARGET_NAMES else str(name)
        if key not in TARGET_NAMES:
            raise EmberError(f"{where}: unknown module {name!r}; use MindSpeed's linear_qkv linear_proj linear_fc1 "
                             f"linear_fc2, Hugging Face's q_proj ... down_proj, or ember's wq wk wv wo w1 w2 w3")
        leaves.extend(leaf for leaf in TARGET_NAMES[key] if leaf not in leaves)
    return tuple(leaf for leaf in ATTENTION_LEAVES + MLP_LEAVES if leaf in leaves)


def make_spec(r: int, alpha: float, dropout: float, targets: Iterable[str]) -> LoRASpec:
    if int(r) <= 0:
        raise EmberError(f"--lora-r must be a positive rank, got {r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise EmberError(f"--lora-dropout must be in [0, 1), got {dropout}")
    leaves = resolve_targets(targets)
    if not leaves:
        raise EmberError("--lora-target-modules is empty; name the layers to adapt, e.g. linear_qkv linear_proj")
    return LoRASpec(int(r), float(alpha), float(dropout), leaves)


def check_model(args: ModelArgs, spec: LoRASpec) -> None:
    """Refuse, in one line, targets the architecture cannot take."""
    mlp = [leaf for leaf in spec.leaves if leaf in MLP_LEAVES]
    if args.num_experts and mlp:
        raise EmberError(f"LoRA on MoE expert layers ({', '.join(mlp)}) is not supported; adapt the attention "
                         f"only (--lora-target-modules linear_qkv linear_proj)")
    if args.mlp_type != "gated" and spec.leaves == ("w3",):
        raise EmberError("--lora-target-modules names only up_proj (w3), which this model's plain MLP does not have")


# ---------------------------------------------------------------------------------------------
class LoRAFactor(nn.Module):
    """One of the two low-rank matrices (PEFT's lora_A / lora_B): a bias-free linear map."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _add_update(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    x = module.lora_dropout(inputs[0])
    return output + module.lora_B(module.lora_A(x)) * module.lora_scaling


def target_paths(model: nn.Module, leaves: Iterable[str]) -> list[str]:
    """Module paths (`layers.3.attention.wq`) of the layers `leaves` adapt in this model or stage."""
    wanted = set(leaves)
    paths = []
    for layer_name, block in model.layers.items():
        for parent in ("attention", "feed_forward"):
            owner = getattr(block, parent, None)
            for leaf in ATTENTION_LEAVES + MLP_LEAVES:
                if leaf in wanted and isinstance(getattr(owner, leaf, None), nn.Linear):
                    paths.append(f"layers.{layer_name}.{parent}.{leaf}")
    return paths


def add_adapters(model: nn.Module, spec: LoRASpec, paths: Iterable[str] | None = None) -> list[str]:
    """Give the layers at `paths` (default: every layer `spec` targets) an adapter, and freeze
    everything else. Works on the meta device and on tensor-parallel (DTensor) layers; the
    adapters are left uninitialised (`initial_adapter_weights` has their values)."""
    paths = target_paths(model, spec.leaves) if paths is None else list(paths)
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        linear = model.get_submodule(path)
        if hasattr(linear, "lora_A"):
            raise EmberError(f"{path} already has a LoRA adapter")
        weight = linear.weight
        out_features, in_features = weight.shape
        linear.lora_A = LoRAFactor(in_features, spec.r).to(device=weight.device, dtype=weight.dtype)
        linear.lora_B = LoRAFactor(spec.r, out_features).to(device=weight.device, dtype=weight.dtype)
        linear.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        linear.lora_scaling = spec.scaling
        _follow_layout(linear)
        # prepend: under tensor parallelism the update joins the output before the style's output
        # hook turns it into a local tensor, so both are still DTensors of the same layout
        linear.register_forward_hook(_add_update, prepend=True)
    model.lora_spec = spec
    return paths


def _follow_layout(linear: nn.Linear) -> None:
    """Shard a tensor-parallel layer's adapter like its weight (see the module docstring)."""
    weight = linear.weight
    if not hasattr(weight, "device_mesh"):
        return
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh, placement = weight.device_mesh, weight.placements[0]
    if placement == Shard(0):  # column-parallel: outputs split
        layouts = {"lora_A": Replicate(), "lora_B": Shard(0)}
    elif placement == Shard(1):  # row-parallel: inputs split
        layouts = {"lora_A": Shard(1), "lora_B": Replicate()}
    else:
        layouts = {"lora_A": Replicate(), "lora_B": Replicate()}
    for name, layout in layouts.items():
        factor = getattr(linear, name)
        factor.weight = nn.Parameter(distribute_tensor(factor.weight, mesh, [layout]))


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_names(model: nn.Module) -> list[str]:
    return [name for name in model.state_dict() if is_adapter_name(name)]


def adapter_shapes(args: ModelArgs, spec: LoRASpec) -> dict[str, torch.Size]:
    """Name -> full shape of every adapter weight `spec` gives the whole model."""
    from ember.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    add_adapters(model, spec)
    return {name: t.shape for name, t in model.state_dict().items() if is_adapter_name(name)}


def initial_adapter_weights(args: ModelArgs, spec: LoRASpec, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's default initialisation, the same for every layout: A ~ kaiming_uniform(a=sqrt(5))
    (uniform in +-1/sqrt(in)), B = 0, so training starts from the base model's outputs."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in sorted(adapter_shapes(args, spec).items()):
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            weights[name] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
        else:
            weights[name] = torch.zeros(shape)
    return weights


def merge_adapters(state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                   scaling: float) -> dict[str, torch.Tensor]:
    """Base weights with every adapter folded in: W + scaling * B @ A (computed in fp32, stored in
    W's dtype), as PEFT's merge_and_unload does. Returns a new dict without the adapter tensors."""
    merged = {name: t for name, t in state.items() if not is_adapter_name(name)}
    for name in adapters:
        if ".lora_A." not in name:
            continue
        layer = name.split(".lora_A.")[0]
        base = f"{layer}.weight"
        if base not in merged:
            raise EmberError(f"adapter {name} has no base weight {base} to merge into")
        a, b = adapters[name].float(), adapters[f"{layer}.lora_B.weight"].float()
        weight = merged[base]
        merged[base] = (weight.float() + scaling * (b @ a)).to(weight.dtype)
    return merged

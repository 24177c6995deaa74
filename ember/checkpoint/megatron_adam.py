"""What a Megatron checkpoint's Adam state is, whatever form it was saved in: the moments (and fp32
master weights) as readers of global tensors by parameter, Adam's step and settings, and the
checks every form shares (Megatron's standard parameter grouping, one set of Adam settings).

`ember.checkpoint.megatron_optim` reads the non-distributed optimizer's forms and writes the ember
training checkpoint; `ember.checkpoint.megatron_distributed_optim` reads the distributed
optimizer's flat gradient buffers. Both build a `MegatronAdam` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.megatron import canonical_name, flatten_state
from ember.errors import EmberError

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32_param"
# the legacy distributed optimizer's file next to each model_optim_rng.pt, and its flat tensors' names
DISTRIBUTED_FILE = "distrib_optim.pt"
FLAT_KINDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", MASTER: "param"}
# Megatron's parameter-group fields that only say how its own scheduler treats a group
_GROUP_FIELDS = {"params", "is_expert_parallel", "default_config", "wd_mult", "lr_mult", "is_decoupled_lr", "max_lr",
                 "min_lr", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                 "differentiable", "fused", "decoupled_weight_decay", "bias_correction", "adam_w_mode", "step"}


class NoUsableOptimizerState(EmberError):
    """The checkpoint holds no optimizer state, or one whose layout ember cannot map."""


@dataclass
class MegatronAdam:
    """What a Megatron checkpoint's optimizer holds, ready to read tensor by tensor."""

    step: int  # Adam's step counter (bias correction)
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float  # of the decayed group (biases and 1-D weights: none)
    readers: dict[str, Any] = field(default_factory=dict)  # "exp_avg", "exp_avg_sq"[, "fp32_param"] -> reader
    scheduler: dict[str, Any] | None = None

    @property
    def has_master_weights(self) -> bool:
        return MASTER in self.readers

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def refuse(where: str, what: str) -> NoUsableOptimizerState:
    return NoUsableOptimizerState(f"{where}: {what}")


def check_standard_group(where: str, number: int, group: dict[str, Any]) -> None:
    strange = sorted(set(group) - _GROUP_FIELDS)
    if strange or group.get("lr_mult", 1.0) != 1.0 or group.get("is_decoupled_lr", False) or "wd_mult" not in group:
        what = f"fields {strange}" if strange else "learning-rate multipliers or no wd_mult"
        raise refuse(where, f"parameter group {number} has {what}: not Megatron's standard grouping, so the "
                             "parameter of each optimizer index is unknown")


def model_parameters(state: dict[str, Any], path: Path) -> list[tuple[str, torch.Tensor]]:
    """A rank file's model parameters in the model's order (that of its 'model' entries)."""
    params = [(name, value) for name, value in flatten_state(state["model"])
              if isinstance(value, torch.Tensor) and canonical_name(name) is not None]
    if any(name.startswith(("language_model.", "word_embeddings_for_head.")) for name, _ in params):
        raise refuse(str(path), "the legacy model's optimizer state (language_model.* names): its parameter order is "
                                 "not one ember can verify")
    return params


def group_step(where: str, groups: list[dict[str, Any]]) -> float:
    """Adam's step where apex's FusedAdam keeps it: in every parameter group."""
    steps = {float(g["step"]) for g in groups if g.get("step") is not None and g.get("params", [0])}
    if len(steps) != 1:
        raise refuse(where, "the optimizer state holds no single Adam step (per parameter or per group); "
                             "did the optimizer never step?")
    return steps.pop()


def adam_state(where: str, groups: list[dict[str, Any]], step: Any, readers: dict[str, Any],
          scheduler: Any) -> MegatronAdam:
    if not groups:
        raise refuse(where, "the optimizer has no parameter groups")
    if any(g.get("amsgrad") for g in groups):
        raise refuse(where, "AMSGrad state (max_exp_avg_sq) is not ember's Adam")
    coupled = [g for g in groups if g.get("decoupled_weight_decay", g.get("adam_w_mode", True)) is False]
    if any(g.get("weight_decay") for g in coupled):
        raise refuse(where, "Adam with L2 weight decay (not AdamW's decoupled one) is not ember's optimizer")
    betas = {tuple(float(b) for b in g["betas"]) for g in groups if "betas" in g}
    eps = {float(g["eps"]) for g in groups if "eps" in g}
    decays = {float(g.get("weight_decay", 0.0)) for g in groups if g.get("wd_mult", 1.0) != 0.0}
    if len(betas) != 1 or len(eps) != 1 or len(decays) > 1:
        raise refuse(where, f"parameter groups with different Adam settings (betas {sorted(betas)}, eps "
                             f"{sorted(eps)}, weight decay {sorted(decays)}); ember has one")
    lr = float(groups[0].get("lr", 0.0))
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    return MegatronAdam(step=int(step), lr=lr, betas=betas.pop(), eps=eps.pop(),
                        weight_decay=decays.pop() if decays else 0.0, readers=readers,
                        scheduler=scheduler if isinstance(scheduler, dict) else None)

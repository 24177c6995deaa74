"""LoRA adapters as PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`).

The folder is the one `peft` writes with `save_pretrained` for a LoRA model on the Hugging Face
model, so `PeftModel.from_pretrained(hf_model, folder)` loads it: tensor names
`base_model.model.<HF module>.lora_{A,B}.weight`, the module found through the same ember <-> HF
table as the base weight (`ember.models.hf`). Families whose Hugging Face q/k/v is one fused module
(Bloom, GPT-2) have no PEFT form for ember's separate q/k/v adapters: merge those instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.weights import atomic_folder
from ember.errors import EmberError
from ember.models.args import ModelArgs
from ember.models.hf import TensorMapper, ember_state_shapes
from ember.models.lora import LoRASpec, is_adapter_name, make_spec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def hf_module_names(family: str, args: ModelArgs, layers: list[str], strict: bool = True) -> dict[str, str]:
    """ember layer path (`layers.0.attention.wq`) -> Hugging Face module path
    (`model.layers.0.self_attn.q_proj`); `strict=False` leaves out layers fused in HF."""
    shapes = ember_state_shapes(args)
    names = {}
    for layer in layers:
        weight = f"{layer}.weight"
        out = TensorMapper(family, args).to_hf(weight, torch.empty(shapes[weight][0], device="meta"))
        if len(out) != 1 or not out[0][0].endswith(".weight"):
            if not strict:
                continue
            raise EmberError(f"{family}'s Hugging Face model fuses {layer.rsplit('.', 1)[-1]} with other layers, "
                             f"so PEFT cannot hold its adapter; adapt other modules, or merge the adapter "
                             f"(ember convert --merge-lora)")
        names[layer] = out[0][0][: -len(".weight")]
    return names


def _layers(adapters: dict[str, torch.Tensor]) -> list[str]:
    return sorted({name.split(".lora_")[0] for name in adapters if is_adapter_name(name)})


def save_peft_adapter(out_dir: str | Path, adapters: dict[str, torch.Tensor], spec: LoRASpec, family: str,
                      args: ModelArgs, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write `adapters` (ember names -> full tensors) as a PEFT LoRA adapter folder."""
    from safetensors.torch import save_file

    layers = _layers(adapters)
    modules = hf_module_names(family, args, layers)
    tensors = {}
    for name, tensor in adapters.items():
        layer, _, rest = name.partition(".lora_")
        tensors[f"{_PREFIX}{modules[layer]}.lora_{rest}"] = tensor.detach().to("cpu").contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules.values()}),
        "bias": "none",
        "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D stores its weight transposed
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, overwrite=overwrite, replaceable=is_adapter_folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise EmberError(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE}); --lora-load takes the folder "
                         f"ember or peft's save_pretrained writes")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise EmberError(f"{path}: invalid JSON ({err})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise EmberError(f"{path}: peft_type {config.get('peft_type')!r}; ember loads LoRA adapters only")
    unsupported = [key for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                                   "layers_to_transform") if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise EmberError(f"{path}: {', '.join(unsupported)} set; ember loads plain LoRA adapters (one r and alpha, "
                         f"no bias, every layer)")
    return config


def load_peft_adapter(folder: str | Path, family: str, args: ModelArgs) -> tuple[LoRASpec, dict[str, torch.Tensor]]:
    """(spec, ember name -> tensor) of a PEFT LoRA adapter folder, for a model of `family`/`args`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise EmberError(f"{folder} has no {WEIGHTS_FILE} (adapter_model.bin is not read: it needs pickle)")
    spec = make_spec(config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
                     config.get("target_modules") or [])
    candidates = [name[: -len(".weight")] for name in ember_state_shapes(args)
                  if name.endswith(".weight") and (".attention.w" in name or ".feed_forward.w" in name)]
    by_hf = {hf: layer for layer, hf in hf_module_names(family, args, candidates, strict=False).items()}
    adapters: dict[str, torch.Tensor] = {}
    shapes = ember_state_shapes(args)
    for name, tensor in load_file(str(weights)).items():
        key = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        module, sep, rest = key.partition(".lora_")
        factor = rest.replace(".default", "")
        if not sep or factor not in ("A.weight", "B.weight") or module not in by_hf:
            raise EmberError(f"{weights}: tensor {name} is not a LoRA weight of a {family} model's "
                             f"adaptable layers")
        layer = by_hf[module]
        out_features, in_features = shapes[f"{layer}.weight"][0]
        want = (spec.r, in_features) if factor == "A.weight" else (out_features, spec.r)
        if tuple(tensor.shape) != want:
            raise EmberError(f"{weights}: {name} has shape {tuple(tensor.shape)}, expected {want} (r={spec.r})")
        adapters[f"{layer}.lora_{factor}"] = tensor.float()
    for layer in _layers(adapters):
        if f"{layer}.lora_A.weight" not in adapters or f"{layer}.lora_B.weight" not in adapters:
            raise EmberError(f"{weights}: {layer} has only one of lora_A / lora_B")
    if not adapters:
        raise EmberError(f"{weights} holds no LoRA weights")
    return spec, adapters


def adapter_layers(adapters: dict[str, torch.Tensor]) -> list[str]:
    """The layer paths the adapters adapt."""
    return _layers(adapters)

"""Hugging Face checkpoints <-> ember weight folders, streamed (`ember convert`).

Both directions first check every tensor name and shape against config.json / ember_model.json
(from headers only), then plan the output shards, then copy tensors one at a time. Peak memory
is about one tensor (or one group of fused tensors), not the model; benchmarks/convert.py
measures it. The command's flags live in `ember.commands.convert`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint import weights as io
from ember.errors import EmberError
from ember.models.hf import (
    TensorMapper,
    args_from_hf_config,
    ember_state_shapes,
    expected_hf_tensors,
    hf_config_from_args,
    normalise_hf_tensor,
)


def convert_to_hf(src: Path, out: Path, max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
                  dtype: torch.dtype | None = None, overwrite: bool = False,
                  merge_lora: bool | str | Path | None = None) -> dict[str, Any]:
    """ember weights -> HF; a training checkpoint (`ember train --save` folder) is read first.
    `merge_lora`: fold LoRA adapters into the weights, those of the training checkpoint (True) or
    those of a PEFT adapter folder (a path)."""
    import tempfile

    from ember.checkpoint.export import export_training_checkpoint, is_training_checkpoint

    src, out = Path(src), Path(out)
    check_output_folder(src, out)
    if not is_training_checkpoint(src) and not merge_lora:
        return convert_ember_to_hf(src, out, max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="ember-export-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        if merge_lora or training_checkpoint_has_adapters(src):
            if not merge_lora:  # the model that run trained is base + adapter: export that
                import sys

                print(f"ember: {src} is a LoRA run: its adapter is merged into the exported weights "
                      f"(`--to peft` writes the adapter alone)", file=sys.stderr)
            weights = merge_lora_weights(src, Path(tmp) / "weights", merge_lora)
        else:
            weights = export_training_checkpoint(src, Path(tmp) / "weights")
        return convert_ember_to_hf(weights, out, max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# LoRA (issue 17): adapters merged into full weights, or exported as a PEFT folder
def training_checkpoint_has_adapters(src: Path) -> bool:
    from ember.checkpoint.export import is_training_checkpoint
    from ember.checkpoint.training import find_checkpoint

    if not is_training_checkpoint(src):
        return False
    ref = find_checkpoint(src)
    return bool(ref.train_state().get("config", {}).get("lora", {}).get("target_modules"))


def _read_lora_training_checkpoint(src: Path):
    """(args, base state, adapters, spec, family, train_state) of a LoRA run's checkpoint."""
    from ember.checkpoint.export import infer_family, read_training_checkpoint
    from ember.models.lora import is_adapter_name, make_spec

    if not training_checkpoint_has_adapters(src):
        raise EmberError(f"{src} holds no LoRA training checkpoint (its run had no --lora-target-modules); "
                         f"give --merge-lora the PEFT adapter folder to merge")
    args, state, train_state = read_training_checkpoint(src)
    config = train_state.get("config", {})
    lora = config["lora"]
    spec = make_spec(lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"])
    adapters = {name: t for name, t in state.items() if is_adapter_name(name)}
    base = {name: t for name, t in state.items() if not is_adapter_name(name)}
    family = infer_family(args, config.get("model", {}).get("name"))
    return args, base, adapters, spec, family, train_state


def merge_lora_weights(src: Path, out: Path, adapter: bool | str | Path | None = True,
                       overwrite: bool = False) -> Path:
    """An ember weight folder with LoRA adapters folded in: SRC a LoRA run's training checkpoint
    (adapter True), or an ember weight folder / training checkpoint plus a PEFT adapter folder."""
    from ember.checkpoint.export import _tokenizer_dir, export_training_checkpoint, is_training_checkpoint
    from ember.checkpoint.peft_adapter import load_peft_adapter
    from ember.models.lora import merge_adapters

    src = Path(src)
    if adapter is True or adapter is None:
        args, base, adapters, spec, family, train_state = _read_lora_training_checkpoint(src)
        source = {"training_checkpoint": str(src.resolve()), "iteration": train_state.get("iteration"),
                  "merged_lora": True}
        return io.save_ember_weights(merge_adapters(base, adapters, spec.scaling), args, out, family, source=source,
                                     tokenizer_dir=_tokenizer_dir(train_state), overwrite=overwrite)
    import tempfile

    parent = Path(out).parent if Path(out).parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="ember-merge-", dir=parent) as tmp:
        folder = export_training_checkpoint(src, Path(tmp) / "weights") if is_training_checkpoint(src) else src
        manifest = io.read_manifest(folder)
        args, state = io.load_ember_weights(folder)
        family = manifest["family"]
        spec, adapters = load_peft_adapter(adapter, family, args)
        source = {**manifest.get("source", {}), "merged_lora": str(Path(adapter).resolve())}
        tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
        return io.save_ember_weights(merge_adapters(state, adapters, spec.scaling), args, out, family, source=source,
                                     tokenizer_dir=tokenizer, overwrite=overwrite)


def export_peft_adapter(src: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """A LoRA run's training checkpoint -> PEFT adapter folder (for the Hugging Face model)."""
    from ember.checkpoint.peft_adapter import save_peft_adapter

    src, out = Path(src), Path(out)
    check_output_folder(src, out)
    args, _, adapters, spec, family, train_state = _read_lora_training_checkpoint(src)
    base = train_state.get("config", {}).get("checkpoint", {}).get("load")
    save_peft_adapter(out, adapters, spec, family, args, base_model=base, overwrite=overwrite)
    size = sum(t.numel() * t.element_size() for t in adapters.values())
    return {"family": family, "tensors": len(adapters), "bytes": size, "shards": 1}


def check_output_folder(src: Path, out: Path) -> None:
    """OUT may not be SRC nor a folder that holds SRC: writing it (with --force, replacing it)
    would delete the source."""
    src_real, out_real = Path(src).resolve(), Path(out).resolve()
    if out_real == src_real:
        raise EmberError(f"the output {out} is the source {src}; choose another output folder")
    if out_real in src_real.parents:
        raise EmberError(f"the output {out} holds the source {src}; replacing it would delete the source, "
                         f"choose another output folder")


def parse_size(text: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", text.upper())
    if not found:
        raise EmberError(f"--max-shard-size {text!r}: expected a size such as 500MB, 2GiB or 5GB")
    number, unit = float(found.group(1)), (found.group(2) or "B")
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    return int(number * base ** powers.get(unit[0], 0))


# ---------------------------------------------------------------------------------------------
def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise EmberError(f"{hf_dir} has no config.json; point SRC at a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise EmberError(f"{path}: invalid JSON ({err})") from None


def convert_hf_to_ember(
    hf_dir: str | Path,
    out_dir: str | Path,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_folder(hf_dir, out_dir)
    config = read_hf_config(hf_dir)
    family, args = args_from_hf_config(config, where=str(hf_dir / "config.json"))
    files = io.WeightFiles(hf_dir)

    # 1. names and shapes only: every expected tensor present, nothing unknown, shapes right
    origin: dict[str, str] = {}
    found: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path, entry in files.entries():
        meta = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        for name, tensor in normalise_hf_tensor(family, args, entry.name, meta):
            if name in found:
                raise EmberError(f"tensor {name} appears twice in {hf_dir} (again in {path.name})")
            found[name] = (tuple(tensor.shape), tensor.dtype)
            origin[name] = entry.name if name == entry.name else f"{entry.name} (as {name})"
            origin[name] += f" [{path.name}]"
    expected = {name: (shape, None) for name, shape in expected_hf_tensors(family, args).items()}
    io.check_tensor_set(found, expected, where=f"{hf_dir} ({family}, config.json)", describe=lambda n: origin.get(n, n))

    # 2. the output layout, by running the mapping over meta tensors
    planner = TensorMapper(family, args)
    entries: list[io.TensorEntry] = []
    for name, (shape, tensor_dtype) in found.items():
        for ember_name, tensor in planner.to_ember(name, torch.empty(shape, dtype=tensor_dtype, device="meta")):
            tensor = io.cast_floating(tensor, dtype)
            entries.append(io.TensorEntry(ember_name, tensor.dtype, tuple(tensor.shape)))
    io.check_tensor_set({e.name: (e.shape, e.dtype) for e in entries}, ember_state_shapes(args), where="the converted model")

    # 3. stream the data; tensors are produced in the order planned in step 2
    mapper = TensorMapper(family, args)
    with io.atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = io.ShardedWriter(tmp, entries, max_shard_bytes)
        for _, name, tensor in files.tensors():
            for hf_name, part in normalise_hf_tensor(family, args, name, tensor):
                for ember_name, out in mapper.to_ember(hf_name, part):
                    writer.write(ember_name, io.cast_floating(out, dtype))
        writer.close()
        source = {"kind": "huggingface", "path": str(hf_dir.resolve()), "hf_config": config}
        io.write_manifest(tmp, args, family, source)
        io.copy_tokenizer_files(hf_dir, tmp / "tokenizer")
    return {"family": family, "tensors": len(entries), "bytes": sum(e.nbytes for e in entries), "shards": len(writer.shards)}


def convert_ember_to_hf(
    ember_dir: str | Path,
    out_dir: str | Path,
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    from ember.models.args import ModelArgs

    ember_dir, out_dir = Path(ember_dir), Path(out_dir)
    check_output_folder(ember_dir, out_dir)
    manifest = io.read_manifest(ember_dir)
    family = manifest["family"]
    args = ModelArgs.from_dict(manifest["model_args"])
    files = io.WeightFiles(ember_dir)
    stored = files.entries()
    found = {entry.name: (entry.shape, entry.dtype) for _, entry in stored}
    io.check_tensor_set(found, ember_state_shapes(args), where=str(ember_dir))

    weight_dtype = io.cast_floating(torch.empty((), dtype=stored[0][1].dtype), dtype).dtype
    config = hf_config_from_args(args, family, base=manifest.get("source", {}).get("hf_config"), dtype=weight_dtype)

    planner = TensorMapper(family, args)
    entries: list[io.TensorEntry] = []
    for _, entry in stored:
        for hf_name, tensor in planner.to_hf(entry.name, torch.empty(entry.shape, dtype=entry.dtype, device="meta")):
            tensor = io.cast_floating(tensor, dtype)
            entries.append(io.TensorEntry(hf_name, tensor.dtype, tuple(tensor.shape)))

    mapper = TensorMapper(family, args)
    with io.atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = io.ShardedWriter(tmp, entries, max_shard_bytes)
        for _, name, tensor in files.tensors():
            for hf_name, out in mapper.to_hf(name, tensor):
                writer.write(hf_name, io.cast_floating(out, dtype))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        io.copy_tokenizer_files(ember_dir / "tokenizer", tmp)
    return {"family": family, "tensors": len(entries), "bytes": sum(e.nbytes for e in entries), "shards": len(writer.shards)}

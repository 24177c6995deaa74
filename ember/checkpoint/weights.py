"""Weights on disk: the ember weight folder, and a streaming safetensors reader/writer.

Ember weight folder (written by `ember convert --to ember` and by training, read by training
and `ember generate`):

    OUT_DIR/ember_model.json      {"format": "ember-weights", "version": 1, "family": ...,
                                   "model_args": {...}, "source": {...}}
    OUT_DIR/model.safetensors     or model-00001-of-0000N.safetensors + model.safetensors.index.json
    OUT_DIR/tokenizer/            tokenizer files, when the source had them

Tensors are named by ember's own state_dict keys (the tied output weight is not stored).

The streaming writer plans every shard's header from tensor names/shapes/dtypes first, then
writes tensors one at a time at their offsets, so converting a model never holds more than a
tensor (or one fused group) in memory. The reader reads one tensor with plain file reads
(no mmap), so memory stays anonymous and measurable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.errors import EmberError
from ember.models.args import ModelArgs
from ember.progress import Progress

MANIFEST = "ember_model.json"
FORMAT = "ember-weights"
VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


# =============================================================================================
# streaming safetensors
# =============================================================================================
@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StoredTensor(TensorEntry):
    path: Path
    start: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> list[StoredTensor]:
    """Tensor names, dtypes, shapes and byte ranges of a safetensors file, in file order."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise EmberError(f"{path}: not a readable safetensors file ({err})") from None
    base = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise EmberError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries.append(StoredTensor(name, _DTYPES[info["dtype"]], tuple(info["shape"]), Path(path), base + begin, base + end))
    return sorted(entries, key=lambda e: e.start)


def read_stored_tensor(f, entry: StoredTensor) -> torch.Tensor:
    nbytes = entry.end - entry.start
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        f.seek(entry.start)
        if f.readinto(memoryview(buffer.numpy())) != nbytes:
            raise EmberError(f"{entry.path}: truncated data for tensor {entry.name}")
    return buffer.view(entry.dtype).reshape(entry.shape)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsFileWriter:
    """Writes one safetensors file whose header is fixed up front; tensors must then arrive
    in the planned order."""

    def __init__(self, path: Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None):
        self.path = path
        self.entries = entries
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for entry in entries:
            header[entry.name] = {
                "dtype": _DTYPE_NAMES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    @property
    def complete(self) -> bool:
        return self._next == len(self.entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries[self._next]
        if name != entry.name or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(
                f"{self.path}: expected {entry.name} {entry.dtype} {list(entry.shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        self._file.write(_tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        self._file.close()


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Split entries, in order, into shards of at most max_shard_bytes (a bigger tensor gets
    a shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class ShardedWriter:
    """Writes planned shards (+ the Hugging Face style index when there are several) into a
    folder, taking tensors one at a time in planned order."""

    def __init__(self, folder: Path, entries: list[TensorEntry], max_shard_bytes: int):
        self.folder = folder
        self.shards = plan_shards(entries, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self._index = 0
        self._writer: SafetensorsFileWriter | None = None
        # a conversion of a large model takes minutes: a line every 10 s says how far it got
        self._progress = Progress("writing weights", len(entries), "tensors", every=10.0)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": {e.name: file for file, shard in zip(self.names, self.shards) for e in shard},
            }
            (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None:
            self._writer = SafetensorsFileWriter(self.folder / self.names[self._index], self.shards[self._index])
        self._writer.write(name, tensor)
        self._progress.update()
        if self._writer.complete:
            self._writer.close()
            self._writer = None
            self._index += 1

    def close(self) -> None:
        self._progress.close()
        if self._writer is not None:
            self._writer.close()
            raise RuntimeError(f"{self.folder}: shard {self.names[self._index]} was left incomplete")
        if self._index != len(self.shards):
            raise RuntimeError(f"{self.folder}: only {self._index} of {len(self.shards)} shards written")


# =============================================================================================
# reading a folder of weights (HF or ember): safetensors shards or pytorch_model*.bin
# =============================================================================================
class WeightFiles:
    """The weight files of a checkpoint folder and the tensors in them, read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = self._find_files()

    def _find_files(self) -> list[Path]:
        folder = self.folder
        for index_name in (INDEX_FILE, "pytorch_model.bin.index.json"):
            index_path = folder / index_name
            if index_path.is_file():
                weight_map = json.loads(index_path.read_text()).get("weight_map", {})
                names = sorted(set(weight_map.values()))
                missing = [n for n in names if not (folder / n).is_file()]
                if missing:
                    raise EmberError(f"{index_path} lists {missing[0]}, which is not in {folder}; the download is incomplete")
                return [folder / n for n in names]
        for single in (SINGLE_FILE, "pytorch_model.bin"):
            if (folder / single).is_file():
                return [folder / single]
        found = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not found:
            raise EmberError(f"no weights in {folder}: expected model*.safetensors (+ index) or pytorch_model*.bin")
        return found

    def entries(self) -> list[tuple[Path, TensorEntry]]:
        """(file, entry) for every tensor, in reading order, without reading data."""
        out: list[tuple[Path, TensorEntry]] = []
        for path in self.files:
            if path.suffix == ".safetensors":
                out += [(path, e) for e in read_safetensors_header(path)]
            else:
                state = _load_bin(path)
                out += [(path, TensorEntry(n, t.dtype, tuple(t.shape))) for n, t in state.items()]
                del state
        return out

    def tensors(self) -> Iterator[tuple[Path, str, torch.Tensor]]:
        """(file, name, tensor) one at a time; only the current tensor is held in memory."""
        for path in self.files:
            if path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    for entry in read_safetensors_header(path):
                        yield path, entry.name, read_stored_tensor(f, entry)
            else:
                state = _load_bin(path)
                for name in list(state):
                    yield path, name, state.pop(name)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """pytorch_model*.bin without executing pickled code; mmap keeps it lazy where possible."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad pickles
        raise EmberError(f"{path}: cannot load with weights_only=True ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise EmberError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


# =============================================================================================
# atomic output folders
# =============================================================================================
def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` when it holds floating-point values (None: as stored); integers stay."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@contextlib.contextmanager
def atomic_folder(out_dir: Path, overwrite: bool = False,
                  replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to out_dir only when the block succeeds,
    so a crash never leaves a half-written out_dir. `overwrite` replaces only an earlier output
    (`replaceable(out_dir)`; by default an ember weight folder or a Hugging Face model folder),
    never a file or an unrelated folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EmberError(f"{out_dir} is a file; choose a folder for the output")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise EmberError(f"{out_dir} already exists and is not empty; choose another output or pass --force")
        if not (replaceable or is_weight_folder)(out_dir):
            raise EmberError(f"{out_dir} is not an earlier export (an ember, Hugging Face or Megatron checkpoint "
                             f"folder): --force replaces only those; choose another output")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def is_weight_folder(folder: Path) -> bool:
    """An ember weight folder, or a Hugging Face model folder (config.json and weight files)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return True
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return (folder / "config.json").is_file() and weights


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# =============================================================================================
# the ember weight folder
# =============================================================================================
def write_manifest(folder: Path, args: ModelArgs, family: str, source: dict[str, Any] | None = None) -> None:
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "family": family,
        "model_args": args.to_dict(),
        "source": source or {},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise EmberError(
            f"{folder} is not an ember weight folder (no {MANIFEST}); "
            "convert Hugging Face weights with `ember convert --from hf --to ember HF_DIR OUT_DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise EmberError(f"{path}: invalid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise EmberError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise EmberError(f"{path}: version {manifest.get('version')} is not supported (this ember reads {VERSION})")
    return manifest


def check_tensor_set(
    found: dict[str, tuple[torch.Size | tuple[int, ...], Any]],
    expected: dict[str, tuple[torch.Size | tuple[int, ...], Any]],
    where: str,
    describe: Any = None,
) -> None:
    """Clear errors for missing, unexpected or mis-shaped tensors. `describe(name)` may add
    where a name comes from (file, source name) to the message."""
    describe = describe or (lambda name: name)
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EmberError(
            f"missing tensor {missing[0]}{more} in {where}; the weights do not match the config "
            "(incomplete download, or weights of another size?)"
        )
    unexpected = [name for name in found if name not in expected]
    if unexpected:
        raise EmberError(f"unexpected tensor {describe(unexpected[0])} in {where}: not part of this model's config")
    for name, (shape, _) in found.items():
        want = tuple(expected[name][0])
        if tuple(shape) != want:
            raise EmberError(
                f"shape mismatch for tensor {describe(name)} in {where}: "
                f"found {list(shape)}, config implies {list(want)}"
            )


def save_ember_weights(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: ModelArgs,
    out_dir: str | Path,
    family: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    source: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an ember weight folder from a model or its (full, unsharded) state_dict."""
    from ember.models.hf import ember_state_shapes

    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    if args.tie_embeddings:
        state.pop("output.weight", None)
    found = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    check_tensor_set(found, ember_state_shapes(args), where="the state_dict to save")
    entries = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_bytes)
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.close()
        write_manifest(tmp, args, family, source)
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp / "tokenizer")
    return out_dir


def iter_ember_weight_files(folder: str | Path) -> Iterator[tuple[ModelArgs, dict[str, torch.Tensor]]]:
    """(ModelArgs, that file's tensors) for each weight file of an ember weight folder, after
    checking every name, shape and dtype from the files' headers (no tied output is stored)."""
    from safetensors.torch import load_file

    from ember.models.hf import ember_state_shapes

    folder = Path(folder)
    manifest = read_manifest(folder)
    args = ModelArgs.from_dict(manifest["model_args"])
    files = WeightFiles(folder).files
    found = {entry.name: (entry.shape, entry.dtype) for path in files for entry in read_safetensors_header(path)}
    check_tensor_set(found, ember_state_shapes(args), where=str(folder))
    for path in files:
        yield args, load_file(path)


def load_ember_weights(folder: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, state_dict) of an ember weight folder; the state_dict has no tied output."""
    state: dict[str, torch.Tensor] = {}
    for args, tensors in iter_ember_weight_files(folder):  # the files' check fails on an empty folder
        state.update(tensors)
    return args, state


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A Transformer with the folder's weights, built on the meta device first so only the
    loaded tensors take memory."""
    args, state = load_ember_weights(folder)
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    return model_from_state(args, {name: t.to(device) for name, t in state.items()}, device)


def model_from_state(args: ModelArgs, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> nn.Module:
    """A Transformer whose parameters are `state`'s tensors themselves (a state_dict without the
    tied output, on `device`): built on the meta device, so nothing is allocated twice."""
    from ember.models.transformer import Transformer

    if args.tie_embeddings:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    with torch.device("meta"):
        model = Transformer(args)
    # assign=True: the loaded tensors become the parameters (hence no `materialize`); it gives
    # each name its own Parameter, so the shared output is tied again.
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.init_buffers(device)
    return model

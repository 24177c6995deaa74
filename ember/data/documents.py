"""Packed documents in a batch: Megatron's `--reset-position-ids`, `--reset-attention-mask` and
`--eod-mask-loss` (megatron-core's `_get_ltor_masks_and_position_ids`), per micro-batch.

A pretraining sample is a window of the document stream, documents ended by the EOD token. For the
input tokens x[0..L-1] of a sample:
- document id of x[t] = the number of EODs among x[0..t-1] (an EOD belongs to the document it ends);
- `reset_position_ids`: positions count from 0 again after each EOD;
- `reset_attention_mask`: a token attends only to tokens of its own document (the model builds the
  block-diagonal causal mask from `document_ids`; no [L x L] mask is stored or collated);
- `eod_mask_loss`: the prediction made at an EOD token (the next document's first token) is not
  trained on.

Fine-tuning samples that pack several examples bring their own `document_ids`/`position_ids`
(one document per example, see `finetune_dataset`); those are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.errors import EmberError


@dataclass(frozen=True)
class PackedDocuments:
    """What the loader adds to each micro-batch; `eod` is the tokenizer's end-of-document id."""

    eod: int | None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    @property
    def active(self) -> bool:
        return self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss

    def check(self) -> None:
        if self.active and self.eod is None:
            flags = [f for f, on in (("--reset-position-ids", self.reset_position_ids),
                                     ("--reset-attention-mask", self.reset_attention_mask),
                                     ("--eod-mask-loss", self.eod_mask_loss)) if on]
            raise EmberError(f"{' '.join(flags)} need the end-of-document token id: give the tokenizer "
                             f"(--tokenizer-type / --tokenizer-name-or-path) that the data was preprocessed with")


def eod_document_ids(input_ids: torch.Tensor, eod: int) -> torch.Tensor:
    """int64 [B, L]: each token's document index within its sample (EODs before it)."""
    is_eod = (input_ids == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def eod_position_ids(input_ids: torch.Tensor, eod: int) -> torch.Tensor:
    """int64 [B, L]: positions restarting at 0 after every EOD."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    after_eod = torch.where(input_ids == eod, positions + 1, torch.zeros_like(positions))
    # the start of each token's document: one past the last EOD strictly before it
    starts = torch.cummax(after_eod, dim=-1).values
    starts = torch.cat([torch.zeros_like(starts[..., :1]), starts[..., :-1]], dim=-1)
    return positions - starts


def add_packed_documents(batch: dict[str, torch.Tensor], packing: PackedDocuments) -> dict[str, torch.Tensor]:
    """Add `position_ids` / `document_ids` to a collated batch and apply --eod-mask-loss (in place)."""
    input_ids = batch["input_ids"]
    if packing.eod_mask_loss:
        batch["loss_mask"] = batch["loss_mask"] * (input_ids != packing.eod).to(batch["loss_mask"].dtype)
    if "document_ids" in batch:  # packed fine-tuning examples: ids and positions came with the samples
        return batch
    if packing.reset_position_ids:
        batch["position_ids"] = eod_position_ids(input_ids, packing.eod)
    if packing.reset_attention_mask:
        batch["document_ids"] = eod_document_ids(input_ids, packing.eod)
    return batch


FINETUNE_PACKINGS = ("packed", "padded")


def finetune_pack(data) -> bool:
    """Whether fine-tuning examples are packed (each isolated) or put one per padded sample, from
    `data.finetune_packing` (a DataConfig); unset, packed exactly when the run resets positions or
    attention at document ends, as MindSpeed's packed fine-tuning does, else padded as PAI's."""
    choice = data.finetune_packing
    if choice is None:
        return bool(data.reset_position_ids or data.reset_attention_mask)
    if choice not in FINETUNE_PACKINGS:
        raise EmberError(f"--finetune-packing {choice!r}: choose packed (examples share a sample, each attending "
                         f"only to itself) or padded (one example per sample)")
    return choice == "packed"


def packed_document_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's forward keywords for a micro-batch's packed-document fields (none when absent)."""
    names = (("position_ids", "positions"), ("document_ids", "documents"))
    return {keyword: batch[name] for name, keyword in names if name in batch}

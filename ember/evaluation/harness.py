"""ember as an lm-evaluation-harness model: `lm_eval` model class "ember" (EmberLM).

    ember eval --load CKPT --tasks arc_easy,my_task --include-path tasks/ --num-fewshot 5
    python -m ember.evaluation run --model ember --model_args load=CKPT,batch_size=16 --tasks ...

Requests are tokenized exactly as lm-eval's own Hugging Face class (`hf`) tokenizes them (the
same transformers tokenizer, the same special-token rules, TemplateLM's context/continuation
split), so the scores differ from `hf`'s only by the model's arithmetic:
- loglikelihood: the requests sorted longest first, right-padded into batches, one forward each;
  only the continuation positions go through the output layer, log-softmax in fp32.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens, scored as above.
- generate_until: greedy, batched over requests whose prompts have the same length (ember's
  Transformer takes no padding mask, so prompts of different lengths run in separate batches),
  one prefill and then one token per step through the KV cache; a row stops at the
  end-of-text token or once its text holds a stop sequence.
Importing this module registers the class with lm-eval's registry.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from ember.errors import EmberError
from ember.evaluation.loading import is_reporting_rank, load_checkpoint, need_tokenizer, parse_dtype
from ember.models import KVCache

MODEL_NAME = "ember"


def load_hf_tokenizer(folder: str | Path):
    """The transformers tokenizer of a local folder (what lm-eval's `hf` class would load)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError
        raise EmberError(f"cannot load a transformers tokenizer from {folder}: {err}") from None


def _flag(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model(MODEL_NAME)
class EmberLM(TemplateLM):
    """model_args: load=DIR (ember weight folder or `ember train --save` folder; `pretrained` is
    an alias), tokenizer=DIR (default: the checkpoint's), dtype=keep|fp32|bf16|fp16,
    max_length=N (default: the model's max_seq_len), add_bos_token, prefix_token_id,
    max_gen_toks (default 256), tp=N (tensor-parallel over N processes under torchrun; pp must be 1).
    In Python, `model=` an ember Transformer and `tokenizer=` a transformers tokenizer also work."""

    def __init__(self, load: str | None = None, pretrained: str | None = None, tokenizer=None,
                 model: nn.Module | None = None, batch_size: int | str = 8, max_batch_size: int | None = None,
                 device: str | None = None, dtype: str | None = None, max_length: int | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, max_gen_toks: int = 256,
                 tp: int = 1, pp: int = 1, **unused):
        super().__init__()
        if unused:
            raise EmberError(f"lm_eval model_args not understood by the ember model: {', '.join(sorted(unused))} "
                             "(known: load, pretrained, tokenizer, dtype, max_length, add_bos_token, "
                             "prefix_token_id, max_gen_toks, batch_size, device, tp)")
        if str(batch_size).startswith("auto"):
            raise EmberError("batch_size=auto is not supported by the ember model; pass a number (--batch_size 16)")
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise EmberError(f"batch_size must be >= 1, got {batch_size}")
        load = load or pretrained
        if model is None:
            if load is None:
                raise EmberError("the ember lm_eval model needs load=DIR (an ember weight folder or ember train --save folder)")
            tokenizer_arg = tokenizer if isinstance(tokenizer, (str, Path)) else None
            model, tokenizer_dir = load_checkpoint(load, device, parse_dtype(dtype), tokenizer_arg, int(tp), int(pp))
            if tokenizer is None or isinstance(tokenizer, (str, Path)):
                tokenizer = need_tokenizer(tokenizer_dir, "lm-eval")
        elif dtype is not None:
            model = model.to(parse_dtype(dtype) or next(model.parameters()).dtype)
        if tokenizer is None:
            raise EmberError("the ember lm_eval model needs a tokenizer (tokenizer=DIR)")
        self.tokenizer = load_hf_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self._max_length = int(max_length) if max_length else int(model.args.max_seq_len)
        if self._max_length > model.args.max_seq_len and model.args.position_type in ("rope", "learned"):
            raise EmberError(f"max_length {self._max_length} exceeds the model's max_seq_len {model.args.max_seq_len}; "
                             f"pass max_length={model.args.max_seq_len} or less")
        self.add_bos_token = _flag(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self._max_gen_toks = int(max_gen_toks)
        # Tensor-parallel layers (DTensor) work out their sharding anew for every input shape they
        # have not seen, which costs far more than the forward itself on small inputs; the sharded
        # model is fed a few padded shapes only.
        self._sharded = getattr(model, "tensor_parallel_mesh", None) is not None

    # -- what lm-eval reads ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "ember")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype)}

    # -- tokenization: the rules of lm-eval's HFLM ----------------------------------------------
    def _special_tokens(self, string: str, add_special_tokens: bool | None, bos_text: str | None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if bos_text and string.startswith(bos_text):  # the text already starts with BOS
            return {"add_special_tokens": False}
        if self.add_bos_token is not None:
            return {"add_special_tokens": self.add_bos_token}
        return {}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        bos_text = self.tokenizer.decode(self.prefix_token_id)
        ids = self.tokenizer.encode(string, **self._special_tokens(string, add_special_tokens, bos_text))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring -------------------------------------------------------------------------------
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per row; rows
        are (input ids, continuation ids) with the input already cut to max_length."""
        width, height = max(len(inp) for inp, _ in rows), len(rows)
        if self._sharded:  # a few padded shapes instead of one per request length (see __init__)
            width, height = min(_next_power_of_two(width), self.max_length), self.batch_size
        ids = torch.zeros(height, width, dtype=torch.long, device=self.device)  # right padding: causal, harmless
        batch_index, positions = [], []
        for i, (inp, cont) in enumerate(rows):
            ids[i, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            batch_index += [i] * len(cont)
            positions += range(len(inp) - len(cont), len(inp))
        batch_index = torch.tensor(batch_index, device=self.device)
        positions = torch.tensor(positions, device=self.device)

        def head(hidden: torch.Tensor, output: nn.Linear) -> torch.Tensor:
            return F.log_softmax(output(hidden[batch_index, positions]).float(), dim=-1)

        logprobs = self.model(ids, head=head)  # [continuation tokens of all rows, vocab]
        results, start = [], 0
        for _, cont in rows:
            part = logprobs[start : start + len(cont)]
            start += len(cont)
            target = torch.tensor(cont, device=self.device)
            greedy = bool((part.argmax(dim=-1) == target).all())
            results.append((float(part.gather(1, target[:, None]).sum()), greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not is_reporting_rank(), desc="ember loglikelihood")
        with torch.inference_mode():
            for begin in range(0, len(order), self.batch_size):
                chunk = order[begin : begin + self.batch_size]
                rows = []
                for i in chunk:
                    _, context, continuation = requests[i]
                    if not context or not continuation:
                        raise EmberError("a loglikelihood request has an empty context or continuation")
                    rows.append(((context + continuation)[-(self.max_length + 1) :][:-1], continuation))
                for i, answer in zip(chunk, self._score_batch(rows)):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def _stopped(self, new_ids: list[int], stops: list[str]) -> bool:
        if new_ids and new_ids[-1] == self.eot_token_id:
            return True
        text = self.tok_decode(new_ids[-64:], skip_special_tokens=False)  # stop strings are short
        return any(stop and stop in text for stop in stops)

    def _kv_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for the key/value heads this process holds (all of them, or its tensor-parallel share)."""
        attention = next(iter(self.model.layers.values())).attention
        param = next(self.model.parameters())
        return KVCache(batch, max_len, attention.n_kv_heads, self.model.args.head_dim, param.dtype, self.device)

    def _prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits after the prompt, which goes into the cache in one forward, or (sharded) in
        power-of-two pieces: 37 tokens as 32 + 4 + 1."""
        if not self._sharded:
            return self.model(ids, kv_cache=cache)[:, -1]
        start, length = 0, ids.shape[1]
        while start < length:
            piece = 1 << ((length - start).bit_length() - 1)
            logits = self.model(ids[:, start : start + piece], kv_cache=cache)[:, -1]
            start += piece
        return logits

    def _greedy(self, prompts: list[list[int]], max_new: int, stops: list[str]) -> list[list[int]]:
        """Greedy continuations of equal-length prompts, batched, through one KV cache."""
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        cache = self._kv_cache(len(prompts), ids.shape[1] + max_new)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits = self._prefill(ids, cache)
        for step in range(max_new):
            tokens = logits.argmax(dim=-1)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    out[row].append(token)
                    done[row] = self._stopped(out[row], stops)
            if all(done) or step + 1 == max_new:
                break
            logits = self.model(tokens[:, None], kv_cache=cache)[:, -1]
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        settings: dict[tuple, tuple[int, list[str]]] = {}
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            stops = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise EmberError("the ember lm_eval model generates greedily only; set do_sample: false "
                                 "(or --gen_kwargs temperature=0) for this task")
            if max_new >= self.max_length:
                raise EmberError(f"max_gen_toks {max_new} must be less than the model's max_length {self.max_length}")
            bos = getattr(self.tokenizer, "bos_token", None)
            ids = self.tokenizer.encode(context, **self._special_tokens(context, None, bos))
            ids = ids[-(self.max_length - max_new) :]
            key = (max_new, tuple(stops), len(ids))
            settings[key] = (max_new, stops)
            groups[key].append((index, ids))
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not is_reporting_rank(), desc="ember generate_until")
        with torch.inference_mode():
            for key in sorted(groups, key=lambda k: -k[2]):
                max_new, stops = settings[key]
                members = groups[key]
                for begin in range(0, len(members), self.batch_size):
                    chunk = members[begin : begin + self.batch_size]
                    for (index, _), new_ids in zip(chunk, self._greedy([ids for _, ids in chunk], max_new, stops)):
                        text = postprocess_generated_text(self.tok_decode(new_ids), stops, None)
                        results[index] = text
                        self.cache_hook.add_partial("generate_until", requests[index].args, text)
                    bar.update(len(chunk))
        bar.close()
        return results


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------
def offline() -> None:
    """Local task and data files only: nothing is fetched from the Hugging Face Hub unless the
    user set these variables otherwise."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")


def evaluate_tasks(lm, tasks: Sequence[str], include_path: Sequence[str] | None = None, num_fewshot: int | None = None,
                   limit: float | None = None, seed: int = 1234, log_samples: bool = False,
                   include_defaults: bool = True, bootstrap_iters: int = 100000) -> dict:
    """lm-eval's `simple_evaluate` on `lm` (an LM instance) for task names, task YAML files or
    folders of them; returns its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for path in include_path or ():
        if not Path(path).is_dir():
            raise EmberError(f"--include-path {path} is not a folder of lm-eval task YAML files")
    from lm_eval.tasks._yaml_loader import load_yaml

    files = [task for task in tasks if task.endswith((".yaml", ".yml"))]
    for task in files:
        if not Path(task).is_file():
            raise EmberError(f"task file {task} does not exist")
    named = [task for task in tasks if task not in files]
    include = list(include_path) if include_path else None
    # Indexing lm-eval's thousands of built-in task files takes seconds: skip it when the local
    # folders hold every task asked for.
    manager = TaskManager(include_path=include, include_defaults=False) if include or not named else None
    if manager is None or (include_defaults and not all(manager.match_tasks([task]) for task in named)):
        manager = TaskManager(include_path=include, include_defaults=include_defaults)
    missing = [task for task in named if not manager.match_tasks([task])]
    if missing:
        raise EmberError(f"lm-eval task(s) {', '.join(missing)} not found; give task names, task YAML files, or "
                         "--include-path DIR holding their YAML")
    names = [load_yaml(str(Path(task).absolute()), resolve_func=True) if task in files else task for task in tasks]
    try:
        return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                               random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                               fewshot_random_seed=seed, log_samples=log_samples,
                               bootstrap_iters=bootstrap_iters)
    except (FileNotFoundError, ConnectionError) as err:
        raise EmberError(f"a task's data could not be read offline ({err}); point its dataset at local files "
                         "(dataset_path: json|parquet, dataset_kwargs: data_files: ...)") from None

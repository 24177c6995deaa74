"""Conversations -> token ids and loss masks through the tokenizer's own chat template
(`--prompt-type chat_template`, and `ember generate --chat`).

The template is the Jinja text the tokenizer folder ships (`chat_template.jinja`, else
`chat_template` in tokenizer_config.json), rendered the way Hugging Face's
`tokenizer.apply_chat_template` renders it (same sandbox, filters, globals and special-token
variables). The rendered text is tokenized once, with no special tokens added (the template writes
them), so the ids are those of `apply_chat_template(messages)`. Only assistant turns are trained:

- where the template marks them with `{% generation %}...{% endgeneration %}`, the tokens that
  overlap those spans: `apply_chat_template(..., return_assistant_tokens_mask=True)`'s mask;
- otherwise, for each assistant message, the text the template adds for it after the generation
  prompt (from `render(messages[:i], add_generation_prompt=True)` to `render(messages[:i+1])`),
  less trailing whitespace: the reply and its end-of-turn token. This needs a template that renders
  earlier turns the same once later turns follow; one that rewrites them (drops past reasoning)
  gets a one-line reason naming the fix (add generation markers).

Records: ShareGPT `conversations` [{from, value}] (human/gpt/system/observation), OpenAI
`messages` [{role, content, ...}], or alpaca instruction/input/output (+ `history`); a top-level
`system` field becomes the first message; `tools` (a list, or a JSON string of one) pass through.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from ember.errors import EmberError

CHAT_TEMPLATE = "chat_template"  # the --prompt-type value
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "model": "assistant", "system": "system", "observation": "tool", "tool": "tool"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, first is standard


class ChatTemplateError(EmberError):
    """A record the template cannot render or split (the preprocess handlers count it as a skip)."""


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EmberError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def load_chat_template(folder) -> "ChatTemplate":
    """The default chat template of a Hugging Face tokenizer folder, with its special-token strings."""
    folder = Path(folder)
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins, as ember's tokenizer reads them
        if (folder / name).is_file():
            config.update(_read_json(folder / name))
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():  # transformers prefers the file to the config entry
        source, origin = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    else:
        source, origin = config.get("chat_template"), f"{folder / 'tokenizer_config.json'}:chat_template"
        if isinstance(source, list):  # named templates: [{"name", "template"}]
            source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}.get("default")
    if not isinstance(source, str) or not source.strip():
        raise EmberError(f"the tokenizer in {folder} has no chat template (no chat_template.jinja, no 'chat_template' "
                         f"in tokenizer_config.json); add the model's template there, or use --prompt-type "
                         f"alpaca/chatml/plain")
    special = {key: str(_token_content(config[key])) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # named model-specific tokens (image_token, ...) are template variables too
        special.update({key: str(_token_content(value)) for key, value in extra.items() if value is not None})
    return ChatTemplate(source, special, origin)


class ChatTemplate:
    """A compiled chat template: `render()` is apply_chat_template(tokenize=False); `assistant_spans()`
    adds where the assistant's trained characters are."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "chat template"):
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        self.has_generation_markers = bool(_GENERATION_TAG.search(source))
        self._template = _compile(source, origin)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
               spans: list | None = None) -> str:
        """The rendered text; with `spans` (a list), the (start, end) character spans of the template's
        `{% generation %}` blocks are appended to it."""
        import jinja2

        context = {**self.special_tokens, "messages": messages, "tools": tools, "documents": None,
                   "add_generation_prompt": add_generation_prompt}
        try:
            if spans is None:
                return self._template.render(**context)
            blocks: list[str] = []
            with self._template.environment.track_generation(blocks, spans):
                for block in self._template.generate(**context):
                    blocks.append(block)
            return "".join(blocks)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            raise ChatTemplateError(f"{self.origin} cannot render this conversation: {err}") from None

    def assistant_spans(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, character spans trained on): the generation blocks, or per assistant message
        the text the template adds for it after the generation prompt, trailing whitespace left out."""
        if self.has_generation_markers:
            spans: list[tuple[int, int]] = []
            return self.render(messages, tools=tools, spans=spans), spans
        text = self.render(messages, tools=tools)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            upto = self.render(messages[: i + 1], tools=tools)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise ChatTemplateError(
                    f"{self.origin} renders earlier turns differently once later turns follow (turn {i}), so its "
                    f"assistant text cannot be located; add {{% generation %}}...{{% endgeneration %}} around the "
                    f"assistant reply in the template")
            end = len(upto.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        return text, spans

    def stop_token_ids(self, backend) -> set[int]:
        """The end-of-turn token the template writes after an assistant reply (`<|im_end|>`,
        `<|eot_id|>`, ...): the first special token in that tail. `backend`: a Rust
        `tokenizers.Tokenizer`. Empty if there is none (or the template cannot render the probe)."""
        probe = "\u2063ember-reply\u2063"
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
        except ChatTemplateError:
            return set()
        if probe not in text:
            return set()
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        tail = backend.encode(text[text.index(probe) + len(probe):], add_special_tokens=False).ids
        return next(({i} for i in tail if i in special), set())


def _compile(source: str, origin: str):
    """jinja2 configured as transformers' `_compile_jinja_template`: an immutable sandbox with
    trim_blocks/lstrip_blocks, loop controls, the `generation` tag, its tojson, raise_exception,
    strftime_now, dict and namespace."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EmberError("chat templates need the jinja2 package: pip install 'jinja2>=3.1.6'") from None

    class GenerationTracker(Extension):
        """`{% generation %}...{% endgeneration %}`: records the block's character span while tracking."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(track_generation=self.track_generation)
            self._blocks = self._spans = None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            if self._spans is not None:
                start = sum(len(block) for block in self._blocks)  # what the template has emitted so far
                self._spans.append((start, start + len(text)))
            return text

        def track_generation(self, blocks: list, spans: list):
            tracker = self

            class Tracking:
                def __enter__(self):
                    tracker._blocks, tracker._spans = blocks, spans

                def __exit__(self, *exc):
                    tracker._blocks = tracker._spans = None

            return Tracking()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateNamespace(jinja2.utils.Namespace):
        """Namespaces without underscore attributes (transformers' guard against sandbox escapes)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTracker, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    environment.globals["namespace"] = TemplateNamespace
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise EmberError(f"{origin} is not a valid Jinja template (line {err.lineno}: {err.message})") from None


# ---- records -> messages -----------------------------------------------------------------------

def record_messages(record: dict, record_format: str = "sharegpt") -> tuple[list[dict], list | None]:
    """(messages, tools) of one data record, as apply_chat_template takes them; ChatTemplateError
    saying what is missing otherwise. `record_format`: "sharegpt" (conversations or messages) or "alpaca"."""
    messages = _alpaca_messages(record) if record_format == "alpaca" else _conversation_messages(record)
    system = record.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise ChatTemplateError("'tools' is a string but not JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ChatTemplateError("'tools' must be a list of objects (JSON schemas)")
    return messages, tools or None


def _conversation_messages(record: dict) -> list[dict]:
    turns = record.get("conversations") or record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ChatTemplateError("missing 'conversations' (or 'messages') list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ChatTemplateError("a conversation turn is not an object")
        if "from" in turn:  # ShareGPT
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise ChatTemplateError(f"unknown ShareGPT speaker {turn['from']!r} "
                                        f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
            message = {"role": role, "content": turn.get("value")}
        else:  # OpenAI: keep every field (tool_calls, name, reasoning_content, ...) but the empty ones
            message = {key: value for key, value in turn.items() if value is not None}
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise ChatTemplateError("a conversation turn has no 'role' (or 'from')")
        if not isinstance(message.get("content"), (str, list)) and "tool_calls" not in message:
            raise ChatTemplateError(f"a {message['role']!r} turn has no text ('content' or 'value')")
        messages.append(_alias_reasoning(message))
    return messages


def _alias_reasoning(message: dict) -> dict:
    """As transformers does: a reply's reasoning under any of its names is seen under all of them."""
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _alpaca_messages(record: dict) -> list[dict]:
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise ChatTemplateError("missing 'instruction' or 'output' text")
    messages = []
    for turn in record.get("history") or []:
        if isinstance(turn, (list, tuple)) and len(turn) == 2:
            messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    extra = record.get("input") or ""
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": output})
    return messages


# ---- text -> ids and mask ----------------------------------------------------------------------

def token_mask(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens (by their character offsets) overlap any span: transformers marks the tokens from
    the one holding a span's first character to the one holding its last."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(bounds), dtype=bool)
    for start, end in spans:
        if end > start:
            mask |= (bounds[:, 0] < end) & (bounds[:, 1] > start)
    return mask


def encode_conversation(template: ChatTemplate, backend, messages: list[dict],
                        tools: list | None = None) -> tuple[list[int], np.ndarray]:
    """(ids, trained mask) of one conversation; `backend` is a Rust `tokenizers.Tokenizer`."""
    text, spans = template.assistant_spans(messages, tools)
    encoding = backend.encode(text, add_special_tokens=False)
    return encoding.ids, token_mask(encoding.offsets, spans)


def read_conversations(path) -> list[list[dict]]:
    """Conversations of a messages file for `ember generate --chat`: .json holding one conversation
    (a list of messages, or an object with messages/conversations) or a list of such objects;
    .jsonl one per line."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"messages file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            one = isinstance(data, dict) or (isinstance(data, list) and data and isinstance(data[0], dict)
                                              and ("role" in data[0] or "from" in data[0]))
            items = [data] if one else data
    except json.JSONDecodeError as err:
        raise EmberError(f"{path} is not valid JSON ({err}); give a list of {{'role', 'content'}} messages") from None
    conversations = []
    for number, item in enumerate(items if isinstance(items, list) else [items], start=1):
        record = {"messages": item} if isinstance(item, list) else item
        try:
            conversations.append(record_messages(record if isinstance(record, dict) else {})[0])
        except ChatTemplateError as err:
            raise EmberError(f"{path}: conversation {number}: {err}") from None
    if not conversations:
        raise EmberError(f"{path} holds no conversation")
    return conversations

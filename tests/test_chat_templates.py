"""Chat templates: `--prompt-type chat_template` gives the token ids and assistant-only loss masks of
Hugging Face's `apply_chat_template(..., return_assistant_tokens_mask=True)` on multi-turn
conversations with system prompts (ShareGPT, OpenAI messages and alpaca records), and
`ember generate --chat` replies what transformers' greedy generate replies to the same templated
prompt. The tokenizer is trained here and the templates written here; nothing comes from a hub."""

from __future__ import annotations

import io
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ember.cli import main  # noqa: E402
from ember.data.chat import ChatTemplate, encode_conversation, load_chat_template  # noqa: E402
from ember.data.handlers import IGNORE_INDEX  # noqa: E402
from ember.data.indexed import IndexedDataset  # noqa: E402
from ember.errors import EmberError  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]

# Qwen2.5-style ChatML: a default system prompt when the conversation has none; replies and their
# <|im_end|> inside {% generation %} (the newline after it is not trained).
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama-3-style: bos_token from the tokenizer's special tokens, trimmed contents, an error for roles
# it does not know.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unsupported role ' + message['role']) }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN_UNMARKED = QWEN.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Drops earlier replies once later turns follow (as reasoning templates drop past thinking).
REWRITING = QWEN_UNMARKED.replace("message.content + '<|im_end|>'",
                                  "(message.content if loop.last else '...') + '<|im_end|>'")

# The conversations (as apply_chat_template takes them) and the same ones as data records.
CONVERSATIONS = [
    [{"role": "system", "content": "You answer in few words."},
     {"role": "user", "content": "what is the capital of france?"},
     {"role": "assistant", "content": "paris, the city of the café 🙂"},
     {"role": "user", "content": "and where does the lazy dog sleep?"},
     {"role": "assistant", "content": "over there, by the brown fox"}],
    [{"role": "user", "content": "to be or not to be?"},  # no system: the Qwen template adds its own
     {"role": "assistant", "content": "that is the question"},
     {"role": "user", "content": "a journey of a thousand miles"},
     {"role": "assistant", "content": "begins with a single step <|im_end|> really"}],
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "  hi there, quick fox  "},
     {"role": "user", "content": "bye"},
     {"role": "assistant", "content": "see you"},
     {"role": "user", "content": "really?"},
     {"role": "assistant", "content": "yes"}],
]


def _as_sharegpt(messages, system_field: bool) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    record = {}
    if system_field and messages[0]["role"] == "system":
        record["system"], messages = messages[0]["content"], messages[1:]
    record["conversations"] = [{"from": names[m["role"]], "value": m["content"]} for m in messages]
    return record


RECORDS = [
    _as_sharegpt(CONVERSATIONS[0], system_field=True),  # ShareGPT, system as a top-level field
    {"messages": CONVERSATIONS[1]},  # OpenAI messages
    _as_sharegpt(CONVERSATIONS[2], system_field=False),  # ShareGPT, system as a turn
    {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]},  # skipped
    {"messages": [{"role": "user", "content": "only a question"}]},  # skipped: nothing to train on
]


@pytest.fixture(scope="module")
def trained_tokenizer():
    from tokenizers import decoders, models, pre_tokenizers, trainers

    text = ["the quick brown fox jumps over the lazy dog", "you are a helpful assistant, paris is in france",
            "to be or not to be that is the question", "a journey of a thousand miles begins with a single step"]
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tokenizer


def _tokenizer_folder(tokenizer, folder, template: str):
    """A tokenizer folder as transformers writes it (chat_template.jinja), and transformers' own load of it."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                              eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                              chat_template=template)
    hf.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _reference(hf_tokenizer, messages) -> tuple[list[int], list[int]]:
    out = hf_tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    labels = [i if m else IGNORE_INDEX for i, m in zip(out["input_ids"], out["assistant_masks"])]
    assert any(out["assistant_masks"]) and not all(out["assistant_masks"])
    return out["input_ids"], labels


def _preprocess(tmp_path, folder, records, handler="SharegptStyleInstructionHandler") -> tuple[list, list, str]:
    data = tmp_path / f"{handler}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    prefix = tmp_path / handler
    argv = ["preprocess", "--input", str(data), "--output-prefix", str(prefix), "--tokenizer-name-or-path",
            str(folder), "--handler-name", handler, "--prompt-type", "chat_template", "--overwrite"]
    assert main(argv) == 0
    ids = IndexedDataset(f"{prefix}_packed_input_ids_document")
    labels = IndexedDataset(f"{prefix}_packed_labels_document")
    return [ids[i].tolist() for i in range(len(ids))], [labels[i].tolist() for i in range(len(labels))], data.name


@pytest.mark.parametrize("template", ["qwen", "llama3", "qwen-unmarked"])
def test_preprocess_equals_apply_chat_template(template, trained_tokenizer, tmp_path, capsys):
    source = {"qwen": QWEN, "llama3": LLAMA3, "qwen-unmarked": QWEN_UNMARKED}[template]
    folder = tmp_path / "tokenizer"
    hf = _tokenizer_folder(trained_tokenizer, folder, source)
    # the unmarked template renders the same text; its mask is the one the markers define
    reference = hf if source != QWEN_UNMARKED else _tokenizer_folder(trained_tokenizer, tmp_path / "marked", QWEN)
    ids, labels, name = _preprocess(tmp_path, folder, RECORDS)
    expected = [_reference(reference, messages) for messages in CONVERSATIONS]
    assert ids == [e[0] for e in expected]
    assert labels == [e[1] for e in expected]
    err = capsys.readouterr().err
    assert f"{name}:4: unknown ShareGPT speaker 'narrator'" in err
    assert f"{name}:5: no assistant tokens to train on" in err

    # alpaca records (system + history) go through the same template
    alpaca = {"system": "Be kind.", "history": [["hello", "  hi there, quick fox  "], ["bye", "see you"]],
              "instruction": "really", "input": "?", "output": "yes"}
    ids, labels, _ = _preprocess(tmp_path, folder, [alpaca], "AlpacaStyleInstructionHandler")
    assert (ids[0], labels[0]) == _reference(reference, CONVERSATIONS[2][:-2] + [
        {"role": "user", "content": "really\n?"}, {"role": "assistant", "content": "yes"}])


def test_template_errors_are_one_line(trained_tokenizer, tmp_path, capsys):
    backend = trained_tokenizer
    # a role the template refuses (raise_exception) and a template that rewrites past turns: counted skips
    hf = _tokenizer_folder(trained_tokenizer, tmp_path / "llama3", LLAMA3)
    with pytest.raises(EmberError, match="unsupported role tool"):
        encode_conversation(load_chat_template(tmp_path / "llama3"), backend,
                            [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}])
    assert hf.chat_template == LLAMA3
    rewriting = ChatTemplate(REWRITING)
    with pytest.raises(EmberError, match="add \\{% generation %\\}"):
        encode_conversation(rewriting, backend, CONVERSATIONS[0])
    _preprocess(tmp_path, tmp_path / "llama3", [{"messages": [{"role": "tool", "content": "42"},
                                                             {"role": "assistant", "content": "ok"}]}] + RECORDS[:1])
    assert "unsupported role tool" in capsys.readouterr().err
    # no template, a broken one: errors before any record is read
    (tmp_path / "plain").mkdir()
    trained_tokenizer.save(str(tmp_path / "plain" / "tokenizer.json"))
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(EmberError, match="no chat template"):
        load_chat_template(tmp_path / "plain")
    with pytest.raises(EmberError, match="not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}{{ m.content }")
    # the template in tokenizer_config.json (older transformers) is read as well as chat_template.jinja
    config = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN}))
    assert load_chat_template(tmp_path / "plain").source == QWEN
    assert main(["generate", "--load", str(tmp_path), "--chat", "--prompt", "x"]) == 2
    assert "--chat takes its turns from stdin or --messages" in capsys.readouterr().err


def test_stop_token_is_the_templates_end_of_turn(trained_tokenizer, tmp_path):
    for source, end in ((QWEN, "<|im_end|>"), (LLAMA3, "<|eot_id|>"), (QWEN_UNMARKED, "<|im_end|>")):
        assert ChatTemplate(source).stop_token_ids(trained_tokenizer) == {trained_tokenizer.token_to_id(end)}
    assert ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}").stop_token_ids(trained_tokenizer) == set()


def test_generate_chat_equals_transformers(trained_tokenizer, tmp_path, capsys, monkeypatch):
    hf_tokenizer = _tokenizer_folder(trained_tokenizer, tmp_path / "hf", QWEN)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=trained_tokenizer.get_vocab_size(), hidden_size=64,
                                      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    stop = [hf_tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    first = hf_tokenizer.apply_chat_template(CONVERSATIONS[0][:4], add_generation_prompt=True, return_dict=True)
    free = hf_model.generate(torch.tensor([first["input_ids"]]), max_new_tokens=4, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, -1]
    with torch.no_grad():  # <|im_end|> just above the 4th greedy token there: that reply ends at the template's stop
        hf_model.lm_head.weight[stop[1]] = hf_model.lm_head.weight[free] * 1.05
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "hf", "--to", "ember", str(tmp_path / "hf"), str(tmp_path / "ember")]) == 0
    ended = []

    def hf_reply(messages) -> str:
        ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        prompt = torch.tensor([ids])
        out = hf_model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        new = out[0, prompt.shape[1]:].tolist()
        assert len(set(new)) > 1
        ended.append(new[-1] == stop[1])
        return hf_tokenizer.decode(new, skip_special_tokens=True)

    argv = ["generate", "--load", str(tmp_path / "ember"), "--chat", "--max-new-tokens", "10"]
    # a messages file: one conversation (.json), several (.jsonl)
    (tmp_path / "chat.json").write_text(json.dumps(CONVERSATIONS[0][:4]))
    capsys.readouterr()
    assert main(argv + ["--messages", str(tmp_path / "chat.json")]) == 0
    assert capsys.readouterr().out == hf_reply(CONVERSATIONS[0][:4]) + "\n"
    assert ended == [True]
    (tmp_path / "chat.jsonl").write_text(
        json.dumps(_as_sharegpt(CONVERSATIONS[0][:2], True)) + "\n" + json.dumps({"messages": CONVERSATIONS[1][:1]}))
    assert main(argv + ["--messages", str(tmp_path / "chat.jsonl"), "--system", "Be kind."]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    second = [{"role": "system", "content": "Be kind."}] + CONVERSATIONS[1][:1]
    assert lines == [{"messages": CONVERSATIONS[0][:2] + [{"role": "assistant", "content": hf_reply(CONVERSATIONS[0][:2])}]},
                     {"messages": second + [{"role": "assistant", "content": hf_reply(second)}]}]

    # interactive: each turn re-renders the history with the replies so far; /reset starts over
    monkeypatch.setattr("sys.stdin", io.StringIO("what is the capital of france?\nand the lazy dog?\n/reset\nhello\n"))
    assert main(argv + ["--system", "You answer in few words."]) == 0
    messages, expected = [{"role": "system", "content": "You answer in few words."}], []
    for turn in ("what is the capital of france?", "and the lazy dog?"):
        messages.append({"role": "user", "content": turn})
        expected.append(hf_reply(messages))
        messages.append({"role": "assistant", "content": expected[-1]})
    expected.append(hf_reply(messages[:1] + [{"role": "user", "content": "hello"}]))
    assert capsys.readouterr().out == "".join(reply + "\n" for reply in expected)

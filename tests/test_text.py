"""Tokenizers and chat templates (omnifuse.processing.text).

Hugging Face tokenizers are built here with the `tokenizers` library; nothing is downloaded.
"""

import json

import pytest

from omnifuse.config import ConfigError, TextConfig
from omnifuse.processing.text import (
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    load_tokenizer,
)

PAD, BOS, EOS, IMAGE = 256, 257, 258, 259

# A chat template in the tokenizer_config.json convention: multi-line, so trim_blocks and
# lstrip_blocks matter, and it uses bos_token, eos_token and raise_exception.
HF_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if loop.first and message['role'] == 'assistant' %}
        {{ raise_exception('Conversation must start with a user or system message') }}
    {% endif %}
<|{{ message['role'] }}|>
    {% if message['content'] is string %}
{{ message['content'] }}
    {%- else %}
        {% for part in message['content'] %}
            {% if part['type'] == 'image' %}
<image>
            {%- elif part['type'] == 'text' %}
{{ part['text'] }}
            {%- endif %}
        {% endfor %}
    {% endif %}
{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "image"}]},
]


# --- byte tokenizer -------------------------------------------------------------------------


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld 🙂 日本"
    ids = tok.encode(text)
    assert ids[0] == BOS and ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == list(text.encode("utf-8"))


def test_byte_attributes():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_ids, tok.image_token_id) == (PAD, BOS, (EOS,), IMAGE)
    assert tok.token_to_id("</s>") == EOS and tok.token_to_id("a") == ord("a") and tok.token_to_id("ab") is None


def test_byte_special_tokens_in_text_are_single_ids():
    tok = ByteTokenizer()
    assert tok.encode("a<image>b</s>", add_bos=False) == [ord("a"), IMAGE, ord("b"), EOS]
    # Text that already starts with the bos string does not get a second bos.
    assert tok.encode("<s>hi") == [BOS, ord("h"), ord("i")]


def test_byte_decode_skips_specials_unless_asked():
    tok = ByteTokenizer()
    ids = tok.encode("<image>é</s>")
    assert tok.decode(ids) == "é"
    assert tok.decode(ids, skip_special_tokens=False) == "<s><image>é</s>"


def test_byte_decode_invalid_utf8_does_not_raise():
    tok = ByteTokenizer()
    emoji = list("🙂".encode())
    assert tok.decode(emoji[:2]) == "\ufffd"
    assert "\ufffd" in tok.decode([0xFF, ord("a")])
    assert isinstance(tok.decode(list(range(260)), skip_special_tokens=False), str)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([260])


def test_byte_decode_accepts_tensor():
    torch = pytest.importorskip("torch")
    tok = ByteTokenizer()
    assert tok.decode(torch.tensor(tok.encode("ok"))) == "ok"


def test_byte_chat_template_images_and_turns():
    tok = ByteTokenizer()
    prompt = tok.apply_chat_template(CHAT)
    assert prompt == ("System: Be brief.\n"
                      "User: <image>What is this?\n"
                      "Assistant: A cat.</s>\n"
                      "User: And these?<image><image>\n"
                      "Assistant: ")
    assert tok.apply_chat_template(CHAT[:1], add_generation_prompt=False) == "System: Be brief.\n"
    assert tok.encode(prompt).count(IMAGE) == 3


def test_byte_custom_template_from_config():
    tok = ByteTokenizer(TextConfig(chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}"))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]) == "[x][y]"


def test_byte_rejects_other_image_token():
    with pytest.raises(ConfigError, match="byte tokenizer has no '<\\|image\\|>' token for text.placeholder_tokens.image"):
        TextConfig(placeholder_tokens={"image": "<|image|>"})


def test_chat_template_errors_are_tokenizer_errors():
    tok = ByteTokenizer(TextConfig(chat_template="{{ raise_exception('no system role') }}"))
    with pytest.raises(TokenizerError, match="no system role"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="does not parse"):
        ByteTokenizer(TextConfig(chat_template="{% for %}")).apply_chat_template([{"role": "user", "content": ""}])
    with pytest.raises(TokenizerError, match="non-empty list"):
        ByteTokenizer().apply_chat_template([])


def test_chat_template_is_sandboxed():
    tok = ByteTokenizer(TextConfig(chat_template="{{ messages.append(1) }}"))
    with pytest.raises(TokenizerError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# --- Hugging Face tokenizer -----------------------------------------------------------------

SPECIALS = ["<s>", "</s>", "<pad>", "<image>", "<|eot_id|>"]


def make_hf_folder(folder, *, bos_post_processor, settings=None):
    """A tiny byte-level BPE tokenizer.json (+ tokenizer_config.json) like a checkpoint's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "a cat on a mat", "what is this?", "héllo 🙂"], trainer)
    if bos_post_processor:  # as Llama's tokenizer.json does
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if settings is None:
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                    "eos_token": "</s>",
                    "chat_template": HF_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(params=[True, False], ids=["bos-post-processor", "no-post-processor"])
def hf_folder(request, tmp_path):
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                              "rstrip": False, "single_word": False, "special": True},
                "chat_template": HF_TEMPLATE}
    if not request.param:
        settings["add_bos_token"] = True  # the checkpoint asks for bos; nothing in tokenizer.json adds it
    return make_hf_folder(tmp_path / "ckpt", bos_post_processor=request.param, settings=settings)


def test_hf_single_bos(hf_folder):
    tok = HFTokenizer.from_folder(hf_folder)
    bos = tok.token_to_id("<s>")
    assert tok.bos_token_id == bos
    ids = tok.encode("hello world")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode("hello world", add_bos=False) == ids[1:]
    assert tok.encode("<s>hello world") == ids  # a rendered template's own bos is not doubled
    assert tok.encode(tok.apply_chat_template(CHAT)).count(bos) == 1


def test_hf_no_bos_unless_checkpoint_adds_it(tmp_path):
    # GPT-2 / SmolLM style: a bos token exists but neither tokenizer.json nor the config adds it.
    folder = make_hf_folder(tmp_path, bos_post_processor=False,
                            settings={"bos_token": "<s>", "eos_token": "</s>"})
    tok = HFTokenizer.from_folder(folder)
    assert tok.encode("hello")[0] != tok.bos_token_id


def test_hf_encode_decode_and_specials(hf_folder):
    tok = HFTokenizer.from_folder(hf_folder)
    text = "héllo world 🙂"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a<image>b</s>", add_bos=False)
    assert tok.image_token_id in ids and tok.token_to_id("</s>") in ids
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<image>b</s>"
    assert tok.eos_token_ids == (tok.token_to_id("</s>"), tok.token_to_id("<|eot_id|>"))
    assert tok.pad_token_id == tok.token_to_id("<pad>")  # not in tokenizer_config.json: text.pad_token
    no_pad = HFTokenizer.from_folder(hf_folder, TextConfig(tokenizer="file", pad_token="<none>"))
    assert no_pad.pad_token_id == tok.token_to_id("</s>")  # no pad token at all: pad with eos
    vocab = json.loads((hf_folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.vocab_size == len(vocab) == max(vocab.values()) + 1


def test_hf_registers_vocab_tokens_as_special(tmp_path):
    # "<image>" is an ordinary vocabulary entry here, which the pre-tokenizer would split apart.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<image>": 3, "hi": 4, "<": 5, "image": 6, ">": 7}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    assert raw.encode("hi <image>").ids == [4, 5, 6, 7]
    tok = HFTokenizer(raw, bos_token="<s>", eos_token="</s>", add_bos_token=True)
    assert tok.encode("hi <image>") == [1, 4, 3]
    assert tok.decode([1, 4, 3, 2]) == "hi"
    with pytest.raises(TokenizerError, match="'<pad>' is not in the tokenizer's vocabulary"):
        HFTokenizer(raw, eos_token="</s>", pad_token="<pad>")


def test_hf_decode_partial_utf8_does_not_raise(hf_folder):
    tok = HFTokenizer.from_folder(hf_folder)
    emoji = tok.encode("🙂", add_bos=False)
    assert len(emoji) > 1  # split into byte pieces by the tiny vocabulary
    assert "\ufffd" in tok.decode(emoji[:1])
    assert isinstance(tok.decode(list(range(tok.vocab_size)), skip_special_tokens=False), str)


def test_hf_matches_transformers(hf_folder):
    transformers = pytest.importorskip("transformers")
    ours = HFTokenizer.from_folder(hf_folder)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(hf_folder))
    for generation_prompt in (True, False):
        expected = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=generation_prompt) == expected
    prompt = ours.apply_chat_template(CHAT)
    assert ours.encode(prompt) == theirs(prompt, add_special_tokens=False)["input_ids"]
    assert ours.encode("hello <image> world", add_bos=False) == theirs(
        "hello <image> world", add_special_tokens=False)["input_ids"]


def test_hf_chat_template_raise_exception(hf_folder):
    tok = HFTokenizer.from_folder(hf_folder)
    with pytest.raises(TokenizerError, match="must start with a user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_hf_chat_template_json_layout(tmp_path):
    folder = make_hf_folder(tmp_path, bos_post_processor=True, settings={"bos_token": "<s>", "eos_token": "</s>"})
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ bos_token }}json"}))
    assert HFTokenizer.from_folder(folder).apply_chat_template(CHAT) == "<s>json"
    (folder / "chat_template.jinja").write_text("{{ eos_token }}jinja")
    assert HFTokenizer.from_folder(folder).apply_chat_template(CHAT) == "</s>jinja"


def test_hf_named_chat_templates(tmp_path):
    settings = {"bos_token": "<s>", "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}
    folder = make_hf_folder(tmp_path, bos_post_processor=True, settings=settings)
    assert HFTokenizer.from_folder(folder).apply_chat_template(CHAT) == "plain"


def test_hf_config_template_and_image_token(tmp_path):
    folder = make_hf_folder(tmp_path, bos_post_processor=True, settings={"bos_token": "<s>", "eos_token": "</s>"})
    tok = HFTokenizer.from_folder(folder, TextConfig(tokenizer="file", chat_template="custom"))
    assert tok.apply_chat_template(CHAT) == "custom"
    tok = HFTokenizer.from_folder(folder, TextConfig(tokenizer="file", placeholder_tokens={"image": "<|image|>"}))
    with pytest.raises(TokenizerError, match="<\\|image\\|>"):
        _ = tok.image_token_id


def test_hf_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json").replace("\\", "\\\\")):
        HFTokenizer.from_folder(tmp_path)


def test_hf_missing_chat_template(tmp_path):
    folder = make_hf_folder(tmp_path, bos_post_processor=True, settings={"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(TokenizerError, match="has no chat template"):
        HFTokenizer.from_folder(folder).apply_chat_template(CHAT)


def test_load_tokenizer(tmp_path):
    assert isinstance(load_tokenizer(TextConfig()), ByteTokenizer)
    with pytest.raises(TokenizerError, match="no checkpoint folder"):
        load_tokenizer(TextConfig(tokenizer="file"))
    folder = make_hf_folder(tmp_path, bos_post_processor=True)
    assert isinstance(load_tokenizer(TextConfig(tokenizer="file"), folder), HFTokenizer)

"""Prompt text for generation: a chat template (``--prompt-type`` / ``--hf-chat-template``) or the raw prompt,
and the stop tokens that end a reply (the tokenizer's eos, the template's stop_words, ``--add-eos-token``)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from mindspeed_lora.errors import UserError


class ChatFormat:
    """Renders a conversation (messages with role system/user/assistant, the last one a user turn) into the
    prompt text that ends where the assistant's reply starts."""

    name: str = "raw"
    stop_words: tuple[str, ...] = ()

    def render(self, messages: list[dict]) -> str:
        raise NotImplementedError


class RawFormat(ChatFormat):
    """No template: the turns' texts concatenated (MindSpeed-LLM's behaviour without a template)."""

    name = "raw"

    def render(self, messages: list[dict]) -> str:
        return "".join(m["content"] for m in messages if m["role"] != "system")


class HFChatFormat(ChatFormat):
    """The tokenizer's own Jinja chat template (``--hf-chat-template``)."""

    name = "hf-chat-template"

    def __init__(self, tokenizer, source: str):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"--hf-chat-template: the tokenizer in {source} has no chat_template; "
                            "use --prompt-type NAME instead")
        self.tokenizer = tokenizer

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class TemplateFormat(ChatFormat):
    """A named template of templates.json (``--prompt-type``), rendered by mindspeed_lora.data.templates."""

    def __init__(self, name: str, path: str | None, enable_thinking):
        from mindspeed_lora.data import templates

        self.template = templates.get_template(name, path)
        self.name = name
        self.enable_thinking = enable_thinking
        self.stop_words = tuple(self.template.stop_words or ())

    def render(self, messages: list[dict]) -> str:
        from mindspeed_lora.data import templates

        return templates.render_generation_prompt(self.template, messages, enable_thinking=self.enable_thinking)


def chat_format(tokenizer, tokenizer_source: str, prompt_type: str | None, prompt_type_path: str | None,
                enable_thinking=None, hf_chat_template: bool = False) -> ChatFormat:
    if prompt_type and hf_chat_template:
        raise UserError("--prompt-type and --hf-chat-template are exclusive: pick one way to format prompts")
    if hf_chat_template:
        return HFChatFormat(tokenizer, tokenizer_source)
    if prompt_type:
        return TemplateFormat(prompt_type, prompt_type_path, enable_thinking)
    return RawFormat()


@dataclass(frozen=True)
class StopTokens:
    token_ids: tuple[int, ...]
    """Single-token stop words (and eos)."""
    sequences: tuple[tuple[int, ...], ...]
    """Stop words that the tokenizer splits into several tokens."""


def stop_tokens(tokenizer, fmt: ChatFormat, extra: list[str] = (), warn=sys.stderr) -> StopTokens:
    """Stop tokens of the tokenizer's eos, the template's stop_words and ``extra``; a template without stop
    words falls back to eos (with a warning), and with no eos either it is refused: a reply could not end."""
    words = list(fmt.stop_words) + list(extra)
    eos = tokenizer.eos_token_id
    if isinstance(fmt, TemplateFormat) and not fmt.stop_words:
        if eos is None and not extra:
            raise UserError(f"template {fmt.name!r} has no stop_words and the tokenizer has no eos token: a reply "
                            "could never end; add \"stop_words\" to the template in --prompt-type-path or pass "
                            "--add-eos-token WORD")
        if warn is not None:
            print(f"warning: template {fmt.name!r} has no stop_words; replies end at the tokenizer's eos token "
                  f"{tokenizer.eos_token!r}" + (f" or {extra}" if extra else ""), file=warn, flush=True)
    ids, seqs = [], []
    if eos is not None:
        ids.append(int(eos))
    for word in words:
        if not word:
            continue
        tid = tokenizer.convert_tokens_to_ids(word)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == word:
            ids.append(tid)
            continue
        enc = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
        elif enc:
            seqs.append(tuple(enc))
    return StopTokens(tuple(dict.fromkeys(ids)), tuple(dict.fromkeys(seqs)))

"""Prompt tokens for generation: a chat template (``--prompt-type`` / ``--hf-chat-template``) or the raw prompt,
and the stop tokens that end a reply (the tokenizer's eos, the template's stop_words, ``--add-eos-token``)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from mindspeed_lora.errors import UserError


class ChatFormat:
    """Turns a conversation (messages with role system/user/assistant, the last one a user turn) into the prompt
    token ids that end where the assistant's reply starts."""

    name: str = "raw"
    stop_words: tuple[str, ...] = ()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def _tokens(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]


class RawFormat(ChatFormat):
    """No template: the turns' texts concatenated (MindSpeed-LLM's behaviour without a template), with the
    tokenizer's own special tokens (a bos where the tokenizer adds one)."""

    name = "raw"

    def encode(self, messages: list[dict]) -> list[int]:
        return self._tokens("".join(m["content"] for m in messages if m["role"] != "system"), special=True)


class HFChatFormat(ChatFormat):
    """The tokenizer's own Jinja chat template (``--hf-chat-template``)."""

    name = "hf-chat-template"

    def __init__(self, tokenizer, source: str):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"--hf-chat-template: the tokenizer in {source} has no chat_template; "
                            "use --prompt-type NAME instead")

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._tokens(text)


class TemplateFormat(ChatFormat):
    """A named template of templates.json (``--prompt-type``), rendered as preprocess_data.py renders training
    data (each slot tokenized on its own), so the prompt is token for token what the model was tuned on.

    Reasoning templates (qwen3): unless ``--enable-thinking true``, the empty thought block follows the
    assistant prefix, as in training data without thoughts (and Qwen3's enable_thinking=False).
    """

    def __init__(self, tokenizer, name: str, path: str | None, enable_thinking):
        from mindspeed_lora.data.templates import ChatTemplate, load_template

        super().__init__(tokenizer)
        self.spec = load_template(name, path)
        self.template = ChatTemplate.bind(self.spec, tokenizer)
        self.name = name
        self.enable_thinking = enable_thinking
        self.stop_words = tuple(self.spec.stop_words)

    def encode(self, messages: list[dict]) -> list[int]:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        turns = [(m["role"], m["content"]) for m in messages if m["role"] != "system"]
        pieces = [p for segment, _ in self.template.render(system, turns, self.enable_thinking) for p in segment]
        if self.template.reasoning and self.enable_thinking is not True:
            pieces.append(self.template.empty_thought)
        ids: list[int] = []
        for piece in pieces:
            ids += [piece] if isinstance(piece, int) else self._tokens(piece)
        return ids


def chat_format(tokenizer, tokenizer_source: str, prompt_type: str | None, prompt_type_path: str | None,
                enable_thinking=None, hf_chat_template: bool = False) -> ChatFormat:
    if prompt_type and hf_chat_template:
        raise UserError("--prompt-type and --hf-chat-template are exclusive: pick one way to format prompts")
    if hf_chat_template:
        return HFChatFormat(tokenizer, tokenizer_source)
    if prompt_type:
        return TemplateFormat(tokenizer, prompt_type, prompt_type_path, enable_thinking)
    return RawFormat(tokenizer)


@dataclass(frozen=True)
class StopTokens:
    token_ids: tuple[int, ...]
    """Single-token stop words (and eos)."""
    sequences: tuple[tuple[int, ...], ...]
    """Stop words that the tokenizer splits into several tokens."""


def stop_sequences(tokenizer, text: str) -> tuple[tuple[int, ...], ...]:
    """Token sequences that end ``text`` as it is written after a line break or a space (tokenizers merge a
    leading newline or space into the word), so generation stops on the first token that completes it."""
    seqs = set()
    for lead in ("", "\n", "\n\n", " "):
        ids = tokenizer.encode(lead + text, add_special_tokens=False)
        bare = tokenizer.encode(lead, add_special_tokens=False) if lead else []
        if ids[:len(bare)] == bare:  # the lead is tokens of its own: the rest is how text follows it
            ids = ids[len(bare):]
        seqs.add(tuple(ids))
    return tuple(sorted(s for s in seqs if s))


def stop_tokens(tokenizer, fmt: ChatFormat, extra: list[str] = (), warn=None) -> StopTokens:
    """Stop tokens of the tokenizer's eos, the template's stop_words and ``extra``; a template without stop
    words falls back to eos (with a warning), and with no eos either it is refused: a reply could not end."""
    words = list(fmt.stop_words) + list(extra)
    eos = tokenizer.eos_token_id
    if isinstance(fmt, TemplateFormat) and not fmt.stop_words:
        if eos is None and not extra:
            raise UserError(f"template {fmt.name!r} has no stop_words and the tokenizer has no eos token: a reply "
                            "could never end; add \"stop_words\" to the template in --prompt-type-path or pass "
                            "--add-eos-token WORD")
        print(f"warning: template {fmt.name!r} has no stop_words; replies end at the tokenizer's eos token "
              f"{tokenizer.eos_token!r}" + (f" or {list(extra)}" if extra else ""), file=warn or sys.stderr, flush=True)
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

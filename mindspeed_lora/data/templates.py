"""Chat templates: ``templates.json`` in MindSpeed-LLM's structure, rendered into masked / trained segments.

The file is a JSON list of objects with a ``name`` and optional slots ``format_user``, ``format_assistant``,
``format_system``, ``format_function``, ``format_observation``, ``format_separator``, ``format_prefix`` (each
``{"slots": [...]}``: a string with ``{{content}}`` / ``{{idx}}``, ``{"token": "<x>"}`` for one token, or
``["bos_token"]`` / ``["eos_token"]``), and ``default_system``, ``stop_words``, ``thought_words``,
``efficient_eos``, ``replace_eos``, ``force_system``, ``template_class`` (``Llama2Template`` puts the system
text inside the first user message; ``ReasoningTemplate`` handles thinking).

Layout of a conversation (the same as MindSpeed-LLM / LLaMA-Factory, so token ids match theirs)::

    message 0:      prefix + system + user_0     (masked)
    message 1:      assistant_0                  (trained)
    message 2k:     separator + user_k           (masked)
    message 2k+1:   assistant_k                  (trained)

Each slot string is tokenized on its own. A missing format_assistant is ``{{content}}`` + eos (unless
``efficient_eos``); with ``replace_eos`` the eos is ``stop_words[0]``.

Thinking (``ReasoningTemplate``, e.g. qwen3): assistant turns before the last one lose their ``<think>`` block
(Qwen3's chat template drops earlier thoughts). On the last turn, ``--enable-thinking false`` removes the
thought too. If the last turn then has no thought, an empty block (``thought_words[0] + thought_words[1]``,
``<think>\\n\\n</think>\\n\\n``) is added: to the prompt (masked) with ``false`` or ``none``, to the response
(trained) with ``true``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from mindspeed_lora.errors import UserError

SLOT_KEYS = ("format_user", "format_assistant", "format_system", "format_function", "format_observation",
             "format_separator", "format_prefix")
OTHER_KEYS = ("name", "format_tools", "default_system", "stop_words", "thought_words", "efficient_eos",
              "replace_eos", "force_system", "template_class")
TEMPLATE_CLASSES = ("Template", "Llama2Template", "ReasoningTemplate")
# MindSpeed-LLM's fallback when a reasoning template names no thought words: "<think>" ... "</think>", whose
# empty block it writes as "<think>\n\n</think>\n\n" -- the same text these give.
DEFAULT_THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")

ROLES = ("user", "assistant", "observation", "function")  # the roles of a conversation after the handlers


def default_templates_path() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "configs", "finetune", "templates.json")


@dataclass(frozen=True)
class TemplateSpec:
    """One entry of templates.json, checked; slots are tuples of str | ("token", text) | ("special", name)."""

    name: str
    format_user: tuple
    format_assistant: tuple
    format_system: tuple
    format_function: tuple
    format_observation: tuple
    format_separator: tuple
    format_prefix: tuple
    default_system: str
    stop_words: tuple[str, ...]
    thought_words: tuple[str, str]
    efficient_eos: bool
    replace_eos: bool
    force_system: bool
    template_class: str


def load_template(name: str, path: str | None = None) -> TemplateSpec:
    path = path or default_templates_path()
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except OSError as e:
        raise UserError(f"--prompt-type-path {path}: cannot read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--prompt-type-path {path}: not valid JSON ({e}); expected a list of templates") from e
    if not isinstance(entries, list) or not all(isinstance(t, dict) and "name" in t for t in entries):
        raise UserError(f"{path}: expected a JSON list of objects, each with a \"name\"")
    by_name = {t["name"]: t for t in entries}
    if name not in by_name:
        raise UserError(f"--prompt-type {name!r}: no such template in {path}; known: {', '.join(sorted(by_name))}")
    return _check(by_name[name], f"{path}: template {name!r}")


def _check(entry: dict, where: str) -> TemplateSpec:
    unknown = sorted(set(entry) - set(SLOT_KEYS) - set(OTHER_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; expected some of {list(SLOT_KEYS + OTHER_KEYS)}")

    def slots(key, default):
        value = entry.get(key)
        if value is None:
            return default
        if not isinstance(value, dict) or not isinstance(value.get("slots"), list):
            raise UserError(f"{where}: {key} must be {{\"slots\": [...]}}")
        extra = sorted(set(value) - {"slots", "tool_format"})
        if extra:
            raise UserError(f"{where}: {key} has unknown keys {extra}")
        return tuple(_slot(s, f"{where}: {key}") for s in value["slots"])

    def flag(key):
        value = entry.get(key, False)
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        return value

    efficient_eos = flag("efficient_eos")
    eos = () if efficient_eos else (("special", "eos_token"),)
    user = slots("format_user", ("{{content}}",))
    default_system = entry.get("default_system", "")
    if isinstance(default_system, list) and all(isinstance(s, str) for s in default_system):
        default_system = "".join(default_system)
    stop_words = entry.get("stop_words", [])
    thought_words = entry.get("thought_words", DEFAULT_THOUGHT_WORDS)
    template_class = entry.get("template_class", "Template")
    if not isinstance(default_system, str):
        raise UserError(f"{where}: default_system must be a string")
    if not isinstance(stop_words, list) or not all(isinstance(s, str) and s for s in stop_words):
        raise UserError(f"{where}: stop_words must be a list of non-empty strings")
    if (not isinstance(thought_words, (list, tuple)) or len(thought_words) != 2
            or not all(isinstance(s, str) and s.strip() for s in thought_words)):
        raise UserError(f"{where}: thought_words must be two strings, e.g. [\"<think>\\n\", \"\\n</think>\\n\\n\"]")
    if template_class not in TEMPLATE_CLASSES:
        raise UserError(f"{where}: template_class {template_class!r}; expected one of {list(TEMPLATE_CLASSES)}")
    replace_eos = flag("replace_eos")
    if replace_eos and not stop_words:
        raise UserError(f"{where}: replace_eos needs stop_words (the first one becomes the eos token)")
    assistant = slots("format_assistant", ("{{content}}",) + eos)
    spec = TemplateSpec(
        name=entry["name"], format_user=user, format_assistant=assistant,
        # as in MindSpeed-LLM: a missing system slot is plain {{content}}, not the user slot
        format_system=slots("format_system", ("{{content}}",)),
        format_function=slots("format_function", assistant),
        format_observation=slots("format_observation", user),
        format_separator=slots("format_separator", ()), format_prefix=slots("format_prefix", ()),
        default_system=default_system, stop_words=tuple(stop_words), thought_words=tuple(thought_words),
        efficient_eos=efficient_eos, replace_eos=replace_eos, force_system=flag("force_system"),
        template_class=template_class,
    )
    if template_class == "Llama2Template" and not all(isinstance(s, str) for s in spec.format_system):
        raise UserError(f"{where}: Llama2Template puts the system text inside the user message, so "
                        "format_system may hold only strings")
    return spec


def _slot(s, where):
    if isinstance(s, str):
        return s
    if isinstance(s, dict) and set(s) == {"token"} and isinstance(s["token"], str):
        return ("token", s["token"])
    if isinstance(s, list) and len(s) == 1 and s[0] in ("bos_token", "eos_token"):
        return ("special", s[0])
    raise UserError(f"{where}: slot {s!r}; expected a string, {{\"token\": \"...\"}}, [\"bos_token\"] or "
                    "[\"eos_token\"]")


class ChatTemplate:
    """A template bound to a tokenizer's ids; renders conversations into segments of pieces.

    A piece is a string (tokenized on its own) or a token id. Picklable: worker processes get a copy.
    """

    def __init__(self, spec: TemplateSpec, token_ids: dict[str, int | None], eos_id: int):
        self.spec = spec
        self.eos_id = eos_id
        self._ids = token_ids
        self._formats = {key: self._bind(getattr(spec, key)) for key in SLOT_KEYS}
        self.reasoning = spec.template_class == "ReasoningTemplate"
        opening, closing = (re.escape(w.strip()) for w in spec.thought_words)
        self._thought = re.compile(rf"\A\s*{opening}.*?{closing}\s*", re.DOTALL)
        self.empty_thought = spec.thought_words[0] + spec.thought_words[1]

    @staticmethod
    def bind(spec: TemplateSpec, tokenizer) -> "ChatTemplate":
        """Resolve the template's tokens with an HF tokenizer (main process only)."""
        where = f"template {spec.name!r}"

        def token_id(text):
            tid = tokenizer.convert_tokens_to_ids(text)
            if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id
                               and text != tokenizer.unk_token):
                raise UserError(f"{where}: token {text!r} is not in the tokenizer's vocabulary; "
                                "use a tokenizer of the template's model family or another --prompt-type")
            return tid

        if spec.replace_eos:
            eos_id = token_id(spec.stop_words[0])
        elif tokenizer.eos_token_id is not None:
            eos_id = tokenizer.eos_token_id
        else:
            raise UserError(f"{where}: the tokenizer has no eos token and the template does not set one "
                            "(replace_eos with stop_words)")
        ids: dict[str, int | None] = {"bos_token": tokenizer.bos_token_id, "eos_token": eos_id}
        for key in SLOT_KEYS:
            for s in getattr(spec, key):
                if isinstance(s, tuple) and s[0] == "token":
                    ids["token:" + s[1]] = token_id(s[1])
        return ChatTemplate(spec, ids, eos_id)

    def _bind(self, slots):
        """Slots -> token ids, plain strings, and (before, after) pairs around a single ``{{content}}``."""
        out = []
        for s in slots:
            if isinstance(s, str):
                parts = s.split("{{content}}")
                out.append((parts[0], parts[1]) if len(parts) == 2 and "{{idx}}" not in s else s)
            elif s[0] == "token":
                out.append(self._ids["token:" + s[1]])
            elif self._ids[s[1]] is not None:  # no bos token: nothing, as MindSpeed-LLM does
                out.append(self._ids[s[1]])
        return tuple(out)

    def _apply(self, key: str, content: str = "", idx: int = 0) -> list:
        pieces = []
        for s in self._formats[key]:
            if type(s) is tuple:
                text = s[0] + content + s[1]
            elif type(s) is str:
                text = s.replace("{{idx}}", str(idx)).replace("{{content}}", content) if "{{" in s else s
            else:
                pieces.append(s)
                continue
            if text:
                pieces.append(text)
        return pieces

    # -- thinking

    def has_thought(self, content: str) -> bool:
        return self._thought.match(content) is not None

    def remove_thought(self, content: str) -> str:
        return self._thought.sub("", content, count=1)

    # -- rendering

    def render(self, system: str, messages: list[tuple[str, str]], enable_thinking: bool | None,
               ) -> list[tuple[list, bool]]:
        """Messages (user / observation at even positions, assistant / function at odd ones) -> one
        ``(pieces, is_response)`` segment per message."""
        spec = self.spec
        if self.reasoning:
            messages = self._apply_thinking_rules(messages, enable_thinking)
        system = system or spec.default_system
        segments = []
        for i, (role, content) in enumerate(messages):
            pieces = []
            if i == 0:
                pieces += self._apply("format_prefix")
                if spec.template_class == "Llama2Template":
                    if system and role == "user":
                        content = "".join(self._apply("format_system", system)) + content
                elif system or spec.force_system:
                    pieces += self._apply("format_system", system)
            elif i % 2 == 0:
                pieces += self._apply("format_separator")
            if role == "user":
                pieces += self._apply("format_user", content, idx=i // 2)
            elif role == "assistant":
                pieces += self._apply("format_assistant", content)
            elif role == "observation":
                pieces += self._apply("format_observation", content)
            else:
                pieces += self._apply("format_function", content)
            segments.append((pieces, i % 2 == 1))
        if self.reasoning and messages[-1][0] == "assistant" and not self.has_thought(messages[-1][1]):
            if enable_thinking:
                segments[-1][0].insert(0, self.empty_thought)
            else:
                segments[-2][0].append(self.empty_thought)
        return segments

    def _apply_thinking_rules(self, messages, enable_thinking):
        last = len(messages) - 1
        out = []
        for i, (role, content) in enumerate(messages):
            if role == "assistant" and (i != last or enable_thinking is False):
                content = self.remove_thought(content)
            out.append((role, content))
        return out

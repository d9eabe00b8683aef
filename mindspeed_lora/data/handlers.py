"""Handlers: one raw sample (a dict) -> a conversation, a preference pair, or pretraining text.

The handler names and ``--map-keys`` are MindSpeed-LLM's, so its preprocessing scripts run unchanged:

- ``AlpacaStyleInstructionHandler``: ``{"instruction", "input", "output", "system", "history": [[q, a], ...]}``;
  the user turn is instruction and input joined by a newline.
- ``SharegptStyleInstructionHandler``: ``{"conversations": [{"from": "human"|"gpt"|"observation"|
  "function_call"|"system", "value": ...}], "system"}``.
- ``OpenAIInstructionHandler``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content"}]}``;
  an assistant ``reasoning_content`` becomes the thought of a reasoning template.
- ``AlpacaStylePairwiseHandler`` / ``SharegptStylePairwiseHandler``: the same prompts plus ``chosen`` and
  ``rejected`` answers (strings, ShareGPT message objects, or one list ``[chosen, rejected]``).
- ``GeneralPretrainHandler``: the text under each of ``--json-keys``.

Turns must alternate: user (or tool observation) first, then assistant (or function call). ``--map-keys``
renames columns, e.g. ``{"prompt": "question", "response": "answer"}`` or, for ShareGPT,
``{"messages": "dialog", "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
"assistant_tag": "assistant"}}``. ``<NAME>`` and ``<AUTHOR>`` in any text become ``--model-name`` and
``--model-author`` (self-cognition data).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from mindspeed_lora.data.readers import SampleError
from mindspeed_lora.errors import UserError

ALPACA_KEYS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", "chosen": "chosen", "rejected": "rejected"}
SHAREGPT_KEYS = {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                 "rejected": "rejected"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_KEYS = {"messages": "messages", "system": "system", "tools": "tools"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
OPTIONAL_KEYS = ("query", "history", "system", "tools")  # may be absent or null in a sample


@dataclass
class Conversation:
    system: str
    messages: list[tuple[str, str]]  # (role, content); roles user / assistant / observation / function


@dataclass
class PreferencePair:
    system: str
    prompt: list[tuple[str, str]]  # ends with a user or observation turn
    chosen: str
    rejected: str


@dataclass
class Handler:
    """Turns a sample dict into what the encoder renders. ``kind`` is sft, pairwise or pretrain."""

    name: str
    kind: str
    keys: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    json_keys: tuple[str, ...] = ("text",)
    placeholders: tuple[tuple[str, str], ...] = ()

    @property
    def output_keys(self) -> tuple[str, ...]:
        if self.kind == "sft":
            return ("input_ids", "attention_mask", "labels")
        if self.kind == "pairwise":
            return ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        return self.json_keys

    def convert(self, sample: dict):
        if self.kind == "pretrain":
            return [self._text(sample, k) for k in self.json_keys]
        if self.name.startswith("Alpaca"):
            out = self._alpaca(sample)
        else:
            out = self._messages(sample)
        if self.placeholders:
            out = self._fill_placeholders(out)
        return out

    # -- fields

    def _get(self, sample, key):
        column = self.keys.get(key)
        if column is None:
            return None
        if column not in sample:
            if key in OPTIONAL_KEYS:
                return None
            mapped = f" (--map-keys {key})" if column != _default_keys(self.name).get(key) else ""
            raise SampleError("missing key", f"no key {column!r}{mapped}; the sample has {sorted(sample)}")
        return sample[column]

    def _str(self, sample, key, optional=False):
        value = self._get(sample, key)
        if value is None and (optional or key in OPTIONAL_KEYS):
            return ""
        if not isinstance(value, str):
            raise SampleError("wrong type", f"{self.keys[key]!r} is {_type(value)}; expected a string")
        return value

    def _text(self, sample, key):
        if key not in sample:
            raise SampleError("missing key", f"no key {key!r} (--json-keys); the sample has {sorted(sample)}")
        if not isinstance(sample[key], str):
            raise SampleError("wrong type", f"{key!r} is {_type(sample[key])}; expected a string")
        return sample[key]

    # -- Alpaca

    def _alpaca(self, sample):
        messages = []
        history = self._get(sample, "history")
        if history:
            if not isinstance(history, list) or not all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
                    for p in history):
                raise SampleError("wrong type", f"{self.keys['history']!r} is {_type(history)}; expected a list "
                                                "of [query, response] string pairs")
            for q, a in history:
                messages += [("user", q), ("assistant", a)]
        prompt = "\n".join(p for p in (self._str(sample, "prompt"), self._str(sample, "query")) if p)
        messages.append(("user", prompt))
        system = self._str(sample, "system")
        if self.kind == "pairwise":
            chosen, rejected = self._pair(sample)
            return PreferencePair(system, messages, chosen, rejected)
        messages.append(("assistant", self._str(sample, "response")))
        return Conversation(system, messages)

    def _pair(self, sample):
        out = []
        for key, pick in (("chosen", 0), ("rejected", 1)):
            value = self._get(sample, key)
            if isinstance(value, list):  # one column [chosen, rejected] mapped to both keys
                if len(value) != 2:
                    raise SampleError("wrong type", f"{self.keys[key]!r} is a list of {len(value)}; expected "
                                                    "a string or [chosen, rejected]")
                value = value[pick]
            if isinstance(value, dict) and self.tags:
                value = self._pair_message(value, key)
            if not isinstance(value, str):
                raise SampleError("wrong type", f"{self.keys[key]!r} is {_type(value)}; expected a string")
            out.append(value)
        return out

    def _pair_message(self, message, key):
        t = self.tags
        role = message.get(t["role_tag"], t["assistant_tag"])
        if role not in (t["assistant_tag"], t["function_tag"]):
            raise SampleError("bad conversation", f"{key} has role {role!r}; expected {t['assistant_tag']!r}")
        if t["content_tag"] not in message:
            raise SampleError("missing key", f"{key} has no {t['content_tag']!r}")
        return message[t["content_tag"]]

    # -- ShareGPT / OpenAI messages

    def _messages(self, sample):
        t = self.tags
        raw = self._get(sample, "messages")
        column = self.keys["messages"]
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise SampleError("wrong type", f"{column!r} is {_type(raw)}; expected a list of message objects")
        system = self._str(sample, "system")
        if raw and raw[0].get(t["role_tag"]) == t["system_tag"]:
            system = self._content(raw[0], 0, column)
            raw = raw[1:]
        tools = self._get(sample, "tools")
        if tools:
            raise SampleError("unsupported", f"{self.keys['tools']!r} is set; tool descriptions are not supported "
                                             "(expected empty)")
        roles = ({t["user_tag"]: "user", t["observation_tag"]: "observation"},
                 {t["assistant_tag"]: "assistant", t["function_tag"]: "function"})
        messages = []
        for i, m in enumerate(raw):
            role = m.get(t["role_tag"])
            if role not in roles[i % 2]:
                who = "user or tool observation" if i % 2 == 0 else "assistant or function call"
                raise SampleError("bad conversation", f"{column}[{i}] has {t['role_tag']} {role!r}; expected a "
                                                      f"{who} turn ({' / '.join(map(repr, roles[i % 2]))}): "
                                                      "turns alternate, starting with the user")
            content = self._content(m, i, column)
            reasoning = m.get("reasoning_content")
            if reasoning:
                if not isinstance(reasoning, str):
                    raise SampleError("wrong type", f"{column}[{i}].reasoning_content is {_type(reasoning)}; "
                                                    "expected a string")
                content = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
            messages.append((roles[i % 2][role], content))
        if self.kind == "pairwise":
            if len(messages) % 2 != 1:
                raise SampleError("bad conversation", f"{column} has {len(messages)} turns; expected an odd "
                                                      "number ending with the user turn that chosen/rejected answer")
            chosen, rejected = self._pair(sample)
            return PreferencePair(system, messages, chosen, rejected)
        if not messages or len(messages) % 2 != 0:
            raise SampleError("bad conversation", f"{column} has {len(messages)} turns; expected user/assistant "
                                                  "pairs ending with an assistant turn")
        return Conversation(system, messages)

    def _content(self, m, i, column):
        t = self.tags
        if m.get("tool_calls"):
            raise SampleError("unsupported", f"{column}[{i}] has tool_calls; structured tool calls are not "
                                             "supported (expected plain content)")
        if t["content_tag"] not in m:
            raise SampleError("missing key", f"{column}[{i}] has no {t['content_tag']!r}")
        content = m[t["content_tag"]]
        if not isinstance(content, str):
            raise SampleError("wrong type", f"{column}[{i}].{t['content_tag']} is {_type(content)}; "
                                            "expected a string")
        return content

    def _fill_placeholders(self, out):
        def fill(text):
            for k, v in self.placeholders:
                text = text.replace(k, v)
            return text

        if isinstance(out, Conversation):
            return Conversation(fill(out.system), [(r, fill(c)) for r, c in out.messages])
        return PreferencePair(fill(out.system), [(r, fill(c)) for r, c in out.prompt], fill(out.chosen),
                              fill(out.rejected))


HANDLERS = {
    "AlpacaStyleInstructionHandler": "sft",
    "SharegptStyleInstructionHandler": "sft",
    "OpenAIInstructionHandler": "sft",
    "AlpacaStylePairwiseHandler": "pairwise",
    "SharegptStylePairwiseHandler": "pairwise",
    "GeneralPretrainHandler": "pretrain",
}


def _default_keys(name: str) -> dict:
    if name.startswith("Alpaca"):
        return dict(ALPACA_KEYS)
    if name.startswith("Sharegpt"):
        return dict(SHAREGPT_KEYS)
    if name.startswith("OpenAI"):
        return dict(OPENAI_KEYS)
    return {}


def _default_tags(name: str) -> dict:
    return dict(SHAREGPT_TAGS) if name.startswith("Sharegpt") else dict(OPENAI_TAGS) if name.startswith(
        "OpenAI") else {}


def make_handler(name: str, map_keys: str | dict | None = None, json_keys=("text",), model_name: str | None = None,
                 model_author: str | None = None) -> Handler:
    if name not in HANDLERS:
        raise UserError(f"--handler-name {name!r}: unknown handler; expected one of {', '.join(HANDLERS)}")
    kind = HANDLERS[name]
    keys, tags = _default_keys(name), _default_tags(name)
    if isinstance(map_keys, str):
        try:
            map_keys = json.loads(map_keys)
        except json.JSONDecodeError as e:
            raise UserError(f"--map-keys {map_keys!r}: not valid JSON ({e.msg}); expected an object such as "
                            "'{\"prompt\": \"question\", \"response\": \"answer\"}'") from e
    if map_keys:
        if kind == "pretrain":
            raise UserError("--map-keys is not used by GeneralPretrainHandler; name the text columns with "
                            "--json-keys")
        if not isinstance(map_keys, dict):
            raise UserError(f"--map-keys: expected a JSON object, got {_type(map_keys)}")
        allowed = set(keys) | ({"tags"} if tags else set())
        for k, v in map_keys.items():
            if k not in allowed:
                raise UserError(f"--map-keys: unknown key {k!r} for {name}; expected some of {sorted(allowed)}")
            if k == "tags":
                if not isinstance(v, dict) or not set(v) <= set(tags) or not all(isinstance(x, str) for x in
                                                                                 v.values()):
                    raise UserError(f"--map-keys tags: expected an object with string values for some of "
                                    f"{sorted(tags)}, got {v!r}")
                tags.update(v)
            elif not v and k in OPTIONAL_KEYS:  # null or "" switches an optional column off
                keys[k] = None
            elif not isinstance(v, str):
                raise UserError(f"--map-keys {k}: expected a column name (string), got {v!r}")
            else:
                keys[k] = v
    placeholders = tuple((k, v) for k, v in (("<NAME>", model_name), ("<AUTHOR>", model_author)) if v)
    return Handler(name, kind, keys, tags, tuple(json_keys), placeholders)


def _type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)

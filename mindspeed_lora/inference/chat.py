"""Multi-turn chat: the conversation so far (up to ``history_turns`` past turns) rendered with the chat format,
and an interactive loop on rank 0 whose lines every rank receives (all TP ranks must run the same forward)."""
from __future__ import annotations

import sys
from typing import Callable

from mindspeed_lora.errors import UserError
from mindspeed_lora.inference.prompting import ChatFormat

QUIT = ("q", "quit", "exit")
CLEAR = ("clear", "new")


def conversation(user: str, history: list[tuple[str, str]], history_turns: int,
                 system: str | None = None) -> list[dict]:
    """Messages for a reply to ``user``: the system prompt, the last ``history_turns`` turns, then ``user``."""
    if not user.strip():
        raise UserError("empty prompt: nothing to reply to")
    if history_turns < 0:
        raise UserError(f"--history-turns={history_turns}: expected >= 0")
    messages = [{"role": "system", "content": system}] if system else []
    kept = history[-history_turns:] if history_turns else []
    for q, a in kept:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": user}]


class ChatSession:
    """One conversation; ``reply`` renders it, generates, and remembers the turn."""

    def __init__(self, fmt: ChatFormat, respond: Callable[[list[int]], str], history_turns: int = 3,
                 system: str | None = None):
        self.fmt, self.respond = fmt, respond
        self.history_turns, self.system = history_turns, system
        self.history: list[tuple[str, str]] = []

    def prompt_ids(self, user: str) -> list[int]:
        return self.fmt.encode(conversation(user, self.history, self.history_turns, self.system))

    def reply(self, user: str) -> str:
        answer = self.respond(self.prompt_ids(user))
        self.history.append((user, answer))
        return answer

    def clear(self) -> None:
        self.history = []


def broadcast_line(line: str | None) -> str | None:
    """Rank 0's input line on every rank (None = end of input)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return line
    box = [line]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def interactive(session: ChatSession, is_rank0: bool, stdin=None, out=None) -> None:
    """Read prompts on rank 0 until q/quit/exit or end of input; clear/new starts a new conversation."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if is_rank0:
        print("chat: type a message; 'clear' starts over, 'q' quits", file=out, flush=True)
    while True:
        line = None
        if is_rank0:
            print("\nYou >> ", end="", file=out, flush=True)
            raw = stdin.readline()
            line = None if raw == "" else raw.rstrip("\n")
        line = broadcast_line(line)
        if line is None or line.strip() in QUIT:
            break
        if line.strip() in CLEAR:
            session.clear()
            continue
        if not line.strip():
            continue
        if is_rank0:
            print("\nAssistant:", file=out, flush=True)
        session.reply(line)

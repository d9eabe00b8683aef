"""JSON lines read for small inputs (prompts, exams): one object per non-blank line, errors naming file:line."""
from __future__ import annotations

import json
from typing import Iterator

from mindspeed_lora.errors import UserError


def iter_json_objects(path: str) -> Iterator[tuple[str, dict]]:
    """(``path:line``, object) per non-blank line; a UserError for a line that is not a JSON object."""
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object")
            yield where, obj

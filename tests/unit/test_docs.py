"""The docs stay true: docs/flags.md is what the parsers generate today, every relative link and #anchor in the
docs and the README resolves, and every command line of a docs code block parses with the scripts' parsers."""
from __future__ import annotations

import os
import re

import pytest

from mindspeed_lora.arguments.docs import render
from tests.unit.test_examples import ROOT, _parse, invocations

DOCS = os.path.join(ROOT, "docs")
PAGES = sorted([os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")]
               + [os.path.join(ROOT, "README.md")])
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"```(?:bash|sh)\n(.*?)```", re.S)


def test_flags_md_is_generated_from_the_parsers():
    with open(os.path.join(DOCS, "flags.md")) as f:
        current = f.read()
    assert current == render(), ("docs/flags.md is stale: run `python -m mindspeed_lora.arguments.docs > "
                                 "docs/flags.md`")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercase, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_anchor_rule():
    assert anchor("CCLoRA (`--lora-fusion`)") == "cclora---lora-fusion"
    assert anchor("1. The tiny model, on any machine") == "1-the-tiny-model-on-any-machine"


def broken_links(page: str) -> list[str]:
    text = re.sub(r"```.*?```", "", open(page).read(), flags=re.S)
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, frag = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(dest):
            broken.append(f"{target}: no file {os.path.relpath(dest, ROOT)}")
        elif frag and dest.endswith(".md") and frag not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{frag} in {os.path.relpath(dest, ROOT)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_resolve(page):
    broken = broken_links(page)
    assert not broken, "\n".join(broken)


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Some part\n\n[ok](#some-part) [self](a.md#title) "
                                   "[gone](b.md) [bad](a.md#nope) [web](https://example.com/x)\n")
    assert broken_links(str(tmp_path / "a.md")) == [
        f"b.md: no file {os.path.relpath(str(tmp_path / 'b.md'), ROOT)}",
        f"a.md#nope: no heading with anchor #nope in {os.path.relpath(str(tmp_path / 'a.md'), ROOT)}"]


def doc_commands(tmp_path) -> list:
    """Every bash code block of the docs as a script of its own, read like the example scripts."""
    found = []
    for page in PAGES:
        for i, block in enumerate(_FENCE.findall(open(page).read())):
            script = tmp_path / f"{os.path.basename(page)}.{i}.sh"
            script.write_text(block)
            for inv in invocations(str(script)):
                inv.argv = [a for a in inv.argv if a != "..."]  # "..." stands for flags left out of an example
                found.append((f"{os.path.relpath(page, ROOT)} (code block {i + 1})", inv))
    return found


def test_doc_command_lines_parse(tmp_path):
    found = doc_commands(tmp_path)
    assert {inv.script for _, inv in found} >= {"convert_ckpt", "posttrain_gpt"}
    for page, inv in found:
        try:
            _parse(inv)
        except AssertionError as e:
            raise AssertionError(f"{page}: {e}") from None


def test_every_doc_page_is_linked_from_getting_started():
    text = open(os.path.join(DOCS, "getting_started.md")).read()
    for page in PAGES:
        name = os.path.basename(page)
        if page.startswith(DOCS) and name != "getting_started.md":
            assert f"]({name}" in text, f"docs/getting_started.md does not link {name}"


def test_help_text_renders_as_written_in_markdown():
    """< and > become entities (a renderer would take <NAME> for an HTML tag and show nothing) except inside
    `code`, where they show literally; pipes are escaped so they cannot split the table row."""
    import argparse

    from mindspeed_lora.arguments.docs import _flag_rows

    p = argparse.ArgumentParser()
    p.add_argument("--x", choices=["a<b", "c"], help="replaces <NAME>; `<tag>` kept; a|b; mg -> hf\nnext")
    row = _flag_rows(p)[-1]
    assert row == ("| `--x` {a&lt;b\\|c} |  | replaces &lt;NAME&gt;; `<tag>` kept; a\\|b; mg -&gt; hf next |")
    outside_code = [part for line in render().splitlines() for part in line.split("`")[::2]]
    assert not [part for part in outside_code if "<" in part or ">" in part]

"""Every python invocation in the example scripts parses with the project's own parser, and every flag they use
is read by the code that script runs (no flag accepted and silently ignored).

The shell is read statically: continuation lines are joined, ``$VAR`` / ``${VAR}`` / ``${VAR:-default}`` are
replaced by the value the script (or examples/mcore/launch.sh) assigns, else by a placeholder, and each
``<script>.py`` of ``SCRIPT_GROUPS`` found in a command is parsed with ``build_parser(<script>)`` along with the
words after it up to the end of the command.
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import pytest

from mindspeed_lora.arguments import SCRIPT_GROUPS, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
PACKAGE = os.path.join(ROOT, "mindspeed_lora")
ARGUMENTS = os.path.join(PACKAGE, "arguments")
LAUNCHER = os.path.join(EXAMPLES, "mcore", "launch.sh")

_END_OF_COMMAND = {"|", "||", "&&", ";", "&", "2>&1", ">", ">>", "2>", "<"}
_ASSIGN = re.compile(r"^\s*(?:export\s+|local\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_DEFAULTED = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):?[-=](.*)\}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-=]([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def example_scripts() -> list[str]:
    out = []
    for d, _, files in os.walk(EXAMPLES):
        out += [os.path.join(d, f) for f in files if f.endswith(".sh")]
    return sorted(out)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash-newline continuations joined."""
    out, buf, start = [], "", None
    for n, line in enumerate(text.splitlines(), 1):
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if value and value[0] == value[-1] and value[0] in "\"'" and len(value) >= 2:
        return value[1:-1]
    return value


def assigned_values(text: str) -> dict[str, str]:
    """NAME -> value of ``NAME=value`` / ``NAME=${NAME:-value}`` lines (the last assignment wins)."""
    values = {}
    for _, line in logical_lines(text):
        m = _ASSIGN.match(line)
        if not m:
            continue
        raw = m.group(2).split(" #")[0].strip()
        if raw.startswith("$(") or raw.startswith("$(("):
            continue
        inner = _DEFAULTED.match(_unquote(raw))
        values[m.group(1)] = _unquote(inner.group(2)) if inner else _unquote(raw)
    return values


def substitute(line: str, values: dict[str, str]) -> str:
    def value(m, depth=0):
        name = m.group(1) or m.group(3)
        v = values.get(name)
        if v is None:
            v = m.group(2) if m.group(2) is not None else f"PLACEHOLDER_{name}"
        return _VAR.sub(lambda mm: value(mm, depth + 1), v) if depth < 5 else v

    return _VAR.sub(value, line)


@dataclass
class Invocation:
    path: str
    line: int
    script: str
    argv: list[str]

    def where(self) -> str:
        return f"{os.path.relpath(self.path, ROOT)}:{self.line} ({self.script}.py)"


def invocations(path: str) -> list[Invocation]:
    with open(path) as f:
        text = f.read()
    with open(LAUNCHER) as f:
        values = assigned_values(f.read())
    values.update(assigned_values(text))
    found = []
    pending = None  # (first line, text) of a command whose quoted string goes on over the next lines
    for n, line in logical_lines(text):
        if pending is None and line.lstrip().startswith("#"):
            continue
        n, line = (pending[0], pending[1] + "\n" + line) if pending else (n, line)
        try:
            words = shlex.split(substitute(line, values), comments=True)
        except ValueError:
            pending = (n, line)
            continue
        pending = None
        for i, w in enumerate(words):
            base = os.path.basename(w)
            if base.endswith(".py") and base[:-3] in SCRIPT_GROUPS:
                argv = []
                for a in words[i + 1:]:
                    if a in _END_OF_COMMAND or a.startswith((">", "2>")):
                        break
                    if a not in ("$@", "$*"):  # the wrapper's own arguments, added by its user
                        argv.append(a)
                found.append(Invocation(path, n, base[:-3], argv))
    assert pending is None, f"{os.path.relpath(path, ROOT)}:{pending[0]}: unbalanced quotes"
    return found


ALL = [inv for p in example_scripts() for inv in invocations(p)]


def test_every_wrapper_launches_one_script():
    """Guards the parser itself: a wrapper whose command the static reader misses would be checked by nothing."""
    wrappers = [p for p in example_scripts() if os.path.dirname(p) != os.path.join(EXAMPLES, "mcore", "tiny")
                and p != LAUNCHER]
    assert len(wrappers) >= 24
    for p in wrappers:
        found = invocations(p)
        assert len(found) == 1, f"{os.path.relpath(p, ROOT)}: expected one python script call, found {found}"


def _parse(inv: Invocation):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser(inv.script).parse_args(inv.argv)
        except SystemExit:
            pass
    raise AssertionError(f"{inv.where()}: {err.getvalue().strip().splitlines()[-1]}\n  argv: {inv.argv}")


@pytest.mark.parametrize("inv", ALL, ids=lambda inv: f"{os.path.relpath(inv.path, EXAMPLES)}:{inv.line}")
def test_example_flags_parse(inv):
    _parse(inv)


def test_a_typo_is_caught_with_script_line_and_flag(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nTP=2\nlaunch_distributed x posttrain_gpt.py \\\n    --load a \\\n"
                   "    --tensor-model-parallel-size $TP \\\n    --lora-rank 8 | tee logs/x.log\n")
    (inv,) = invocations(str(bad))
    assert (inv.script, inv.line, inv.argv) == \
        ("posttrain_gpt", 3, ["--load", "a", "--tensor-model-parallel-size", "2", "--lora-rank", "8"])
    with pytest.raises(AssertionError, match=r"bad\.sh:3 \(posttrain_gpt\.py\): .*unrecognized arguments: "
                                             r"--lora-rank 8"):
        _parse(inv)


# --------------------------------------------------------------------------------------- flags are read

def _module_file(name: str) -> str | None:
    rel = name.split(".")
    for cand in (os.path.join(ROOT, *rel) + ".py", os.path.join(ROOT, *rel, "__init__.py")):
        if os.path.isfile(cand):
            return cand
    return None


def _imports(path: str) -> set[str]:
    """mindspeed_lora modules imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(open(path).read())
    pkg = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    out = {m for m in out if m.split(".")[0] == "mindspeed_lora"}
    if "importlib.import_module" in open(path).read() and path.endswith("__init__.py"):
        # a package that imports its submodules lazily by name reaches all of them
        d = os.path.dirname(path)
        out.update(f"{pkg}.{f[:-3]}" for f in os.listdir(d) if f.endswith(".py") and f != "__init__.py")
    return out


@lru_cache(maxsize=None)
def reachable_files(script: str) -> frozenset[str]:
    """Package files the entry script can run: its import closure, parents' __init__ included."""
    todo, seen = [os.path.join(ROOT, f"{script}.py")], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for mod in _imports(path):
            parts = mod.split(".")
            for k in range(1, len(parts) + 1):
                f = _module_file(".".join(parts[:k]))
                if f and f not in seen:
                    todo.append(f)
    return frozenset(p for p in seen if p.startswith(PACKAGE + os.sep))


def _args_attrs(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args"}


@lru_cache(maxsize=None)
def argument_module_flow() -> tuple[dict[str, set[str]], set[str]]:
    """In mindspeed_lora/arguments/: dest -> config fields its value is passed to (``Config(field=args.x)``,
    also through local variables), and the dests validated by a check that raises."""
    flow: dict[str, set[str]] = {}
    checked: set[str] = set()
    for f in os.listdir(ARGUMENTS):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ARGUMENTS, f)).read())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            local: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign):
                    names = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            local.setdefault(t.id, set()).update(_args_attrs(node.value) | {"$" + n for n in names})
                elif isinstance(node, ast.If) and any(isinstance(s, ast.Raise) for s in ast.walk(node)):
                    checked.update(_args_attrs(node.test))

            def dests(expr, depth=0):
                out = set(_args_attrs(expr))
                for n in ast.walk(expr):
                    if isinstance(n, ast.Name) and n.id in local and depth < 5:
                        for d in local[n.id]:
                            out |= dests(ast.Name(id=d[1:]), depth + 1) if d.startswith("$") else {d}
                return out

            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                for kw in call.keywords:
                    if kw.arg:
                        for d in dests(kw.value):
                            flow.setdefault(d, set()).add(kw.arg)
    return flow, checked


def _read_in(files, name: str) -> bool:
    pattern = re.compile(rf"\.{name}\b|[\"']{name}[\"']")
    return any(pattern.search(open(f).read()) for f in files)


def flag_is_read(script: str, dest: str) -> bool:
    files = [f for f in reachable_files(script) if not f.startswith(ARGUMENTS + os.sep)]
    if _read_in(files, dest):
        return True
    flow, checked = argument_module_flow()
    if dest in checked:
        return True
    return any(_read_in(files, field) for field in flow.get(dest, ()))


def used_flags() -> dict[tuple[str, str], list[str]]:
    """(script, dest) -> where the examples use it."""
    used: dict[tuple[str, str], list[str]] = {}
    for inv in ALL:
        actions = build_parser(inv.script)._option_string_actions
        for a in inv.argv:
            flag = a.split("=", 1)[0]
            if flag.startswith("--") and flag in actions:
                used.setdefault((inv.script, actions[flag].dest), []).append(f"{inv.where()} {flag}")
    return used


def test_every_flag_in_the_examples_is_read_by_the_script_it_is_given_to():
    unread = [f"{places[0]} (dest {dest!r}): nothing that {script}.py runs reads it"
              for (script, dest), places in sorted(used_flags().items()) if not flag_is_read(script, dest)]
    assert not unread, "\n".join(unread)


def test_the_read_check_can_fail():
    """A dest that appears nowhere, and a compat flag no code reads, are unread; a flag read only through the
    config its parser module builds is read where that config field is."""
    assert not flag_is_read("posttrain_gpt", "no_such_flag_anywhere")
    assert not flag_is_read("posttrain_gpt", "use_mcore_models")  # accepted for MindSpeed-LLM scripts: always on
    # read by preprocessing code, which inference.py does not run
    assert flag_is_read("preprocess_data", "handler_name") and not flag_is_read("inference", "handler_name")
    assert flag_is_read("posttrain_gpt", "stage") and flag_is_read("posttrain_gpt", "lr")
    flow, _ = argument_module_flow()
    assert "target_tp" in flow["target_tensor_parallel_size"]
    assert flag_is_read("convert_ckpt", "target_tensor_parallel_size")


def test_the_quickstart_runs_every_script():
    found = invocations(os.path.join(EXAMPLES, "mcore", "tiny", "quickstart.sh"))
    assert [inv.script for inv in found] == ["preprocess_data", "convert_ckpt", "posttrain_gpt", "convert_ckpt",
                                             "inference", "evaluation"]


# --------------------------------------------------------------------------------------- wrappers run in bash

_PRINTER = "#!/bin/sh\nprintf 'env ASCEND_RT_VISIBLE_DEVICES=%s HCCL_CONNECT_TIMEOUT=%s TOOLKIT=%s\\0' " \
           "\"$ASCEND_RT_VISIBLE_DEVICES\" \"$HCCL_CONNECT_TIMEOUT\" \"$FAKE_TOOLKIT_SOURCED\"\n" \
           "printf '%s\\0' \"$@\"\n"


def wrappers() -> list[str]:
    return [p for p in example_scripts() if os.path.dirname(p) != os.path.join(EXAMPLES, "mcore", "tiny")
            and p != LAUNCHER]


def run_wrapper(path: str, tmp, *args: str, fill_paths: bool = True, **env_overrides):
    """Run the wrapper with bash, python and torchrun replaced by a program that prints its argv (NUL-separated)
    and the NPU variables it sees; returns (process, launched command or None)."""
    printer = tmp / "print_argv"
    printer.write_text(_PRINTER)
    printer.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPUS_PER_NODE", "GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "ASCEND_RT_VISIBLE_DEVICES", "HCCL_CONNECT_TIMEOUT")}
    env.update(PYTHON=str(printer), TORCHRUN=str(printer), ASCEND_HOME=str(tmp / "no_ascend"))
    if fill_paths:
        for name, value in assigned_values(open(path).read()).items():
            if value.startswith("your "):
                env[name] = str(tmp / name.lower())
    env.update(env_overrides)
    proc = subprocess.run(["bash", path, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    launched = None
    if "\0" in proc.stdout:
        body = proc.stdout.split("\n", proc.stdout[: proc.stdout.index("\0")].count("\n"))[-1]
        launched = body.split("\0")[:-1]
    return proc, launched


@pytest.mark.parametrize("path", wrappers(), ids=lambda p: os.path.relpath(p, EXAMPLES))
def test_wrapper_launches_its_script_with_parsable_flags(path, tmp_path):
    proc, launched = run_wrapper(path, tmp_path)
    assert proc.returncode == 0 and launched, proc.stderr
    env_line, argv = launched[0], launched[1:]
    if not (shutil.which("npu-smi") or os.path.exists("/dev/davinci0")):
        assert env_line == "env ASCEND_RT_VISIBLE_DEVICES= HCCL_CONNECT_TIMEOUT= TOOLKIT="
    (static,) = invocations(path)
    if argv[0].startswith("--nproc-per-node"):
        expected_nproc = "2" if "/generate_" in path else "8"
        assert argv[:10] == ["--nproc-per-node", expected_nproc, "--nnodes", "1", "--node-rank", "0",
                             "--master-addr", "localhost", "--master-port", "6000"]
        argv = argv[10:]
    assert argv[0] == os.path.join(ROOT, f"{static.script}.py") and os.path.isfile(argv[0])
    _parse(Invocation(path, static.line, static.script, argv[1:]))
    log = tmp_path / "logs" / f"{os.path.basename(path)[:-3].replace('_ptd', '')}.log"
    assert log.is_file(), sorted(os.listdir(tmp_path / "logs"))


def test_placeholders_stop_a_wrapper_before_it_launches(tmp_path):
    path = os.path.join(EXAMPLES, "mcore", "qwen3", "tune_qwen3_8b_4K_lora_ptd.sh")
    proc, launched = run_wrapper(path, tmp_path, fill_paths=False)
    assert proc.returncode == 1 and launched is None
    for name in ("CKPT_LOAD_DIR", "CKPT_SAVE_DIR", "DATA_PATH"):
        assert f"error: set {name} at the top of {path}" in proc.stderr


def test_wrapper_arguments_multinode_and_npu_environment(tmp_path):
    path = os.path.join(EXAMPLES, "mcore", "qwen25", "tune_qwen25_7b_4K_lora_ptd.sh")
    _, launched = run_wrapper(path, tmp_path, "--tensorboard-dir", "tb dir", NNODES="2", NODE_RANK="1",
                              MASTER_ADDR="10.0.0.1", NPUS_PER_NODE="4")
    assert launched[1:11] == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1",
                              "--master-addr", "10.0.0.1", "--master-port", "6000"]
    assert launched[-2:] == ["--tensorboard-dir", "tb dir"]
    proc, launched = run_wrapper(path, tmp_path, NNODES="2")
    assert proc.returncode == 1 and launched is None and "needs MASTER_ADDR" in proc.stderr
    # an NPU machine: toolkit environment sourced, devices and HCCL timeout set
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "npu-smi").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "npu-smi").chmod(0o755)
    (tmp_path / "ascend" / "ascend-toolkit").mkdir(parents=True)
    (tmp_path / "ascend" / "ascend-toolkit" / "set_env.sh").write_text("export FAKE_TOOLKIT_SOURCED=yes\n")
    _, launched = run_wrapper(path, tmp_path, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                              ASCEND_HOME=str(tmp_path / "ascend"), NPUS_PER_NODE="4")
    assert launched[0] == "env ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 HCCL_CONNECT_TIMEOUT=1800 TOOLKIT=yes"

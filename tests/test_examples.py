"""The examples run as a user runs them (a subprocess, the embedded default model): the scripts in
examples/ and the shell examples of README.md and docs/*.md."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from surgery.cli import build_parser
from tests.helpers import ROOT


@pytest.mark.real
def test_prune_and_generate(tmp_path: Path, surgery_cache: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prune_and_generate.py"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "30 -> 28 layers" in done.stdout
    # Dropping layers 12-13 keeps SmolLM2's answer (measured; dropping 10-11 or 16-17 does not).
    assert "Paris" in done.stdout
    assert "layers: 0-11,14-29" in (tmp_path / "out" / "surgery-recipe.yaml").read_text()  # the written model is the pruned one


# ------------------------------------------------------------------------ the docs' shell examples
#
# Every `surgery ...` command in a shell code block of README.md and docs/*.md (```bash, ```console,
# and unlabelled blocks of `$ ` lines) is collected. Each one must parse with the CLI's own parser
# (placeholders such as MODEL or OUT are arguments like any other), so a renamed or removed option
# fails here. Those that run offline in a few seconds are run too, in their block's order in a
# fresh directory: the writing verbs and `inspect` on the embedded default model or on what an
# earlier command of the same block wrote. Measuring, training, exporting and pushing commands
# (validate, analyze, sweep, heal, export-onnx, generate, push, --validate, --onnx, --push-to-hub, --to-layers)
# take minutes or need the Hub, and so do commands naming an input no block writes (a placeholder
# in capitals, `./dir`, a Hub repo id): those are only parsed. A `$ ` command in a console block
# must print what the block shows after it: a `surgery: error:` line exactly, on stderr with exit 2;
# other lines (except elisions, `...`) on stdout, in any order.

DOC_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
_FENCE = re.compile(r"^\s*```\s*([\w-]*)")
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_SLOW_VERBS = {"validate", "analyze", "sweep", "heal", "export-onnx", "generate", "push"}
_SLOW_FLAGS = {"--validate", "--onnx", "--push-to-hub", "--to-layers"}


@dataclass(frozen=True)
class DocCommand:
    """One `surgery ...` command of a shell block, with the output its console block shows."""

    where: str  # FILE:LINE
    block: str  # FILE:LINE of the block's opening fence
    text: str
    expected: tuple[str, ...] = ()


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def _block_commands(name: str, fence_line: int, lang: str, lines: list[tuple[int, str]]) -> list[DocCommand]:
    console = lang == "console" or (lang in ("", "text") and any(t.startswith("$ ") for _, t in lines))
    if not console and lang not in ("bash", "sh", "shell"):
        return []
    block = f"{name}:{fence_line}"
    found: list[DocCommand] = []
    if console:
        current: tuple[int, str] | None = None
        output: list[str] = []

        def flush() -> None:
            if current is not None and current[1].startswith("surgery "):
                found.append(DocCommand(f"{name}:{current[0]}", block, current[1], tuple(output)))

        for number, text in lines:
            if text.startswith("$ "):
                flush()
                current, output = (number, _strip_comment(text[2:])), []
            elif current is not None:
                output.append(text.rstrip())
        flush()
        return found
    joined: list[tuple[int, str]] = []  # backslash continuations joined
    for number, text in lines:
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + text.strip())
        else:
            joined.append((number, text.strip()))
    for number, text in joined:
        if text.startswith("#"):
            continue
        for part in _strip_comment(text).split("&&"):
            if part.strip().startswith("surgery "):
                found.append(DocCommand(f"{name}:{number}", block, part.strip()))
    return found


def doc_commands(files: tuple[Path, ...] = DOC_FILES) -> list[DocCommand]:
    """Every `surgery` command in the shell blocks of ``files``, in order."""
    found: list[DocCommand] = []
    for path in files:
        name = path.relative_to(ROOT).as_posix()
        fence: tuple[int, str] | None = None
        lines: list[tuple[int, str]] = []
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = _FENCE.match(text)
            if match and fence is None:
                fence, lines = (number, match.group(1).lower()), []
            elif text.strip().startswith("```") and fence is not None:
                found += _block_commands(name, fence[0], fence[1], lines)
                fence = None
            elif fence is not None:
                lines.append((number, text))
    return found


def _argv(command: DocCommand) -> list[str]:
    """The arguments after `surgery`: optional `[--...]` parts and redirects dropped, `a|b` choices taken as `a`."""
    text = command.text
    while (shorter := re.sub(r"\s\[--[^\[\]]*\]", "", text)) != text:
        text = shorter
    argv = shlex.split(text)[1:]
    argv = argv[:next((i for i, arg in enumerate(argv) if arg in (">", ">>", "|", "&&")), len(argv))]  # a redirect
    return [arg.split("|")[0] if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", arg) else arg for arg in argv]


def _inputs(args: argparse.Namespace) -> list[str]:
    """The existing paths a parsed command reads."""
    if args.verb in ("prune", "repeat", "reorder", "apply", "parallel"):
        recipe = [args.recipe] if getattr(args, "recipe", None) else []
        return (args.paths[:1] if len(args.paths) == 2 else []) + recipe
    if args.verb == "inspect":
        return [args.model] if args.model else []
    if args.verb == "update-code":
        return [args.out]
    return []


def _runnable(command: DocCommand, written: set[str]) -> bool:
    argv = _argv(command)
    if not argv or argv[0] in _SLOW_VERBS or _SLOW_FLAGS & set(argv):
        return False
    if any(_PLACEHOLDER.match(arg) or arg == "..." for arg in argv):
        return False
    args = build_parser().parse_args(argv)
    return all(path == "default" or path.rstrip("/").split("/surgery-recipe.yaml")[0] in written
               for path in _inputs(args))


def _runnable_blocks() -> list[list[DocCommand]]:
    blocks: dict[str, list[DocCommand]] = {}
    for command in doc_commands():
        blocks.setdefault(command.block, []).append(command)
    runnable = []
    for commands in blocks.values():
        written: set[str] = set()
        selected = []
        for command in commands:
            if _runnable(command, written):
                selected.append(command)
                args = build_parser().parse_args(_argv(command))
                if args.verb in ("prune", "repeat", "reorder", "apply", "parallel") and not args.dry_run and args.paths:
                    written.add(args.paths[-1].rstrip("/"))
        if selected:
            runnable.append(selected)
    return runnable


def test_docs_hold_shell_examples() -> None:
    """The collector finds the examples (a change of fence style would silently run nothing)."""
    commands = doc_commands()
    files = {command.where.split(":")[0] for command in commands}
    assert "README.md" in files and any(name.startswith("docs/") for name in files), files
    assert sum(len(block) for block in _runnable_blocks()) >= 5


@pytest.mark.parametrize("command", doc_commands(), ids=lambda c: c.where)
def test_documented_command_parses(command: DocCommand, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        build_parser().parse_args(_argv(command))
    except SystemExit:
        pytest.fail(f"{command.where}: `{command.text}` does not parse: {capsys.readouterr().err.strip()}")


@pytest.mark.real
@pytest.mark.parametrize("block", _runnable_blocks(), ids=lambda b: b[0].block)
def test_documented_commands_run(block: list[DocCommand], tmp_path: Path, surgery_cache: Path) -> None:
    for command in block:
        done = subprocess.run(
            [sys.executable, "-m", "surgery.cli", *_argv(command)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        expected = [line for line in command.expected if line.strip() and "..." not in line]
        if expected and expected[0].startswith("surgery: error:"):
            assert (done.returncode, done.stderr.strip()) == (2, "\n".join(expected)), command.where
            continue
        assert done.returncode == 0, f"{command.where}: `{command.text}`\n{done.stderr[-2000:]}"
        printed = {line.rstrip() for line in done.stdout.splitlines()}
        missing = [line for line in expected if line not in printed]
        assert not missing, f"{command.where}: `{command.text}` did not print {missing}\n{done.stdout[-2000:]}"

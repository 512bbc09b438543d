"""The shell commands written in README.md and docs/*.md, where each is written.

A command is a line of a ```bash block (a line ending in a backslash joined to the next; `&&`
and `|` separate commands) or inline code that starts with `python ` or `bash `. Inline code
with a placeholder (`<name>`, `[...]`, `...`) is a synopsis of a command's form, not a
command, and is left out; so is a module named without arguments (`python -m
qwen_jax.serve`, the name of a program in prose).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_SYNOPSIS = re.compile(r"<\w|\[|\.\.\.")


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE
    argv: tuple[str, ...]
    text: str  # the whole line it came from, as written

    @property
    def program(self) -> str:
        """`train.py`, `-m qwen_jax.generate`, `bench/serve.py`, `curl`, ..."""
        a = self.argv
        if a[0] in ("python", "python3"):
            return f"-m {a[2]}" if a[1] == "-m" else a[1]
        return a[0]

    @property
    def args(self) -> list[str]:
        a = list(self.argv)
        if a[0] in ("python", "python3"):
            return a[3:] if a[1] == "-m" else a[2:]
        return a[1:]


def _split(line: str) -> list[list[str]]:
    """The simple commands of a shell line (comments dropped; `&&` and `|` split it)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in ("|", "&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def _ansi_c(line: str) -> str:
    """bash's $'...' strings (a prompt with newlines) as plain single-quoted text."""
    return re.sub(r"\$'((?:[^'\\]|\\.)*)'", lambda m: shlex.quote(
        m.group(1).encode().decode("unicode_escape")), line)


def commands(documents=DOCUMENTS) -> list[Command]:
    out = []
    for path in documents:
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        blocks = []
        for block in _BLOCK.finditer(text):
            blocks.append(block.span())
            if block.group(1) not in ("bash", "sh", "shell"):
                continue
            first = text.count("\n", 0, block.start(2)) + 1
            lines = block.group(2).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                i += 1
                for argv in _split(_ansi_c(line)):
                    out.append(Command(f"{name}:{first + start}", tuple(argv), line.strip()))
        prose = _blank(text, blocks)
        for span in _INLINE.finditer(prose):
            code = " ".join(span.group(1).split())
            if not re.match(r"(python3?|bash) ", code) or _SYNOPSIS.search(code):
                continue
            for argv in _split(_ansi_c(code)):
                if argv[1:2] != ["-m"] or len(argv) > 3:
                    line = text.count("\n", 0, span.start()) + 1
                    out.append(Command(f"{name}:{line}", tuple(argv), code))
    return out


def _blank(text: str, spans) -> str:
    """`text` with the given spans replaced by spaces and newlines (positions kept)."""
    parts, last = [], 0
    for s, e in spans:
        parts.append(text[last:s])
        parts.append(re.sub(r"[^\n]", " ", text[s:e]))
        last = e
    parts.append(text[last:])
    return "".join(parts)


def find(program: str, *contains: str, documents=DOCUMENTS) -> Command:
    """The one command of `program` whose line contains every string of `contains`; a test
    that runs a documented command takes it from here, so that the document and the test
    cannot drift apart."""
    found = [c for c in commands(documents)
             if c.program == program and all(s in c.text for s in contains)]
    assert found, f"no {program} command with {contains} in the documents"
    texts = {c.text for c in found}
    assert len(texts) == 1, f"several {program} commands with {contains}: {sorted(texts)}"
    return found[0]


def section(path: pathlib.Path, heading: str) -> list[Command]:
    """The commands under the heading `heading` (e.g. "## A tour") of one document, in
    order, up to the next heading of that level or above."""
    lines = path.read_text().split("\n")
    level = heading.split(" ")[0]
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")
                and len(lines[i].split(" ")[0]) <= len(level)), len(lines))
    name = path.relative_to(ROOT).as_posix()
    return [c for c in commands([path])
            if c.where.split(":")[0] == name and start < int(c.where.split(":")[1]) <= end]

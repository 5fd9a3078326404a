"""The docs cannot drift: every relative link and image in the README and docs/ resolves
(anchors included), every `ldmkit ...` command the README shows parses with the real CLI
parser and config loader (nothing runs), every `make` target it names exists, and the
config reference is what the dataclasses generate. Reads files only; under a second."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from ldmkit import config
from ldmkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
         ROOT / "BENCHMARKS.md", ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMG_TAG = re.compile(r"<img[^>]*\ssrc=\"([^\"]+)\"")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block, read line by line as Markdown does."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the reference


def test_the_config_reference_is_what_config_py_generates():
    gen = _load_generator()
    assert gen.PAGE.read_text() == gen.render(), (
        "docs/config-reference.md is stale: run `make docs` "
        "(python scripts/gen_config_reference.py) and commit it")


def test_every_config_key_has_a_doc_and_appears_in_the_reference():
    page = (ROOT / "docs" / "config-reference.md").read_text()
    undocumented = []
    for name, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("doc", "").strip():
                undocumented.append(f"{name}.{f.name}")
            assert f"`{name}.{f.name}`" in page
    assert not undocumented, f"give these keys a doc= in config.py: {undocumented}"


def test_the_generator_formats_defaults_as_toml():
    gen = _load_generator()
    assert gen.toml_value([0, -1]) == "[0, -1]"
    assert gen.toml_value(True) == "true" and gen.toml_value("a b") == '"a b"'
    assert gen.allowed({"lo": 0.0, "hi": 1.0}) == "0 .. 1"
    assert gen.allowed({"choices": ("eps", "v")}) == '`"eps"`, `"v"`'
    assert gen.cell("a | b\n c") == "a \\| b c"


# ----------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text) + IMG_TAG.findall(text)


def test_slugs_follow_github():
    assert slug("Demo geometry: 64x64 / f = 8 vs 32x32 / f = 4") == \
        "demo-geometry-64x64--f--8-vs-32x32--f--4"
    assert slug("The suite (`make bench`)") == "the-suite-make-bench"


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


# ----------------------------------------------------------------------------- commands


def shown_commands(text: str) -> list[list[str]]:
    """Shell commands of a page as word lists: fenced bash blocks (continuations joined)
    and inline code, split at `&&`, `;` and `|`, comments dropped (but for `# = CMD`)."""
    lines = []
    for lang, block in fenced_blocks(text):
        if lang in ("", "bash", "sh", "console"):
            lines += block.replace("\\\n", " ").splitlines()
    lines += [span.strip("`") for span in CODE_SPAN.findall(FENCE.sub("", text))]
    # `make demo   # = ldmkit demo --out runs/demo`: what a target runs is shown too
    lines += [m.group(1) for line in lines if (m := re.search(r"#\s*=\s*([^#]+)", line))]
    out = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # a quote left open: a Python snippet's line, not a command
            assert "ldmkit " not in line, f"cannot split {line!r}"
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", "||", ";", "|"):
                out += [command] if command else []
                command = []
            else:
                command.append(word)
    return out


def ldmkit_argv(words: list[str]) -> list[str] | None:
    """The arguments after `ldmkit` (or `-m ldmkit.cli`), or None for another command."""
    for i, word in enumerate(words):
        if word == "ldmkit" and i == 0 or word in ("ldmkit.cli", "ldmkit") and i > 0 \
                and words[i - 1] == "-m":
            return words[i + 1:]
    return None


README_COMMANDS = [c for c in shown_commands((ROOT / "README.md").read_text())
                   if ldmkit_argv(c) is not None]
# docs/ pages: their bash blocks (a usage synopsis goes in a ```text block)
DOC_COMMANDS = [(page.name, c) for page in sorted((ROOT / "docs").glob("*.md"))
                for c in shown_commands("".join(
                    f"```bash\n{body}```\n" for lang, body in fenced_blocks(page.read_text())
                    if lang in ("bash", "sh", "console")))
                if ldmkit_argv(c) is not None]


def test_the_readme_and_docs_show_commands_to_check():
    assert len(README_COMMANDS) >= 5 and len(DOC_COMMANDS) >= 10


@pytest.mark.parametrize("command", README_COMMANDS, ids=" ".join)
def test_every_ldmkit_command_in_the_readme_parses(command, capsys):
    check_parses(command, capsys)


@pytest.mark.parametrize(("page", "command"), DOC_COMMANDS,
                         ids=[f"{p}: {' '.join(c)}" for p, c in DOC_COMMANDS])
def test_every_ldmkit_command_in_a_docs_code_block_parses(page, command, capsys):
    check_parses(command, capsys)


def check_parses(command: list[str], capsys) -> None:
    """`command`'s arguments pass the real parser, and its overrides the config loader."""
    argv = ldmkit_argv(command)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing (or of printing --help)
        assert exc.code == 0 and ("--help" in argv or "--version" in argv), (
            f"{command!r}: {capsys.readouterr().err.strip()}")
        return
    overrides = getattr(args, "overrides", None)
    if overrides is not None:  # the overrides name real keys with valid values
        cfg_file = getattr(args, "config", None)
        config.load_config(ROOT / cfg_file if cfg_file else None, overrides)


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {c[1] for c in shown_commands((ROOT / "README.md").read_text())
             if c[0] == "make" and len(c) > 1}
    assert named and named <= targets, named - targets

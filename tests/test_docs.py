"""The README and docs/*.md point at things that exist: every relative link (file, and #anchor
to a heading of the target), every `make` target, every repository path, every test named as
`test_x.py::test_name`, and every --flag given to a script of the repository (read from the
script's own --help)."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"(?ms)^```.*?^```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"(?m)^#{1,6} (.+?)\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
MAKE = re.compile(r"\bmake ([a-z][\w-]*)")
# Repository paths as the docs write them: a top-level folder, then a file or folder name.
REPO_PATH = re.compile(r"(?<![\w./-])((?:benchmarks|examples|tests|lstm_fused|csrc|docs)/"
                       r"[\w./-]*[\w/])")
TEST_NAME = re.compile(r"(test_\w+\.py)?::(test_\w+)")
SCRIPT_CALL = re.compile(r"((?:benchmarks|examples)/\w+\.py)([^`\n|]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The text outside fenced code blocks (whose `#` lines are comments, not headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(prose(read(path))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return frozenset(result)


def relative_links(path: Path):
    for target in LINK.findall(prose(read(path))):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        yield target


def link_problem(source: Path, target: str) -> str | None:
    file_part, _, anchor = target.partition("#")
    resolved = (source.parent / file_part).resolve() if file_part else source
    if not resolved.exists():
        return f"{target}: no such file {resolved}"
    if anchor:
        if resolved.suffix != ".md":
            return f"{target}: an anchor into a file that is not markdown"
        if anchor not in anchors(resolved):
            return f"{target}: no heading with anchor #{anchor} in {resolved.name}"
    return None


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_relative_link_resolves(doc):
    problems = [p for t in relative_links(doc) if (p := link_problem(doc, t))]
    assert not problems, "\n".join(problems)


@functools.cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"(?m)^([\w-]+):", read(ROOT / "Makefile")))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_make_target_exists(doc):
    named = set(MAKE.findall(read(doc)))
    assert named - make_targets() == set(), f"not in the Makefile: {named - make_targets()}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_repository_path_exists(doc):
    text = read(doc)
    missing = set()
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".")
        if "*" in path or "<" in path:
            continue
        if not (ROOT / path).exists():
            missing.add(path)
    assert not missing, f"named in {doc.name} but not in the repository: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_named_test_exists(doc):
    """`test_x.py::test_name`, and `::test_other` (later on the same line) for another test of
    the same file."""
    missing = set()
    for line in read(doc).splitlines():
        current = None
        for file, name in TEST_NAME.findall(line):
            current = file or current
            if current and not re.search(rf"(?m)^def {name}\(", read(ROOT / "tests" / current)):
                missing.add(f"{current}::{name}")
    assert not missing, f"named in {doc.name}, not defined: {sorted(missing)}"


@functools.cache
def script_flags(script: str) -> frozenset[str]:
    """The flags a script's argparse accepts, from its --help."""
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], check=False, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr}"
    return frozenset(FLAG.findall(result.stdout)) | {"--help"}


def script_calls(doc: Path):
    """(script, flags) for each command line in the doc that runs a script of the repository:
    lines of fenced code blocks and inline code spans."""
    text = read(doc)
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
    lines += INLINE_CODE.findall(prose(text))
    for line in lines:
        command = line.split("#", 1)[0]  # a shell comment is no part of the command
        for script, rest in SCRIPT_CALL.findall(command):
            flags = FLAG.findall(rest)
            if flags:
                yield script, flags


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_script_flag_exists(doc):
    unknown = set()
    for script, flags in script_calls(doc):
        assert (ROOT / script).exists(), f"{script} named in {doc.name} does not exist"
        unknown |= {f"{script} {flag}" for flag in flags if flag not in script_flags(script)}
    assert not unknown, f"flags in {doc.name} that the scripts do not accept: {sorted(unknown)}"


def test_the_checks_catch_a_broken_link_flag_target_and_test(tmp_path):
    """The checks above on a planted doc: each kind of mistake is found."""
    doc = tmp_path / "planted.md"
    doc.write_text("# Title\n\n[ok](#title) [gone](no_such_file.md) [bad anchor](#nowhere)\n")
    problems = [p for t in relative_links(doc) if (p := link_problem(doc, t))]
    assert len(problems) == 2, problems
    assert "--no-such-flag" not in script_flags("benchmarks/bench.py")
    assert "--sizes" in script_flags("benchmarks/bench.py")
    assert "no-such-target" not in make_targets() and "test" in make_targets()
    assert slug("Deploying: ONNX") == "deploying-onnx"
    assert slug("1. The math") == "1-the-math"

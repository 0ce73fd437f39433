"""Every relative link and #anchor in the docs a newcomer reads resolves, as GitHub renders them.

A link is checked where it points: a file or folder of the repository (that a clone has: not
ignored by git), and an anchor in the same page or in another Markdown page, against the
headings' slugs by GitHub's rules (lower case, punctuation other than ``-`` and ``_`` dropped,
each space a ``-``, a repeated slug ``-1``, ``-2``...) and explicit ``<a id>``/``<a name>``.
Code blocks and code spans are not Markdown: links and headings there are not read.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import ROOT

DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "clients" / "python" / "README.md",
    ROOT / "deploy" / "README.md",
    ROOT / "bench" / "README.md",
]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
# [text](target "title") and ![alt](target); the text may hold one level of brackets (a badge).
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+[\"'(][^)]*)?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"""<(?:a|img)\s[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")
# GitHub's line anchors in a file it shows as source.
LINE_ANCHOR = re.compile(r"^L\d+(?:C\d+)?(?:-L\d+(?:C\d+)?)?$")


@dataclass(frozen=True)
class Link:
    page: Path
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: ({self.target})"


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines outside fenced code blocks, with code spans blanked, numbered from 1."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        opening = FENCE.match(line)
        if fence is None:
            if opening:
                fence = opening.group(1)
                continue
        else:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        yield number, CODE_SPAN.sub(lambda m: "`" + " " * (len(m.group(0)) - 2) + "`", line)


def heading_text(markdown: str) -> str:
    """The text GitHub renders for a heading's Markdown: links, images, emphasis and code marks gone."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", markdown)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "")
    text = re.sub(r"(\*{1,3})(\S(?:.*?\S)?)\1", r"\2", text)
    text = re.sub(r"(?<![^\W_])(_{1,3})(\S(?:.*?\S)?)\1(?![^\W_])", r"\2", text)  # not inside a word
    return text


def slug(text: str) -> str:
    """GitHub's slug of a heading's rendered text (github-slugger without the duplicate count)."""
    text = heading_text(text).strip().lower()
    return "".join(c if c in "-_" or c.isalnum() else "-" if c == " " else "" for c in text)


def raw_headings(text: str) -> Iterator[str]:
    """The heading texts, ATX and setext, in order, outside code."""
    previous = ""
    for line in _raw_prose(text):
        atx = HEADING.match(line)
        if atx:
            yield atx.group(2)
            previous = ""
            continue
        if previous.strip() and SETEXT.match(line) and not previous.lstrip().startswith(("-", "*", "|", ">")):
            yield previous.strip()
            previous = ""
            continue
        previous = line


def _raw_prose(text: str) -> Iterator[str]:
    """Lines outside fenced code, code spans kept (a heading's slug keeps their text)."""
    fence: str | None = None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None:
            if opening:
                fence = opening.group(1)
                continue
            yield line
        elif opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
            fence = None


@cache
def anchors(page: Path) -> frozenset[str]:
    """Every anchor GitHub gives ``page``: its headings' slugs, numbered when repeated, and HTML ids."""
    text = page.read_text(encoding="utf-8")
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in raw_headings(text):
        base = slug(heading)
        count = counts.get(base, 0)
        counts[base] = count + 1
        name = base if count == 0 else f"{base}-{count}"
        while name in found:  # GitHub skips a numbered slug that a heading already has
            count += 1
            counts[base] = count + 1
            name = f"{base}-{count}"
        found.add(name)
    for _, line in prose_lines(text):
        found.update(HTML_ANCHOR.findall(line))
    return frozenset(found)


def links(page: Path) -> Iterator[Link]:
    text = page.read_text(encoding="utf-8")
    for number, line in prose_lines(text):
        for pattern in (INLINE_LINK, REFERENCE, HTML_LINK):
            for match in pattern.finditer(line):
                target = match.group(1).strip("<>")
                if not EXTERNAL.match(target):
                    yield Link(page, number, target)


def broken(link: Link) -> str | None:
    """Why ``link`` does not resolve, or None."""
    path_part, _, anchor = link.target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    anchor = unquote(anchor)
    if path_part.startswith("/"):
        target = ROOT / path_part.lstrip("/")
    elif path_part:
        target = link.page.parent / path_part
    else:
        target = link.page
    target = Path(*target.parts)  # keeps ".." for the check below
    resolved = target.resolve()
    if not resolved.is_relative_to(ROOT.resolve()):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file or folder"
    if not anchor:
        return None
    if resolved.is_dir():
        return f"an anchor (#{anchor}) on a folder"
    if resolved.suffix.lower() == ".md":
        if anchor not in anchors(resolved):
            return f"{resolved.relative_to(ROOT.resolve())} has no anchor #{anchor}"
        return None
    if LINE_ANCHOR.match(anchor):
        return None
    return f"#{anchor} is not a line anchor of {resolved.name}"


ALL_LINKS = [link for page in DOCS for link in links(page)]


def test_the_pages_exist_and_have_links() -> None:
    for page in DOCS:
        assert page.is_file(), page
    assert len(ALL_LINKS) > 50, "the scanner found too few links: is it reading the pages?"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    problems = [f"{link}: {why}" for link in ALL_LINKS if link.page == page and (why := broken(link))]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_no_link_points_at_a_path_a_clone_does_not_have() -> None:
    """A linked file that exists here but git ignores (a build output, a local file) is broken on GitHub."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = set()
    for link in ALL_LINKS:
        path_part = unquote(link.target.partition("#")[0].split("?", 1)[0])
        if path_part:
            base = ROOT if path_part.startswith("/") else link.page.parent
            resolved = (base / path_part.lstrip("/")).resolve()
            if resolved.exists():
                paths.add(str(resolved.relative_to(ROOT.resolve())))
    result = subprocess.run(
        [git, "check-ignore", "--no-index", "--stdin"],
        input="\n".join(sorted(paths)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    assert not result.stdout.strip(), "links to paths git ignores:\n" + result.stdout


# The rules themselves, on the cases the docs meet.
@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("HTTP/REST", "httprest"),
        ("Triton's model API", "tritons-model-api"),
        ("`--weights random`: seeded", "--weights-random-seeded"),
        ("Errors and their codes", "errors-and-their-codes"),
        ("Fine-tuning (the `FineTuning` service)", "fine-tuning-the-finetuning-service"),
        ("A [link](docs/x.md) in *a* heading", "a-link-in-a-heading"),
        ("snake_case stays", "snake_case-stays"),
        ("max_batch_size and _emphasis_", "max_batch_size-and-emphasis"),
        ("Größe und Ähnliches", "größe-und-ähnliches"),
        ("1.  two  spaces", "1--two--spaces"),
    ],
)
def test_slug_follows_githubs_rules(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_repeated_headings_and_explicit_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Setup\n\n## Setup\n\ntext\n\nSetup\n-----\n\n```\n# Not a heading\n```\n"
        '<a id="kept"></a> and <a name="also-kept"></a>\n`<a id="in-code"></a>`\n',
        encoding="utf-8",
    )
    assert anchors(page) == {"setup", "setup-1", "setup-2", "kept", "also-kept"}


def test_links_in_code_are_not_read_and_a_broken_one_is_found(tmp_path: Path) -> None:
    page = ROOT / "docs" / "operations.md"  # a real page, to resolve against the real tree
    fake = Link(page, 1, "protocol.md#http-rest")
    assert broken(fake) == "docs/protocol.md has no anchor #http-rest"
    assert broken(Link(page, 1, "protocol.md#httprest")) is None
    assert broken(Link(page, 1, "no-such-page.md")) == "no such file or folder"
    assert broken(Link(page, 1, "../service/")) is None
    assert broken(Link(page, 1, "../service/host/files.py#L10-L20")) is None
    assert broken(Link(page, 1, "#not-a-heading-here")) is not None
    assert broken(Link(page, 1, "../../outside.md")) == "points outside the repository"
    sample = tmp_path / "sample.md"
    sample.write_text(
        "See [a](one.md), ![b](img.png 'title'), [c]: ref.md\n"
        "```\n[in a fence](fence.md)\n```\n"
        '`[in a span](span.md)` and <a href="html.md">x</a> and [web](https://example.com/x.md)\n'
        "[ref]: <spaced.md>\n",
        encoding="utf-8",
    )
    assert [link.target for link in links(sample)] == ["one.md", "img.png", "html.md", "spaced.md"]


def test_operations_lists_every_store_error_reason() -> None:
    """docs/operations.md's table of ``vision_store_errors_total`` reasons is StoreReason's list."""
    from service.finetune.store import StoreReason

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    table = text.partition("| reason | the entry |")[2].partition("\n\n")[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))
    counted = {reason.value for reason in StoreReason if reason.counted}
    assert documented == counted, f"missing: {counted - documented}, not reasons: {documented - counted}"

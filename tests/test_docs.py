"""The documentation's links stay inside the repository and lead somewhere.

Every Markdown link or image in ``README.md``, ``docs/*.md`` and ``benchmarks/*.md`` is either a web address or
a relative path to a file of this repository (a ``#fragment`` must name a heading of its target), so a clone read
on its own, or on GitHub, has no dead link and none into the folders around it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
WEB = ("http://", "https://", "mailto:")

FENCED_CODE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without code, where ``](...)`` may be Python rather than a link."""
    return INLINE_CODE.sub("", FENCED_CODE.sub("", text))


def links(document: Path) -> list[str]:
    return LINK.findall(prose(document.read_text(encoding="utf-8")))


def anchors(document: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    found: set[str] = set()
    repeats: dict[str, int] = {}
    for heading in HEADING.findall(FENCED_CODE.sub("", document.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        seen = repeats.get(slug, 0)
        repeats[slug] = seen + 1
        found.add(f"{slug}-{seen}" if seen else slug)
    return found


def broken_links(document: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each link of ``document`` that is not a web address."""
    broken = []
    for target in links(document):
        if target.startswith(WEB):
            continue
        path, _, fragment = target.partition("#")
        if path.startswith(("/", "~", "file:")) or re.match(r"^[A-Za-z]:[\\/]", path):
            broken.append(f"{target}: an absolute path; link relative to the document's folder")
            continue
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.is_relative_to(root):
            broken.append(f"{target}: outside the repository; cite the source in the text instead")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: {resolved.relative_to(root)} has no heading #{fragment}")
    return broken


def test_the_documents_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in DOCUMENTS}
    assert {"README.md", "docs/guide.md", "docs/tour.md", "docs/performance.md", "benchmarks/HISTORY.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_links_stay_in_the_repository_and_resolve(document: Path):
    broken = broken_links(document)
    assert not broken, f"{document.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_the_check_finds_each_kind_of_broken_link(tmp_path: Path):
    repository = tmp_path / "repository"
    (repository / "docs").mkdir(parents=True)
    (repository / "docs" / "there.md").write_text("# Here\n\n## Here\n")
    page = repository / "docs" / "page.md"
    page.write_text(
        "[ok](there.md#here-1) [ok](#a-code-heading-1) [ok](https://arxiv.org/abs/1706.03762)\n"
        "[up](../../outside.md) [abs](/etc/hosts) [gone](missing.md) [anchor](there.md#nowhere)\n"
        "`[code](not-a-link)`\n\n```\n[code](nor-this)\n```\n## A `code` heading: §1\n"
    )
    assert anchors(page) == {"a-code-heading-1"}
    assert [problem.split(":")[0] for problem in broken_links(page, repository)] == [
        "../../outside.md",
        "/etc/hosts",
        "missing.md",
        "there.md#nowhere",
    ]

"""The documentation holds together: every results folder is in the index, and every path and link that
README.md and docs/*.md name exists. Reads text only: no model, no network, well under a second."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
INDEX = RESULTS / "README.md"
# top-level folders whose paths a document may name, relative to the repository root
PREFIXES = ("docs", "plans", "tools", "tests", "examples", "runtime", "compiler", "src", "benchmarks", "experiments")


def _documents():
    docs = [ROOT / "README.md", ROOT / "README.draft.md", *sorted(DOCS.glob("*.md")), INDEX]
    return [d for d in docs if d.exists()]


# a path as a token: not preceded by a word character, '/', '.', '-' or '$' (so not inside a URL, `OUT/plans/...`
# or `qra/plans`), one of the prefixes, then path characters
PATH = re.compile(r"(?<![\w/.\-$~])((?:%s)/[\w./*?\-<>]*)" % "|".join(PREFIXES))
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for match in HEADING.finditer(FENCE.sub("", doc.read_text())):
        slug = _slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _exists(path: str) -> bool:
    """A repository path exists; a glob matches something; a `<placeholder>` path has its folder."""
    path = path.rstrip(".,:;")
    if "<" in path:
        return (ROOT / path.split("<", 1)[0]).exists()
    if any(c in path for c in "*?"):
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def broken_references(doc: Path) -> list[str]:
    """Every path (named anywhere in the text, code included) and relative link of `doc` that does not exist."""
    text = doc.read_text()
    broken = []
    for match in PATH.finditer(text):
        path = match.group(1)
        if not _exists(path):
            broken.append(f"path {path}")
    for match in LINK.finditer(FENCE.sub("", text)):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        where = (doc.parent / file).resolve() if file else doc
        if not where.exists():
            broken.append(f"link {target}")
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            broken.append(f"link {target} (no such heading)")
    return broken


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: str(d.relative_to(ROOT)))
def test_named_paths_and_links_exist(doc):
    assert broken_references(doc) == []


def test_every_results_folder_is_in_the_index():
    """docs/results/README.md links every folder of docs/results, and docs/results holds folders and its index only."""
    index = INDEX.read_text()
    linked = {target.split("/")[0] for target in LINK.findall(index) if not target.startswith(("#", "http"))}
    folders = sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
    assert [f for f in folders if f not in linked] == []
    assert sorted(p.name for p in RESULTS.iterdir() if p.is_file()) == ["README.md"]


def test_slugs_follow_github():
    assert _slug("GGUF for llama.cpp and Ollama: the model that was trained") == (
        "gguf-for-llamacpp-and-ollama-the-model-that-was-trained")
    assert _slug("Past one machine: Ray workers") == "past-one-machine-ray-workers"
    assert _slug("What `qra compile` does") == "what-qra-compile-does"

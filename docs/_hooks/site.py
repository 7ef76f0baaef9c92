"""MkDocs hooks (mkdocs.yml ``hooks:``): files written once, outside docs/, on the site as they are.

- The home page is ``README.md`` (``docs/index.md`` is a placeholder), its ``docs/...`` links made
  relative to the site.
- ``benchmarks/results/`` (the run's pages and charts) and ``benchmarks/README.md`` are pages of
  the site at the same paths, so a docs page links them as ``../benchmarks/results/latest.md``,
  which works on GitHub too; in the site that link is made ``benchmarks/results/latest.md``.
- The slot between ``<!-- benchmarks-summary: start`` and ``<!-- benchmarks-summary: end -->``
  in ``docs/benchmarks.md`` is replaced by ``benchmarks/results/summary.md`` when that file
  exists (``python -m benchmarks.summary`` writes it), its headings one level down. Its links
  may be relative to the repository's root (``benchmarks/results/latest.md``, as the site has
  them too) or to ``benchmarks/results/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
SUMMARY = ROOT / RESULTS / "summary.md"

_REPO_LINK = re.compile(r"\]\(\.\./(benchmarks/[^)\s]*)\)")
_SLOT = re.compile(r"<!-- benchmarks-summary: start.*?-->.*?<!-- benchmarks-summary: end -->", re.DOTALL)
# A link of the summary's that is relative to benchmarks/results/ (those relative to the
# repository's root, benchmarks/..., are right as they are: the site has the same paths).
_RELATIVE = re.compile(r"(\]\(|\bsrc=\")(?!https?:|mailto:|#|/|benchmarks/)([^)\"\s]+)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def on_files(files: Files, config: Any) -> Files:
    def add(path: str, dest_uri: str | None = None) -> None:
        files.append(
            File(
                path,
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
                dest_uri=dest_uri,
            )
        )

    for item in sorted((ROOT / RESULTS).iterdir()):
        if item.suffix in (".md", ".png", ".svg") and item.name != "summary.md":
            add(f"{RESULTS}/{item.name}")
    # Not benchmarks/index.html: that is docs/benchmarks.md's page.
    add("benchmarks/README.md", dest_uri="benchmarks/harness/index.html")
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    src = page.file.src_uri
    if src == "index.md":
        return re.sub(r"\]\(docs/", "](", (ROOT / "README.md").read_text("utf-8"))
    if src.startswith("benchmarks/"):
        return markdown
    markdown = _REPO_LINK.sub(r"](\1)", markdown)
    if src == "benchmarks.md" and SUMMARY.is_file():
        summary = _in_page(SUMMARY.read_text("utf-8"))
        markdown = _SLOT.sub(lambda _: summary, markdown)
    return markdown


def _in_page(text: str) -> str:
    """The summary as part of docs/benchmarks.md: links relative to it, headings one level down."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            line = _RELATIVE.sub(lambda m: f"{m[1]}{RESULTS}/{m[2]}", line)
            if line.startswith("#"):
                line = "#" + line
        lines.append(line)
    return "\n".join(lines)

"""Text from a dropped file, for ``Collection.add_document``: .txt and .md as they are,
.html/.htm as the text a reader sees (tags dropped, script/style/template content
skipped, entities decoded, block elements on their own lines).

Bytes are decoded as UTF-8 (a BOM is dropped), or UTF-16 when a UTF-16 BOM says so;
undecodable bytes become U+FFFD rather than failing the file. Line ends become "\\n". The
offsets of chunks refer to this text (for HTML, not to the markup).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from tabmesh.rag.store import CollectionError

__all__ = ["SUPPORTED_SUFFIXES", "MAX_FILE_BYTES", "document_text", "html_to_text"]

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
MAX_FILE_BYTES = 64 * 1024 * 1024

_SKIP = {"script", "style", "template", "noscript", "head"}
_BLOCK = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt",
          "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
          "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "td",
          "th", "tr", "ul", "title"}


def document_text(filename: str, data: bytes) -> str:
    """The text of a dropped file; CollectionError for another type or a file too big."""
    name = filename.lower()
    suffix = next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise CollectionError(f"{filename!r}: only {', '.join(SUPPORTED_SUFFIXES)} files can be "
                              "added (save other documents as text first)")
    if len(data) > MAX_FILE_BYTES:
        raise CollectionError(f"{filename!r} is {len(data)} bytes; files up to "
                              f"{MAX_FILE_BYTES // 2**20} MiB can be added")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = data.decode("utf-16", errors="replace")
    else:
        text = data.decode("utf-8-sig", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return html_to_text(text) if suffix in (".html", ".htm") else text


class _TextOf(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n")
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")
        self.pre -= tag == "pre" and self.pre > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The visible text of an HTML document (see the module docstring)."""
    parser = _TextOf()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()

"""Document loaders: .txt, .md, .html (stdlib html.parser, scripts/styles dropped), .pdf (pypdf).

Each file becomes one `Document` whose `doc_id` is its path relative to the folder (stable across
runs, so re-indexing a folder updates documents in place) and whose `source` is the path itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import LLMKitError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + (".pdf",)


@dataclass
class Document:
    doc_id: str
    text: str
    source: str
    meta: dict = field(default_factory=dict)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: <script>/<style>/<noscript> bodies dropped, block tags -> newlines."""

    SKIP = {"script", "style", "noscript", "template"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
             "blockquote", "table", "ul", "ol", "header", "footer", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")
        self._in_title = False

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)
            if self._in_title:
                self.title += data


def html_to_text(html: str) -> tuple[str, str]:
    """-> (visible text with paragraphs on their own lines, <title>)."""
    p = _HTMLText()
    p.feed(html)
    p.close()
    lines = [" ".join(line.split()) for line in "".join(p.parts).splitlines()]
    text, blank = [], False
    for line in lines:  # squeeze runs of empty lines to one paragraph break
        if line:
            text.append(line)
            blank = False
        elif not blank and text:
            text.append("")
            blank = True
    return "\n".join(text).strip(), p.title.strip()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")


def pdf_text(path: Path) -> tuple[str, int]:
    """-> (text of every page, joined by blank lines; page count). A corrupt PDF is an LLMKitError."""
    try:
        from pypdf import PdfReader
    except ImportError:
        raise LLMKitError(f"reading {path} needs pypdf: pip install 'llmkit[rag]'") from None
    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types (PdfReadError, ValueError, KeyError...) on bad files
        msg = next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise LLMKitError(f"{path} is not a readable PDF ({msg})") from None
    return "\n\n".join(p.strip() for p in pages), len(pages)


def load_file(path: str | Path, doc_id: str | None = None) -> Document:
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            text, meta = _read_text(p), {"type": suffix.lstrip(".")}
        elif suffix in HTML_SUFFIXES:
            text, title = html_to_text(_read_text(p))
            meta = {"type": "html", "title": title}
        elif suffix == ".pdf":
            text, pages = pdf_text(p)
            meta = {"type": "pdf", "pages": pages}
        else:
            raise LLMKitError(f"{p}: unsupported document type {suffix or '(none)'}; "
                              f"supported: {', '.join(SUFFIXES)}")
    except OSError as e:
        raise LLMKitError(f"cannot read {p}: {e.strerror or e}") from None
    return Document(doc_id or p.name, text, str(p), meta)


def load_folder(folder: str | Path) -> list[Document]:
    """Every supported file under `folder` (recursively, sorted), doc_id = its relative path.
    An empty, missing or unreadable folder, or one with no supported files, is an LLMKitError."""
    root = Path(folder)
    if not root.is_dir():
        raise LLMKitError(f"document folder {root} does not exist or is not a folder")
    try:
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(root).parts))
    except OSError as e:
        raise LLMKitError(f"cannot read document folder {root}: {e.strerror or e}") from None
    if not files:
        raise LLMKitError(f"document folder {root} holds no {', '.join(SUFFIXES)} files")
    docs = [load_file(f, f.relative_to(root).as_posix()) for f in files]
    if not any(d.text.strip() for d in docs):
        raise LLMKitError(f"the documents in {root} hold no text")
    return docs

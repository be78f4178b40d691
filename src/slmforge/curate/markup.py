"""Text out of HTML, for documents of a web dump that still carry their markup (`<p>...</p>`,
`<div class="post">`, entities): without this, the tags' `< > / = "` make the quality stage drop the
whole document as symbols.

No extractor library is needed (trafilatura, inscriptis and readability are not among datatrove's
dependencies): Python's `html.parser` reads the markup, tolerant of unclosed and misnested tags. The
text of every element is kept except that of script, style, noscript, template, svg, head and
comments (boilerplate such as navigation is left to the quality and dedup stages); entities are
unescaped; whitespace inside the text collapses as a browser collapses it (line breaks inside <pre>
stay); block elements (p, div, li, headings, table rows, br, ...) end a line, paragraphs and headings a
paragraph (a blank line), so the result reads like the page.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Tags that say "this is HTML": seeing `min_tags` of them (opening, closing or self-closing) or a
# doctype / <html> marks a document as HTML. Ordinary text rarely writes `<p>` or `</div>`; a lone
# `<b>` in a sentence about markup stays text unless `min_tags` is 1.
KNOWN_TAGS = ("a|abbr|address|article|aside|b|blockquote|body|br|button|caption|center|code|dd|div|dl|dt|em|"
              "figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|label|li|link|"
              "main|meta|nav|noscript|ol|option|p|pre|script|section|select|small|span|strong|style|sub|sup|"
              "table|tbody|td|textarea|tfoot|th|thead|title|tr|u|ul")
_TAG = re.compile(rf"</?(?:{KNOWN_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_DOCUMENT = re.compile(r"<!doctype\s+html|<html[\s>]", re.IGNORECASE)

_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head", "math"})
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl",
                        "figure", "hr"})
_LINE = frozenset({"br", "div", "li", "tr", "dd", "dt", "section", "article", "header", "footer", "nav", "main",
                   "aside", "form", "address", "caption", "figcaption", "title", "option", "center", "body",
                   "html", "tbody", "thead", "tfoot", "textarea"})
_CELL = frozenset({"td", "th"})
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track",
                   "wbr", "param"})
_SPACES = re.compile(r"[ \t\r\n\f\v]+")  # HTML's whitespace only: NBSP and other spaces are text


def looks_like_html(text: str, min_tags: int = 2) -> bool:
    """Whether `text` holds markup: a doctype or <html>, or at least `min_tags` known HTML tags."""
    if "<" not in text:
        return False
    if _DOCUMENT.search(text):
        return True
    count = 0
    for _ in _TAG.finditer(text):
        count += 1
        if count >= min_tags:
            return True
    return False


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str | int] = []  # text, or a break: 1 = end of line, 2 = end of paragraph
        self.skipping: list[str] = []  # open elements whose text is dropped
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "body" and "head" in self.skipping:  # an unclosed <head> ends where <body> starts
            del self.skipping[self.skipping.index("head"):]
        if tag in _SKIP:
            if tag not in _VOID:
                self.skipping.append(tag)
            return
        if self.skipping:
            return
        if tag == "pre":
            self.pre += 1
        self._block(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if not self.skipping and tag not in _SKIP:
            self._block(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.skipping:
            del self.skipping[len(self.skipping) - 1 - self.skipping[::-1].index(tag):]
            return
        if self.skipping:
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag not in _VOID:
            self._block(tag)

    def _block(self, tag: str) -> None:
        if tag in _PARAGRAPH:
            self.out.append(2)
        elif tag in _LINE:
            self.out.append(1)
        elif tag in _CELL:
            self.out.append(" ")

    def handle_data(self, data: str) -> None:
        if self.skipping or not data:
            return
        if self.pre:  # its line breaks are the text's own
            first, *rest = data.split("\n")
            self.out.append(first)
            for line in rest:
                self.out += [1, line]
        else:
            self.out.append(_SPACES.sub(" ", data))

    def text(self) -> str:
        lines: list[str] = [""]
        pending = 0
        for piece in self.out:
            if isinstance(piece, int):
                pending = max(pending, piece)
            elif piece.strip(" "):
                if pending and lines != [""]:
                    lines += [""] * pending
                pending = 0
                lines[-1] += piece
            elif not pending:
                lines[-1] += piece
        cleaned = (_SPACES.sub(" ", line).strip(" ") for line in lines)
        return "\n".join(cleaned).strip("\n")


def html_to_text(text: str) -> str:
    """The readable text of an HTML document or fragment (see the module docstring)."""
    parser = _Extractor()
    parser.feed(text)
    parser.close()
    return parser.text()

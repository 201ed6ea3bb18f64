#!/usr/bin/env python3
"""Build the page-aligned parallel text set in this folder from the Debian
``debian-handbook`` package (The Debian Administrator's Handbook).

Usage::

    apt-get download debian-handbook          # debian-handbook_11.20220922_all.deb
    python benchmarks/data/parallel/build_parallel.py debian-handbook_11.20220922_all.deb

The .deb is read directly (ar archive -> data.tar.* via ``tarfile``), so
neither dpkg-deb nor an extraction step is needed; only the standard library
is used.  Given the same .deb the output files are reproduced byte for byte.

Steps (see SOURCES.md for the resulting counts):

1. Pages are the Publican HTML chunks under
   ``usr/share/doc/debian-handbook/html/<locale>/``, taken in reading order
   (the ``rel="next"`` chain starting at ``index.html``; ``index.html`` itself,
   the title page / legal notice / table of contents, is not used).
2. Plain text: ``html.parser`` walks each page; ``<head>``, scripts/styles,
   the banner, the top/bottom navigation bars (``docnav``), chapter tables of
   contents (``toc``), and code/console blocks (``<pre>``) are dropped.  Every
   block element (div, p, li, headings, table cells, ...) ends a paragraph;
   whitespace inside a paragraph is collapsed to single spaces; empty
   paragraphs are dropped; paragraphs are joined with ``\\n``.
3. Untranslated rule: for a page and a language, ``identical`` is the share
   of the English page's paragraph characters whose paragraph occurs verbatim
   in that language's page.  ``identical >= 0.60`` means the page is
   untranslated for that language.  A language with fewer than 60% of the
   candidate pages translated is dropped; then only pages translated in every
   kept language are used.
4. Taking those pages in reading order, whole pages are added until the
   English character total passes TARGET_EN_CHARS; the same pages are written
   for every language, in the same order, as ``<lang>.jsonl`` lines
   ``{"id": "<page name>", "text": "..."}``.

``--drop-untranslated-paragraphs`` (not used for the shipped files) is a
stricter mode: a page passing the rule above can still hold English
paragraphs left untranslated in some languages; this mode removes, from every
language, each paragraph (>= 40 chars) that any kept language left identical
to English, keeping only pages whose paragraph counts match English.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import re
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

HTML_ROOT = "usr/share/doc/debian-handbook/html"
# output code -> Publican locale folder; English first
LANGS = {
    "en": "en-US",
    "de": "de-DE",
    "fr": "fr-FR",
    "es": "es-ES",
    "it": "it-IT",
    "pt": "pt-BR",
    "ru": "ru-RU",
    "ja": "ja-JP",
    "zh": "zh-CN",
}
UNTRANSLATED_IDENTICAL = 0.60  # page untranslated if >= this share is identical to English
MIN_TRANSLATED_PAGES = 0.60  # drop a language translating fewer pages than this share
TARGET_EN_CHARS = 250_000  # take whole pages until the English total passes this

BLOCK_TAGS = {
    "address", "blockquote", "body", "caption", "dd", "div", "dl", "dt",
    "figcaption", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li",
    "ol", "p", "section", "table", "tbody", "td", "tfoot", "th", "thead",
    "tr", "ul", "br",
}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input",
             "link", "meta", "param", "source", "track", "wbr"}
SKIP_TAGS = {"head", "script", "style", "pre", "noscript"}
SKIP_IDS = {"banner", "title"}
SKIP_CLASSES = {"docnav", "toc"}
WS = re.compile(r"\s+")


# --------------------------------------------------------------------------- .deb reading

def read_deb_html(deb_path: Path) -> dict[str, dict[str, str]]:
    """Return {locale: {page file name: html text}} for the handbook's HTML."""
    data = deb_path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb_path}: not a .deb (ar) archive")
    pos, member = 8, None
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            member = (name, body)
            break
        pos += 60 + size + (size & 1)
    if member is None:
        raise SystemExit(f"{deb_path}: no data.tar member")
    name, body = member
    if name.endswith(".zst"):
        raise SystemExit("data.tar.zst is not supported by the standard library")
    if name.endswith(".xz"):
        body = lzma.decompress(body)
        mode = "r:"
    else:
        mode = "r:*"
    pages: dict[str, dict[str, str]] = {}
    wanted = set(LANGS.values())
    with tarfile.open(fileobj=io.BytesIO(body), mode=mode) as tar:
        for info in tar:
            if not info.isfile():
                continue
            path = info.name.lstrip("./")
            if not path.startswith(HTML_ROOT + "/"):
                continue
            parts = path[len(HTML_ROOT) + 1:].split("/")
            if len(parts) != 2 or parts[0] not in wanted or not parts[1].endswith(".html"):
                continue
            raw = tar.extractfile(info).read()
            pages.setdefault(parts[0], {})[parts[1]] = raw.decode("utf-8")
    return pages


# --------------------------------------------------------------------------- HTML -> text

class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, skipping from here on)
        self.paras: list[str] = []
        self.buf: list[str] = []

    def _skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def _flush(self) -> None:
        text = WS.sub(" ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.paras.append(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = (self._skipping() or tag in SKIP_TAGS or a.get("id") in SKIP_IDS
                or bool(classes & SKIP_CLASSES))
        if tag in BLOCK_TAGS and not self._skipping():
            self._flush()
        if tag not in VOID_TAGS:
            self.stack.append((tag, skip))

    def handle_startendtag(self, tag, attrs):
        if tag in BLOCK_TAGS and not self._skipping():
            self._flush()
        # self-closed elements (e.g. <a id=".."/>) hold no text: nothing to push

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        # pop to the matching open tag (tolerates unclosed inner tags)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in BLOCK_TAGS and not self._skipping():
            self._flush()

    def handle_data(self, data):
        if not self._skipping():
            self.buf.append(data)

    def close(self):
        super().close()
        self._flush()


def page_paragraphs(html: str) -> list[str]:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.paras


def reading_order(en_pages: dict[str, str]) -> list[str]:
    """Page names following rel="next" links from index.html (index excluded)."""
    order, seen, cur = [], {"index.html"}, "index.html"
    link = re.compile(r'<link rel="next" href="([^"#]+)"')
    while True:
        m = link.search(en_pages[cur])
        if not m or m.group(1) in seen or m.group(1) not in en_pages:
            break
        cur = m.group(1)
        seen.add(cur)
        order.append(cur)
    # any page not on the chain goes last, alphabetically
    order += sorted(set(en_pages) - seen)
    return order


def identical_share(en_paras: list[str], other_paras: list[str]) -> float:
    other = set(other_paras)
    total = sum(len(p) for p in en_paras)
    same = sum(len(p) for p in en_paras if p in other)
    return same / total if total else 1.0


# --------------------------------------------------------------------------- main

def build(deb_path: Path, out_dir: Path, report: bool = False,
          drop_untranslated_paragraphs: bool = False) -> dict:
    html = read_deb_html(deb_path)
    missing = [loc for loc in LANGS.values() if loc not in html]
    langs = {c: loc for c, loc in LANGS.items() if loc in html}
    if "en" not in langs:
        raise SystemExit("no en-US pages in the package")
    order = reading_order(html["en-US"])
    # pages present in every available language
    order = [p for p in order if all(p in html[loc] for loc in langs.values())]
    paras = {c: {p: page_paragraphs(html[loc][p]) for p in order} for c, loc in langs.items()}
    order = [p for p in order if paras["en"][p]]

    ident = {c: {p: identical_share(paras["en"][p], paras[c][p]) for p in order}
             for c in langs if c != "en"}
    translated_share = {c: sum(v < UNTRANSLATED_IDENTICAL for v in ident[c].values()) / len(order)
                        for c in ident}
    dropped = {c: translated_share[c] for c in ident if translated_share[c] < MIN_TRANSLATED_PAGES}
    kept = [c for c in langs if c not in dropped]
    usable = [p for p in order
              if all(ident[c][p] < UNTRANSLATED_IDENTICAL for c in kept if c != "en")]

    if drop_untranslated_paragraphs:
        # Optional stricter mode (off by default; the shipped files use the page rule only):
        # keep pages whose paragraph count matches English in every kept language, and
        # drop paragraph i from every language when English paragraph i (>= 40 chars)
        # reappears verbatim as paragraph i of any kept language.
        filtered = {}
        for p in usable:
            n = len(paras["en"][p])
            if any(len(paras[c][p]) != n for c in kept):
                continue
            keep = [i for i, x in enumerate(paras["en"][p])
                    if len(x) < 40 or not any(paras[c][p][i] == x for c in kept if c != "en")]
            filtered[p] = keep
        usable = [p for p in usable if p in filtered]
        for c in kept:
            for p in usable:
                paras[c][p] = [paras[c][p][i] for i in filtered[p]]

    chosen, en_total = [], 0
    for p in usable:
        if en_total > TARGET_EN_CHARS:
            break
        chosen.append(p)
        en_total += len("\n".join(paras["en"][p]))

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for c in kept:
        lines, chars, english = [], 0, 0
        for p in chosen:
            text = "\n".join(paras[c][p])
            chars += len(text)
            en_set = set(paras["en"][p])
            english += sum(len(x) for x in paras[c][p] if len(x) >= 40 and x in en_set)
            lines.append(json.dumps({"id": p[:-len(".html")], "text": text}, ensure_ascii=False))
        (out_dir / f"{c}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
        stats[c] = {"docs": len(chosen), "chars": chars,
                    "bytes": (out_dir / f"{c}.jsonl").stat().st_size,
                    # share of characters in paragraphs (>= 40 chars) identical to English ones
                    "english_identical_share": round(english / chars, 3) if c != "en" else None}

    info = {
        "missing_locales": missing,
        "candidate_pages": len(order),
        "translated_share": translated_share,
        "dropped": dropped,
        "kept": kept,
        "usable_pages": len(usable),
        "chosen": [p[:-len(".html")] for p in chosen],
        "stats": stats,
    }
    if report:
        untranslated = {c: [p for p in order if ident[c][p] >= UNTRANSLATED_IDENTICAL] for c in ident}
        info["untranslated"] = untranslated
        info["identical"] = {c: {p: round(v, 3) for p, v in ident[c].items()} for c in ident}
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deb", type=Path, help="path to debian-handbook_*_all.deb")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output folder (default: this script's folder)")
    ap.add_argument("--report", action="store_true",
                    help="also print per-page identical shares and untranslated pages")
    ap.add_argument("--drop-untranslated-paragraphs", action="store_true",
                    help="stricter, non-default mode: also drop, from every language, paragraphs "
                         "left in English by any kept language (the shipped files do not use it)")
    args = ap.parse_args(argv)
    info = build(args.deb, args.out, report=args.report,
                 drop_untranslated_paragraphs=args.drop_untranslated_paragraphs)
    if not args.report:
        info.pop("chosen")
    json.dump(info, sys.stdout, ensure_ascii=False, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

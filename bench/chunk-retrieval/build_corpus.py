#!/usr/bin/env python3
"""Rebuild docs.jsonl: library pages of the Python 3.11 documentation as plain text.

Source: the Debian package python3.11-doc (bookworm; pulled in by python3-doc), HTML under
/usr/share/doc/python3.11/html/library/. Without it installed:

    cd /tmp && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    bench/chunk-retrieval/build_corpus.py --html /tmp/pydoc/usr/share/doc/python3.11/html

The text is Sphinx's main body (div.body) converted with html.parser: one paragraph per block
element (p, pre, li, dt, dd, headings, table rows...), paragraphs separated by blank lines, code
blocks kept line by line, the pilcrow links dropped. --list prints every library page's size
instead (to choose pages); the chosen pages are PAGES below.
"""
import argparse
import html.parser
import json
import os
import re
import sys

# 61 library pages of varied topics, each 12k-50k characters of text (2.9k-11.8k tokens).
PAGES = ["asyncio-stream", "collections", "compileall", "concurrent.futures", "contextlib", "csv",
    "dataclasses", "difflib", "email.headerregistry", "enum", "ftplib", "functools", "gettext",
    "hashlib", "heapq", "http.client", "http.cookiejar", "http.server", "imaplib", "ipaddress",
    "itertools", "json", "locale", "lzma", "math", "mmap", "multiprocessing.shared_memory",
    "operator", "os.path", "pathlib", "pdb", "pprint", "random", "select", "shlex", "shutil",
    "signal", "smtplib", "socketserver", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "threading", "time", "traceback", "tracemalloc", "types", "urllib.parse", "venv",
    "warnings", "weakref", "xml.sax.handler", "xmlrpc.client", "xmlrpc.server", "zipapp",
    "zipfile", "zlib", "zoneinfo"]

BLOCK = {"p", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "div",
         "section", "ul", "ol", "dl", "table", "blockquote", "figure", "caption", "th"}
SKIP = {"script", "style"}


class BodyText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0          # div depth inside div.body; 0 = outside
        self.skip = 0           # inside a skipped element (script, headerlink)
        self.pre = 0
        self.paragraphs = []
        self.current = []
        self.title = None
        self.in_h1 = False
        self.h1 = []

    def flush(self):
        text = "".join(self.current)
        self.current = []
        if self.pre:
            text = text.strip("\n")
            lines = [l.rstrip() for l in text.split("\n")]
            text = "\n".join(lines).strip("\n")
        else:
            text = re.sub(r"\s+", " ", text).strip()
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and "body" in (a.get("class") or "").split() and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if self.skip:
            if tag in SKIP or tag == "a":
                self.skip += 1
            return
        if tag in SKIP or (tag == "a" and "headerlink" in (a.get("class") or "").split()):
            self.skip = 1
            return
        if tag in BLOCK:
            self.flush()
        if tag == "pre":
            self.pre += 1
        if tag == "h1" and self.title is None:
            self.in_h1 = True
        if tag == "br":
            self.current.append("\n" if self.pre else " ")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if self.skip:
            if tag in SKIP or tag == "a":
                self.skip -= 1
            if tag == "div":
                self.depth -= 1
            return
        if tag in BLOCK:
            self.flush()
        if tag == "pre":
            self.pre -= 1
        if tag == "h1" and self.in_h1:
            self.in_h1 = False
            self.title = re.sub(r"\s+", " ", "".join(self.h1)).strip()
        if tag == "div":
            self.depth -= 1
            if self.depth == 0:
                self.flush()

    def handle_data(self, data):
        if self.depth == 0 or self.skip:
            return
        self.current.append(data)
        if self.in_h1:
            self.h1.append(data)


def page_text(path):
    p = BodyText()
    with open(path, encoding="utf-8") as f:
        p.feed(f.read())
    p.flush()
    return p.title or os.path.basename(path), "\n\n".join(p.paragraphs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--html", default="/usr/share/doc/python3.11/html")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs.jsonl"))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    lib = os.path.join(args.html, "library")
    if not os.path.isdir(lib):
        sys.exit(f"no {lib}: install python3-doc (or extract python3.11-doc) and pass --html")
    if args.list:
        for name in sorted(os.listdir(lib)):
            if name.endswith(".html"):
                title, text = page_text(os.path.join(lib, name))
                print(len(text), name[:-5], title, sep="\t")
        return
    with open(args.out, "w", encoding="utf-8") as out:
        for name in PAGES:
            title, text = page_text(os.path.join(lib, name + ".html"))
            out.write(json.dumps({"id": name, "title": title, "text": text}, ensure_ascii=False) + "\n")
    print(f"{len(PAGES)} documents -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

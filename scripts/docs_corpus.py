"""Natural-language text that is already installed on a machine, gathered into one JSON-lines corpus, for
measurements that need more text than tiny Shakespeare and no network (scripts/bench_optimizers.py).

    python -m scripts.docs_corpus --out corpus.jsonl.gz               # what this machine has; one line per source
    python -m scripts.prepare_data --source jsonl --input corpus.jsonl.gz --name docs --val_split last_fraction

Sources, each skipped with one line where it is absent: the Rust books of a rustup toolchain (mdBook's print.html,
the English ones, a document per chapter), Node.js's API reference (Debian's nodejs-doc, Markdown), the English
manual pages of sections 1-8 rendered by man (without gcloud's thousands of generated pages, which repeat one
template), and tiny Shakespeare ($TINYSHAKESPEARE_PATH). Each document is one line {"text", "source"}; identical
texts (a page under two names) are kept once; the documents are shuffled with a fixed seed, so that the last
fraction of the tokens, the validation split, is a sample of every source rather than the last one.
"""
import glob
import gzip
import hashlib
import html.parser
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import cli  # noqa: E402

RUST_BOOKS = "~/.rustup/toolchains/stable-*/share/doc/rust/html/*/print.html"  # book, reference, cargo, nomicon, ...
NODE_API = "/usr/share/doc/nodejs/api/*.md"
MAN_PAGES = "/usr/share/man/man[1-8]/*"
SKIP_MAN = re.compile(r"^gcloud")


class Chapters(html.parser.HTMLParser):
    """The chapters of an mdBook print.html: the text inside <main> (the sidebar's table of contents is outside
    it), a new chapter at each <h1>, one line per block element, scripts and styles left out."""

    BLOCKS = {"p", "div", "pre", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "blockquote", "dt", "dd"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.skip, self.chapters = 0, 0, [[]]

    def handle_starttag(self, tag, attrs):
        self.depth += tag == "main"
        self.skip += tag in ("script", "style")
        if self.depth and tag == "h1":
            self.chapters.append([])
        if self.depth and tag in self.BLOCKS:
            self.chapters[-1].append("\n")

    def handle_endtag(self, tag):
        self.depth -= tag == "main" and self.depth > 0
        self.skip -= tag in ("script", "style") and self.skip > 0
        if self.depth and tag in self.BLOCKS:
            self.chapters[-1].append("\n")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.chapters[-1].append(data)


def tidy(text):
    """Runs of spaces to one, at most one blank line in a row, no trailing spaces."""
    lines = [re.sub(r"[ \t]+", " ", line).rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def rust_books():
    for path in sorted(glob.glob(os.path.expanduser(RUST_BOOKS))):
        parser = Chapters()
        parser.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
        for chapter in parser.chapters:
            yield f"rust:{Path(path).parent.name}", tidy("".join(chapter))


def node_api():
    for path in sorted(glob.glob(NODE_API)):
        yield f"nodejs:{Path(path).stem}", tidy(Path(path).read_text(encoding="utf-8", errors="replace"))


def man_pages():
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    for path in sorted(glob.glob(MAN_PAGES)):
        if SKIP_MAN.match(Path(path).name) or not os.path.isfile(path):
            continue
        rendered = subprocess.run(["man", "-l", "-P", "cat", path], capture_output=True, env=env, timeout=60)
        text = re.sub(r".\x08", "", rendered.stdout.decode("utf-8", errors="replace"))  # overstrike bold, underline
        if rendered.returncode == 0 and text.strip():
            yield f"man:{Path(path).name}", tidy(text)


def tinyshakespeare():
    path = os.environ.get("TINYSHAKESPEARE_PATH")
    if path and Path(path).is_file():
        yield "tinyshakespeare", Path(path).read_text(encoding="utf-8")


SOURCES = {"rust books": rust_books, "nodejs api": node_api, "man pages": man_pages,
           "tiny shakespeare": tinyshakespeare}


def run(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="FILE", help="the corpus, JSON lines; gzip-compressed when it ends "
                                                                 "in .gz")
    p.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES),
                   help="which installed texts to gather (default: all)")
    p.add_argument("--seed", type=int, default=0, help="the documents' shuffled order (default: 0)")
    args = p.parse_args(argv)
    documents, seen = [], set()
    for name in args.sources:
        found = chars = 0
        for source, text in SOURCES[name]():
            digest = hashlib.sha1(text.encode()).digest()
            if len(text) < 200 or digest in seen:  # an empty page, or one under a second name
                continue
            seen.add(digest)
            documents.append({"text": text, "source": source})
            found, chars = found + 1, chars + len(text)
        print(f"{name}: {found} documents, {chars / 1e6:.1f}M characters" if found else f"{name}: none on this machine")
    if not documents:
        raise cli.UserError("no documentation found on this machine; pass a text of your own to "
                            "scripts.prepare_data instead")
    random.Random(args.seed).shuffle(documents)
    opener = gzip.open if args.out.endswith(".gz") else open
    with opener(args.out, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(document, ensure_ascii=False) + "\n" for document in documents)
    total = sum(len(d["text"]) for d in documents)
    print(f"wrote {args.out}: {len(documents)} documents, {total / 1e6:.1f}M characters, "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB")
    return 0


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Where the preparation's documents come from: tiny Shakespeare, text files, JSON lines, parquet
files, the FineWeb-Edu stream. SOURCES maps each --source name to its class.

    source = open_source("jsonl", input=["docs/*.jsonl.gz"], text_field="text")   # checked now
    source.identity()                  # what the manifest records, to spot a changed input on resume
    bar = source.progress_bar()        # tqdm, with a total where one is known in advance
    for text, starts_document in source.items(skip=120, progress=bar): ...

A source is checked when it is made (files exist, an optional package is installed, a parquet
file has the column), before anything in the output folder is touched. items() yields the same
(text, starts_document) items in the same order every time; skip=n passes over the first n of
them without tokenizing them, which is how a resumed preparation continues. Text files yield
pieces (a file is one document, cut at blank lines); the other sources yield one item per document.
JSON lines yield their text still as a JsonLine, which the tokenizer process parses (.text()).

A new source is one class and one row of SOURCES; the command line (scripts/prepare_data.py)
and the manifest follow from its attributes:

    class Markdown(FileSource):       # Markdown files, one document each, without their front matter
        options = ("input",)           # keyword arguments it takes, from --input / --text_field / --out_dir
        layouts = ("last_fraction", "first_shard")   # --val_split values it allows; the first is its default

        def __init__(self, input):
            self.paths = find_inputs(input)

        def identity(self):            # FileSource supplies describe() and progress_bar()
            return {"input": describe_inputs(self.paths)}

        def items(self, skip, progress):
            for path in self.paths[skip:]:
                progress.update(path.stat().st_size)
                yield strip_front_matter(path.read_text(encoding="utf-8")), True

    SOURCES = {..., "markdown": Markdown}
"""
import glob
import gzip
import io
import itertools
import json
import os
import re
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

import files
from shards import DataError

TEXT_CHUNK_CHARS = 1 << 18  # files above ~256K characters are cut into pieces (one a worker task)
# Cut just before a blank line that follows a non-space character: GPT-2's regex never joins
# that character with the newlines, so the pieces tokenize exactly like the whole file.
PARAGRAPH_CUT = re.compile(r"(?<=\S)(?=\n\n)")

FINEWEB_EDU = {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
# sample-10BT holds about 9.67M documents (Hugging Face's dataset viewer; ~10B GPT-2 tokens): the
# progress bar's total, labelled as an estimate.
FINEWEB_EDU_DOCUMENTS = 9_670_000
PROGRESS_EVERY_LINES = 4096  # JSON lines read between two updates of the bar
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def find_inputs(patterns):
    """The files the --input globs name, sorted and without repeats; a DataError when there are none."""
    paths = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)})
    if not paths:
        shown = " ".join(repr(p) for p in patterns)
        raise DataError(f"no files match --input {shown}; check the paths, and quote globs so the shell keeps them")
    return paths


def describe_inputs(paths):
    """[[absolute path, bytes, mtime_ns]]: a file that changed since the last run shows in one of them."""
    described = []
    for path in paths:
        stat = path.stat()
        described.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return described


class Source:
    """What the preparation asks of a source. A subclass sets the class attributes where its
    differ and implements __init__ (taking the keywords in `options`), identity, describe,
    progress_bar and items."""

    options = ()  # keyword arguments of __init__, from the command line: "input", "text_field", "out_dir"
    name = None  # the shards' prefix; None: the user names the dataset (--name)
    out_dir = None  # the default output folder; None: data/<name>
    layouts = ("first_shard", "last_fraction")  # the --val_split values it allows; the first is its default
    items_are = "documents"  # what one item of items() is, in the line a resumed run prints

    def identity(self) -> dict:
        """What must not change for a resumed run to continue the shards (input files, dataset, field)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is tokenized, for the line that starts a run: "3 files", "fineweb-edu"."""
        raise NotImplementedError

    def progress_bar(self):
        raise NotImplementedError

    def items(self, skip, progress):
        raise NotImplementedError


class FileSource(Source):
    """Files named by --input globs, each document's text in the field --text_field names (a subclass whose
    files are plain text sets its own options, __init__ and identity)."""

    options = ("input", "text_field")

    def __init__(self, input, text_field):
        self.paths = find_inputs(input)
        self.field = text_field

    def identity(self):
        return {"input": describe_inputs(self.paths), "text_field": self.field}

    def describe(self):
        return plural(len(self.paths), "file")

    def progress_bar(self):
        return tqdm(total=sum(p.stat().st_size for p in self.paths), unit="B", unit_scale=True, desc="read")


class TextFiles(FileSource):
    """Each file is one document; files above TEXT_CHUNK_CHARS characters are read and handed
    on in pieces of about that size, cut at blank lines (so memory holds a few pieces, not the file)."""

    options = ("input",)
    layouts = ("last_fraction", "first_shard")
    items_are = "pieces"

    def __init__(self, input):
        self.paths = find_inputs(input)

    def identity(self):
        # The piece size decides how a resume position counts items, so it must not change in between.
        return {"input": describe_inputs(self.paths), "text_piece_chars": TEXT_CHUNK_CHARS}

    def items(self, skip, progress):
        for path in self.paths:
            with open(path, "rb") as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8")  # newline=None: \r\n reads as \n, as read_text does
                reported = 0
                try:
                    for i, piece in enumerate(paragraph_pieces(text.read, TEXT_CHUNK_CHARS)):
                        progress.update(raw.tell() - reported)
                        reported = raw.tell()
                        if skip:
                            skip -= 1
                            continue
                        yield piece, i == 0
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} is not UTF-8 text ({e}); convert it (iconv -t UTF-8) "
                                    f"or leave it out of --input") from None


def paragraph_pieces(read, max_chars):
    """Cut the text that read(n) returns into pieces, each ending just before the first blank line after its
    first max_chars characters, reading about max_chars at a time: the same pieces however read splits it."""
    buffer, at_end, searched_from = "", False, max_chars
    while True:
        cut = PARAGRAPH_CUT.search(buffer, searched_from) if len(buffer) > max_chars else None
        if cut is not None:
            yield buffer[: cut.start()]
            buffer, searched_from = buffer[cut.start():], max_chars
        elif at_end:
            # The last piece: no blank line in the rest of the file ("" for an empty file, still one document).
            yield buffer
            return
        else:
            # No cut yet: read on. A cut needs one character before it and two after, so only
            # the last character searched may turn into a cut once more text is there.
            searched_from = max(max_chars, len(buffer) - 1)
            block = read(max_chars)
            at_end = not block
            buffer += block


class JsonLines(FileSource):
    """One JSON object per line, its text in `text_field`; .gz files are read through gzip. Blank lines
    are passed over. The lines are parsed where they are tokenized (JsonLine): the main process only reads
    and splits the files, so it keeps up with many tokenizer processes."""

    def items(self, skip, progress):
        for path in self.paths:
            with open(path, "rb") as raw:
                lines = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
                reported = 0
                try:
                    for line_number, line in enumerate(lines, 1):
                        if line_number % PROGRESS_EVERY_LINES == 0:
                            progress.update(raw.tell() - reported)
                            reported = raw.tell()
                        if not line.strip():
                            continue
                        if skip:  # a resumed run passes over finished documents without parsing them
                            skip -= 1
                            continue
                        yield JsonLine(line, f"{path}:{line_number}", self.field), True
                except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                    raise DataError(f"{path} is not a readable gzip file ({e}); re-download or re-compress it, "
                                    f"or drop the .gz from its name if it is plain text") from None
                progress.update(raw.tell() - reported)


class JsonLine:
    """A line of a JSON lines file, as bytes, with where it is (file:line) and the field that holds
    its text. text() parses it in the process that tokenizes it; len() is its size in bytes."""

    __slots__ = ("line", "where", "field")

    def __init__(self, line, where, field):
        self.line, self.where, self.field = line, where, field

    def __len__(self):
        return len(self.line)

    def text(self):
        where, field = self.where, self.field
        try:
            record = json.loads(self.line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{where} is not UTF-8 ({e}); convert the file (iconv -t UTF-8) "
                            f"or leave it out of --input") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not JSON ({e.msg}: column {e.colno}); each line must be one "
                            f'JSON object such as {{"{field}": "..."}}') from None
        if not isinstance(record, dict):
            raise DataError(f"{where} holds a JSON {type(record).__name__}, not an object with a {field!r} field")
        if field not in record:
            keys = ", ".join(map(repr, list(record)[:10])) or "none"
            raise DataError(f"{where} has no {field!r} field (its keys: {keys}); name the field "
                            f"that holds the text with --text_field")
        text = record[field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {field!r} holds a JSON {type(text).__name__}, expected a string")
        return text


class ParquetFiles(FileSource):
    """Parquet files with a string column `text_field`, e.g. FineWeb-Edu's files as its download leaves
    them; one row is one document. Read a batch of rows at a time."""

    BATCH_ROWS = 1024

    def __init__(self, input, text_field):
        try:
            import pyarrow.parquet  # optional: only --source parquet needs it
        except ImportError:
            raise DataError("--source parquet needs the pyarrow package: pip install pyarrow") from None
        self.parquet = pyarrow.parquet
        super().__init__(input, text_field)
        self.rows = [self.check(path) for path in self.paths]

    def check(self, path):
        """The file's row count, once its schema shows a string column named field."""
        import pyarrow

        try:
            metadata = self.parquet.ParquetFile(path).metadata
            schema = metadata.schema.to_arrow_schema()
        except (pyarrow.ArrowException, OSError) as e:
            raise DataError(f"{path} is not a readable parquet file ({e}); re-download it or leave it out "
                            f"of --input") from None
        if self.field not in schema.names:
            columns = ", ".join(map(repr, schema.names[:10])) or "none"
            raise DataError(f"{path} has no column {self.field!r} (its columns: {columns}); name the column "
                            f"that holds the text with --text_field")
        column_type = schema.field(self.field).type
        if not (pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)):
            raise DataError(f"{path}: column {self.field!r} holds {column_type}, expected strings (UTF-8 text)")
        return metadata.num_rows

    def progress_bar(self):
        return tqdm(total=sum(self.rows), unit="docs", unit_scale=True, desc="read")

    def items(self, skip, progress):
        for path in self.paths:
            parquet_file = self.parquet.ParquetFile(path)
            groups = list(range(parquet_file.metadata.num_row_groups))
            # A resumed run jumps over whole row groups by their row counts, without reading them.
            while groups and parquet_file.metadata.row_group(groups[0]).num_rows <= skip:
                rows = parquet_file.metadata.row_group(groups.pop(0)).num_rows
                skip -= rows
                progress.update(rows)
            if not groups:
                continue
            first_row = sum(parquet_file.metadata.row_group(g).num_rows for g in range(groups[0]))
            for batch in parquet_file.iter_batches(batch_size=self.BATCH_ROWS, row_groups=groups, columns=[self.field]):
                texts = batch.column(0).to_pylist()
                progress.update(len(texts))
                for text in texts:
                    first_row += 1
                    if skip:
                        skip -= 1
                        continue
                    if text is None:
                        raise DataError(f"{path}: row {first_row - 1} has no text (null in column {self.field!r}); "
                                        f"drop such rows or leave the file out of --input")
                    yield text, True


class FineWebEdu(Source):
    """HuggingFaceFW/fineweb-edu sample-10BT, streamed through the Hugging Face datasets package."""

    name = "edufineweb"
    out_dir = "data/edu_fineweb10B"
    layouts = ("first_shard",)

    def __init__(self):
        try:
            import datasets  # optional: only this source needs it
        except ImportError:
            raise DataError("--source fineweb-edu needs the Hugging Face datasets package: "
                            "pip install datasets") from None
        self.datasets = datasets

    def identity(self):
        return {"dataset": f"{FINEWEB_EDU['path']} {FINEWEB_EDU['name']}"}

    def describe(self):
        return "fineweb-edu"

    def progress_bar(self):
        return tqdm(total=FINEWEB_EDU_DOCUMENTS, unit="docs", unit_scale=True,
                    desc="read (total: an estimate)")

    def items(self, skip, progress):
        try:
            stream = self.datasets.load_dataset(**FINEWEB_EDU, streaming=True)
            if skip:
                stream = stream.skip(skip)  # passes over the documents of finished shards; none is tokenized again
        except Exception as e:  # noqa: BLE001  no network, a hub error: nothing has been written yet in this run
            raise DataError(f"could not open the FineWeb-Edu stream ({type(e).__name__}: {e}); check the "
                            f"connection, then run the same command again") from None
        progress.update(skip)
        documents = iter(stream)
        for read in itertools.count(skip):  # documents read so far
            try:
                document = next(documents)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001  a dropped connection, a server error: the shards so far are kept
                raise DataError(f"the FineWeb-Edu stream failed after {read:,} documents ({type(e).__name__}: {e}); "
                                f"run the same command again to continue after the last finished shard") from None
            progress.update(1)
            yield document["text"], True


class TinyShakespeare(Source):
    """Tiny Shakespeare (1.1 MB), one document: $TINYSHAKESPEARE_PATH, else the copy cached in the
    output folder, else downloaded from TINYSHAKESPEARE_URL into that cache. The trainer's quickstart
    data (ensure_tinyshakespeare)."""

    options = ("out_dir",)
    name = "tinyshakespeare"
    out_dir = "data/tinyshakespeare"
    layouts = ("last_fraction",)

    def __init__(self, out_dir):
        self.text, self.origin = read_tinyshakespeare(out_dir)

    def identity(self):
        return {}  # one fixed text, wherever it came from

    def describe(self):
        return f"tiny Shakespeare from {self.origin}"

    def progress_bar(self):
        return tqdm(total=1, unit="docs", desc="read")

    def items(self, skip, progress):
        progress.update(1)
        if not skip:
            yield self.text, True


def read_tinyshakespeare(cache_dir):
    """(text, where it came from): $TINYSHAKESPEARE_PATH, the cached copy in cache_dir, or the URL."""
    env_path = os.environ.get("TINYSHAKESPEARE_PATH")
    if env_path:
        if not Path(env_path).is_file():
            raise DataError(
                f"TINYSHAKESPEARE_PATH={env_path} is not a file; point it at a copy of "
                f"{TINYSHAKESPEARE_URL} or unset it to download"
            )
        return Path(env_path).read_text(encoding="utf-8"), env_path
    cached = Path(cache_dir) / "tinyshakespeare.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8"), str(cached)
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=10) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
        raise DataError(
            f"could not download tiny Shakespeare from {TINYSHAKESPEARE_URL}: {e}. Fix: download it "
            f"by hand to {cached} (curl -L -o {cached} {TINYSHAKESPEARE_URL}), "
            f"or set TINYSHAKESPEARE_PATH to a local copy"
        ) from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(cached, lambda f: f.write(text.encode("utf-8")))
    return text, TINYSHAKESPEARE_URL


# --source name -> class: a new source is one class above and one row here.
SOURCES = {
    "tinyshakespeare": TinyShakespeare,
    "text": TextFiles,
    "jsonl": JsonLines,
    "parquet": ParquetFiles,
    "fineweb-edu": FineWebEdu,
}


def open_source(key, **options):
    """The source SOURCES[key], made (and so checked) from the options it takes; the others are ignored.
    Its .key is the name it was opened by, which the manifest records."""
    cls = SOURCES[key]
    source = cls(**{option: options[option] for option in cls.options})
    source.key = key
    return source

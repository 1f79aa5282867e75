"""Capture: reading raw events (JSON lines) from files and folders.

`ReadEvents(paths)` takes files, folders (every *.jsonl, *.ndjson, *.json, *.jsonl.gz file in
them, recursively) and glob patterns, and yields each non-blank line as bytes: decoding is
ParseAndValidate's job, so that a line that is not UTF-8 becomes a dead letter instead of failing
the read. A path that matches nothing, or a file in an encoding other than UTF-8 (UTF-16 or
UTF-32, which spreadsheet and Windows tools write), is an error at construction time, not an
empty run or a dead letter per line.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import os
from typing import Iterable, List, Sequence

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io.textio import ReadAllFromText
from apache_beam.metrics import Metrics

from cdpflow.errors import BadInput

EVENT_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz")


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Files named by `paths` (files, folders, globs), sorted and without repeats.

    Raises:
      FileNotFoundError: a path matches no file.
    """
    found = []
    for path in paths:
        if os.path.isdir(path):
            matches = [os.path.join(root, name)
                       for root, _, names in os.walk(path) for name in names
                       if name.endswith(EVENT_FILE_SUFFIXES)]
        elif os.path.isfile(path):
            matches = [path]
        else:
            matches = [m for m in glob.glob(path, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"no event files at {path!r} (expected JSON-lines files or folders of them)")
        found.extend(os.path.abspath(m) for m in matches)
    files = sorted(set(found))
    for path in files:
        refuse_other_encodings(path)
    return files


# Longest byte-order marks first: UTF-32's little-endian mark begins with UTF-16's.
_MARKS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
          (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def open_event_file(path: str):
    """An event file opened for reading bytes (a `.gz` one decompressed)."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _head(path: str, size: int = 4096) -> bytes:
    try:
        with open_event_file(path) as handle:
            return handle.read(size)
    except (OSError, EOFError) as err:  # a truncated or non-gzip .gz file
        raise BadInput(f"{path}: cannot be read ({err})") from None


def refuse_other_encodings(path: str) -> None:
    """Refuses a file that is UTF-16 or UTF-32 text (with a byte-order mark, or without one:
    NUL bytes beside ASCII), naming the encoding; JSON lines are UTF-8.

    Raises:
      BadInput: the file is in another encoding.
    """
    head = _head(path)
    encoding = next((name for mark, name in _MARKS if head.startswith(mark)), None)
    if encoding is None and len(head) >= 8:
        # Without a mark: JSON text starts with ASCII, so UTF-16 puts a NUL beside each of its
        # first characters and UTF-32 three (JSON's own "Encoding detection", RFC 4627).
        start = head[:8]
        if start[1::2] == b"\0" * 4 or start[0::2] == b"\0" * 4:
            encoding = "UTF-32" if start[1:3] == b"\0\0" or start[:2] == b"\0\0" else "UTF-16"
    if encoding:
        raise BadInput(f"{path} is {encoding} text; cdpflow reads JSON lines in UTF-8: convert it first, e.g. "
                       f"`iconv -f {encoding} -t UTF-8 {os.path.basename(path)} > events.jsonl`")


def has_event_lines(files: Sequence[str]) -> bool:
    """True if any of `files` holds a non-blank line (reads only as far as the first one)."""
    for path in files:
        with open_event_file(path) as handle:
            if any(line.strip() for line in handle):
                return True
    return False


class _DropBlank(beam.DoFn):
    def __init__(self):
        self.blank = Metrics.counter(self.__class__, "blank_lines")

    def process(self, line: bytes) -> Iterable[bytes]:
        if line.strip():
            yield line
        else:
            # Blank lines separate nothing in JSON lines; counted so that none vanishes unseen.
            self.blank.inc()


class ReadEvents(beam.PTransform):
    """Files, folders or globs of JSON lines -> PCollection[bytes], one raw event per element."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self.files = expand_inputs(paths)

    def expand(self, pbegin):
        return (pbegin
                | "ListFiles" >> beam.Create(self.files)
                | "ReadLines" >> ReadAllFromText(coder=BytesCoder())
                | "DropBlank" >> beam.ParDo(_DropBlank()).with_output_types(bytes))

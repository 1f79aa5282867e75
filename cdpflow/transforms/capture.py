"""Capture: reading raw events (JSON lines) from files and folders.

`ReadEvents(paths)` takes files, folders (every *.jsonl, *.ndjson, *.json, *.jsonl.gz file in
them, recursively) and glob patterns, and yields each non-blank line as bytes: decoding is
ParseAndValidate's job, so that a line that is not UTF-8 becomes a dead letter instead of failing
the read. A path that matches nothing is an error at construction time, not an empty run.
"""
from __future__ import annotations

import glob
import os
from typing import Iterable, List, Sequence

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io.textio import ReadAllFromText
from apache_beam.metrics import Metrics

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
    return sorted(set(found))


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

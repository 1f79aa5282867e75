"""Replays recorded event files through the streaming graph, as they arrived.

    cdpflow replay --input out/sample/events --out out/stream [--warehouse out/cdp.duckdb] [--runner direct|prism]

Until the Kafka source exists, this is how the streaming job runs on this machine: the lines are
ordered by `receivedAt` and played as a TestStream whose watermark follows arrival, a step (at
most a day, at most 500 lines) at a time, on Beam's DirectRunner in streaming mode (or Prism). What comes out is what the live
stream emits: a profile row whenever the watermark passes a change (an event, a merge, a window
or lifecycle boundary), lifecycle transitions, and dead letters, appended as JSON lines under
`--out` (`profiles/`, `lifecycle_transitions/`, `dead_letters/`).

With `--warehouse`, the replay starts where the warehouse stands: its accepted events are loaded
into the feature state first, a copy of its identity store resolves them and the new events, and
rows are scored with its latest fitted CLV models. The warehouse itself is not written.
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import orjson
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import Timestamp

from cdpflow.core.timeutil import US_PER_SECOND, parse_ts
from cdpflow.pipelines.batch import identity_store_path
from cdpflow.pipelines.stream import build_stream
from cdpflow.runners.direct import streaming_pipeline
from cdpflow.transforms import DEAD_LETTERS
from cdpflow.transforms.capture import expand_inputs
from cdpflow.transforms.features import PROFILES, TRANSITIONS
from cdpflow.transforms.sinks import dead_letter_row, to_json_line

OUTPUTS = (PROFILES, TRANSITIONS, DEAD_LETTERS)


def _received_at(line: bytes) -> Optional[int]:
    try:
        return parse_ts(orjson.loads(line)["receivedAt"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def arrival_order(inputs: Sequence[str]) -> List[Tuple[int, bytes]]:
    """(receivedAt in microseconds, line) of every non-blank line, in arrival order.

    A line without a readable receivedAt (a broken one) arrives with the line before it in its
    file, so it still reaches the stream and becomes a dead letter there.
    """
    import gzip
    timed: List[List] = []
    for path in expand_inputs(inputs):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            previous = None
            for line in handle:
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                received = _received_at(line)
                previous = received if received is not None else previous
                timed.append([previous, line])
    first = min((t for t, _ in timed if t is not None), default=0)
    return sorted(((t if t is not None else first, line) for t, line in timed), key=lambda item: item[0])


def end_of(lines: Sequence[Tuple[int, bytes]]) -> int:
    """The last watermark `as_stream` sets: the millisecond after the last arrival."""
    return lines[-1][0] // 1000 * 1000 + 1000 if lines else 0


def as_stream(lines: Sequence[Tuple[int, bytes]], step_us: int = 86_400 * US_PER_SECOND, chunk: int = 500) -> TestStream:
    """A TestStream of the lines; the watermark moves to each step's earliest arrival.

    Steps hold at most `chunk` lines and at most `step_us` of arrival time. Watermarks are
    whole milliseconds (what runners keep).
    """
    stream, mark, start = TestStream(), None, 0
    while start < len(lines):
        end = start + 1
        while end < len(lines) and end - start < chunk and lines[end][0] - lines[start][0] < step_us:
            end += 1
        low = lines[start][0] // 1000 * 1000
        mark = low if mark is None else max(mark, low)
        stream = stream.add_elements([line for _, line in lines[start:end]], event_timestamp=Timestamp(micros=mark))
        stream = stream.advance_watermark_to(Timestamp(micros=mark))
        start = end
    return stream.advance_watermark_to(Timestamp(micros=end_of(lines))) if lines else stream


class _AppendJsonLines(beam.DoFn):
    """Appends rows as JSON lines to a file of this worker's own under `<out>/<name>/`."""

    def __init__(self, out_dir: str, name: str):
        self.folder = os.path.join(out_dir, name)
        self.handle = None

    def process(self, row):
        if self.handle is None:  # opened on the first row: an instance that writes nothing leaves no file
            os.makedirs(self.folder, exist_ok=True)
            self.handle = open(os.path.join(self.folder, f"part-{uuid.uuid4().hex}.jsonl"), "a", encoding="utf-8")
        self.handle.write(to_json_line({k: v for k, v in row.items() if not k.startswith("_")}) + "\n")

    def finish_bundle(self):
        if self.handle is not None:
            self.handle.flush()

    def teardown(self):
        if self.handle is not None:
            self.handle.close()


def run_replay(inputs: Sequence[str], out_dir: str, config: dict, warehouse: Optional[str] = None,
               runner: str = "direct") -> Dict[str, int]:
    """Replays `inputs` through the streaming graph; returns rows written per output."""
    lines = arrival_order(inputs)
    if not lines:
        raise ValueError(f"no event lines in {', '.join(inputs)}")
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUTS:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    store = os.path.join(out_dir, "identity.sqlite")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(store + suffix):
            os.remove(store + suffix)
    history, model = None, None
    if warehouse:
        from cdpflow.warehouse import DuckDBWarehouse
        if not os.path.exists(warehouse):
            raise FileNotFoundError(f"no warehouse at {warehouse}")
        if os.path.exists(identity_store_path(warehouse)):
            shutil.copy(identity_store_path(warehouse), store)
        replay_file = os.path.join(out_dir, "warehouse-events.jsonl")
        with DuckDBWarehouse(warehouse, read_only=True) as wh:
            wh.write_replay(replay_file)
            model = wh.latest_clv_model()
        with open(replay_file, "rb") as handle:
            history = [line.rstrip(b"\n") for line in handle if line.strip()]
    pipeline = streaming_pipeline(runner)
    source = pipeline | "Replay" >> as_stream(lines)
    preload = pipeline | "WarehouseEvents" >> beam.Create(history) if history else None
    # Timers stop at the end of the recording: past it the runner would fire every window and
    # lifecycle timer down to the end of time, for times the stream never reached.
    outputs = build_stream(source, config, store, preload=preload, clv_model=model, until=end_of(lines))
    _ = (outputs[DEAD_LETTERS] | "DeadLetterRows" >> beam.Map(dead_letter_row)
         | "Write_dead_letters" >> beam.ParDo(_AppendJsonLines(out_dir, DEAD_LETTERS)))
    for name in (PROFILES, TRANSITIONS):
        _ = outputs[name] | f"Write_{name}" >> beam.ParDo(_AppendJsonLines(out_dir, name))
    pipeline.run().wait_until_finish()
    written = {}
    for name in OUTPUTS:
        folder = os.path.join(out_dir, name)
        written[name] = sum(sum(1 for _ in open(os.path.join(folder, f), "rb"))
                            for f in (os.listdir(folder) if os.path.isdir(folder) else ()))
    written["lines"] = len(lines)
    written["preloaded"] = len(history or ())
    return written

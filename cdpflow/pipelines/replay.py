"""Replays recorded event files through the streaming graph, as they arrived.

    cdpflow replay --input out/sample/events --out out/stream [--warehouse out/cdp.duckdb] [--runner direct|prism]

Until the Kafka source exists, this is how the streaming job runs on this machine: the lines are
ordered by `receivedAt` and played as a TestStream whose watermark follows arrival, a step (at
most a day, at most 500 lines) at a time, on Beam's DirectRunner in streaming mode (or Prism). What comes out is what the live
stream emits: a profile row whenever the watermark passes a change (an event, a merge, a window
or lifecycle boundary), lifecycle transitions, and dead letters, appended as JSON lines under
`--out` (`profiles/`, `lifecycle_transitions/`, `dead_letters/`).

With `--warehouse`, the replay starts where the warehouse stands: its accepted events are loaded
into the feature state first, an identity store rebuilt from them under the warehouse's
governance (forgotten identifiers stay forgotten, separations stay apart) resolves them and the
new events, and rows are scored with its latest fitted CLV models. The warehouse itself is not
written, and no copy of its events or identity graph is left under `--out`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import orjson
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import Timestamp

from cdpflow.core import governance
from cdpflow.errors import BadInput
from cdpflow.core.identity import open_identity_store, sqlite_path
from cdpflow.core.timeutil import US_PER_SECOND, parse_ts
from cdpflow.pipelines.stream import build_stream
from cdpflow.runners.direct import streaming_pipeline
from cdpflow.transforms import DEAD_LETTERS
from cdpflow.transforms.capture import expand_inputs, open_event_file
from cdpflow.transforms.features import PROFILES, TRANSITIONS
from cdpflow.transforms.sinks import DeadLetterRows, to_json_line
from cdpflow.warehouse import open_warehouse, warehouse_path

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
    timed: List[List] = []
    for path in expand_inputs(inputs):
        with open_event_file(path) as handle:
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
    """Writes each bundle's rows as one JSON-lines file of its own under `<out>/<name>/`.

    The file is written under a temporary name and renamed when the bundle finishes, so a
    bundle the runner retries leaves no rows behind from its failed attempt.
    """

    def __init__(self, out_dir: str, name: str):
        self.folder = os.path.join(out_dir, name)
        self.rows: List[str] = []

    def start_bundle(self):
        self.rows = []

    def process(self, row):
        self.rows.append(to_json_line({k: v for k, v in row.items() if not k.startswith("_")}))

    def finish_bundle(self):
        if not self.rows:  # a bundle that wrote nothing leaves no file
            return
        os.makedirs(self.folder, exist_ok=True)
        final = os.path.join(self.folder, f"part-{uuid.uuid4().hex}.jsonl")
        with open(final + ".tmp", "w", encoding="utf-8") as handle:
            handle.write("\n".join(self.rows) + "\n")
        os.replace(final + ".tmp", final)
        self.rows = []


def rebuild_identity_store(uri: str, rules, history: Sequence[tuple], batch_size: int = 500) -> int:
    """Resolves a warehouse's accepted events into a new identity store, in event-time order.

    The order and the batching are the batch run's, so the graph is the one it committed; the
    rules are the warehouse's governance, so nothing forgotten is rebuilt. Returns the events resolved.
    """
    store = open_identity_store(uri, rules)
    try:
        for start in range(0, len(history), batch_size):
            store.resolve_batch((mid, ts, ids) for ts, mid, ids in history[start:start + batch_size])
    finally:
        store.close()
    return len(history)


def read_start(wh, config: dict, work: str) -> Dict[str, object]:
    """What a stream starting on a warehouse reads from it: its governance as identity rules, its
    accepted events (raw lines, `history`), their identity order (`identity`), the latest CLV
    model and the segment memberships. `work` is a folder for the events' file."""
    key = governance.suppression_key(config, wh.demo_key_file())
    replay_file = os.path.join(work, "warehouse-events.jsonl")
    wh.write_replay(replay_file)
    with open(replay_file, "rb") as handle:
        history = [line.rstrip(b"\n") for line in handle if line.strip()]
    return {"rules": governance.identity_rules(config, wh.governance(), key), "history": history,
            "identity": wh.identity_history(), "model": wh.latest_clv_model(), "memberships": wh.memberships()}


def run_replay(inputs: Sequence[str], out_dir: str, config: dict, warehouse: Optional[str] = None,
               runner: str = "direct", identity_store: Optional[str] = None) -> Dict[str, int]:
    """Replays `inputs` through the streaming graph; returns rows written per output.

    With a warehouse, its governance (forgotten identifiers, separations) rules every stage
    through `cdpflow.core.governance.identity_rules`, and the identity store is rebuilt from
    its accepted events in a private folder (never copied from a store a forget may not have
    reached). Nothing but the three output folders is written under `out_dir`.

    Args:
      identity_store: where the replay's identity store is built: `sqlite:///path` of a file that
        does not exist yet, or an empty `redis://host:port/db[?prefix=]`; default a private
        SQLite file, deleted afterwards.
    """
    lines = arrival_order(inputs)
    if not lines:
        raise BadInput(f"no event lines in {', '.join(inputs)}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BadInput(f"--out {out_dir} is a file; a replay writes a folder (profiles/, lifecycle_transitions/, "
                       "dead_letters/)")
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUTS:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    if identity_store:
        local = sqlite_path(identity_store)
        if local is not None and os.path.exists(local):
            raise BadInput(f"--identity-store {identity_store}: exists already; a replay builds a new store")
        if local is None:
            probe = open_identity_store(identity_store)
            try:
                if not probe.is_empty():
                    raise BadInput(f"--identity-store {identity_store}: holds a graph already; a replay builds a new store")
            finally:
                probe.close()
    work = tempfile.mkdtemp(prefix="cdpflow-replay-")
    try:
        store = identity_store or os.path.join(work, "identity.sqlite")
        history, model = None, None
        state = governance.GovernanceState()
        key = governance.LEGACY_KEY
        if warehouse:
            path = warehouse_path(warehouse)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"no warehouse at {warehouse}")
            with open_warehouse(warehouse, read_only=True) as wh:
                start = read_start(wh, config, work)
            rules, history, identity_history, model = start["rules"], start["history"], start["identity"], start["model"]
        else:
            rules = governance.identity_rules(config, state, key)
        if history:
            rebuild_identity_store(store, rules, identity_history)
        pipeline = streaming_pipeline(runner)
        source = pipeline | "Replay" >> as_stream(lines)
        preload = pipeline | "WarehouseEvents" >> beam.Create(history) if history else None
        # Timers stop at the end of the recording: past it the runner would fire every window and
        # lifecycle timer down to the end of time, for times the stream never reached.
        outputs = build_stream(source, config, store, identity_rules=rules, preload=preload, clv_model=model,
                               until=end_of(lines))
        _ = (outputs[DEAD_LETTERS] | "DeadLetterRows" >> DeadLetterRows(config["default_region"], rules)
             | "Write_dead_letters" >> beam.ParDo(_AppendJsonLines(out_dir, DEAD_LETTERS)))
        for name in (PROFILES, TRANSITIONS):
            _ = outputs[name] | f"Write_{name}" >> beam.ParDo(_AppendJsonLines(out_dir, name))
        pipeline.run().wait_until_finish()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    written = {}
    for name in OUTPUTS:
        folder = os.path.join(out_dir, name)
        written[name] = sum(sum(1 for _ in open(os.path.join(folder, f), "rb"))
                            for f in (os.listdir(folder) if os.path.isdir(folder) else ()) if f.endswith(".jsonl"))
    written["lines"] = len(lines)
    written["preloaded"] = len(history or ())
    return written

"""The warehouse table contract, one definition for DuckDB (embedded) and BigQuery.

Every sink and every reader of the warehouse goes through these definitions: the DuckDB DDL
and the BigQuery schema are both generated from them, so the two warehouses cannot drift.
Timestamps are UTC; in staged rows they travel as integer microseconds since the epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

# Logical type -> (DuckDB type, BigQuery type)
_TYPES = {
    "STRING": ("VARCHAR", "STRING"),
    "INT64": ("BIGINT", "INT64"),
    "FLOAT64": ("DOUBLE", "FLOAT64"),
    "NUMERIC": ("DECIMAL(38, 9)", "NUMERIC"),
    "BOOL": ("BOOLEAN", "BOOL"),
    "TIMESTAMP": ("TIMESTAMPTZ", "TIMESTAMP"),
    "JSON": ("JSON", "JSON"),
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    mode: str = "NULLABLE"  # NULLABLE | REQUIRED | REPEATED


def duckdb_column(column: Column, nullable: bool = False) -> str:
    """A column definition for DuckDB (`nullable` drops NOT NULL, for ALTER TABLE ADD COLUMN)."""
    sql_type = _TYPES[column.type][0] + ("[]" if column.mode == "REPEATED" else "")
    null = " NOT NULL" if column.mode == "REQUIRED" and not nullable else ""
    return f'"{column.name}" {sql_type}{null}'


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: Tuple[Column, ...]
    key: Tuple[str, ...] = ()

    @property
    def column_names(self) -> List[str]:
        return [c.name for c in self.columns]

    def duckdb_ddl(self) -> str:
        """CREATE TABLE statement for DuckDB."""
        cols = [duckdb_column(c) for c in self.columns]
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" (\n  ' + ",\n  ".join(cols) + "\n)"

    def bigquery_schema(self) -> List[Dict[str, str]]:
        """The table's schema as BigQuery's JSON schema fields."""
        return [{"name": c.name, "type": _TYPES[c.type][1], "mode": c.mode,
                 "description": c.description} for c in self.columns]


def _c(name, type_, description, mode="NULLABLE"):
    return Column(name, type_, description, mode)


EVENTS = Table("events", "One row per accepted event (after validation and deduplication).", (
    _c("message_id", "STRING", "The event's messageId: unique key, used for deduplication.", "REQUIRED"),
    _c("profile_id", "STRING", "The unified profile the event belongs to (current survivor)."),
    _c("type", "STRING", "identify, track, page, screen, alias or group.", "REQUIRED"),
    _c("event", "STRING", "The track event name, or the page/screen name."),
    _c("timestamp", "TIMESTAMP", "Event time, UTC, corrected for device clock skew.", "REQUIRED"),
    _c("received_at", "TIMESTAMP", "When the collector received the event, UTC.", "REQUIRED"),
    _c("channel", "STRING", "web, mobile, server, pos ... as sent."),
    _c("revenue", "NUMERIC", "Order revenue in the event's currency (Order Completed)."),
    _c("currency", "STRING", "ISO 4217 currency of revenue."),
    _c("revenue_reporting", "NUMERIC", "Revenue converted to the reporting currency at the event date's rate."),
    _c("schema_version", "STRING", "The JSON Schema applied, e.g. track/v1."),
    _c("identifiers", "JSON", "The normalised identifiers the event carried: [[type, value], ...]."),
    _c("enrichment", "JSON", "Device/OS/browser from the user agent, UTM campaign, product categories and brands."),
    _c("raw", "JSON", "The event exactly as received (the rest of its fields); replays start from here.", "REQUIRED"),
), key=("message_id",))

IDENTITY_LINKS = Table("identity_links", "Which profile each normalised identifier belongs to.", (
    _c("identifier_type", "STRING", "user_id, anonymous_id, email, phone, loyalty_id, device_id, or any externalIds type.", "REQUIRED"),
    _c("identifier_value", "STRING", "The identifier as normalised (emails lowercased, phones E.164).", "REQUIRED"),
    _c("profile_id", "STRING", "The profile that holds it (current survivor).", "REQUIRED"),
    _c("first_seen", "TIMESTAMP", "Event time of the first event carrying it.", "REQUIRED"),
    _c("last_seen", "TIMESTAMP", "Event time of the latest event carrying it.", "REQUIRED"),
    _c("quarantined", "BOOL", "True once fan-out quarantine stopped it from merging profiles."),
), key=("identifier_type", "identifier_value"))

PROFILE_MERGES = Table("profile_merges", "Every merge of two profiles, as it happened.", (
    _c("survivor_id", "STRING", "The profile that remained (the smaller id).", "REQUIRED"),
    _c("absorbed_id", "STRING", "The profile that was merged into the survivor.", "REQUIRED"),
    _c("cause_message_id", "STRING", "The event whose identifiers joined the two.", "REQUIRED"),
    _c("reason", "STRING", "Why they merged, e.g. 'shared email'.", "REQUIRED"),
    _c("merged_at", "TIMESTAMP", "Event time of the causing event.", "REQUIRED"),
    _c("undone_at", "TIMESTAMP", "Event time at which a quarantine undid the merge (null while it holds)."),
    _c("undone_by", "STRING", "What undid it, e.g. 'quarantine of device_id (<message id>)'."),
), key=("absorbed_id", "merged_at"))

IDENTITY_CONFLICTS = Table("identity_conflicts", "Links that merge protection refused, and quarantined identifiers.", (
    _c("identifier_type", "STRING", "Type of the identifier whose link was refused or that was quarantined.", "REQUIRED"),
    _c("identifier_value", "STRING", "Its normalised value.", "REQUIRED"),
    _c("profiles", "STRING", "The profiles involved (as they were at that moment).", "REPEATED"),
    _c("rule", "STRING", "max_per_profile:<type>, manual_split, or fan_out_quarantine.", "REQUIRED"),
    _c("cause_message_id", "STRING", "The event that asked for the link.", "REQUIRED"),
    _c("event_time", "TIMESTAMP", "Its event time.", "REQUIRED"),
))

IDENTITY_SUPPRESSIONS = Table("identity_suppressions", "Forgotten identifiers, kept only as hashes so replays cannot bring them back.", (
    _c("identifier_hash", "STRING", "HMAC-SHA256 of the identifier (type and normalised value) under the deployment's "
       "suppression key (the legacy rows: sha256 salted with 'forget').", "REQUIRED"),
    _c("suppressed_at", "TIMESTAMP", "When `cdpflow forget` ran.", "REQUIRED"),
    _c("request_id", "STRING", "Groups the identifiers of one forget request."),
    _c("key_id", "STRING", "Id of the key the hash was made with (null or legacy-sha256: the constant salt)."),
), key=("identifier_hash",))

IDENTITY_SEPARATIONS = Table("identity_separations", "Pairs of identifiers a manual split keeps in different profiles.", (
    _c("left_type", "STRING", "Identifier on one side of the split.", "REQUIRED"),
    _c("left_value", "STRING", "", "REQUIRED"),
    _c("right_type", "STRING", "Identifier on the other side.", "REQUIRED"),
    _c("right_value", "STRING", "", "REQUIRED"),
    _c("created_at", "TIMESTAMP", "When `cdpflow identity split` ran.", "REQUIRED"),
    _c("reason", "STRING", "Why, as given to the command."),
))

IDENTITY_NAMES = Table("identity_names", "Profile ids a manual split gave founding identifiers, so that the part "
                       "marketers know (the one holding the user id, else most identifiers) keeps the profile's id.", (
    _c("identifier_type", "STRING", "A founding identifier (the one a profile's id is the hash of).", "REQUIRED"),
    _c("identifier_value", "STRING", "", "REQUIRED"),
    _c("profile_id", "STRING", "The id a profile it founds has from `created_at` on (the latest row for an "
       "identifier holds).", "REQUIRED"),
    _c("created_at", "TIMESTAMP", "When the split gave the name.", "REQUIRED"),
    _c("reason", "STRING", "Why, as given to the split."),
))

_WINDOW_METRICS = (
    ("orders", "INT64", "Orders (Order Completed)"),
    ("revenue", "NUMERIC", "Revenue of those orders in the reporting currency"),
    ("avg_order_value", "NUMERIC", "revenue / orders"),
    ("email_opens", "INT64", "Email Opened events"),
    ("email_clicks", "INT64", "Email Link Clicked events"),
    ("unsubscribes", "INT64", "Unsubscribed events"),
    ("page_views", "INT64", "page and screen events"),
    ("product_views", "INT64", "Product Viewed events"),
    ("sessions", "INT64", "Sessions (30 minutes of inactivity end one) starting"),
)
WINDOW_DAYS = (7, 30, 90, 365)
WINDOW_COLUMNS = tuple(_c(f"{name}_{w}d", type_, f"{text} in the {w} days up to as_of.")
                       for w in WINDOW_DAYS for name, type_, text in _WINDOW_METRICS)

PROFILES = Table("profiles", "One row per unified profile: traits, features as of a time, lifecycle.", (
    _c("profile_id", "STRING", "Deterministic profile id (p_ + hash of the identifier that created it).", "REQUIRED"),
    _c("user_id", "STRING", "The latest user id seen on the profile."),
    _c("email", "STRING", "The latest email trait (normalised)."),
    _c("phone", "STRING", "The latest phone trait (E.164)."),
    _c("first_name", "STRING", "Latest first_name trait."),
    _c("last_name", "STRING", "Latest last_name trait."),
    _c("age", "INT64", "Age in years: the age trait, or computed from birthday at as_of."),
    _c("city", "STRING", "Latest city trait."),
    _c("country", "STRING", "Latest country trait."),
    _c("interests", "STRING", "Latest interests trait (lowercased).", "REPEATED"),
    _c("traits", "JSON", "All traits, the value with the latest event time winning per trait."),
    _c("identifier_count", "INT64", "How many identifiers the profile holds."),
    _c("first_seen", "TIMESTAMP", "Event time of its first event."),
    _c("last_seen", "TIMESTAMP", "Event time of its latest event."),
    _c("event_count", "INT64", "Events up to as_of."),
    _c("orders_total", "INT64", "Orders (Order Completed) up to as_of: lifetime frequency."),
    _c("revenue_total", "NUMERIC", "Revenue up to as_of in the reporting currency: lifetime monetary value."),
    _c("avg_order_value", "NUMERIC", "revenue_total / orders_total."),
    _c("last_order_at", "TIMESTAMP", "Event time of the latest order."),
    _c("recency_days", "FLOAT64", "Days from the latest order to as_of (null without orders)."),
    _c("tenure_days", "FLOAT64", "Days from first_seen to as_of."),
    *WINDOW_COLUMNS,
    _c("unsubscribed", "BOOL", "True if the latest subscription event up to as_of is Unsubscribed."),
    _c("engagement_score", "FLOAT64", "0-100 from email opens and clicks in 30 days; 0 when unsubscribed (docs/features.md)."),
    _c("category_affinity", "JSON", "Share of each product category in the views, adds and purchases of the last 90 days."),
    _c("top_category", "STRING", "The category with the most views, adds and purchases in the last 90 days."),
    _c("lifecycle_stage", "STRING", "prospect, new, reactivated, active, at_risk, lapsed or churned (docs/features.md)."),
    _c("expected_purchases_30d", "FLOAT64", "BG/NBD: expected orders in the next 30 days (null without orders or model)."),
    _c("expected_purchases_90d", "FLOAT64", "BG/NBD: expected orders in the next 90 days."),
    _c("probability_alive", "FLOAT64", "BG/NBD: probability the customer is still active."),
    _c("expected_order_value", "FLOAT64", "Gamma-Gamma: expected value of a future order (reporting currency)."),
    _c("clv_90d", "FLOAT64", "expected_purchases_90d x expected_order_value (undiscounted)."),
    _c("clv_model_id", "STRING", "The clv_models row whose parameters scored this profile."),
    _c("as_of", "TIMESTAMP", "The time the features were computed at.", "REQUIRED"),
    _c("updated_at", "TIMESTAMP", "Processing time of the run that wrote the row.", "REQUIRED"),
), key=("profile_id",))

SEGMENT_MEMBERSHIPS = Table("segment_memberships", "Segment membership spans; an open span has no exited_at.", (
    _c("profile_id", "STRING", "The member profile.", "REQUIRED"),
    _c("segment", "STRING", "Segment name (lifecycle segments are named lifecycle:<stage>).", "REQUIRED"),
    _c("source", "STRING", "rule, lifecycle or model.", "REQUIRED"),
    _c("entered_at", "TIMESTAMP", "Event time the profile became a member: the event, or the window edge, lifecycle "
       "threshold or birthday after it, that made the rule or stage true (a cluster, or a rule on predicted fields: "
       "the time of the row that was scored; a batch run scores as of its as-of time).", "REQUIRED"),
    _c("exited_at", "TIMESTAMP", "Event time the membership ended, the same way (null while a member)."),
    _c("model_version", "STRING", "Version of the rules or model that assigned it."),
), key=("profile_id", "segment", "entered_at"))

DEAD_LETTERS = Table("dead_letters", "Records that could not be accepted, with their raw payload.", (
    _c("dead_letter_id", "STRING", "Hash of stage and raw payload, so replays do not repeat a row.", "REQUIRED"),
    _c("raw", "STRING", "The record exactly as read.", "REQUIRED"),
    _c("stage", "STRING", "The stage that refused it: parse, validate, normalize, lateness, future, dedup, identity, "
       "warehouse (a row BigQuery refused).", "REQUIRED"),
    _c("error", "STRING", "What was wrong, in words.", "REQUIRED"),
    _c("schema_version", "STRING", "The schema applied (none if the kind was unknown)."),
    _c("identifiers", "JSON", "The normalised identifiers the record carries, as far as it could be read: "
       "[[type, value], ...] (how a forget finds it)."),
    _c("received_at", "TIMESTAMP", "receivedAt of the record if it had one, else when it was read."),
), key=("dead_letter_id",))

LIFECYCLE_TRANSITIONS = Table("lifecycle_transitions", "Every change of a profile's lifecycle stage.", (
    _c("profile_id", "STRING", "The profile.", "REQUIRED"),
    _c("from_stage", "STRING", "The stage before (null for the stage a profile starts in)."),
    _c("to_stage", "STRING", "The stage after.", "REQUIRED"),
    _c("transitioned_at", "TIMESTAMP", "Event time of the change: an order, or an order plus a threshold.", "REQUIRED"),
    _c("as_of", "TIMESTAMP", "as_of of the run (batch) or the emission (stream) that found it.", "REQUIRED"),
    _c("source", "STRING", "batch or stream.", "REQUIRED"),
), key=("profile_id", "transitioned_at", "to_stage"))

CLV_MODELS = Table("clv_models", "Every fit of the predictive customer-value models.", (
    _c("model_id", "STRING", "Hash of as_of, parameters and status.", "REQUIRED"),
    _c("as_of", "TIMESTAMP", "The time the histories were taken at.", "REQUIRED"),
    _c("fitted_at", "TIMESTAMP", "Processing time of the fit.", "REQUIRED"),
    _c("status", "STRING", "fitted, or why not (too few customers, no convergence).", "REQUIRED"),
    _c("customers", "INT64", "Profiles with at least one order."),
    _c("r", "FLOAT64", "BG/NBD shape of the purchase-rate gamma."),
    _c("alpha", "FLOAT64", "BG/NBD scale of the purchase-rate gamma (weeks)."),
    _c("a", "FLOAT64", "BG/NBD dropout beta a."),
    _c("b", "FLOAT64", "BG/NBD dropout beta b."),
    _c("p", "FLOAT64", "Gamma-Gamma shape of spend per order."),
    _c("q", "FLOAT64", "Gamma-Gamma shape of the spend-scale gamma."),
    _c("v", "FLOAT64", "Gamma-Gamma scale of the spend-scale gamma."),
), key=("model_id",))

OUTBOX = Table("outbox", "Messages for the change topics, written in the same transaction as the tables they describe.", (
    _c("idempotency_key", "STRING", "Unique per message: a re-publish sends nothing twice.", "REQUIRED"),
    _c("topic", "STRING", "Where it goes, e.g. cdp.segments.changes.", "REQUIRED"),
    _c("message_key", "STRING", "The message's partition key (the profile id)."),
    _c("payload", "JSON", "The message.", "REQUIRED"),
    _c("created_at", "TIMESTAMP", "Processing time of the commit that wrote it.", "REQUIRED"),
    _c("warehouse_version", "INT64", "The warehouse version that commit created.", "REQUIRED"),
    _c("published_at", "TIMESTAMP", "When a publisher delivered it (null until then)."),
), key=("idempotency_key",))

WAREHOUSE_META = Table("warehouse_meta", "Facts about the warehouse itself: its version, which every commit checks.", (
    _c("name", "STRING", "version: bumped by every commit (optimistic concurrency).", "REQUIRED"),
    _c("value", "INT64", "The value.", "REQUIRED"),
    _c("updated_at", "TIMESTAMP", "When it last changed.", "REQUIRED"),
), key=("name",))

STREAM_OFFSETS = Table("stream_offsets", "Where the loader has read each Kafka partition up to, committed with the rows.", (
    _c("topic", "STRING", "The topic.", "REQUIRED"),
    _c("partition", "INT64", "The partition.", "REQUIRED"),
    _c("next_offset", "INT64", "The first offset not yet loaded.", "REQUIRED"),
    _c("updated_at", "TIMESTAMP", "When the loader last committed it.", "REQUIRED"),
), key=("topic", "partition"))

ALL_TABLES: Dict[str, Table] = {t.name: t for t in (
    EVENTS, IDENTITY_LINKS, PROFILE_MERGES, IDENTITY_CONFLICTS, PROFILES, SEGMENT_MEMBERSHIPS, DEAD_LETTERS,
    IDENTITY_SUPPRESSIONS, IDENTITY_SEPARATIONS, IDENTITY_NAMES, CLV_MODELS, LIFECYCLE_TRANSITIONS, OUTBOX, WAREHOUSE_META,
    STREAM_OFFSETS)}

"""Reading a warehouse file directly in tests, and copying one with the files kept beside it."""
import os
import shutil

import duckdb

COMPANIONS = (".suppression.key", ".identity.sqlite", ".segment_changes.jsonl")


def stem(path):
    return os.path.splitext(str(path))[0]


def copy_warehouse(base, target):
    """A copy of a warehouse with its companions (demo key, identity store, published changes)."""
    shutil.copy(base, target)
    for suffix in COMPANIONS:
        if os.path.exists(stem(base) + suffix):
            shutil.copy(stem(base) + suffix, stem(target) + suffix)


def query(wh, sql, params=()):
    """Rows of a query on the warehouse file, opened read-only (not through the code under test)."""
    con = duckdb.connect(str(wh), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def family_split_input(folder):
    """A shared cookie that founded a profile before a person signed in on it (the cookie's id
    sorts first, so the merge kept it), as a raw JSON-lines file.

    Returns:
      (raw file, cookie, the merged profile's id, the id the person's user id hashes to, the
      person's identifiers as normalised).
    """
    import orjson

    from cdpflow.core.identity import profile_id_for
    cookie = next(f"shared-{n}" for n in range(1000)
                  if profile_id_for(("anonymous_id", f"shared-{n}")) < profile_id_for(("user_id", "u-ann")))

    def event(n, day, **fields):
        return {"messageId": f"fam-{n}", "timestamp": f"2026-10-{day:02d}T10:00:00Z",
                "receivedAt": f"2026-10-{day:02d}T10:00:01Z", **fields}

    events = [
        event(1, 1, type="page", name="Home", anonymousId=cookie),
        event(2, 2, type="identify", userId="u-ann", anonymousId="ann-phone",
              traits={"email": "ann@shop.io", "phone": "+1 415 555 0101"}),
        event(3, 3, type="track", event="Order Completed", userId="u-ann",
              properties={"order_id": "o-1", "revenue": 120.0, "currency": "USD"}),
        event(4, 4, type="track", event="Product Viewed", anonymousId=cookie, userId="u-ann"),
    ]
    raw = os.path.join(str(folder), "family.jsonl")
    with open(raw, "wb") as handle:
        handle.write(b"".join(orjson.dumps(e) + b"\n" for e in events))
    person = {("user_id", "u-ann"), ("email", "ann@shop.io"), ("phone", "+14155550101"), ("anonymous_id", "ann-phone")}
    return raw, cookie, profile_id_for(("anonymous_id", cookie)), profile_id_for(("user_id", "u-ann")), person

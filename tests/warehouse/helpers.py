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

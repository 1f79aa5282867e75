"""The warehouse: the `Warehouse` interface and its backends, chosen by URI (`open_warehouse`).

DuckDB (`duckdb:///path/cdp.duckdb`, or a plain path) is the embedded default; BigQuery joins
through the same table contract (`cdpflow.schemas.tables`).
"""
from cdpflow.warehouse.base import ConcurrentWriteError, Warehouse, WarehouseError, open_warehouse, warehouse_path
from cdpflow.warehouse.embedded import DuckDBWarehouse

__all__ = ["ConcurrentWriteError", "DuckDBWarehouse", "Warehouse", "WarehouseError", "open_warehouse", "warehouse_path"]

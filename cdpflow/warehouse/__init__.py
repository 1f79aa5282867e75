"""The warehouse: the embedded DuckDB file (BigQuery arrives through the same table contract)."""
from cdpflow.warehouse.embedded import DuckDBWarehouse, WarehouseError

__all__ = ["DuckDBWarehouse", "WarehouseError"]

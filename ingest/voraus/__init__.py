"""voraus-AD parquet files: layout, streaming reader."""

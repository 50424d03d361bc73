"""Run records: every run kept, sweeps of runs, DuckDB views over the store, and garbage collection."""

"""The cache core: content-addressed artifacts, keys, shards, the row memo, claims, and the driver that
runs stages through them. Plain Python: no Prefect, no dataset layout, no stage imports."""

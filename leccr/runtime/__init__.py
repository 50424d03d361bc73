"""Where and how work runs: devices and threads, model paths and the hub cache, progress, preflight checks,
scale-out checks."""

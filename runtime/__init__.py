"""runtime: schedulers, health checks, the router, process logs."""

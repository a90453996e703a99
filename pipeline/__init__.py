"""pipeline: deployments and the release ledger, stack detection, builders, config, the job queue."""

from pathlib import Path

MIGRATIONS = Path(__file__).parent / "migrations"

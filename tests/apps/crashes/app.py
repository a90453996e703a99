"""A web process that exits at start, before it ever listens on $PORT."""
import sys

print("crashing on purpose", flush=True)
sys.exit(3)

"""predeploy / postdeploy hook: records that it ran, so the web process and tests can see it."""
import sys
from pathlib import Path

Path(f"{sys.argv[1]}.stamp").write_text(f"{sys.argv[1]} ran")
print(f"{sys.argv[1]} hook ran", flush=True)

"""The release phase: runs once per release, before the new processes start."""
import os
from pathlib import Path

Path("release.stamp").write_text(f"release ran for {os.environ.get('DEVFLOW_RELEASE', 'unknown release')}")
print("release phase ran", flush=True)

# Sourced by the scripts: a virtual environment in .venv with DevFlow installed (editable),
# reinstalled only when pyproject.toml changes or extras are asked for that the install lacks
# (an install with the test extras serves `scripts/up` and `scripts/bench` as it is).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${DEVFLOW_VENV:-$ROOT/.venv}

ensure_venv() {
  local extras=${1:-} python stamp hash have_hash="" have_extras=""
  for python in python3.13 python3.12 python3.11 python3; do
    command -v "$python" >/dev/null && "$python" 2>/dev/null -c 'import sys; sys.exit(sys.version_info < (3, 11))' && break
    python=""
  done
  [ -n "$python" ] || { echo "DevFlow needs Python 3.11 or newer" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
  stamp=$VENV/.devflow-installed
  hash=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)
  [ -f "$stamp" ] && { read -r have_hash have_extras <"$stamp" || true; }
  if [ "$have_hash" != "$hash" ] || { [ -n "$extras" ] && [ "$have_extras" != "$extras" ]; }; then
    echo "installing DevFlow into $VENV ..." >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT$extras" >&2
    echo "$hash $extras" >"$stamp"
  fi
}

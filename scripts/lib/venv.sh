# Sourced by the scripts: a virtual environment in .venv with DevFlow installed (editable),
# reinstalled only when pyproject.toml (or the extras asked for) change.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${DEVFLOW_VENV:-$ROOT/.venv}

ensure_venv() {
  local extras=${1:-} python stamp want
  for python in python3.13 python3.12 python3.11 python3; do
    command -v "$python" >/dev/null && "$python" 2>/dev/null -c 'import sys; sys.exit(sys.version_info < (3, 11))' && break
    python=""
  done
  [ -n "$python" ] || { echo "DevFlow needs Python 3.11 or newer" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
  stamp=$VENV/.devflow-installed
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16) $extras"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing DevFlow into $VENV ..." >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT$extras" >&2
    echo "$want" >"$stamp"
  fi
}

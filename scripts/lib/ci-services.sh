# Sourced by scripts/test under CI=true: the system packages the integration tests drive.
CI_PACKAGES=(git openssh-client)

install_ci_packages() {
  local missing=() pkg
  for pkg in "${CI_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "CI: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages cv-worker's demo and tests need, or says exactly how to when not root.
# Usage: scripts/system-deps.sh PACKAGE...   (each PACKAGE may be "pkg:command-that-proves-it-is-there")
set -euo pipefail
missing=()
for spec in "$@"; do
  pkg=${spec%%:*}
  probe=${spec#*:}
  if [ "$probe" != "$spec" ]; then
    eval "$probe" >/dev/null 2>&1 && continue
  else
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && continue
  fi
  missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "cv-worker needs these system packages: ${missing[*]}" >&2
  echo "install them with:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo ">> apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"

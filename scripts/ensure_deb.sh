#!/usr/bin/env bash
# Something the tests or the engine use from Debian: installed here when missing and we may
# (root with apt-get); otherwise a warning saying what goes without it. Never fails the build.
#   scripts/ensure_deb.sh PACKAGE "WHAT GOES WITHOUT IT" COMMAND [COMMAND ...]
# Nothing to do when any COMMAND is on PATH.
set -u
package=$1 without=$2
shift 2
for b in "$@"; do
  if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's $package (apt-get)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null \
    || echo "warning: could not install $package; $without" >&2
else
  echo "warning: no $package and no root apt-get; $without" >&2
fi
exit 0

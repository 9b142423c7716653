#!/usr/bin/env bash
# The playground page's browser test needs a Chromium: Debian's package, installed here when
# missing and we may (root with apt-get). Without one the test says so and is skipped.
set -u
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test (apt-get)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
else
  echo "warning: no chromium and no root apt-get; the browser test will be skipped" >&2
fi
exit 0

#!/usr/bin/env bash
# Renders a tapelora HTML report (or any page/SVG) in headless Chromium and saves a PNG, to look
# at what a person would see. Not part of CI. Needs Debian's chromium (apt-get install chromium).
#   tools/screenshot_report.sh runs/demo/report/index.html report.png
set -euo pipefail
page=$(realpath "${1:?usage: screenshot_report.sh PAGE.html OUT.png}")
out=${2:-report.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1200,3000 --screenshot="$out" "file://$page"
echo "wrote $out"

#!/bin/sh
# Make sure a headless Chromium is present for the report rendering test (Testing/metrics) and the browser tests
# of `xaioverlay serve` (Testing/web, driven through the playwright package, which never downloads a browser here).
# Installs Debian/Ubuntu's chromium with apt-get when missing (as root, or through password-less sudo).
# Never fails the build itself: if Chromium cannot be installed, the rendering test fails and says why.
set -u
for name in "${XAIOVERLAY_CHROMIUM:-}" chromium chromium-browser google-chrome google-chrome-stable; do
    [ -n "$name" ] && command -v "$name" >/dev/null 2>&1 && exit 0
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no Chromium and no apt-get; install Chromium (or set XAIOVERLAY_CHROMIUM) for the report test" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    run=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run="sudo -n"
else
    echo "ensure_chromium: Chromium missing; run 'sudo apt-get install chromium' (needed by the report test)" >&2
    exit 0
fi
echo "ensure_chromium: installing chromium with apt-get (once)" >&2
$run apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $run apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || echo "ensure_chromium: apt-get could not install chromium; the report test will fail" >&2
exit 0

#!/bin/sh
# Install the public-domain corpora the demo language model (demo:lm) is trained on:
# Debian's bible-kjv (with bible-kjv-text), whose `bible -f Gen1:1-Rev22:21` prints the
# King James Bible one verse a line. Run once on a training machine; tests never need it.
set -eu
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_corpora.sh: run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends bible-kjv
command -v bible >/dev/null 2>&1 || { echo "install_corpora.sh: bible-kjv installed but no 'bible' command on PATH" >&2; exit 1; }
echo "bible-kjv: $(bible -f Gen1:1-Rev22:21 | wc -l) verses"

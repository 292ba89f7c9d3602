#!/usr/bin/env bash
# The main job on the embedded default, as far as rankwire goes today:
# check the host facts rankwire relies on.
set -euo pipefail
echo "== rankwire doctor"
rankwire doctor

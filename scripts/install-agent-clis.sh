#!/usr/bin/env bash
# The real agent CLIs the agent tests drive against a local Orchard (each test skips without its CLI):
#   Claude Code (@anthropic-ai/claude-code) speaks /v1/messages; Codex CLI (@openai/codex) /v1/responses.
# Both run offline against a local base URL. Installed into ORCHARD_AGENTS_DIR (default
# ~/.cache/orchard/agents), never globally; their binaries land in $ORCHARD_AGENTS_DIR/node_modules/.bin.
set -euo pipefail
dir=${ORCHARD_AGENTS_DIR:-$HOME/.cache/orchard/agents}
command -v npm >/dev/null || { echo "npm not found: agent CLI tests will skip" >&2; exit 0; }
mkdir -p "$dir"
npm install --silent --no-audit --no-fund --prefix "$dir" @anthropic-ai/claude-code@2.1.332 @openai/codex@0.171.0
ls "$dir/node_modules/.bin"

"""The README's demo command, run as a user would (minus setup, done by the test command)."""

import os
import subprocess
from pathlib import Path

from mesh import BIN, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_one_line_per_call():
    env = dict(
        os.environ,
        DEMO_SKIP_SETUP="1",
        AGENTMESH_BIN_DIR=str(BIN),
        AGENTMESH_DEMO_OUTBOUND=str(free_port()),
        AGENTMESH_DEMO_ADMIN=str(free_port()),
        AGENTMESH_DEMO_LLM=str(free_port()),
        AGENTMESH_DEMO_MCP=str(free_port()),
    )
    out = subprocess.run(
        ["bash", "scripts/sdk-demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("outbound ")]
    # the chat completion, with the mock's hand-computable usage (6 words + 4 in, "Paris." out)
    assert any("llm/openai" in l and "gpt-4o-mini" in l and " 200 " in l and "tokens 10/1 " in l for l in lines), lines
    assert any("llm/anthropic" in l and "claude-haiku-4-5" in l for l in lines), lines
    assert any("tools/call:web_search" in l for l in lines), lines
    assert any("server/discover" in l for l in lines), lines
    assert any("mcp/shell" in l and " 403 " in l and "not_granted" in l for l in lines), lines
    # the demo policy's denial, with its reason, in the sidecar's line and in what the agent got
    assert any("tools/call:read_file" in l and " 403 " in l and "policy_denied" in l for l in lines), lines
    assert 'agent got error -32003: tool "read_file" is not allowed for agent "planner"' in out.stdout

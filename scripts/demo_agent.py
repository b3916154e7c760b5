"""The demo's agent: a few calls with the official SDKs, all through the local sidecar.
The sidecar prints one line per call as it happens."""

import json
import os
import sys
import urllib.error
import urllib.request

import anthropic
import anyio
import openai
from mcp import Client, MCPError

MESH = os.environ.get("AGENTMESH_OUTBOUND", "http://127.0.0.1:15001")


def say(line: str) -> None:
    """Prints a line in one write: the sidecar prints its own lines to the same terminal, and
    `print` may write a line and its newline apart, letting one of those land in between."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def step(text: str) -> None:
    say(f"\n# {text}")


async def mcp_calls() -> None:
    step("MCP, session-based revision: list the tools, then search")
    async with Client(f"{MESH}/mcp/search-tools", mode="legacy") as c:
        tools = await c.list_tools()
        say(f"  agent sees tools: {', '.join(t.name for t in tools.tools)}")
        r = await c.call_tool("web_search", {"q": "service mesh"})
        say(f"  agent got: {r.content[0].text}")
    step("MCP, stateless 2026-07-28 revision: add two numbers")
    async with Client(f"{MESH}/mcp/search-tools") as c:
        r = await c.call_tool("add", {"a": 19, "b": 23})
        say(f"  agent got: {r.content[0].text}")
    step("A tool the policy does not allow this agent (examples/local/policy): denied with its reason")
    async with Client(f"{MESH}/mcp/search-tools") as c:
        try:
            await c.call_tool("read_file", {"path": "/notes.txt"})
            say("  unexpected: the call went through")
        except MCPError as e:
            say(f"  agent got error {e.code}: {e.message}")


def main() -> int:
    oa = openai.OpenAI(base_url=f"{MESH}/llm/openai/v1", api_key="demo-key-not-needed", max_retries=0)
    an = anthropic.Anthropic(base_url=f"{MESH}/llm/anthropic", api_key="demo-key-not-needed", max_retries=0)

    step("OpenAI chat completion")
    r = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "What is the capital of France?"}])
    say(f"  agent got: {r.choices[0].message.content}")

    step("OpenAI streamed completion (the sidecar reads usage off the final chunk)")
    text = "".join(
        c.choices[0].delta.content or ""
        for c in oa.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Stream a short greeting"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        if c.choices
    )
    say(f"  agent got: {text}")

    step("OpenAI tool call decided by the (scripted) model")
    r = oa.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Find the latest news on agents"}],
        tools=[{"type": "function", "function": {"name": "web_search", "parameters": {"type": "object"}}}],
    )
    call = r.choices[0].message.tool_calls[0].function
    say(f"  model asks for: {call.name}({call.arguments})")

    step("Anthropic message")
    m = an.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "Say hello"}])
    say(f"  agent got: {m.content[0].text}")

    anyio.run(mcp_calls)

    step("A call to an MCP server the agent was not granted: refused before any connection")
    req = urllib.request.Request(f"{MESH}/mcp/shell", data=b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', method="POST")
    try:
        urllib.request.urlopen(req, timeout=10)
        say("  unexpected: the call went through")
        return 1
    except urllib.error.HTTPError as e:
        say(f"  agent got {e.code}: {json.loads(e.read())['error']['message']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

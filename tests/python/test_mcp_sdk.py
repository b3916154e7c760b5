"""The official MCP Python SDK client as the agent, through a running sidecar, in both protocol
revisions: the session-based handshake and the stateless 2026-07-28 one."""

import json
import urllib.error
import urllib.request

import anyio
from mcp import Client, MCPError


def run(coro):
    return anyio.run(coro)


def test_mcp_legacy_session(mesh):
    async def go():
        async with Client(f"{mesh.base}/mcp/tools", mode="legacy") as c:
            tools = await c.list_tools()
            assert {t.name for t in tools.tools} >= {"echo", "add", "web_search"}
            r = await c.call_tool("add", {"a": 2, "b": 40})
            assert r.content[0].text == "42"

    run(go)
    calls = mesh.wait_calls(4)
    methods = [m["method"] for c in calls for m in c.get("mcp", {}).get("messages", [])]
    assert methods[:2] == ["initialize", "notifications/initialized"]
    assert "tools/list" in methods and "tools/call" in methods
    add = next(c for c in calls if any(m.get("tool") == "add" for m in c.get("mcp", {}).get("messages", [])))
    msg = add["mcp"]["messages"][0]
    assert "arguments" not in msg, "tool arguments never reach the access log"
    assert add["mcp"]["session_id"], "the session id is recorded"
    assert add["mcp"]["protocol_version"] == "2025-11-25"


def test_mcp_stateless_revision_with_param_headers(mesh):
    async def go():
        async with Client(f"{mesh.base}/mcp/tools") as c:  # auto: probes server/discover
            r = await c.call_tool("web_search", {"q": "agents", "region": "eu"})
            assert "agents" in r.content[0].text and "(eu)" in r.content[0].text

    run(go)
    calls = mesh.wait_calls(2)
    methods = [m["method"] for c in calls for m in c.get("mcp", {}).get("messages", [])]
    assert methods[0] == "server/discover"
    call = next(c for c in calls if c["mcp"]["messages"][0]["method"] == "tools/call")
    assert call["mcp"]["protocol_version"] == "2026-07-28"
    assert call["mcp"]["messages"][0]["tool"] == "web_search"
    assert "session_id" not in call["mcp"]


def post(mesh, path, body: bytes, headers=None):
    req = urllib.request.Request(f"{mesh.base}{path}", data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_malformed_and_oversized_bodies(mesh):
    status, body = post(mesh, "/mcp/tools", b'{"jsonrpc": "2.0", "method": ')
    assert status == 400 and body["error"]["code"] == -32700
    assert body["error"]["data"]["upstream"] == "mcp/tools"
    status, body = post(mesh, "/llm/openai/v1/chat/completions", b"{oops")
    assert status == 400 and body["error"]["type"] == "malformed_json"
    big = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"' + b"x" * 70000 + b'"}}}'
    status, body = post(mesh, "/mcp/tools", big)
    assert status == 413 and body["error"]["data"]["type"] == "body_too_large"
    # a header that disagrees with the body is refused before it reaches the server
    status, body = post(
        mesh,
        "/mcp/tools",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"a"}}}',
        {"Mcp-Method": "tools/call", "Mcp-Name": "add"},
    )
    assert status == 400 and body["error"]["code"] == -32020
    # and the sidecar is still serving
    async def ok():
        async with Client(f"{mesh.base}/mcp/tools", mode="legacy") as c:
            assert (await c.call_tool("echo", {"text": "still here"})).content[0].text == "still here"

    run(ok)


def test_policy_denies_an_undeclared_tool_in_both_revisions(mesh):
    # The demo policy lets agent `planner` use echo, add and web_search: not read_file.
    async def go(mode):
        kwargs = {"mode": mode} if mode else {}
        async with Client(f"{mesh.base}/mcp/tools", **kwargs) as c:
            assert (await c.call_tool("echo", {"text": "allowed"})).content[0].text == "allowed"
            try:
                await c.call_tool("read_file", {"path": "/notes.txt"})
                raise AssertionError("expected a policy deny")
            except MCPError as e:  # the sidecar's JSON-RPC error, as the SDK surfaces it
                assert e.code == -32003
                assert e.message == 'tool "read_file" is not allowed for agent "planner"'
                assert e.data["type"] == "policy_denied" and e.data["upstream"] == "mcp/tools"

    run(lambda: go("legacy"))
    run(lambda: go(None))
    denied = [c for c in mesh.wait_calls(1) if c.get("decision", {}).get("allow") is False]
    assert len(denied) == 2, denied

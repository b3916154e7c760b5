"""The official A2A Python SDK (a2a-sdk) as the client of an agentmesh agent, through a sidecar:
the SDK resolves the agent's card through the sidecar, speaks A2A JSON-RPC — 1.0, which it
prefers among the card's interfaces, and 0.3, when only that one is left — to the agent behind
the sidecar's `agents/approver` route, sees the task pause
in input-required with the agent's question, answers it, and gets the completed task with its
artifact; streaming gives status events before the final one; an unknown task is the SDK's
TaskNotFound error. Every call is in the sidecar's access log as an a2a call."""

import asyncio
import json

import httpx
import pytest
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb

from mesh import Mesh, free_port, wait_http

WORKFLOW = """workflow:
  - {id: approve, ask: 'Publish {{input}}?'}
  - {id: publish, tool: {server: tools, name: echo, arguments: {text: 'published {{input}}: {{steps.approve}}'}}}
"""


class AgentMesh(Mesh):
    """Mock LLM, MCP server, one sidecar and one agent (`approver`) behind its `agents/` route."""

    def start(self) -> "AgentMesh":
        self.agent_port = free_port()
        self._spawn("mcp-tools", "--listen", f"127.0.0.1:{self.mcp_port}")
        cfg = self.dir / "sidecar.yaml"
        cfg.write_text(
            f"""agent: {{name: client}}
listeners: {{outbound: "127.0.0.1:{self.out_port}", admin: "127.0.0.1:{self.admin_port}"}}
upstreams:
  - name: agents/approver
    endpoints: ["http://127.0.0.1:{self.agent_port}"]
  - name: mcp/tools
    endpoints: ["http://127.0.0.1:{self.mcp_port}/mcp"]
policy: {{path: "{self.dir / 'policy'}"}}
"""
        )
        (self.dir / "policy").mkdir()
        (self.dir / "policy" / "authz.rego").write_text("package agentmesh.authz\n\ndecision := true\n")
        manifest = self.dir / "approver.yaml"
        manifest.write_text(
            f"""name: approver
description: Asks before it publishes
model: {{provider: openai, name: gpt-4o-mini}}
tools: [tools]
skills: [{{id: publish, name: Publish with approval}}]
sidecar: "{self.base}"
listen: "127.0.0.1:{self.agent_port}"
card_url: "{self.base}/agents/approver/"
store: "{self.dir / 'approver.db'}"
{WORKFLOW}"""
        )
        self._spawn("agentmesh-proxy", "--config", str(cfg), "--access-log", str(self.access_log))
        self._spawn("agentmesh-agent", "--manifest", str(manifest))
        wait_http(f"http://127.0.0.1:{self.mcp_port}/healthz")
        wait_http(f"http://127.0.0.1:{self.admin_port}/readyz")
        wait_http(f"http://127.0.0.1:{self.agent_port}/healthz")
        return self


@pytest.fixture()
def agent_mesh():
    m = AgentMesh().start()
    yield m
    m.stop()


def user_message(text: str, task_id: str = "") -> pb.Message:
    m = pb.Message(message_id=f"msg-{text}-{task_id}", role=pb.ROLE_USER, parts=[pb.Part(text=text)])
    if task_id:
        m.task_id = task_id
    return m


async def collect(client, message: pb.Message) -> list:
    events = []
    async for ev in client.send_message(pb.SendMessageRequest(message=message)):
        events.append(ev)
    return events


def tasks_of(events) -> list:
    """The task each event carries or describes (StreamResponse or (task, update) tuples)."""
    out = []
    for ev in events:
        if isinstance(ev, tuple):
            ev = ev[0]
        if hasattr(ev, "HasField") and ev.HasField("task"):
            out.append(ev.task)
        elif isinstance(ev, pb.Task):
            out.append(ev)
    return out


@pytest.mark.parametrize("version", ["1.0", "0.3"])
def test_the_sdk_pauses_for_input_answers_and_gets_the_artifact(agent_mesh, version):
    async def run():
        async with httpx.AsyncClient(timeout=20) as http:
            card = await A2ACardResolver(http, f"{agent_mesh.base}/agents/approver").get_agent_card()
            assert card.name == "approver"
            assert [(i.url, i.protocol_version) for i in card.supported_interfaces] == [
                (f"{agent_mesh.base}/agents/approver/", "1.0"),
                (f"{agent_mesh.base}/agents/approver/", "0.3"),
            ]
            # The SDK takes the newest revision the card offers: leave only the one under test.
            keep = [i for i in card.supported_interfaces if i.protocol_version == version]
            del card.supported_interfaces[:]
            card.supported_interfaces.extend(keep)
            client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)

            first = tasks_of(await collect(client, user_message("the brief")))
            assert first, "a task came back"
            task = first[-1]
            assert task.status.state == pb.TASK_STATE_INPUT_REQUIRED, task
            assert task.status.message.parts[0].text == "Publish the brief?"

            done = tasks_of(await collect(client, user_message("yes", task.id)))[-1]
            assert done.status.state == pb.TASK_STATE_COMPLETED, done
            assert done.artifacts[0].parts[0].text == "published the brief: yes"
            got = await client.get_task(pb.GetTaskRequest(id=task.id))
            assert got.status.state == pb.TASK_STATE_COMPLETED

            with pytest.raises(Exception) as e:
                await client.get_task(pb.GetTaskRequest(id="no-such-task"))
            assert "no task" in str(e.value).lower() or "not found" in str(e.value).lower(), e.value

            # Streaming: the task, then status events, the last one final.
            streaming = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
            events = await collect(streaming, user_message("the memo"))
            assert events[0].HasField("task"), events
            assert events[0].task.status.state == pb.TASK_STATE_WORKING
            updates = [e.status_update for e in events[1:] if e.HasField("status_update")]
            assert [u.status.message.parts[0].text for u in updates if u.status.message.parts] == [
                "step 1 of 2: approve",
                "Publish the memo?",
            ], events
            assert updates[-1].status.state == pb.TASK_STATE_INPUT_REQUIRED

    asyncio.run(run())
    expected = {
        "1.0": {"SendMessage", "GetTask", "SendStreamingMessage"},
        "0.3": {"message/send", "tasks/get", "message/stream"},
    }[version]

    def methods(calls):
        return {c["a2a"]["method"] for c in calls if c["kind"] == "a2a" and c.get("a2a")}

    # A streamed call is logged when its stream ends, which may be after the client has its
    # last event: wait for the calls asked for, not for a count of lines.
    calls = agent_mesh.wait_until(lambda calls: expected <= methods(calls))
    a2a = [c for c in calls if c["kind"] == "a2a"]
    assert expected <= methods(calls), json.dumps(a2a, indent=1)

    assert all(c["target"] == "agents/approver" for c in a2a)

"""Starts real agentmesh processes on loopback for the SDK suites: mock LLM, sample MCP
server and one sidecar, each on a free port, and reads the sidecar's access log."""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("AGENTMESH_BIN_DIR", ROOT / "target" / "debug"))
# The demo's policy: agent `planner` may use the models and tools its data.json lists.
POLICY = ROOT / "examples" / "local" / "policy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not come up")
            time.sleep(0.05)


class Mesh:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="agentmesh-py-"))
        self.procs: list[subprocess.Popen] = []
        self.llm_port, self.mcp_port = free_port(), free_port()
        self.out_port, self.admin_port = free_port(), free_port()
        self.access_log = self.dir / "access.jsonl"

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([str(BIN / name), *args], stdout=log, stderr=subprocess.STDOUT))

    def start(self) -> "Mesh":
        self._spawn("mock-llm", "--listen", f"127.0.0.1:{self.llm_port}")
        self._spawn("mcp-tools", "--listen", f"127.0.0.1:{self.mcp_port}")
        cfg = self.dir / "sidecar.yaml"
        cfg.write_text(
            f"""agent: {{name: planner}}
listeners: {{outbound: "127.0.0.1:{self.out_port}", admin: "127.0.0.1:{self.admin_port}"}}
limits: {{max_inspect_body_bytes: 65536}}
upstreams:
  - name: llm/openai
    endpoints: ["http://127.0.0.1:{self.llm_port}"]
  - name: llm/anthropic
    endpoints: ["http://127.0.0.1:{self.llm_port}"]
  - name: mcp/tools
    endpoints: ["http://127.0.0.1:{self.mcp_port}/mcp"]
policy: {{path: "{POLICY}"}}
"""
        )
        self._spawn("agentmesh-proxy", "--config", str(cfg), "--access-log", str(self.access_log))
        wait_http(f"http://127.0.0.1:{self.llm_port}/healthz")
        wait_http(f"http://127.0.0.1:{self.mcp_port}/healthz")
        wait_http(f"http://127.0.0.1:{self.admin_port}/readyz")
        return self

    def stop(self) -> None:
        # SIGINT is the sidecar's fast shutdown; SIGTERM would drain for the grace period.
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.out_port}"

    def calls(self) -> list[dict]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def wait_calls(self, n: int, timeout: float = 5.0) -> list[dict]:
        """The access log is written when a call ends; wait until it has `n` lines."""
        return self.wait_until(lambda calls: len(calls) >= n, timeout)

    def wait_until(self, done, timeout: float = 15.0) -> list[dict]:
        """The access log's calls once `done(calls)` holds, or as they are at `timeout`."""
        deadline = time.time() + timeout
        calls = self.calls()
        while not done(calls) and time.time() < deadline:
            time.sleep(0.02)
            calls = self.calls()
        return calls

package agentmesh.lib.manifest_test

import rego.v1

import data.agentmesh.lib.manifest

call(agent, kind, name) := {
	"direction": "outbound", "source": {"agent": agent},
	"destination": {"kind": kind, "name": name},
}

test_declared_upstreams_pass if {
	count(manifest.deny) == 0 with input as call("planner", "llm", "openai")
	count(manifest.deny) == 0 with input as call("planner", "a2a", "writer")
}

test_undeclared_upstream_is_denied if {
	manifest.deny == {`agent "writer" does not declare mcp/search-tools`} with input as call("writer", "mcp", "search-tools")
}

test_agents_are_named_agents_slash if {
	manifest.deny == {`agent "writer" does not declare agents/planner`} with input as call("writer", "a2a", "planner")
}

test_tools_are_declared_per_server if {
	inp := object.union(call("researcher", "mcp", "search-tools"), {"mcp": {"method": "tools/call", "tool": "read_file"}})
	manifest.deny == {`agent "researcher" does not declare tool "read_file" of mcp/search-tools`} with input as inp
}

test_session_messages_need_no_tool if {
	inp := object.union(call("planner", "mcp", "search-tools"), {"mcp": {"method": "tools/list"}})
	count(manifest.deny) == 0 with input as inp
}

test_inbound_calls_are_not_the_manifest_s_business if {
	inp := {"direction": "inbound", "source": {"agent": ""}, "destination": {"kind": "a2a", "name": "writer"}}
	count(manifest.deny) == 0 with input as inp
}

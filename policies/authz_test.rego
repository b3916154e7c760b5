# Tests of the composed decision, with the library's example data (data.json).
# Run: agentmesh policy test policies/
package agentmesh.authz_test

import rego.v1

import data.agentmesh.authz

llm(agent, model) := {
	"version": 1, "direction": "outbound", "source": {"agent": agent},
	"destination": {"kind": "llm", "name": "openai"},
	"request": {"method": "POST", "path": "/llm/openai/v1/chat/completions", "headers": {}},
	"llm": {"provider": "openai", "operation": "chat_completions", "model": model, "stream": false},
}

tool(agent, server, name, args) := {
	"version": 1, "direction": "outbound", "source": {"agent": agent},
	"destination": {"kind": "mcp", "name": server},
	"request": {"method": "POST", "path": sprintf("/mcp/%s", [server]), "headers": {}},
	"mcp": {"method": "tools/call", "tool": name, "arguments": args, "batch_size": 1},
}

test_declared_model_is_allowed if {
	authz.decision == {"allow": true} with input as llm("planner", "gpt-4o-mini")
}

test_undeclared_model_is_denied_with_reason if {
	d := authz.decision with input as llm("planner", "gpt-4.1")
	d.allow == false
	d.status == 403
	d.reason == `model "gpt-4.1" is not allowed for agent "planner"`
}

test_unknown_agent_is_denied if {
	d := authz.decision with input as llm("intruder", "gpt-4o-mini")
	d.allow == false
	contains(d.reason, `agent "intruder" has no manifest`)
}

test_every_reason_is_given if {
	d := authz.decision with input as tool("writer", "search-tools", "shell", {"cmd": "rm -rf /"})
	d.allow == false
	contains(d.reason, "does not declare mcp/search-tools")
	contains(d.reason, `does not declare tool "shell"`)
}

test_over_budget_is_429 if {
	inp := object.union(llm("planner", "gpt-4o-mini"), {"budget": {"spent_usd": 5.01, "window": "24h"}})
	d := authz.decision with input as inp
	d.allow == false
	d.status == 429
}

test_over_budget_and_forbidden_is_403 if {
	inp := object.union(llm("planner", "gpt-4.1"), {"budget": {"spent_usd": 9, "window": "24h"}})
	d := authz.decision with input as inp
	d.status == 403
}

test_declared_tool_is_allowed if {
	authz.decision.allow with input as tool("planner", "search-tools", "web_search", {"q": "mesh"})
}

# An agent may call only what its manifest declares: upstreams (`llm/openai`, `mcp/search-tools`,
# `agents/writer`, `http/weather`) and, per MCP server, the tools it may call.
#
# data.agents.<agent>.upstreams: ["llm/openai", ...]
# data.agents.<agent>.tools.<mcp server>: ["web_search", ...]
package agentmesh.lib.manifest

import rego.v1

agent := data.agents[input.source.agent]

# The destination as the manifest names it: `agents/<name>` for A2A, `<kind>/<name>` otherwise.
destination := sprintf("agents/%s", [input.destination.name]) if input.destination.kind == "a2a"

destination := sprintf("%s/%s", [input.destination.kind, input.destination.name]) if {
	input.destination.kind != "a2a"
}

deny contains sprintf("agent %q has no manifest", [input.source.agent]) if {
	input.direction == "outbound"
	not agent
}

deny contains sprintf("agent %q does not declare %s", [input.source.agent, destination]) if {
	input.direction == "outbound"
	agent
	not destination in agent.upstreams
}

deny contains sprintf("agent %q does not declare tool %q of %s", [input.source.agent, input.mcp.tool, destination]) if {
	input.direction == "outbound"
	input.mcp.method == "tools/call"
	not input.mcp.tool in object.get(agent, ["tools", input.destination.name], [])
}

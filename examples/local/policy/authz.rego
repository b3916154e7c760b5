# The local demo's policy. Each agent may use the models and MCP tools that data.json lists for
# it; everything else is denied with a reason the caller sees. See docs/policy.md.
package agentmesh.authz

import rego.v1

agent := data.agents[input.source.agent]

default decision := {"allow": false, "reason": "no rule of the demo policy allows this call"}

decision := {"allow": true} if allowed

decision := {"allow": false, "reason": sprintf("model %q is not allowed for agent %q", [input.llm.model, input.source.agent])} if {
	input.llm.model
	not allowed
}

decision := {"allow": false, "reason": sprintf("tool %q is not allowed for agent %q", [input.mcp.tool, input.source.agent])} if {
	input.mcp.tool
	not allowed
}

# LLM calls to an allowed model; listing models names none.
allowed if input.llm.model in agent.models

allowed if {
	input.destination.kind == "llm"
	not input.llm.model
}

# MCP: the session's own messages (initialize, tools/list, notifications, the GET stream, the
# closing DELETE) carry no tool; tool calls must name an allowed tool.
allowed if {
	input.destination.kind == "mcp"
	not input.mcp.tool
}

allowed if input.mcp.tool in agent.tools

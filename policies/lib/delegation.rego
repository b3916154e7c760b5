# The A2A delegation graph: who may delegate tasks to whom, and how long a chain of delegations
# may grow. The chain is the token's nested `act` claim (RFC 8693): each hop that acted for the
# user adds one level, so a planner acting for a researcher acting for alice is depth 2.
#
# data.agents.<agent>.delegates_to: ["writer", "researcher"]
# data.delegation.max_depth: 3
package agentmesh.lib.delegation

import rego.v1

deny contains sprintf("agent %q may not delegate to %q", [input.source.agent, input.destination.name]) if {
	input.direction == "outbound"
	input.destination.kind == "a2a"
	not input.destination.name in object.get(data.agents, [input.source.agent, "delegates_to"], [])
}

deny contains sprintf("delegation chain too deep: more than %d hops", [max]) if {
	input.destination.kind == "a2a"
	max := data.delegation.max_depth
	# The actor one level beyond the limit exists: the chain is too long.
	object.get(claims, acts(max + 1), null) != null
}

claims := object.get(input, ["user", "claims"], {})

# ["act", "act", ...], n times: the path to the n-th actor in the token's `act` chain.
acts(n) := [k | some _ in numbers.range(1, n); k := "act"]

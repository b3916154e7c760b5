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

deny contains sprintf("delegation chain too deep: %d hops, at most %d", [depth, data.delegation.max_depth]) if {
	input.destination.kind == "a2a"
	depth > data.delegation.max_depth
}

claims := object.get(input, ["user", "claims"], {})

# The number of nested `act` claims in the caller's token (counted up to 16).
depth := count([n |
	some n in numbers.range(1, 16)
	object.get(claims, acts(n), null) != null
])

# ["act", "act", ...], n times: the path to the n-th actor.
acts(n) := [k | some _ in numbers.range(1, n); k := "act"]

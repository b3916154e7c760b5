package agentmesh.lib.delegation_test

import rego.v1

import data.agentmesh.lib.delegation

a2a(from, to, claims) := {
	"direction": "outbound", "source": {"agent": from},
	"destination": {"kind": "a2a", "name": to},
	"user": {"sub": "alice", "claims": claims},
}

test_allowed_edge_passes if {
	count(delegation.deny) == 0 with input as a2a("planner", "writer", {})
}

test_edge_not_in_the_graph_is_refused if {
	delegation.deny == {`agent "writer" may not delegate to "planner"`} with input as a2a("writer", "planner", {})
}

test_a_chain_at_the_limit_passes if {
	at_limit := {"act": {"sub": "planner", "act": {"sub": "researcher"}}}
	count(delegation.deny) == 0 with input as a2a("planner", "writer", at_limit)
}

test_too_deep_a_chain_is_refused if {
	deep := {"act": {"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}}}
	delegation.deny == {"delegation chain too deep: more than 2 hops"} with input as a2a("researcher", "writer", deep)
}

package agentmesh.lib.budget_test

import rego.v1

import data.agentmesh.lib.budget

spend(agent, usd) := {"source": {"agent": agent}, "destination": {"kind": "llm"}, "budget": {"spent_usd": usd, "window": "24h"}}

test_under_budget_passes if {
	count(budget.deny) == 0 with input as spend("planner", 4.99)
}

test_spent_budget_is_refused if {
	budget.deny == {`agent "planner" has spent $5 of its $5 daily budget`} with input as spend("planner", 5)
}

test_agents_without_a_budget_are_not_limited if {
	count(budget.deny) == 0 with input as spend("writer", 1000)
}

test_only_llm_calls_spend if {
	count(budget.deny) == 0 with input as object.union(spend("planner", 50), {"destination": {"kind": "mcp"}})
}

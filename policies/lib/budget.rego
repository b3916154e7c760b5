# Per-agent daily spend on LLM calls. The sidecar fills input.budget with the agent's spend in
# the current window; a call that starts when the budget is spent is refused (429).
#
# data.agents.<agent>.daily_budget_usd: 5
package agentmesh.lib.budget

import rego.v1

deny contains sprintf("agent %q has spent $%v of its $%v daily budget", [input.source.agent, spent, limit]) if {
	input.destination.kind == "llm"
	limit := data.agents[input.source.agent].daily_budget_usd
	spent := input.budget.spent_usd
	spent >= limit
}

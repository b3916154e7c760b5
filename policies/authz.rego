# The entry point: data.agentmesh.authz.decision, the rule the sidecar evaluates.
#
# Each module under lib/ contributes `deny` reasons; a call is allowed only when no module
# denies it. The manifest module denies every destination an agent has not declared, so the
# library is closed by default: a new agent can call nothing until its manifest says so.
package agentmesh.authz

import rego.v1

# One import per module (not `data.agentmesh.lib` as a whole, which would make the engine build
# every rule under it, tests included, on each call).
import data.agentmesh.lib.budget
import data.agentmesh.lib.delegation
import data.agentmesh.lib.manifest
import data.agentmesh.lib.models
import data.agentmesh.lib.roles
import data.agentmesh.lib.tools

# Each module is consulted only for the calls it rules on, so a call pays for the checks that
# concern it (the modules test the same conditions themselves; this only saves evaluating them).
denials contains reason if some reason in manifest.deny

denials contains reason if {
	input.destination.kind == "llm"
	some reason in models.deny
}

denials contains reason if {
	input.mcp.method == "tools/call"
	some reason in tools.deny
}

denials contains reason if {
	input.destination.kind == "a2a"
	some reason in delegation.deny
}

denials contains reason if {
	data.required_roles[manifest.destination]
	some reason in roles.deny
}

budget_denials contains reason if {
	input.destination.kind == "llm"
	some reason in budget.deny
}

all_denials := denials | budget_denials

# Over budget and nothing else wrong: 429, so clients back off instead of failing hard.
status := 429 if {
	count(budget_denials) > 0
	count(denials) == 0
} else := 403

decision := {"allow": true} if count(all_denials) == 0

decision := {"allow": false, "status": status, "reason": concat("; ", sort(all_denials))} if {
	count(all_denials) > 0
}

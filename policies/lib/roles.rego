# End-user role checks: some destinations may be used only on behalf of users with a role, taken
# from the validated JWT's `roles` claim (a list) or `scope` (space-separated).
#
# data.required_roles["llm/openai"]: ["analyst", "admin"]   (any one of them)
package agentmesh.lib.roles

import rego.v1

import data.agentmesh.lib.manifest

user_roles contains r if some r in object.get(input, ["user", "claims", "roles"], [])

user_roles contains r if some r in split(object.get(input, ["user", "claims", "scope"], ""), " ")

deny contains sprintf("%s needs an end user with one of the roles %v", [manifest.destination, required]) if {
	required := data.required_roles[manifest.destination]
	not input.user
}

deny contains sprintf("user %q has none of the roles %v that %s needs", [input.user.sub, required, manifest.destination]) if {
	required := data.required_roles[manifest.destination]
	input.user
	count({r | some r in required; r in user_roles}) == 0
}

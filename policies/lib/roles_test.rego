package agentmesh.lib.roles_test

import rego.v1

import data.agentmesh.lib.roles

files(user) := object.union(
	{"direction": "outbound", "source": {"agent": "researcher"}, "destination": {"kind": "mcp", "name": "files"}},
	user,
)

test_user_with_a_role_passes if {
	count(roles.deny) == 0 with input as files({"user": {"sub": "alice", "claims": {"roles": ["analyst"]}}})
}

test_roles_from_scope_count if {
	count(roles.deny) == 0 with input as files({"user": {"sub": "bob", "claims": {"scope": "read admin"}}})
}

test_user_without_the_role_is_refused if {
	roles.deny == {`user "carol" has none of the roles ["analyst", "admin"] that mcp/files needs`} with input as files({"user": {"sub": "carol", "claims": {"roles": ["viewer"]}}})
}

test_no_user_is_refused if {
	count(roles.deny) == 1 with input as files({})
}

test_destinations_without_requirements_need_no_user if {
	count(roles.deny) == 0 with input as {"direction": "outbound", "source": {"agent": "planner"}, "destination": {"kind": "llm", "name": "openai"}}
}

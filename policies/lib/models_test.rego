package agentmesh.lib.models_test

import rego.v1

import data.agentmesh.lib.models

llm(agent, model) := {"source": {"agent": agent}, "destination": {"kind": "llm"}, "llm": {"model": model}}

test_listed_model_passes if {
	count(models.deny) == 0 with input as llm("writer", "claude-haiku-4-5")
}

test_unlisted_model_is_denied if {
	models.deny == {`model "gpt-4o" is not allowed for agent "writer"`} with input as llm("writer", "gpt-4o")
}

test_agent_without_a_list_may_use_any_model if {
	count(models.deny) == 0 with input as llm("researcher", "o3")
}

test_listing_models_names_none if {
	count(models.deny) == 0 with input as {"source": {"agent": "writer"}, "llm": {"operation": "models"}}
}

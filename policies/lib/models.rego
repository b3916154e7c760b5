# Model allow-lists per agent. An agent without a `models` list may use any model of the
# providers it declares; with one, only those models.
#
# data.agents.<agent>.models: ["gpt-4o-mini", "claude-haiku-4-5"]
package agentmesh.lib.models

import rego.v1

deny contains sprintf("model %q is not allowed for agent %q", [input.llm.model, input.source.agent]) if {
	# object.get rather than a plain reference: an agent without a manifest has no list, and the
	# manifest module already denies it.
	models := object.get(data.agents, [input.source.agent, "models"], null)
	models != null
	input.llm.model
	not input.llm.model in models
}

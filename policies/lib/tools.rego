# Constraints on MCP tool arguments, whoever calls:
# - shell-like tools may not run commands matching a destructive pattern;
# - file tools may touch only paths under the allowed prefixes, and never with `..`.
#
# data.tool_rules.shell_tools, .destructive_patterns (regular expressions),
# data.tool_rules.file_tools, .allowed_path_prefixes
package agentmesh.lib.tools

import rego.v1

rules := data.tool_rules

args := object.get(input, ["mcp", "arguments"], {})

# The strings in the arguments, and in lists and objects one level down: a command passed as
# ["sh", "-c", "rm -rf /"] still counts.
arg_strings contains s if {
	some s in args
	is_string(s)
}

arg_strings contains s if {
	some v in args
	is_array(v)
	some s in v
	is_string(s)
}

arg_strings contains s if {
	some v in args
	is_object(v)
	some s in v
	is_string(s)
}

deny contains sprintf("tool %q: destructive command refused (matches %q)", [input.mcp.tool, pattern]) if {
	input.mcp.method == "tools/call"
	input.mcp.tool in rules.shell_tools
	some s in arg_strings
	some pattern in rules.destructive_patterns
	regex.match(pattern, s)
}

deny contains sprintf("tool %q: path %q is outside the allowed directories", [input.mcp.tool, path]) if {
	input.mcp.method == "tools/call"
	input.mcp.tool in rules.file_tools
	some key in ["path", "file", "filename", "directory"]
	path := args[key]
	not allowed_path(path)
}

allowed_path(path) if {
	not contains(path, "..")
	some prefix in rules.allowed_path_prefixes
	startswith(path, prefix)
}

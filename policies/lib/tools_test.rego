package agentmesh.lib.tools_test

import rego.v1

import data.agentmesh.lib.tools

call(name, args) := {"mcp": {"method": "tools/call", "tool": name, "arguments": args}}

test_harmless_shell_command_passes if {
	count(tools.deny) == 0 with input as call("shell", {"cmd": "ls -la /workspace"})
}

test_destructive_commands_are_refused if {
	some cmd in ["rm -rf /", "sudo rm -fr ~", "mkfs.ext4 /dev/sda1", "dd if=/dev/zero of=/dev/sda", ":(){ :|:& };:", "echo x > /dev/sda"]
	count(tools.deny) == 1 with input as call("shell", {"cmd": cmd})
}

test_all_destructive_commands_are_refused if {
	every cmd in ["rm -rf /", "mkfs.ext4 /dev/sda1", "dd if=/dev/zero of=/dev/sda", ":(){ :|:& };:"] {
		count(tools.deny) == 1 with input as call("shell", {"cmd": cmd})
	}
}

test_commands_hidden_in_a_list_are_found if {
	count(tools.deny) == 1 with input as call("exec", {"argv": ["sh", "-c", "rm -rf /home"]})
}

test_other_tools_may_mention_rm if {
	count(tools.deny) == 0 with input as call("web_search", {"q": "rm -rf explained"})
}

test_file_paths_inside_the_workspace_pass if {
	count(tools.deny) == 0 with input as call("read_file", {"path": "/workspace/notes.md"})
}

test_file_paths_outside_are_refused if {
	tools.deny == {`tool "read_file": path "/etc/shadow" is outside the allowed directories`} with input as call("read_file", {"path": "/etc/shadow"})
}

test_parent_directory_escapes_are_refused if {
	count(tools.deny) == 1 with input as call("write_file", {"path": "/workspace/../etc/passwd"})
}

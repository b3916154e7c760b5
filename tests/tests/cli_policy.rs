//! `agentmesh policy test` and `agentmesh policy eval` as a security engineer runs them: the
//! library in `policies/` passes its own tests, failures and broken files are reported with
//! their location and a non-zero exit, and `eval` shows the decision and the rules that fired.

use agentmesh_tests::{bin_dir, Scratch};
use std::path::{Path, PathBuf};
use std::process::Output;

fn agentmesh(args: &[&str]) -> Output {
    std::process::Command::new(bin_dir().join("agentmesh"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run agentmesh")
}

/// `agentmesh policy eval` of an input file against the policy library.
fn eval_library(input: &Path) -> Output {
    agentmesh(&[
        "policy",
        "eval",
        "-p",
        "policies",
        "-i",
        input.to_str().unwrap(),
    ])
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_policy_library_passes_its_tests() {
    let out = agentmesh(&["policy", "test", "policies", "-v"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let summary = text.lines().last().unwrap();
    let (passed, total) = summary
        .strip_prefix("PASS: ")
        .and_then(|s| s.split_once('/'))
        .expect("a PASS: n/m summary");
    assert_eq!(passed, total);
    assert!(total.parse::<usize>().unwrap() >= 30, "{summary}");
    // Every module of the library has tests.
    for module in [
        "authz_test",
        "manifest_test",
        "models_test",
        "tools_test",
        "delegation_test",
        "budget_test",
        "roles_test",
    ] {
        assert!(
            text.contains(&format!("{module}.test_")),
            "no tests from {module}"
        );
    }
}

#[test]
fn failing_and_broken_tests_are_reported_with_a_nonzero_exit() {
    let dir = Scratch::new("cli-fail");
    std::fs::write(
        dir.path("p.rego"),
        "package p\nimport rego.v1\nallow if input.ok\n",
    )
    .unwrap();
    std::fs::write(
        dir.path("p_test.rego"),
        "package p_test\nimport rego.v1\nimport data.p\ntest_ok if p.allow with input as {\"ok\": true}\ntest_wrong if p.allow with input as {\"ok\": false}\n",
    )
    .unwrap();
    let out = agentmesh(&["policy", "test", dir.0.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("p_test.rego:"), "{text}");
    assert!(text.contains("data.p_test.test_wrong: FAIL"), "{text}");
    assert!(
        !text.contains("test_ok"),
        "passes are shown only with -v: {text}"
    );
    assert!(
        text.contains("PASS: 1/2") && text.contains("FAIL: 1/2"),
        "{text}"
    );

    std::fs::write(dir.path("p.rego"), "package p\nallow if {\n").unwrap();
    let out = agentmesh(&["policy", "test", dir.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.rego:3:1:"), "{err}");
}

#[test]
fn eval_shows_the_decision_and_the_rules_that_fired() {
    let dir = Scratch::new("cli-eval");
    let input = dir.path("input.json");
    std::fs::write(
        &input,
        r#"{"version":1,"direction":"outbound","source":{"agent":"planner"},
            "destination":{"kind":"mcp","name":"search-tools"},
            "request":{"method":"POST","path":"/mcp/search-tools","headers":{}},
            "mcp":{"method":"tools/call","tool":"shell","arguments":{"cmd":"rm -rf /"},"batch_size":1},
            "time":"2026-12-01T00:00:00Z"}"#,
    )
    .unwrap();
    let out = eval_library(&input);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "deny exits 3: {text}");
    assert!(text.contains("=> deny (403)"), "{text}");
    assert!(
        text.contains(r#"does not declare tool \"shell\" of mcp/search-tools"#),
        "{text}"
    );
    assert!(text.contains("  denials = ["), "{text}");
    // An input field the document does not have is a mistake worth hearing about.
    std::fs::write(&input, r#"{"version":1,"sauce":{}}"#).unwrap();
    let out = eval_library(&input);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a policy input document"));
}

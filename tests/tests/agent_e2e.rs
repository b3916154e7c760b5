//! The agent runtime's model-planned loop through a real sidecar (issue 7, first part): the
//! model (mock LLM) asks for a tool, the runtime calls it over MCP through the sidecar, hands the
//! result back, and the task completes; every step is committed, and a task resumed from an
//! earlier step finds its completed call instead of making it again.

use agentmesh_agent_runtime::manifest::Manifest;
use agentmesh_agent_runtime::runner::Runner;
use agentmesh_agent_runtime::store::{Status, Store};
use agentmesh_tests::{Fixture, Scratch, Sidecar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_calls_a_tool_through_the_sidecar_and_resumes_without_repeating_it() {
    let dir = Scratch::new("agent");
    let script = dir.path("script.yaml");
    std::fs::write(
        &script,
        "rules: [{match: 'agent news', tool_call: {name: search__web_search, arguments: {q: agent meshes}}}]\n",
    )
    .unwrap();
    let llm = Fixture::mock_llm(&dir, &["--script", script.to_str().unwrap()]).await;
    let tools = Fixture::mcp_tools(&dir).await;
    let sc = Sidecar::start(
        &dir,
        &format!(
            "upstreams:\n  - {{name: llm/openai, endpoints: [\"{}\"]}}\n  - {{name: mcp/search, endpoints: [\"{}\"]}}\n",
            llm.url(""),
            tools.url("/mcp")
        ),
    )
    .await;
    let manifest = dir.path("planner.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: planner\nmodel: {{provider: openai, name: gpt-4o-mini}}\nsystem_prompt: You research.\ntools: [search]\nsidecar: \"{}\"\n",
            sc.url("")
        ),
    )
    .unwrap();
    let m = Manifest::load(&manifest).unwrap();
    let store_path = m.store.clone().unwrap();
    std::fs::create_dir_all(store_path.parent().unwrap()).unwrap();
    let runner = Runner::new(m, Store::open(&store_path).unwrap());

    let done = runner
        .start("t1", "What is the latest agent news?")
        .await
        .unwrap();
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let answer = Runner::answer(&done).unwrap();
    assert!(answer.starts_with("The tool answered:"), "{answer}");
    assert_eq!(
        done.step, 2,
        "one step for the tool call, one for the answer"
    );
    let tool_calls = |calls: &[serde_json::Value]| {
        calls
            .iter()
            .filter(|c| {
                c["mcp"]["messages"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["method"] == "tools/call"))
            })
            .count()
    };
    let calls = sc.wait_calls(4).await;
    assert_eq!(tool_calls(&calls), 1, "{calls:?}");

    // As if the agent had died after the call but before the step was committed: the task is
    // back at step 0. Resumed, it reaches the same answer without calling the tool again.
    let mut back = runner.store.task("t1").unwrap().unwrap();
    back.step = 0;
    back.status = Status::Working;
    back.messages.truncate(2);
    runner.store.checkpoint(&back).unwrap();
    drop(runner);
    let m = Manifest::load(&manifest).unwrap();
    let runner = Runner::new(m, Store::open(&store_path).unwrap());
    let open = runner.store.open_tasks().unwrap();
    assert_eq!(open.len(), 1);
    let again = runner.run(open[0].clone()).await.unwrap();
    assert_eq!(again.status, Status::Completed);
    assert_eq!(Runner::answer(&again), Some(answer));
    let llm_calls =
        |calls: &[serde_json::Value]| calls.iter().filter(|c| c["kind"] == "llm").count();
    let calls = sc.wait_calls(llm_calls(&calls) + 2 + 3).await;
    assert_eq!(
        tool_calls(&calls),
        1,
        "the completed call was not repeated: {calls:?}"
    );
    assert_eq!(llm_calls(&calls), 4, "the model was asked again, twice");
}

"""The official OpenAI and Anthropic SDKs as the agent, through a running sidecar."""

import time

import anthropic
import openai


def oa(mesh):
    return openai.OpenAI(base_url=f"{mesh.base}/llm/openai/v1", api_key="unused-by-mock", max_retries=0)


def an(mesh):
    return anthropic.Anthropic(base_url=f"{mesh.base}/llm/anthropic", api_key="unused-by-mock", max_retries=0)


def test_openai_chat_completion_and_usage(mesh):
    r = oa(mesh).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello from the agent"}]
    )
    assert r.choices[0].message.content == "Mock reply to: hello from the agent"
    # mock rule: 4 words + 4 per message in; 7 words out
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (8, 7)
    [call] = mesh.wait_calls(1)
    assert call["kind"] == "llm" and call["target"] == "llm/openai" and call["status"] == 200
    assert call["llm"]["operation"] == "chat_completions"
    assert call["llm"]["model"] == "gpt-4o-mini" and call["llm"]["stream"] is False
    assert call["llm"]["usage"] == {"input_tokens": 8, "output_tokens": 7, "cached_input_tokens": 0}


def test_openai_stream_arrives_chunk_by_chunk(mesh):
    delay = 0.25
    stream = oa(mesh).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunk-delay-ms": str(int(delay * 1000))},
    )
    arrivals, text, usage = [], "", None
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "Mock reply to: one two three four"
    assert usage.completion_tokens == 7
    # The mock sleeps `delay` between its 10 chunks. Had the sidecar buffered the stream, every
    # chunk would arrive at once; passed through, the first arrives long before the last.
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] >= 0.5 * delay * (len(arrivals) - 1)
    [call] = mesh.wait_calls(1)
    assert call["llm"]["stream"] is True
    assert call["llm"]["usage"]["input_tokens"] == 8 and call["llm"]["usage"]["output_tokens"] == 7


def test_openai_responses_api_json_and_stream(mesh):
    c = oa(mesh)
    r = c.responses.create(model="gpt-5-mini", input="summarise this please")
    assert r.output_text == "Mock reply to: summarise this please"
    events = list(c.responses.create(model="gpt-5-mini", input="stream me", stream=True))
    assert events[-1].type == "response.completed"
    calls = mesh.wait_calls(2)
    assert [c["llm"]["operation"] for c in calls] == ["responses", "responses"]
    assert [c["llm"]["stream"] for c in calls] == [False, True]
    # "stream me": 2 words + 4 in; "Mock reply to: stream me": 5 out
    assert calls[1]["llm"]["usage"]["input_tokens"] == 6 and calls[1]["llm"]["usage"]["output_tokens"] == 5


def test_anthropic_messages_json_stream_and_tool_use(mesh):
    c = an(mesh)
    m = c.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi claude"}])
    assert m.content[0].text == "Mock reply to: hi claude"
    with c.messages.stream(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "count to three"}]
    ) as s:
        final = s.get_final_message()
    assert final.usage.output_tokens == 6
    t = c.messages.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        tools=[{"name": "web_search", "description": "s", "input_schema": {"type": "object"}}],
        messages=[{"role": "user", "content": "please web_search for rust"}],
    )
    assert t.stop_reason == "tool_use" and t.content[0].name == "web_search"
    calls = mesh.wait_calls(3)
    assert all(c["target"] == "llm/anthropic" and c["llm"]["operation"] == "messages" for c in calls)
    assert [c["llm"]["stream"] for c in calls] == [False, True, False]
    assert calls[0]["llm"]["max_tokens"] == 64
    # message_start carries input tokens (3 + 4), message_delta the final output count (6)
    assert calls[1]["llm"]["usage"]["input_tokens"] == 7 and calls[1]["llm"]["usage"]["output_tokens"] == 6


def test_anthropic_bearer_auth_is_passed(mesh):
    c = anthropic.Anthropic(base_url=f"{mesh.base}/llm/anthropic", auth_token="tok", max_retries=0)
    m = c.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert m.content[0].text == "Mock reply to: x"


def test_upstream_error_is_named(mesh):
    try:
        oa(mesh).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-status": "503"}
        )
        raise AssertionError("expected an error")
    except openai.InternalServerError as e:
        assert e.status_code == 503
    [call] = mesh.wait_calls(1)
    assert call["status"] == 503


def test_policy_denies_a_model_with_its_reason(mesh):
    # The demo policy (examples/local/policy) lists the models agent `planner` may use.
    for client, call in (
        (oa(mesh), lambda c: c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])),
        (an(mesh), lambda c: c.messages.create(model="claude-opus-4-1", max_tokens=8, messages=[{"role": "user", "content": "x"}])),
    ):
        try:
            call(client)
            raise AssertionError("expected a policy deny")
        except (openai.PermissionDeniedError, anthropic.PermissionDeniedError) as e:
            assert e.status_code == 403
            assert "is not allowed for agent \"planner\"" in str(e), str(e)
    calls = mesh.wait_calls(2)
    assert [c["decision"]["allow"] for c in calls] == [False, False]
    assert all(c["status"] == 403 for c in calls)

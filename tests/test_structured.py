"""Structured output: grammars as token masks (llguidance), lossless under them in every mode."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from tandem.local_runtime.constraints import constraint_for, parse_tool_calls
from tandem.local_runtime.grammar import GrammarError, GrammarViolation, compile_constraint, token_bytes
from tandem.local_runtime.models import load_model
from tandem.local_runtime.sequence import generate_alone
from tandem.protocols.errors import GatewayError
from tandem.protocols.messages import Constraint, GenerateRequest, OpenSession
from tandem.protocols.transport import InProcessTransport
from tandem.remote_gateway.service import Gateway
from tandem.sdk import Client

from .conftest import chi_square_pvalue, run, vocab8_model

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                   "pet": {"enum": ["cat", "dog", "none"]}},
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
TOOLS = [
    {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}},
    {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 16}},
                                         "required": ["path"]}},
]


@pytest.fixture(scope="module")
def byte_tok():
    return load_model("tiny-llama", progress=False).tokenizer


def test_token_bytes_of_a_byte_tokenizer(byte_tok):
    tb = token_bytes(byte_tok, 300)
    assert tb[65] == b"A" and tb[0xE2] == b"\xe2"
    assert tb[257].startswith(b"\xff") and tb[299] == b"\xff<unused299>" or tb[299].startswith(b"\xff")


def test_state_masks_forces_and_rolls_back(byte_tok):
    st = compile_constraint(Constraint(kind="json_schema", source=SCHEMA), byte_tok, 300)
    m = st.mask()
    assert m.only == ord("{") and m.allowed.sum() == 1
    st.sync(list(b'{"name": "Al", "age": 3'))
    assert st.mask().allowed[ord("4")] and not st.mask().allowed[ord("x")]
    st.sync(list(b'{"name": "Bo'))  # a rollback to the common prefix, then new tokens
    assert st.tokens == list(b'{"name": "Bo')
    with pytest.raises(GrammarViolation):
        st.sync(list(b'{"name": "Bo"x'))
    assert st.tokens == list(b'{"name": "Bo"')  # what it admitted stays
    st.sync(list(b'{"name": "Bo", "age": 7, "pet": "cat"}'))
    assert st.accepting and st.mask().only == 257  # only the end of sequence


def test_schema_errors_name_the_keyword_and_path(byte_tok):
    bad = {"type": "object", "properties": {"a": {"type": "string", "patternz": "x"}}}
    with pytest.raises(GrammarError) as e:
        compile_constraint(Constraint(kind="json_schema", source=bad), byte_tok, 300)
    assert "patternz" in e.value.message and "properties.a.patternz" in e.value.message and e.value.param == "response_format"
    deep = {"type": "object"}
    for _ in range(20):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(GrammarError, match="deeper"):
        compile_constraint(Constraint(kind="json_schema", source=deep), byte_tok, 300)
    with pytest.raises(GrammarError, match="Invalid type"):
        compile_constraint(Constraint(kind="json_schema", source={"type": "strin"}), byte_tok, 300)
    with pytest.raises(GrammarError, match="not an identifier"):
        constraint_for(tools=[{"name": "rm -rf"}], tool_choice="required") if False else compile_constraint(
            Constraint(kind="tool_call", source={"tools": [{"name": "rm -rf"}]}), byte_tok, 300)
    with pytest.raises(GrammarError, match="no tool named 'nope'"):
        constraint_for(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_constraint_for_api_arguments():
    assert constraint_for() is None and constraint_for(tools=TOOLS) is None and constraint_for(tools=TOOLS, tool_choice="none") is None
    c = constraint_for(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert c.kind == "tool_call" and c.source["parallel"] is False and c.source["name"] is None
    assert constraint_for(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}).source["name"] == "add"
    assert constraint_for(response_format={"type": "json_object"}).kind == "json_object"
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    assert constraint_for(response_format=rf).source == SCHEMA
    assert constraint_for(response_format=SCHEMA).source == SCHEMA

    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    assert constraint_for(response_format=Person).source["required"] == ["name", "age"]


def test_parse_tool_calls_keeps_bad_ones_as_data():
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": oops}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me add." and len(calls) == 2
    assert calls[0].name == "add" and json.loads(calls[0].arguments) == {"a": 1, "b": 2} and calls[0].error is None
    assert calls[1].error and calls[1].arguments == '{"name": oops}'
    assert parse_tool_calls("no calls") == ("no calls", [])


def _reference(lm, prompt: str, constraint: Constraint, n: int) -> list[int]:
    grammar = compile_constraint(constraint, lm.tokenizer, lm.vocab_size)
    return list(generate_alone(lm, lm.tokenizer.prompt_tokens(prompt, chat=False), n, grammar=grammar))


CONSTRAINTS = [
    Constraint(kind="json_schema", source=SCHEMA),
    Constraint(kind="regex", source=r"(yes|no), because [a-z ]{3,40}\."),
    Constraint(kind="tool_call", source={"tools": TOOLS, "parallel": True}),
    Constraint(kind="json_object"),
]


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: c.kind)
@pytest.mark.parametrize("drafter", ["tiny-llama-b", "tiny-llama:int8"])
def test_greedy_every_mode_follows_the_grammar_and_speculative_equals_cloud(tiny_gateway, constraint, drafter):
    target = tiny_gateway.lm
    prompts = ["Hello there", "Once upon a time"]

    async def go():
        async with Client(drafter=drafter, gateway=InProcessTransport(tiny_gateway), draft_len=4) as c:
            out = []
            for p in prompts:
                out.append({m: await c.generate(p, mode=m, max_new_tokens=48, chat=False, constraint=constraint)
                            for m in ("cloud", "speculative", "local", "assist")})
            return out

    for prompt, recs in zip(prompts, run(go())):
        reference = _reference(target, prompt, constraint, 48)
        assert recs["cloud"].tokens == reference, prompt
        assert recs["speculative"].tokens == reference, prompt
        drafter_lm = load_model(drafter, progress=False)
        for mode in ("local", "assist"):  # the device's own output, still under the grammar
            grammar = compile_constraint(constraint, drafter_lm.tokenizer, drafter_lm.vocab_size)
            grammar.sync(recs[mode].tokens[:-1] if recs[mode].tokens[-1:] == [257] else recs[mode].tokens)
    spec = recs["speculative"]
    assert spec.usage.forced_tokens > 0  # the grammar's forced tokens were drafted for free and accepted


def test_gateway_refuses_bad_constraints_and_stays_up(tiny_gateway):
    tok = tiny_gateway.lm.tokenizer
    ids = tok.prompt_tokens("hi", chat=False)

    async def go():
        with pytest.raises(GatewayError) as e:
            await tiny_gateway.open(OpenSession(prompt_tokens=ids, tokenizer_fingerprint=tok.fingerprint,
                                                constraint=Constraint(kind="json_schema", source={"type": "object", "bogus": 1})))
        assert e.value.code == "bad_request" and e.value.detail == {"param": "response_format"} and "bogus" in e.value.message
        with pytest.raises(GatewayError) as e:
            await tiny_gateway.generate(GenerateRequest(prompt_tokens=ids, tokenizer_fingerprint=tok.fingerprint,
                                                        constraint=Constraint(kind="regex", source="x" * 70_000)))
        assert e.value.code == "too_large"
        chunks = await tiny_gateway.generate(GenerateRequest(prompt_tokens=ids, tokenizer_fingerprint=tok.fingerprint,
                                                             max_new_tokens=40, constraint=Constraint(kind="regex", source="(ab|cd)+!")))
        text = "".join([c.text async for c in chunks])
        return text

    text = run(go())
    assert text.endswith("!") and set(text[:-1]) <= set("abcd")


def test_sampled_speculative_under_a_grammar_is_the_masked_target_distribution():
    """On an 8-token vocabulary under the regex [a-d][b-f]: the first two tokens' joint
    distribution is the target's, masked and renormalised at each step (chi-square)."""
    target, drafter = vocab8_model(0), vocab8_model(1)
    prompt = [1, 2, 3]
    first, second = np.zeros(8, bool), np.zeros(8, bool)
    first[0:4], second[1:6] = True, True
    with torch.inference_mode():
        l1 = target.model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
        p1 = torch.softmax(l1.masked_fill(~torch.from_numpy(first), float("-inf")), -1)
        joint = np.zeros((8, 8))
        for a in range(4):
            l2 = target.model(input_ids=torch.tensor([prompt + [a]])).logits[0, -1].double()
            joint[a] = (p1[a] * torch.softmax(l2.masked_fill(~torch.from_numpy(second), float("-inf")), -1)).numpy()
    gateway = Gateway(target)
    constraint = Constraint(kind="regex", source="[a-d][b-f]")

    async def go(n):
        counts = Counter()
        client = Client(drafter=drafter, gateway=InProcessTransport(gateway), draft_len=2, progress=False)
        for seed in range(n):
            rec = await client.generate("bcd", chat=False, max_new_tokens=2, temperature=1.0, seed=seed, constraint=constraint)
            counts[tuple(rec.tokens[:2])] += 1
        return counts

    N = 2500
    counts = run(go(N))
    observed = np.array([counts[(a, b)] for a in range(8) for b in range(8)], dtype=float)
    expected = joint.reshape(-1) * N
    assert observed[expected == 0].sum() == 0  # nothing outside the grammar
    pvalue = chi_square_pvalue(observed, expected)
    assert pvalue > 1e-3, pvalue
    gateway.close()


def test_bench_structured_end_to_end_on_tiny_models(tmp_path):
    """The command's fields, on a tiny pair (figures not asserted: the models are random)."""
    from tandem.sdk.bench.structured import bench_structured, load_schemas

    path = tmp_path / "schemas.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "schema": SCHEMA}) for p in ["Hello", "Once upon"]) + "\n")
    out = run(bench_structured(drafter="tiny-llama:int8", target="tiny-llama", items=load_schemas(path), max_new_tokens=64))
    assert out["n"] == 2 and out["valid"] == 2 and out["mismatches"] == 0
    assert out["forced_share"] > 0 and out["tokens_per_round"] > 0 and out["tokens_per_round_unconstrained"] > 0
    assert set(out) >= {"speedup_vs_cloud", "cpu_flags", "target_served"}
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="a line is"):
        load_schemas(path)


def test_generate_command_holds_the_answer_to_a_schema_or_regex(tmp_path):
    from typer.testing import CliRunner

    from tandem.sdk.cli import app

    bounded = {**SCHEMA, "properties": {**SCHEMA["properties"], "name": {"type": "string", "maxLength": 6},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(bounded))
    base = ["generate", "Hello", "--raw", "--drafter", "tiny-llama-b", "--target", "tiny-llama", "--max-new-tokens", "48"]
    out = CliRunner().invoke(app, [*base, "--schema", str(schema), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(data["parsed"]) == {"name", "age", "pet"} and data["parse_error"] is None
    out = CliRunner().invoke(app, [*base, "--mode", "local", "--regex", "(yes|no)!", "--json"])
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] in ("yes!", "no!")
    bad = CliRunner().invoke(app, [*base, "--schema", str(tmp_path / "missing.json")])
    assert bad.exit_code == 2 and "missing.json" in bad.output

"""Which exact target a machine gets (`NAME@auto`): the rule on measured figures, and the probe."""

from __future__ import annotations

from tandem.remote_gateway.choice import MAX_BLOCK_RATIO, measure, resolve_target, rule


def test_w8a8_where_the_int8_block_is_nearly_free_and_exact():
    c = rule("m", {"available": True, "int8_dot": True, "exact": True, "ms": {"1": 0.63, "8": 0.65}})
    assert (c.model, c.engine) == ("m:w8a8", "w8a8") and "1.03x" in c.why


def test_llama_cpp_otherwise_and_the_reason_says_why():
    compute_bound = {"available": True, "int8_dot": True, "exact": True, "ms": {"1": 1.0, "8": MAX_BLOCK_RATIO + 0.5}}
    cases = [
        (compute_bound, "compute-bound"),
        ({**compute_bound, "ms": {"1": 1.0, "8": 1.0}, "exact": False}, "depend on the batch"),
        ({**compute_bound, "ms": {"1": 1.0, "8": 1.0}, "int8_dot": False}, "VNNI"),
        ({"available": False, "reason": "no oneDNN"}, "no oneDNN"),
    ]
    for measured, reason in cases:
        c = rule("m", measured)
        assert (c.model, c.engine) == ("m@llama.cpp", "llama.cpp") and reason in c.why, c.why


def test_auto_resolves_from_this_machines_measurement_and_other_names_pass_through():
    m = measure()
    assert m is measure()  # measured once per process
    if m["available"]:
        assert m["ms"]["1"] > 0 and m["ms"]["8"] > 0 and isinstance(m["exact"], bool)
    name, choice = resolve_target("qwen2.5-coder-1.5b@auto")
    assert choice is not None and name == choice.model and name.startswith("qwen2.5-coder-1.5b")
    assert choice.to_dict()["why"]
    assert resolve_target("tiny-llama") == ("tiny-llama", None)
    assert resolve_target("x@llama.cpp") == ("x@llama.cpp", None)


def test_the_gateway_reports_how_its_target_runs():
    from tandem.remote_gateway.backends import make_backend
    from tandem.remote_gateway.service import Gateway

    plain = Gateway("tiny-llama").info()
    assert plain.target is None and plain.load_s >= 0  # named outright: nothing was chosen
    backend = make_backend(None, "tiny-llama")
    backend.choice = rule("tiny-llama", {"available": False, "reason": "stand-in"})
    info = Gateway(backend=backend).info()
    assert info.target["engine"] == "llama.cpp" and "stand-in" in info.target["why"]


def test_an_in_process_gateway_built_from_auto_serves_the_choice(monkeypatch):
    """The client asks its own gateway for nothing by name: `NAME@auto` is served as the choice."""
    import asyncio

    from tandem.remote_gateway import choice
    from tandem.sdk import Client

    monkeypatch.setattr(choice, "measure", lambda: {"available": True, "int8_dot": True, "exact": True,
                                                    "ms": {"1": 1.0, "8": 1.0}})

    async def go():
        async with Client(drafter="tiny-llama", target="tiny-llama@auto", draft_len=3) as c:
            rec = await c.generate("Hello there", max_new_tokens=6, chat=False, mode="speculative")
            return rec, (await c.transport.info()).model

    rec, served = asyncio.run(go())
    assert served == "tiny-llama:w8a8" and len(rec.tokens) == 6

"""Messages validate what they carry; configs name what is wrong."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tandem.protocols.messages import GenerateRequest, OpenSession, SparseDist, VerifyRequest, VerifyResult
from tandem.remote_gateway.config import GatewayConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_open_needs_exactly_one_prompt_form():
    with pytest.raises(ValidationError, match="exactly one"):
        OpenSession(prompt_tokens=[1, 2], tokenizer_fingerprint="abcdefgh12", prompt_text="hi")
    with pytest.raises(ValidationError, match="exactly one"):
        OpenSession()
    with pytest.raises(ValidationError, match="fingerprint"):
        OpenSession(prompt_tokens=[1, 2])
    assert OpenSession(prompt_text="hi").text_space
    assert not OpenSession(prompt_tokens=[1], tokenizer_fingerprint="abcdefgh12").text_space


def test_verify_lengths_must_agree():
    with pytest.raises(ValidationError, match="draft_probs"):
        VerifyRequest(session_id="s", position=3, draft_tokens=[1, 2], draft_probs=[0.5])
    with pytest.raises(ValidationError, match="outside the support"):
        VerifyRequest(
            session_id="s", position=3, draft_tokens=[7], draft_probs=[0.5],
            draft_dists=[SparseDist(ids=[1, 2], probs=[0.5, 0.5])],
        )


def test_sparse_dist_must_be_a_distribution():
    with pytest.raises(ValidationError, match="sum to 1"):
        SparseDist(ids=[1, 2], probs=[0.5, 0.2])
    with pytest.raises(ValidationError, match="distinct"):
        SparseDist(ids=[1, 1], probs=[0.5, 0.5])


def test_unknown_fields_and_versions_are_refused():
    with pytest.raises(ValidationError):
        GenerateRequest(prompt_text="x", colour="blue")
    with pytest.raises(ValidationError, match="version"):
        GenerateRequest(prompt_text="x", version=2)


@given(
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=64),
    position=st.integers(1, 10**9),
)
def test_verify_round_trips_through_json(tokens, position):
    req = VerifyRequest(session_id="s_x", position=position, draft_tokens=tokens, draft_probs=[0.5] * len(tokens))
    assert VerifyRequest.model_validate_json(req.model_dump_json()) == req


@given(accepted=st.integers(0, 64), tokens=st.lists(st.integers(0, 10**6), min_size=1, max_size=65))
def test_verify_result_round_trips(accepted, tokens):
    res = VerifyResult(
        session_id="s", accepted=accepted, next_token=tokens[-1], tokens=tokens,
        position=len(tokens), finished=False,
    )
    assert VerifyResult.model_validate_json(res.model_dump_json()) == res


def test_sample_gateway_config_is_valid():
    cfg = load_config(ROOT / "samples" / "gateway.yaml")
    assert cfg.model == "gemma3-270m" and cfg.limits().max_draft_tokens == 32


def test_gateway_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "gw.yaml"
    bad.write_text("port: 99999\nmax_sesions: 3\n")
    with pytest.raises(ValueError) as exc:
        load_config(bad)
    assert "port" in str(exc.value) and "99999" in str(exc.value) and "max_sesions" in str(exc.value)
    assert GatewayConfig().port == 8000

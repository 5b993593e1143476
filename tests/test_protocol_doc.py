"""PROTOCOL.md is generated from the protocol's models and stays in step with them."""

from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path

from typer.testing import CliRunner

from tandem.local_runtime.models import Tokenizer, tokenizer_fingerprint
from tandem.protocols.document import render
from tandem.protocols.messages import ErrorCode, ErrorReply
from tandem.protocols.operations import OPERATIONS
from tandem.sdk.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "PROTOCOL.md"


def test_the_committed_protocol_document_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "PROTOCOL.md is stale: the protocol's models changed. Regenerate it with "
        "`tandem gateway protocol --out PROTOCOL.md` and commit it."
    )


def test_it_covers_every_operation_message_and_error_code():
    text = render()
    for op in OPERATIONS:
        assert f"`{op.method} {op.path}`" in text
        assert f"### `{op.request.__name__}`" in text and f"### `{op.reply.__name__}`" in text
    assert "### `ErrorReply`" in text
    for code in typing.get_args(ErrorCode):
        assert f"| `{code}` |" in text


def test_every_example_is_a_valid_message():
    models = {op.request.model_fields["type"].default: op.request for op in OPERATIONS}
    models |= {op.reply.model_fields["type"].default: op.reply for op in OPERATIONS}
    models["error"] = ErrorReply
    blocks = re.findall(r"```json\n(.*?)\n```", render(), flags=re.S)
    examples = [json.loads(b) for b in blocks if '"$defs"' not in b and '"properties"' not in b]
    assert len(examples) >= 12
    for body in examples:
        models[body["type"]].model_validate(body)  # raises if the document shows an invalid body


def test_the_documented_fingerprint_recipe_is_the_implementation():
    """A device without Python computes the fingerprint from the document's words alone."""
    vocab = {"<s>": 0, "</s>": 1, "▁the": 2, "é": 3, "日本": 4, '"q"': 5}
    tok = Tokenizer(encode=list, decode=str, vocab=vocab, eos_token_ids=[1], bos_token_id=0)
    pairs = json.dumps([[t, i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1])], ensure_ascii=False,
                       separators=(", ", ": "))
    special = json.dumps({"eos": [1], "bos": 0}, separators=(", ", ": "))
    recipe = hashlib.sha256((pairs + special).encode("utf-8")).hexdigest()[:24]
    assert recipe == tokenizer_fingerprint(vocab, [1], 0) == tok.fingerprint


def test_the_command_writes_and_checks_it(tmp_path):
    out = tmp_path / "PROTOCOL.md"
    runner = CliRunner()
    assert runner.invoke(app, ["gateway", "protocol", "--out", str(out)]).exit_code == 0
    assert out.read_text(encoding="utf-8") == render()
    assert runner.invoke(app, ["gateway", "protocol", "--out", str(out), "--check"]).exit_code == 0
    out.write_text("stale", encoding="utf-8")
    result = runner.invoke(app, ["gateway", "protocol", "--out", str(out), "--check"])
    assert result.exit_code == 1 and "out of date" in result.output

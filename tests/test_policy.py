"""Policy files: valid samples, every kind of invalid file (with line, field and value), the
decision rules of Policy.choose, the JSON Schema, and the `tandem policy` commands."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.protocols.errors import PolicyFileError
from tandem.routing.policy import Policy, RequestContext, policy_json_schema
from tandem.routing.policy_files import check_policy_text, load_policy
from tandem.sdk.cli import app

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "samples" / "policies").glob("*.yaml"))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_policies_are_valid(path):
    policy = load_policy(path)
    assert isinstance(policy, Policy)


def test_there_are_samples():
    assert len(SAMPLES) >= 3


def _issues(text):
    policy, issues = check_policy_text(text)
    assert policy is None
    return issues


# each: (file text, expected line, expected field, a word of the message, the offending value or None)
INVALID = {
    "yaml-syntax": ("defaults:\n  mode: local\n  draft_len: [4\n", 4, "", "not valid YAML", None),
    "not-a-mapping": ("- just\n- a list\n", 1, "", "mapping", ["just", "a list"]),
    "unknown-top-field": ("version: 1\nrulez: []\n", 2, "rulez", "unknown field", []),
    "unknown-nested-field": ("rules:\n  - name: a\n    mode: local\n    when:\n      tag_any: [x]\n", 5,
                             "rules[0].when.tag_any", "unknown field", ["x"]),
    "bad-mode": ("defaults:\n  mode: fast\n", 2, "defaults.mode", "'local'", "fast"),
    "draft-len-range": ("defaults:\n  draft_len: 100\n", 2, "defaults.draft_len", "less than or equal to 64", 100),
    "threshold-range": ("defaults:\n  token_router: {name: entropy, threshold: 1.5}\n", 2,
                        "defaults.token_router.threshold", "less than or equal to 1", 1.5),
    "wrong-type": ("rules:\n  - name: a\n    mode: local\n    when: {tags_any: privacy}\n", 4,
                   "rules[0].when.tags_any", "valid list", "privacy"),
    "missing-mode": ("rules:\n  - name: a\n    when: {min_chars: 10}\n", 2, "rules[0].mode", "required", None),
    "unknown-token-router": ("defaults:\n  token_router:\n    name: magic\n", 3, "defaults.token_router.name",
                             "unknown token router", "magic"),
    "unknown-query-router": ("query_router:\n  name: oracle\n", 2, "query_router.name", "unknown query router", "oracle"),
    "threshold-and-share": ("query_router:\n  name: random\n  threshold: 0.5\n  cloud_share: 0.3\n", 1, "query_router",
                            "either threshold or cloud_share", None),
    "min-above-max": ("rules:\n  - name: a\n    mode: local\n    when:\n      min_chars: 50\n      max_chars: 10\n", 4,
                      "rules[0].when", "above max_chars", None),
    "budget-negative": ("budgets:\n  cloud_tokens_per_day: -5\n", 2, "budgets.cloud_tokens_per_day", "greater than or equal to 1", -5),
    "budget-fallback-uses-cloud": ("budgets:\n  on_exhausted: cloud\n", 2, "budgets.on_exhausted", "must not use the cloud", "cloud"),
    "offline-not-local": ("network:\n  offline: cloud\n", 2, "network.offline", "'local'", "cloud"),
    "fallback-to-itself": ("fallbacks:\n  cloud: [cloud, local]\n", 1, "fallbacks", "its own fallback", None),
    "duplicate-key": ("defaults:\n  mode: local\n  mode: cloud\n", 3, "defaults.mode", "duplicate key", "mode"),
    "duplicate-rule-name": ("rules:\n  - name: a\n    mode: local\n  - name: a\n    mode: cloud\n", 4, "rules[1].name",
                            "used twice", "a"),
    "bad-rule-name": ("rules:\n  - name: 'has space'\n    mode: local\n", 2, "rules[0].name", "pattern", "has space"),
    "bad-version": ("version: 2\n", 1, "version", "1", 2),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_policies_name_line_field_and_value(case):
    text, line, field, word, value = INVALID[case]
    issues = _issues(text)
    hit = [i for i in issues if i.field == field]
    assert hit, f"no issue for field {field!r}: {[i.format() for i in issues]}"
    issue = hit[0]
    assert issue.line == line, issue.format()
    assert word in issue.message, issue.format()
    if value is not None:
        assert issue.has_value and issue.value == value, issue.format()
    assert f"x.yaml:{line}: " in issue.format("x.yaml")


def test_every_problem_is_reported_at_once():
    text = "defaults:\n  mode: fast\n  draft_len: 0\nbudgets:\n  cloud_tokens_per_minute: 0\n"
    fields = {i.field for i in _issues(text)}
    assert fields == {"defaults.mode", "defaults.draft_len", "budgets.cloud_tokens_per_minute"}


def test_empty_file_is_the_default_policy():
    policy, issues = check_policy_text("")
    assert issues == [] and policy == Policy()


def test_load_policy_raises_with_all_issues(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("defaults:\n  mode: fast\n")
    with pytest.raises(PolicyFileError) as exc:
        load_policy(p)
    assert "bad.yaml:2: defaults.mode" in str(exc.value)
    assert exc.value.issues[0].value == "fast"


# ---------------------------------------------------------------------------------------------
# decisions


class FixedRouter:
    name = "fixed"

    def __init__(self, value):
        self.value = value
        self.calls = 0
        self.calibration = None

    def score(self, query):
        self.calls += 1
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


POLICY = """
defaults: {mode: speculative, draft_len: 4, token_router: {name: confidence, threshold: 0.4}}
query_router: {name: random, threshold: 0.6, hard_mode: cloud, easy_mode: local}
rules:
  - name: private
    when: {tags_any: [privacy, pii]}
    mode: local
  - name: long
    when: {min_chars: 100, tags_none: [urgent]}
    mode: speculative
    draft_len: 8
  - name: easy-short
    when: {max_chars: 20, max_difficulty: 0.3}
    mode: assist
    token_router: {name: entropy, threshold: 0.2}
budgets: {cloud_tokens_per_minute: 100, cloud_tokens_per_day: 1000, on_exhausted: local}
network: {slow_rtt_ms: 300, on_slow: assist}
fallbacks: {cloud: [speculative, local]}
"""


@pytest.fixture(scope="module")
def policy():
    p, issues = check_policy_text(POLICY)
    assert not issues
    return p


def test_offline_is_local_whatever_the_rules(policy):
    d = policy.choose("x" * 500, RequestContext(online=False, tags=frozenset({"urgent"})), router=FixedRouter(0.99))
    assert (d.mode, d.rule, d.fallbacks) == ("local", "network.offline", [])


def test_first_matching_rule_decides(policy):
    r = FixedRouter(0.9)
    d = policy.choose("x" * 500, RequestContext(tags=frozenset({"pii"})), router=r)
    assert (d.mode, d.rule) == ("local", "private") and "pii" in d.reason
    assert r.calls == 0  # no rule before it needed the difficulty
    d = policy.choose("x" * 500, RequestContext(), router=r)
    assert (d.mode, d.rule, d.draft_len) == ("speculative", "long", 8)
    assert (d.token_router, d.threshold) == ("confidence", 0.4)


def test_tags_none_excludes(policy):
    d = policy.choose("x" * 500, RequestContext(tags=frozenset({"urgent"})), router=FixedRouter(0.9))
    assert d.rule == "query_router" and d.mode == "cloud"


def test_difficulty_rule_and_query_router(policy):
    d = policy.choose("short", RequestContext(), router=FixedRouter(0.1))
    assert (d.mode, d.rule, d.token_router, d.threshold, d.difficulty) == ("assist", "easy-short", "entropy", 0.2, 0.1)
    d = policy.choose("short", RequestContext(), router=FixedRouter(0.5))
    assert (d.mode, d.rule) == ("local", "query_router") and "0.500 < threshold 0.600" in d.reason
    d = policy.choose("short", RequestContext(), router=FixedRouter(0.7))
    assert (d.mode, d.rule, d.fallbacks) == ("cloud", "query_router", ["speculative", "local"])


def test_context_difficulty_skips_the_router(policy):
    r = FixedRouter(0.0)
    d = policy.choose("short", RequestContext(difficulty=0.8), router=r)
    assert d.mode == "cloud" and r.calls == 0


def test_router_failure_escalates_and_is_flagged(policy):
    for bad in (RuntimeError("boom"), float("nan"), 7.0):
        d = policy.choose("short", RequestContext(), router=FixedRouter(bad))
        assert (d.mode, d.difficulty, d.router_escalated) == ("cloud", 1.0, True)
    d = policy.choose("short", RequestContext(difficulty=float("nan")))
    assert d.mode == "cloud" and d.router_escalated


def test_budgets_override_cloud_modes(policy):
    d = policy.choose("short", RequestContext(difficulty=0.9, cloud_tokens_last_minute=100))
    assert (d.mode, d.rule, d.overridden_by) == ("local", "query_router", "budgets.cloud_tokens_per_minute")
    d = policy.choose("short", RequestContext(difficulty=0.9, cloud_tokens_today=1000))
    assert (d.mode, d.overridden_by) == ("local", "budgets.cloud_tokens_per_day")
    assert "1000/1000 tokens today" in d.reason
    d = policy.choose("short", RequestContext(difficulty=0.9, cloud_tokens_today=999))
    assert d.mode == "cloud" and d.overridden_by is None
    # local needs no budget
    d = policy.choose("short", RequestContext(difficulty=0.5, cloud_tokens_today=5000))
    assert d.mode == "local" and d.overridden_by is None


def test_slow_network_swaps_speculative(policy):
    d = policy.choose("x" * 500, RequestContext(rtt_ms=450))
    assert (d.mode, d.rule, d.overridden_by) == ("assist", "long", "network.slow_rtt_ms")
    d = policy.choose("x" * 500, RequestContext(rtt_ms=100))
    assert d.mode == "speculative" and d.overridden_by is None


def test_network_condition_in_rules():
    p, _ = check_policy_text(
        "network: {slow_rtt_ms: 200}\nrules:\n  - name: slow\n    when: {network: [slow]}\n    mode: local\n"
    )
    assert p.choose("q", RequestContext(rtt_ms=250)).rule == "slow"
    assert p.choose("q", RequestContext(rtt_ms=150)).rule == "defaults"


def test_cloud_share_uses_the_router_calibration():
    from tandem.routing.base import Calibration

    p, _ = check_policy_text("query_router: {name: random, cloud_share: 0.25, hard_mode: cloud, easy_mode: local}\n")
    r = FixedRouter(0.8)
    r.calibration = Calibration(tuple(x / 100 for x in range(101)))  # uniform scores
    d = p.choose("q", router=r)
    assert d.mode == "cloud" and "threshold 0.750" in d.reason
    r.value = 0.74
    assert p.choose("q", router=r).mode == "local"


def test_choose_is_pure(policy):
    ctx = RequestContext(tags=frozenset({"x"}), rtt_ms=20)
    a = policy.choose("short", ctx, router=FixedRouter(0.2))
    b = policy.choose("short", ctx, router=FixedRouter(0.2))
    assert a == b


def test_json_schema_export():
    schema = policy_json_schema()
    assert schema["type"] == "object"
    assert {"defaults", "rules", "budgets", "network", "fallbacks", "query_router"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    json.dumps(schema)


# ---------------------------------------------------------------------------------------------
# the commands

runner = CliRunner()


def test_cli_policy_check_ok():
    r = runner.invoke(app, ["policy", "check", str(SAMPLES[0])])
    assert r.exit_code == 0, r.output
    assert "ok" in r.stdout


def test_cli_policy_check_errors_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("defaults:\n  mode: fast\nrules:\n  - name: a\n    mode: local\n    when: {bogus: 1}\n")
    r = runner.invoke(app, ["policy", "check", str(p)])
    assert r.exit_code == 2
    assert f"{p}:2: defaults.mode" in r.output and "'fast'" in r.output
    assert f"{p}:6: rules[0].when.bogus: unknown field" in r.output
    r = runner.invoke(app, ["policy", "check", str(p), "--json"])
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert out["valid"] is False and {e["line"] for e in out["errors"]} == {2, 6}


def test_cli_policy_check_missing_file(tmp_path):
    r = runner.invoke(app, ["policy", "check", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2


def test_cli_policy_schema_and_explain(tmp_path):
    out = tmp_path / "schema.json"
    r = runner.invoke(app, ["policy", "schema", "--out", str(out)])
    assert r.exit_code == 0 and json.loads(out.read_text())["title"] == "tandem routing policy"
    r = runner.invoke(app, ["policy", "explain", str(SAMPLES[0]), "hello", "--tag", "privacy"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mode"] == "local"

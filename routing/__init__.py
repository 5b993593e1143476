"""Routers: per query (difficulty) and per token (reward/confidence), and policy files.

    from tandem.routing import get_query_router, load_policy, RequestContext

    policy = load_policy("samples/policies/balanced.yaml")
    decision = policy.choose("Prove that sqrt(2) is irrational.", RequestContext(tags={"math"}))
    decision.mode, decision.draft_len, decision.token_router, decision.threshold, decision.reason

Query routers answer `score(query) -> float` in [0, 1] (higher: more likely to need the cloud
model); token routers `score(context, token) -> float` in [0, 1] (higher: the device's token is
more likely right). Thresholds are separate (`query_to_cloud`, `token_to_cloud`,
`calibrate_threshold`), routers come from a registry by name, and every router handed out by the
registry is wrapped in `FailSafe`: an error or an invalid score escalates to the cloud and is
counted. Heavy libraries (torch, sentence-transformers) load only when a router that needs them
is built.
"""

from importlib import import_module

_EXPORTS = {
    # routers and decisions
    "QueryRouter": ".base",
    "TokenRouter": ".base",
    "TokenContext": ".base",
    "FailSafe": ".base",
    "Calibration": ".base",
    "RollingCalibration": ".base",
    "valid_score": ".base",
    "query_to_cloud": ".base",
    "token_to_cloud": ".base",
    "calibrate_threshold": ".base",
    "get_query_router": ".base",
    "get_token_router": ".base",
    "register_query_router": ".base",
    "register_token_router": ".base",
    "query_router_names": ".base",
    "token_router_names": ".base",
    "DEFAULT_QUERY_ROUTER": ".base",
    "HiddenStateTap": ".token",
    # policies
    "Policy": ".policy",
    "Decision": ".policy",
    "RequestContext": ".policy",
    "PolicyFileError": ".policy_files",
    "load_policy": ".policy_files",
    "default_policy": ".policy_files",
    "check_policy_text": ".policy_files",
    "policy_json_schema": ".policy",
    # evaluation
    "route_metrics": ".metrics",
    "RouteMetrics": ".metrics",
    "load_table": ".data",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

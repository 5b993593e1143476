"""`tandem route ...` (query/token routers: evaluate, train, list) and `tandem policy ...`
(check a policy file, export its JSON Schema, explain a decision)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import err, fail

route_app = typer.Typer(help="Query and token routers: evaluate, train, calibrate, list.", no_args_is_help=True)
policy_app = typer.Typer(help="Routing policy files: check, schema, explain.", no_args_is_help=True)

# routers reading per-prompt features that the on-disk cache can keep
CACHED_ROUTERS = ("embedding", "format", "mf", "knn", "ensemble", "prefill")
METRIC_COLUMNS = ("strong_calls_at_95pct", "apgr", "cpt50", "cpt80")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# route


@route_app.command("eval")
def route_eval(
    data: Path = typer.Option(..., "--data", help="A RouteLLM-format CSV, or a folder of them."),
    router: Optional[str] = typer.Option(
        None, "--router", help="Router name, comma-separated names, or 'all' (default: the one `auto` mode uses)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="PNG to write (default ./route-eval-<data>.png)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Write no plot."),
    limit: Optional[int] = typer.Option(None, min=1, help="Judge only this many rows, spread evenly over the table."),
    weak: Optional[str] = typer.Option(None, help="Weak model's correctness column (default: the first)."),
    strong: Optional[str] = typer.Option(None, help="Strong model's correctness column (default: the second)."),
    cache: bool = typer.Option(True, help="Keep per-prompt features in the on-disk cache ($TANDEM_CACHE_DIR)."),
    only_unseen: bool = typer.Option(False, help="Judge only prompts the trained routers never saw in training."),
) -> None:
    """Share of strong-model calls each router needs for 95% of the strong model's quality, and
    RouteLLM's APGR, CPT(50%) and CPT(80%), next to random and oracle routing; also writes a
    quality-vs-cloud-calls plot."""
    import numpy as np

    from ...routing.base import DEFAULT_QUERY_ROUTER, query_router_names
    from ...routing.data import load_table
    from ...routing.evaluate import evaluate, plot, spread_sample

    try:
        table = load_table(data, weak=weak, strong=strong)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), code=2)
    if only_unseen:
        from ...routing.evaluate import seen_mask

        table = table.subset(~seen_mask(table))
        if len(table) == 0:
            fail("every prompt in this data was seen in training", code=2)
    if limit:
        table = table.subset(np.isin(np.arange(len(table)), spread_sample(len(table), limit)))
    if router in (None, ""):
        names = [DEFAULT_QUERY_ROUTER]
    elif router == "all":
        names = [n for n in query_router_names() if n != "random"]
    else:
        names = [n.strip() for n in router.split(",") if n.strip()]
    unknown = [n for n in names if n not in query_router_names()]
    if unknown:
        fail(f"unknown router(s) {', '.join(unknown)} (known: {', '.join(query_router_names())})", code=2)
    kwargs = {n: {"use_cache": True} for n in CACHED_ROUTERS} if cache else None
    try:
        res = evaluate(table, names, router_kwargs=kwargs, log=lambda s: err.print(s))
    except (FileNotFoundError, ImportError) as exc:
        fail(str(exc))
    first = res["routers"][names[0]]
    out = {"data": str(data), "router": names[0], **{k: v for k, v in first.items()}}
    out["seen_in_training"] = res["seen_in_training"]
    if res["seen_in_training"]:
        err.print(f"note: {res['seen_in_training']} of these {len(table)} prompts were seen in training; their numbers "
                  "are optimistic (unseen prompts are reported apart; cross-validated figures: `tandem route train`)")
    out["routers"] = res["routers"]
    if not no_plot:
        path = plot_path or Path(f"route-eval-{data.stem or 'data'}.png")
        plot(table, res["scores"], path, title=f"{data.name}: quality vs cloud calls ({len(table)} prompts)")
        out["plot"] = str(path)
    if as_json:
        print(json.dumps(out))
        return
    t = Table(title=f"route eval: {data} ({len(table)} prompts, weak {first['weak_accuracy']:.1%}, strong {first['strong_accuracy']:.1%})")
    for col in ("router", "strong calls @95%", "APGR", "CPT(50%)", "CPT(80%)", "unseen n", "unseen calls @95%",
                "unseen APGR", "escalations"):
        t.add_column(col)
    for name, m in res["routers"].items():
        u = m.get("unseen") or {}
        t.add_row(name, *(_fmt(m[k]) for k in METRIC_COLUMNS), _fmt(u.get("n")),
                  _fmt(u.get("strong_calls_at_95pct")), _fmt(u.get("apgr")), str(m["escalations"]))
    for base in ("random", "oracle"):
        t.add_row(base, *(_fmt(first[f"{base}_{k}"]) for k in METRIC_COLUMNS), "", "", "", "")
    Console().print(t)
    if "plot" in out:
        err.print(f"plot: {out['plot']}")


@route_app.command("calibrate")
def route_calibrate(
    share: float = typer.Option(..., "--share", min=0.0, max=1.0, help="Target share of queries sent to the cloud."),
    router: Optional[str] = typer.Option(None, "--router", help="Query router (default: the one `auto` mode uses)."),
    policy: Path = typer.Option(Path("policy.yaml"), "--policy", help="Policy file to write the threshold into (created when absent)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Calibrate on these prompts (a CSV or folder; e.g. recent traffic) instead of the router's training prompts."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Find the threshold that sends `--share` of queries to the cloud and write it, with the
    router's name, into the policy file's `query_router` block (other lines are kept)."""
    from ...protocols.errors import PolicyFileError
    from ...routing.base import (
        DEFAULT_QUERY_ROUTER,
        calibrate_threshold,
        get_query_router,
        query_router_names,
    )
    from ...routing.policy_files import with_query_router_threshold

    name = router or DEFAULT_QUERY_ROUTER
    if name not in query_router_names():
        fail(f"unknown router {name} (known: {', '.join(query_router_names())})", code=2)
    r = get_query_router(name, **({"use_cache": True} if name in CACHED_ROUTERS else {}))
    if data is not None:
        from ...routing.data import load_table

        try:
            prompts = load_table(data).prompts
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc), code=2)
        scores = r.score_many(prompts)
        if r.stats.escalations:
            fail(f"router '{name}' could not score {r.stats.escalations} of {len(prompts)} prompts ({r.stats.last_error})")
        threshold, source = calibrate_threshold(scores, share), f"{len(prompts)} prompts of {data}"
    else:
        if r.calibration is None:
            fail(f"router '{name}' has no calibration of its own (give --data, or train it with `tandem route train`)")
        threshold, source = r.calibration.threshold_for_share(share), "the router's training prompts (out-of-fold scores)"
    text = policy.read_text(encoding="utf-8") if policy.exists() else "version: 1\n"
    try:
        policy.write_text(with_query_router_threshold(text, name, threshold), encoding="utf-8")
    except PolicyFileError as exc:
        fail(f"{policy}: not a valid policy after the change:\n{exc}", code=2)
    out = {"router": name, "share": share, "threshold": threshold, "calibrated_on": source, "policy": str(policy)}
    if as_json:
        print(json.dumps(out))
    else:
        err.print(f"{policy}: query_router {name}, threshold {threshold:.4f} (about {share:.0%} of queries to the cloud; "
                  f"calibrated on {source})")


@route_app.command("train")
def route_train(
    data: Optional[Path] = typer.Option(None, help="Folder with gsm8k.csv and mmlu/ (default ../shared/data/routing)."),
    routers: str = typer.Option("learned", help="What to train: learned (embedding, format, mf, knn, ensemble), prefill."),
    nested: bool = typer.Option(True, help="Also run the nested cross-validation that reports the selection's worth."),
    per_domain: int = typer.Option(5, min=1, help="Prefill router: training prompts per MMLU domain."),
    gsm8k_sample: int = typer.Option(120, min=1, help="Prefill router: GSM8K training prompts."),
    max_tokens: int = typer.Option(128, min=8, help="Prefill router: prompt tokens read."),
    out: Optional[Path] = typer.Option(None, help="Artefact folder (default: the package's routing/artifacts)."),
) -> None:
    """Train the query routers on the training part of the shared routing data (deterministic)."""
    from ...routing.train import train_query_routers

    try:
        manifest = train_query_routers(
            data_dir=data, out=out, routers=tuple(r.strip() for r in routers.split(",") if r.strip()),
            per_domain=per_domain, gsm8k_sample=gsm8k_sample, max_tokens=max_tokens, nested=nested,
            log=lambda s: err.print(s),
        )
    except (FileNotFoundError, ValueError, ImportError) as exc:
        fail(str(exc))
    print(json.dumps(manifest))


@route_app.command("train-token")
def route_train_token(
    prompts: Optional[Path] = typer.Option(None, help="Spec-Bench JSONL (default ../shared/data/specbench/question.jsonl)."),
    limit: int = typer.Option(40, min=4, help="Training prompts, spread over the file's non-held-out lines (a third as many held-out ones are measured)."),
    max_new_tokens: int = typer.Option(32, min=4),
    reuse: bool = typer.Option(True, help="Reuse tokens collected by an earlier run with the same settings (in the feature cache)."),
    device_model: str = typer.Option("smollm2-135m", help="The device model whose hidden state the head reads."),
    cloud_model: str = typer.Option("gemma3-270m", help="The cloud model whose greedy choices are the labels."),
    out: Optional[Path] = typer.Option(None, help="Artefact folder (default: the package's routing/artifacts)."),
) -> None:
    """Train the reward token router: a small head on the device model's hidden state predicting
    whether the cloud model's greedy continuation agrees with the device's token."""
    from ...routing.train_token import train_reward_head

    try:
        report = train_reward_head(
            prompts_path=prompts, limit=limit, max_new_tokens=max_new_tokens, device_model=device_model,
            cloud_model=cloud_model, out=out, reuse=reuse, log=lambda s: err.print(s),
        )
    except (FileNotFoundError, ValueError, ImportError) as exc:
        fail(str(exc))
    print(json.dumps(report))


@route_app.command("list")
def route_list() -> None:
    """Registered query and token routers."""
    from ...routing.base import DEFAULT_QUERY_ROUTER, query_router_names, token_router_names

    for name, about in query_router_names().items():
        star = " (default)" if name == DEFAULT_QUERY_ROUTER else ""
        print(f"query  {name:11s} {about}{star}")
    for name, about in token_router_names().items():
        print(f"token  {name:11s} {about}")


# ---------------------------------------------------------------------------------------------
# policy


@policy_app.command("check")
def policy_check(
    file: Path = typer.Argument(..., help="A policy file (YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Validate a policy file: exit 0, or exit 2 listing each error with its line, field and value."""
    from ...routing.policy_files import check_policy_text

    try:
        text = file.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as exc:
        if as_json:
            print(json.dumps({"file": str(file), "valid": False, "errors": [{"line": None, "field": "", "message": str(exc)}]}))
        else:
            err.print(f"{file}: {exc}")
        raise typer.Exit(2)
    policy, issues = check_policy_text(text)
    if as_json:
        print(json.dumps({
            "file": str(file), "valid": policy is not None,
            "errors": [{"line": i.line, "field": i.field, "message": i.message, **({"value": repr(i.value)} if i.has_value else {})}
                       for i in issues],
        }))
    else:
        for i in issues:
            sys.stderr.write(i.format(str(file)) + "\n")
        if policy is not None:
            print(f"{file}: ok ({len(policy.rules)} rules)")
    if policy is None:
        raise typer.Exit(2)


@policy_app.command("schema")
def policy_schema(out: Optional[Path] = typer.Option(None, help="Write here instead of stdout.")) -> None:
    """The JSON Schema of policy files (for editors)."""
    from ...routing.policy import policy_json_schema

    text = json.dumps(policy_json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
        err.print(f"wrote {out}")
    else:
        print(text)


@policy_app.command("explain")
def policy_explain(
    file: Path = typer.Argument(..., help="A policy file (YAML)."),
    prompt: str = typer.Argument(..., help="The request's prompt."),
    tag: list[str] = typer.Option([], "--tag", help="A tag on the request (repeatable)."),
    offline: bool = typer.Option(False, help="The device has no network."),
    rtt_ms: Optional[float] = typer.Option(None, help="Measured round-trip time to the gateway."),
    difficulty: Optional[float] = typer.Option(None, help="Use this difficulty instead of scoring the prompt."),
    cloud_tokens_today: int = typer.Option(0, min=0),
    cloud_tokens_last_minute: int = typer.Option(0, min=0),
) -> None:
    """Which mode the policy picks for one request, and why (one JSON object)."""
    from ...protocols.errors import PolicyFileError
    from ...routing.policy import RequestContext
    from ...routing.policy_files import load_policy

    try:
        policy = load_policy(file)
    except PolicyFileError as exc:
        sys.stderr.write(str(exc) + "\n")
        raise typer.Exit(2)
    except FileNotFoundError as exc:
        fail(str(exc), code=2)
    ctx = RequestContext(
        tags=frozenset(tag), online=not offline, rtt_ms=rtt_ms, difficulty=difficulty,
        cloud_tokens_today=cloud_tokens_today, cloud_tokens_last_minute=cloud_tokens_last_minute,
    )
    print(policy.choose(prompt, ctx).model_dump_json())


__all__ = ["route_app", "policy_app"]

"""`tandem bench device`: the on-device backends side by side (see `bench_device`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ...protocols.errors import TandemError
from .common import err


def bench_device_cmd(
    model: str = typer.Option("smollm2-135m", help="Device model (a registered name or path; llama.cpp needs a GGUF)."),
    tokens: int = typer.Option(512, min=1, help="Prompt length for prefill (and the cap on agreement prompts)."),
    decode_tokens: int = typer.Option(128, min=1, help="Tokens generated per decode measurement."),
    prompts: Optional[Path] = typer.Option(None, help="Spec-Bench style JSONL (default ../shared/data/specbench/question.jsonl)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Agreement prompts, spread over the file (default: all)."),
    reps: int = typer.Option(3, min=1, help="Timing rounds (medians; backends interleaved within each)."),
    backend: list[str] = typer.Option([], help="Only these backends (repeatable; the fp32 reference always runs): reference-fp32, cpu-int8, cpu-int8-mixed, onnx, torch-int8, llama.cpp."),
    chunk: int = typer.Option(128, min=16, max=1024, help="Chunk length of the chunked prefill backends."),
    threads: Optional[int] = typer.Option(None, min=1, help="Threads for every backend (default: the CPUs available)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """On-device engine speed: prefill and decode of every backend, agreement with fp32."""
    from ..bench.device import bench_device

    try:
        result = bench_device(
            model, tokens, decode_tokens=decode_tokens, prompts_path=str(prompts) if prompts else None, limit=limit,
            reps=reps, backends=backend or None, threads=threads, chunk=chunk,
            progress=lambda msg: err.print(f"[dim]{msg}[/]"),
        )
    except (TandemError, FileNotFoundError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"bench device: {result['model']}, {result['tokens']}-token prompt")
    for col in ("backend", "prefill tok/s", "decode tok/s", "agreement", "max |dlogit|", "resident MB", "device"):
        table.add_column(col)
    for name, row in result["backends"].items():
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        table.add_row(name, fmt(row["prefill_tok_per_s"]), fmt(row["decode_tok_per_s"]), fmt(row["greedy_agreement"]),
                      fmt(row["max_abs_logit_err"]), fmt(row["resident_mb"]), row["device"])
    Console().print(table)
    for key in ("best_prefill", "prefill_vs_reference", "prefill_vs_llama_cpp", "most_accurate_prefill",
                "most_accurate_vs_reference", "best_drafter", "decode_vs_llama_cpp", "reference_top2_gap"):
        if key in result:
            Console().print(f"{key}: {result[key]}")
    for name, why in result["skipped"].items():
        err.print(f"skipped {name}: {why}")


def register(bench_app: typer.Typer) -> None:
    bench_app.command("device")(bench_device_cmd)


__all__ = ["register", "bench_device_cmd"]

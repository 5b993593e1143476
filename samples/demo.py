"""The quick-start demo (`make demo`): a gateway process on loopback verifies what a device model
drafts, over real HTTP, and the text streams here as it is accepted.

    python samples/demo.py [--drafter NAME] [--target NAME] [--prompt TEXT] [--max-new-tokens N]

The gateway is the same one `tandem gateway serve` runs; this script starts it on a free port,
waits until it answers, streams one speculative generation, prints the usage, and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from rich.console import Console

from tandem.sdk import Client
from tandem.sdk.client import DEFAULT_DRAFTER, DEFAULT_TARGET

console = Console(stderr=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(target: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tandem.sdk.cli", "gateway", "serve", "--model", target, "--port", str(port)]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the gateway did not answer within {timeout_s:.0f} s")


async def stream(url: str, drafter: str, prompt: str, max_new_tokens: int, draft_len: int) -> None:
    async with Client(drafter=drafter, gateway=url, draft_len=draft_len) as client:
        gen = client.stream(prompt, max_new_tokens=max_new_tokens)
        console.print(f"[bold]prompt:[/] {prompt}\n[bold]speculative ({drafter} drafts, gateway verifies):[/]")
        async for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        u = gen.usage
        console.print(
            f"\n{len(gen.tokens)} tokens in {u.wall_s:.2f} s ({len(gen.tokens) / u.wall_s:.1f} tok/s) | "
            f"{u.rounds} verify rounds ({len(gen.tokens) / max(1, u.rounds):.2f} tokens/round) | "
            f"acceptance {u.acceptance_rate:.0%} | drafted {u.local_tokens}, accepted {u.accepted_tokens}, "
            f"cloud-chosen {u.cloud_tokens} | {u.bytes_up:,} B up, {u.bytes_down:,} B down"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default=DEFAULT_DRAFTER)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--draft-len", type=int, default=4)
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    console.print(f"starting gateway ({args.target}) on {url} ...")
    proc = start_gateway(args.target, port)
    try:
        wait_ready(url, proc)
        asyncio.run(stream(url, args.drafter, args.prompt, args.max_new_tokens, args.draft_len))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()

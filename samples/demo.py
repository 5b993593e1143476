"""The quick-start demo (`make demo`): a gateway process on loopback verifies what a device model
drafts, over real HTTP, and the text streams here as it is accepted.

    python samples/demo.py [--drafter NAME] [--target NAME] [--prompt TEXT] [--max-new-tokens N]

The gateway is the same one `tandem gateway serve` runs; this script starts it on a free port
(`tandem.sdk.bench.launch.GatewayProcess`), waits until it answers, streams one speculative
generation, prints the usage, then the same prompt's rate from the cloud alone on the same
gateway (the baseline speculation has to beat), and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from rich.console import Console

from tandem.sdk import Client
from tandem.sdk.bench.launch import GatewayProcess
from tandem.sdk.cli.common import origin_legend, origin_writer
from tandem.sdk.client import DEFAULT_DRAFTER, DEFAULT_TARGET

console = Console(stderr=True)


async def stream(url: str, drafter: str, prompt: str, max_new_tokens: int, draft_len: str) -> None:
    k = "auto" if draft_len == "auto" else int(draft_len)
    async with Client(drafter=drafter, gateway=url, draft_len=k) as client:
        gen = client.stream(prompt, max_new_tokens=max_new_tokens)
        console.print(f"[bold]prompt:[/] {prompt}\n[bold]speculative ({drafter} drafts, gateway verifies):[/]")
        write = origin_writer()  # coloured by who produced each piece, on a terminal
        async for piece in gen:
            write(piece)
        sys.stdout.write("\n")
        if write.colored:
            console.print(origin_legend())
        u = gen.usage
        console.print(
            f"\n{len(gen.tokens)} tokens in {u.wall_s:.2f} s ({len(gen.tokens) / u.wall_s:.1f} tok/s) | "
            f"{u.rounds} verify rounds ({len(gen.tokens) / max(1, u.rounds):.2f} tokens/round) | "
            f"acceptance {u.acceptance_rate:.0%} | drafted {u.local_tokens}, accepted {u.accepted_tokens}, "
            f"cloud-chosen {u.cloud_tokens} | {u.bytes_up:,} B up, {u.bytes_down:,} B down"
        )
        spec_rate = len(gen.tokens) / u.wall_s
        with console.status("the same prompt from the cloud alone, for comparison ..."):
            alone = await client.generate(prompt, max_new_tokens=max_new_tokens, mode="cloud")
        cloud_rate = len(alone.tokens) / alone.usage.wall_s
        faster = "speculative" if spec_rate > cloud_rate else "the cloud alone"
        console.print(
            f"cloud alone on the same gateway: {len(alone.tokens)} tokens in {alone.usage.wall_s:.2f} s "
            f"({cloud_rate:.1f} tok/s); speculative is {spec_rate / cloud_rate:.2f}x that ({faster} is faster here)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default=DEFAULT_DRAFTER)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--draft-len", default="auto", help="a number, or 'auto' (chosen each round)")
    ap.add_argument("--gateway-logs", action="store_true", help="show the gateway process's own output")
    args = ap.parse_args()

    gateway = GatewayProcess(args.target, quiet=not args.gateway_logs)
    with console.status(f"starting the gateway ({args.target}) on {gateway.url}; loading its model ..."):
        gateway.start()
    with gateway:
        asyncio.run(stream(gateway.url, args.drafter, args.prompt, args.max_new_tokens, args.draft_len))


if __name__ == "__main__":
    main()

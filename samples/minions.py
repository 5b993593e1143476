"""MinionS-style question answering over a long document: the cloud model (through the gateway)
writes the instruction for each chunk, the devices run it over their chunks in parallel, and the
cloud model aggregates their notes (the graph is samples/minions.yaml).

Everything goes through one MQTT broker: the devices are `tandem device serve` processes, and
the coordinator reaches the gateway through the broker too (MQTT request/response), as a
device behind NAT would.

    python samples/minions.py --tiny                    # tiny random models: seconds, nonsense text
    python samples/minions.py                           # gemma3-270m in the cloud, smollm2-135m devices
    python samples/minions.py --document FILE --question "Who is involved?" --devices 3

By default the document is the longest summarisation item of Spec-Bench (../shared/data).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from tandem.protocols.mqtt import MqttTransport
from tandem.remote_gateway.mqtt_bridge import MqttBridge
from tandem.remote_gateway.service import Gateway
from tandem.sdk.taskgraph import Coordinator, load_graph_spec
from tandem.sdk.taskgraph.agent import spawn_agent, stop_agents
from tandem.sdk.taskgraph.broker import EmbeddedBroker

HERE = Path(__file__).resolve().parent
SPECBENCH = HERE.parent.parent / "shared" / "data" / "specbench" / "question.jsonl"
FALLBACK = (
    "The harbour town kept its records in three ledgers. The first, begun in 1820, lists ships and "
    "cargo: timber, salt cod and, after 1850, coal. The second records the lighthouse keepers, of "
    "whom Mary Olsen served longest, thirty-one years. The third is a list of storms; the worst, in "
    "1887, destroyed the north pier, which was rebuilt in stone two years later. "
) * 6


def default_document() -> str:
    if SPECBENCH.exists():
        rows = [json.loads(line) for line in SPECBENCH.read_text().splitlines() if line.strip()]
        text = max((r["turns"][0] for r in rows if r.get("category") == "summarization"), key=len)
        return text.removeprefix("Summarize:").strip()
    return FALLBACK


async def main(args: argparse.Namespace) -> None:
    graph = load_graph_spec(HERE / "minions.yaml")
    document = Path(args.document).read_text() if args.document else default_document()
    cloud_model = args.cloud or ("tiny-llama" if args.tiny else "gemma3-270m")
    device_models = [args.device_model or ("tiny-llama-b" if args.tiny else "smollm2-135m")] * args.devices

    print(f"cloud: {cloud_model}; devices: {', '.join(device_models)}; document: {len(document):,} characters", file=sys.stderr)
    async with EmbeddedBroker() as broker:
        procs = [spawn_agent(f"minion-{i}", broker.url, model=m) for i, m in enumerate(device_models)]
        gateway = await asyncio.to_thread(Gateway, cloud_model)
        transport = MqttTransport(broker.url, timeout_s=600)
        try:
            async with MqttBridge(gateway, broker.url), Coordinator(broker.url, gateway=transport) as coord:
                await coord.wait_for_devices(len(procs), timeout_s=300)
                t0 = time.perf_counter()
                report = await coord.run(
                    graph, {"document": document, "question": args.question},
                    on_event=lambda line: print(line, file=sys.stderr),
                )
                wall = time.perf_counter() - t0
        finally:
            await transport.aclose()
            gateway.close()
            await asyncio.to_thread(stop_agents, procs)

    print(f"question: {args.question}\n")
    print(f"answer: {report.outputs['answer'].strip()}\n")
    where: dict[str, list[str]] = {}
    for task, device in report.placements.items():
        where.setdefault(device, []).append(task.split("/", 1)[1])
    for device, tasks in sorted(where.items()):
        print(f"  {device:10s} {', '.join(sorted(tasks))}")
    print(f"\n{report.tasks} tasks in {wall:.1f} s (HEFT's estimate {report.planned_makespan_s:.1f} s); "
          f"replaced {report.replaced}, duplicates {report.duplicates}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", default="What happened, where, and who was involved?")
    parser.add_argument("--document", help="a text file (default: a long Spec-Bench article)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny random-initialised models (fast; the text is noise)")
    parser.add_argument("--cloud", help="the gateway's model")
    parser.add_argument("--device-model", help="the devices' model")
    asyncio.run(main(parser.parse_args()))

#!/usr/bin/env python3
"""Events per second through the Kafka-in bridge into a subscription, in one process.

The benchmark starts a Tansu (``engines.tansu()``, or the Kafka that ``CALLBOARD_BENCH_KAFKA``
names), writes ``--messages`` JSON messages to a Kafka topic of its own (``--partitions``
partitions), then starts a callboard application whose Kafka bridge reads the topic from the
beginning into a callboard topic, and one subscription that counts what it receives. Each
message is published to callboard's broker (``--broker``: ``memory`` or ``sqlite``, a file in a
temporary directory), its offset committed once stored, and delivered to the subscription.

Two figures per broker: ``events/s`` from the first event delivered to the last (the bridge's
pace once the consumer group formed), and ``start to last`` (the group's formation included;
Tansu holds a new group for its rebalance timeout, here 500 ms).

    python bench/kafka_bridge.py                              # memory and sqlite, 20,000 messages
    python bench/kafka_bridge.py --brokers sqlite --messages 50000 --autocommit
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from engines import tansu

from callboard import Event, ModuleContext, create_app, load_config, module


async def fill(address: str, topic: str, messages: int, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=address)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=address, acks="all", linger_ms=5)
    await producer.start()
    try:
        for n in range(messages):
            body = orjson.dumps({"n": n, "repository": {"full_name": "octo/repo"}})
            await producer.send(topic, body, partition=n % partitions, headers=[("x-n", b"1")])
        await producer.flush()
    finally:
        await producer.stop()


async def run(address: str, broker: str, args: argparse.Namespace) -> dict[str, Any]:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    await fill(address, topic, args.messages, args.partitions)
    received = 0
    first = last = 0.0
    done = asyncio.Event()

    @module("counter")
    def counter(context: ModuleContext) -> None:
        async def on_event(event: Event) -> None:
            nonlocal received, first, last
            received += 1
            last = time.perf_counter()
            if received == 1:
                first = last
            if received == args.messages:
                done.set()

        context.subscribers.add_subscription("counter", "orders", on_event)

    kafka = {
        "topics": [topic],
        "groupId": f"bench-{uuid.uuid4().hex[:8]}",
        "fromBeginning": True,
        "autoCommit": args.autocommit,
        "sessionTimeout": 2000,
        "rebalanceTimeout": 500,
        "heartbeatInterval": 300,
        "maxWaitTime": 100,
    }
    config = load_config(
        overrides={
            "events": {
                "broker": broker,
                "modules": {
                    "kafka": {
                        "kafkaConsumingEventPublisher": {
                            "clientId": "callboard-bench",
                            "brokers": [address],
                            "topics": [{"topic": "orders", "kafka": kafka}],
                        }
                    }
                },
            }
        }
    )
    app = create_app(config, modules=[counter], use_entry_points=False)
    started = time.perf_counter()
    async with app.board.lifespan():
        await asyncio.wait_for(done.wait(), args.timeout)
    return {
        "events/s": round((received - 1) / (last - first)) if last > first else None,
        "start to last s": round(last - started, 2),
        "received": received,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="memory,sqlite")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--autocommit", action="store_true", help="autoCommit: true")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    with tansu() as address, tempfile.TemporaryDirectory() as directory:
        for kind in args.brokers.split(","):
            url = "memory://" if kind == "memory" else f"sqlite:///{Path(directory) / 'b.db'}"
            figures = asyncio.run(run(address, url, args))
            print(f"{kind:8} {args.messages} messages, autoCommit {args.autocommit}: {figures}")


if __name__ == "__main__":
    main()

"""The PostgreSQL checkpoint prune after an agent turn: langgraph-checkpoint-postgres' `aprune(strategy="keep_latest")`
against the project's one statement (agentcore.checkpoint._POSTGRES_PRUNE), alternating, on one connection.

Each sample is a thread shaped like a conversation after a tool-calling turn: the previous turn's checkpoint, then
the turn's three (its answer, the tool step, the last model step), each with a new version of the messages (a blob)
and two pending writes. The prune deletes three checkpoints, their writes and the blobs only they used. Printed per
way: round trips (psycopg exchanges), the client's CPU, the wall time and the PostgreSQL backend's CPU per prune
(from /proc: the server must run on this machine).
Run: `.venv/bin/python bench/checkpoint_prune.py --database-url postgres://postgres@127.0.0.1:5432/<db> [-n 300]`
(the checkpoint tables are created in that database if missing; the threads written are deleted at the end).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(args: argparse.Namespace) -> None:
    import psycopg
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langgraph.checkpoint.base import copy_checkpoint, empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row

    from agentcore.checkpoint import _POSTGRES_PRUNE

    conn = await psycopg.AsyncConnection.connect(args.database_url, autocommit=True, prepare_threshold=None,
                                                 row_factory=dict_row)
    saver = AsyncPostgresSaver(conn)
    await saver.setup()
    pid = (await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"]
    history = [m for n in range(args.history) for m in (HumanMessage(f"question {n} " * 20),
                                                        AIMessage(f"answer {n} " * 40))]

    async def thread_after_a_tool_turn() -> str:
        thread = f"bench-prune-{uuid.uuid4()}"
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        checkpoint = empty_checkpoint()
        checkpoint["v"] = 4  # the format the graph writes (empty_checkpoint's is older)
        messages = list(history)
        for step, new in enumerate([[], [HumanMessage("what time is it?"), AIMessage("Let me look.")],
                                    [ToolMessage("12:00", tool_call_id="call-1")], [AIMessage("It is noon.")]]):
            checkpoint = copy_checkpoint(checkpoint)
            checkpoint["id"] = str(uuid6())
            messages = messages + new
            version = saver.get_next_version(checkpoint["channel_versions"].get("messages"), None)
            checkpoint["channel_versions"]["messages"] = version
            checkpoint["channel_values"]["messages"] = messages
            config = await saver.aput(config, checkpoint, {"source": "loop", "step": step, "parents": {}},
                                      {"messages": version})
            await saver.aput_writes(config, [("messages", new), ("iterations", step)], task_id=str(uuid.uuid4()))
        return thread

    async def by_aprune(thread: str) -> None:
        await saver.aprune([thread], strategy="keep_latest")

    async def by_statement(thread: str) -> None:
        await conn.execute(_POSTGRES_PRUNE, {"thread": thread})

    ways = {"aprune": by_aprune, "statement": by_statement}
    seen: dict[str, dict[str, list[float]]] = {name: {"trips": [], "cpu": [], "wall": [], "server": []}
                                               for name in ways}
    wait = psycopg.AsyncConnection.wait
    trips = [0]

    async def counted(self, gen, *a, **k):
        if not (gen.gi_code.co_name == "_commit_gen"
                and self.info.transaction_status == psycopg.pq.TransactionStatus.IDLE):
            trips[0] += 1
        return await wait(self, gen, *a, **k)

    threads = []
    for i in range(args.n * 2):
        name = list(ways)[i % 2]
        thread = await thread_after_a_tool_turn()
        threads.append(thread)
        psycopg.AsyncConnection.wait = counted
        trips[0] = 0
        server, cpu, wall = backend_cpu(pid), time.process_time(), time.perf_counter()
        await ways[name](thread)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        psycopg.AsyncConnection.wait = wait
        await asyncio.sleep(0.002)  # the backend's CPU counters settle
        seen[name]["server"].append(backend_cpu(pid) - server)
        seen[name]["trips"].append(trips[0])
        seen[name]["cpu"].append(cpu)
        seen[name]["wall"].append(wall)
        rows = await (await conn.execute("SELECT count(*) AS n FROM checkpoints WHERE thread_id = %s",
                                         (thread,))).fetchone()
        assert rows["n"] == 1, (name, rows)
    for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
        await conn.execute(f"DELETE FROM {table} WHERE thread_id = ANY(%s)", (threads,))
    await conn.close()
    print(f"{args.n} prunes each, alternating; history {args.history * 2} messages")
    for name, values in seen.items():
        print(f"{name:>10}: {statistics.mean(values['trips']):.0f} round trips, client CPU "
              f"{statistics.mean(values['cpu']) * 1000:.3f} ms, wall p50 {statistics.median(values['wall']) * 1000:.3f}"
              f" ms, backend CPU {statistics.mean(values['server']) * 1000:.3f} ms per prune")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--history", type=int, default=10, help="earlier question/answer pairs in the thread")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    asyncio.run(main(parser.parse_args()))

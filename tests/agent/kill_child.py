"""Child process of the kill -9 test: appends, seals and delivers, reporting through stdout.

Lines it writes (each flushed after the buffer's commit, before anything else happens):
``C <first> <last>``  readings with values first..last are committed;
``S <seq> <sha256>``  batch seq is sealed with this frame;
``D <seq> <v,v,...>`` batch seq was delivered (written *before* the batch is deleted, as a
collector's ack arrives before the agent deletes).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
import uuid
from pathlib import Path

from agent.buffer import Buffer
from protocol import decode_batch

GATEWAY = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEVICES = [uuid.UUID(int=i + 1).bytes for i in range(3)]


async def main(path: Path, first_id: int, seed: int) -> None:
    rng = random.Random(seed)
    out = sys.stdout
    async with Buffer(path, gateway_id=GATEWAY, max_points=400, max_bytes=2**30) as buffer:
        next_id = first_id
        while True:
            n = rng.randint(1, 300)
            rows = [
                (DEVICES[i % 3], f"m{i % 2}", 1_700_000_000_000_000 + v, v)
                for i, v in enumerate(range(next_id, next_id + n))
            ]
            await buffer.append(rows)
            out.write(f"C {next_id} {next_id + n - 1}\n")
            out.flush()
            next_id += n
            for seq in await buffer.seal(force=rng.random() < 0.3):
                frame = (await buffer.batches(after=seq - 1, upto=seq, limit=1))[0].frame
                out.write(f"S {seq} {hashlib.sha256(frame).hexdigest()}\n")
                out.flush()
            if rng.random() < 0.4:
                oldest = await buffer.batches(limit=1)
                if oldest:
                    batch = decode_batch(oldest[0].frame)
                    values = [v for s in batch.series for v in s.values]
                    out.write(f"D {batch.seq} {','.join(str(v) for v in values)}\n")
                    out.flush()
                    await buffer.acknowledge(batch.seq, rejected=False)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))

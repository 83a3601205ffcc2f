#!/usr/bin/env python3
"""A burst of TCP connections at once, for the lab benchmarks (stdlib only).

  burst.py serve PORT                  echo server on 127.0.0.1:PORT (backlog 1024)
  burst.py connect HOST PORT N BYTES   open N connections at once; each sends BYTES and
                                       reads them back; all stay open until every one is
                                       done, then close. Prints "N/N echoed, S s".

iperf3 -P stops at 128 streams; this opens as many as asked. Every wait is bounded (30 s a
step); the caller also runs it under `timeout`.
"""
import asyncio
import sys
import time


async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port):
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


async def connect(host, port, n, size):
    done = 0
    all_done = asyncio.Event()

    async def one():
        nonlocal done
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        try:
            writer.write(b"q" * size)
            await asyncio.wait_for(writer.drain(), 30)
            got = 0
            while got < size:
                data = await asyncio.wait_for(reader.read(65536), 30)
                if not data:
                    break
                got += len(data)
            ok = got == size
            done += 1
            if done == n:
                all_done.set()
            # Hold the connection until every other one got its echo.
            await asyncio.wait_for(all_done.wait(), 30)
            return ok
        finally:
            writer.close()

    start = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    ok = sum(1 for r in results if r is True)
    errors = {type(r).__name__ for r in results if isinstance(r, BaseException)}
    note = f" (errors: {', '.join(sorted(errors))})" if errors else ""
    print(f"{ok}/{n} echoed, {time.monotonic() - start:.1f} s{note}")
    return ok == n


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    elif len(sys.argv) == 6 and sys.argv[1] == "connect":
        _, _, host, port, n, size = sys.argv
        sys.exit(0 if asyncio.run(connect(host, int(port), int(n), int(size))) else 1)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

"""The process runtime's bounded stop (a real child process: the stop ends it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson

from tests.support import ROOT

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from shared.logs import setup_logging
    from shared.runtime import _bounded

    async def quick() -> None:
        await asyncio.sleep(0.01)

    async def stuck() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        await _bounded(quick(), 1.0)
        print("quick cleanup returned", flush=True)
        asyncio.get_running_loop().create_task(stuck(), name="never-ends")
        await _bounded(stuck(), 0.2)
        print("not reached", flush=True)

    setup_logging("INFO", role="test")
    asyncio.run(main())
    """
)


def test_a_stop_that_hangs_ends_the_process_and_says_what_was_stuck() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == ["quick cleanup returned"]
    (line,) = [orjson.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert line["msg"] == "stop did not finish; exiting anyway"
    assert line["timeout"] == 0.2
    assert any("stuck" in frame for frame in line["tasks"]["never-ends"]), line["tasks"]

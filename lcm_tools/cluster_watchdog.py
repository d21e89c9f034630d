"""Stop a cluster worker's ComfyUI when the process that keeps it alive is gone.

    python -m lcm_tools.cluster_watchdog KEEPER_PID KEEPER_CREATED SLOT_DIR

A Dask worker that is killed (SIGKILL, the kernel's OOM killer, its nanny dying or killing it while ComfyUI
boots) runs no clean-up, so the ComfyUI it started would live on, holding its GPU's memory. Each worker *slot*
(see :mod:`lcm_tools.cluster_worker`) therefore gets this small process, started before its first ComfyUI and
in a session of its own, so that a Ctrl-C in the terminal does not end it first. It watches KEEPER_PID (the
worker's nanny, which restarts a dead worker that then adopts the same ComfyUI; or the worker itself when it
has no nanny). Once the keeper is gone it terminates every ComfyUI of the slot, found by the slot folder in its
command line (``--temp-directory SLOT_DIR``), so a server still booting is caught too, then removes the folder.
It exits without touching anything when the folder is removed (the worker stopped its server and closed).
Processes are named by pid *and* creation time, so a reused pid is never mistaken for the keeper. Only psutil
(a dependency of distributed) is imported.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import psutil

POLL_S = 1.0
TERMINATE_GRACE_S = 20.0
SLOT_FLAG = "--temp-directory"


def running(pid: int, created: float) -> bool:
    """Whether ``pid`` is still the process created at ``created`` (and not a zombie)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def servers_of(slot: Path) -> list[psutil.Process]:
    """The processes started with ``--temp-directory SLOT`` (the slot's ComfyUI, booting or running)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(a == SLOT_FLAG and b == str(slot) for a, b in zip(cmd, cmd[1:], strict=False)):
            found.append(proc)
    return found


def stop(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=TERMINATE_GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def watch(keeper_pid: int, keeper_created: float, slot: Path, poll_s: float = POLL_S) -> bool:
    """Block until the slot is closed (returns False) or its keeper is gone (stops its servers, returns True)."""
    while slot.is_dir():
        if not running(keeper_pid, keeper_created):
            stop(servers_of(slot))
            shutil.rmtree(slot, ignore_errors=True)
            return True
        time.sleep(poll_s)
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print(__doc__.split("\n\n")[0] + "\nusage: python -m lcm_tools.cluster_watchdog KEEPER_PID KEEPER_CREATED SLOT_DIR",
              file=sys.stderr)
        return 2
    watch(int(args[0]), float(args[1]), Path(args[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

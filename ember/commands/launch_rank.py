"""What each rank of an `ember launch` runs first: `python -m ember.commands.launch_rank MODULE ARGS`.

torchelastic starts this shim, not MODULE, so that before MODULE runs as __main__ a rank
- joins its stderr to stdout, so its log file holds warnings and tracebacks where they happened;
- dies with its launcher, even one killed by SIGKILL (`die_with_launcher`);
- after an elastic restart, uses a key space of its own in the launcher's store
  (`separate_restart_keys`).
It runs in every rank and imports nothing of the launcher's, so it stays cheap to start.
"""

from __future__ import annotations

import os
import sys

from ember.commands.child_processes import die_with_parent

# Set by the launcher for its ranks: the pid a rank's parent must have (see `die_with_launcher`).
LAUNCHER_PID_VARIABLE = "EMBER_LAUNCHER_PID"


def separate_restart_keys() -> None:
    """Give a restarted rank its own key space in the launcher's store.

    torchelastic's static rendezvous keeps one store for the node's whole life, and a rank's
    process group publishes its address there under fixed keys; after a restart a fast rank could
    read the address a dead predecessor left and fail to connect. Prefixing every key of the
    rank's process groups with the attempt number makes each attempt start from an empty store.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import importlib

    import torch.distributed as dist

    # the module, not the function of the same name that torch.distributed exports
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create_store = getattr(rendezvous, "_create_c10d_store", None)
    if create_store is None:  # a torch without this hook: restarts keep torch's own behaviour
        return

    def create_attempt_store(*args, **kwargs):
        return dist.PrefixStore(f"/ember/attempt_{attempt}", create_store(*args, **kwargs))

    rendezvous._create_c10d_store = create_attempt_store


def die_with_launcher() -> None:
    """A rank dies with its launcher (`die_with_parent`): the trainer then saves a checkpoint and
    stops, as on any SIGTERM.

    torchelastic starts each rank directly from the launcher's main thread (the thread whose end
    the kernel watches), in a session of its own: nothing else would take the rank down."""
    launcher = os.environ.pop(LAUNCHER_PID_VARIABLE, None)  # for this process, not what it starts
    if launcher:
        die_with_parent(int(launcher))


def main(argv: list[str]) -> int:
    """Run MODULE as __main__ with stderr joined to stdout; its exit status."""
    import runpy

    if not argv:
        print("usage: python -m ember.commands.launch_rank MODULE [ARGS...]", file=sys.stderr)
        return 2
    die_with_launcher()
    separate_restart_keys()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(sys.stdout.fileno(), sys.stderr.fileno())
    sys.argv = [argv[0], *argv[1:]]
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

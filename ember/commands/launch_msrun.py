"""`ember launch --msrun "CMD" ARGS`: MindFormers' `scripts/msrun_launcher.sh` positional forms,
read into a `LaunchPlan`.

A file of its own because the script's argument counts and defaults are MindFormers' convention,
not torchrun's: they change when MindFormers changes, and nothing else in the launcher reads them.
"""

from __future__ import annotations

import os
import shlex
import sys

from ember.commands.launch_plan import LaunchPlan, check_plan
from ember.errors import EmberError


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise EmberError(f"expected True or False, got {text!r}")


def plan_from_msrun(command: str, positional: list[str], module: str, max_restarts: int) -> LaunchPlan:
    """MindFormers' scripts/msrun_launcher.sh "CMD" [ARGS], every form it takes (H3, issue 16):

        (none)                       8 workers on this node
        WORKER_NUM                   WORKER_NUM workers on this node
        WORKER_NUM MASTER_PORT LOG_DIR JOIN TIMEOUT                               one node
        WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN TIMEOUT   nodes

    Defaults are the script's (port 8118, output/msrun_log plus _$MF_LOG_SUFFIX, timeout 7200 s),
    except JOIN: its short forms start msrun with join=False (return at once); ember stays in the
    foreground there (say JOIN False in the longer forms to return at once). Other argument counts
    are read as the first ones of the 9-argument form. With WORKER_NUM equal to LOCAL_WORKER the
    job runs on this node alone, as the script does (MASTER_ADDR and NODE_RANK unused)."""
    count = len(positional)
    try:
        worker_num = int(positional[0]) if positional else 8
        if count == 5:  # the single-machine form: WORKER_NUM MASTER_PORT LOG_DIR JOIN TIMEOUT
            local_worker, master_addr, node_rank = worker_num, "127.0.0.1", 0
            master_port, log_dir, join, timeout = int(positional[1]), positional[2], _bool(positional[3]), \
                int(positional[4])
        else:
            local_worker = int(positional[1]) if count > 1 else worker_num
            master_addr = positional[2] if count > 2 else "127.0.0.1"
            master_port = int(positional[3]) if count > 3 else 8118
            node_rank = int(positional[4]) if count > 4 else 0
            log_dir = positional[5] if count > 5 else "output/msrun_log"
            join = _bool(positional[6]) if count > 6 else True
            timeout = int(positional[7]) if count > 7 else 7200
    except ValueError as err:
        raise EmberError(f"msrun arguments: {err}; expected WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT "
                         f"NODE_RANK LOG_DIR JOIN TIMEOUT] or WORKER_NUM MASTER_PORT LOG_DIR JOIN TIMEOUT") from None
    if count > 8:
        raise EmberError(f"msrun: {count} arguments after the command; msrun_launcher.sh takes at most 8")
    suffix = os.environ.get("MF_LOG_SUFFIX", "")
    log_dir += f"_{suffix}" if suffix else ""
    if worker_num < 1 or local_worker < 1 or worker_num % local_worker:
        raise EmberError(f"msrun: WORKER_NUM {worker_num} is not a multiple of LOCAL_WORKER {local_worker}")
    if worker_num == local_worker:  # one node: msrun_launcher.sh passes no address or node rank
        master_addr, node_rank = "127.0.0.1", 0
    if count in (0, 1):
        print(f"ember launch: msrun_launcher.sh with {count + 1} argument(s) runs msrun with join=False (returns at "
              f"once); ember stays in the foreground (the 6- and 9-argument forms take JOIN)", file=sys.stderr)
    words = shlex.split(command)
    if words and words[0].endswith(".py"):  # run_mindformer.py: ember's trainer reads the same flags
        words = words[1:]
    plan = LaunchPlan(local_worker, worker_num // local_worker, node_rank, master_addr, master_port,
                      log_dir, max_restarts, join, timeout, module, words)
    check_plan(plan)
    return plan

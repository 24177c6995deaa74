"""Rendezvous faults of an `ember launch`, each ended in one line that says what to do.

torchelastic meets a MASTER_ADDR that does not resolve, a busy MASTER_PORT or a missing node by
retrying until the join timeout and then raising a C++ stack trace. The launcher checks what it
can before any rank starts (`check_master`, `wait_for_master`) and reads what it cannot
(`rendezvous_error`) into the same sentences.
"""

from __future__ import annotations

import errno
import re
import socket

from ember.commands.launch_plan import LaunchPlan
from ember.errors import EmberError


def check_master(plan: LaunchPlan) -> None:
    """Refuse, in one line, a MASTER_ADDR that does not resolve (torchelastic would retry it until
    the join timeout) and, on node 0, a MASTER_PORT something else already listens on."""
    try:
        socket.getaddrinfo(plan.master_addr, plan.master_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) else str(err)
        raise EmberError(f"MASTER_ADDR {plan.master_addr!r} does not resolve ({reason}); set --master-addr "
                         f"(or MASTER_ADDR) to node 0's host name or IP address") from None
    if plan.node_rank != 0:
        return
    # node 0 serves the rendezvous on every interface, as torchelastic's TCPStore does
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does
        try:
            probe.bind(("", plan.master_port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                raise EmberError(_port_in_use(plan, err.strerror)) from None
            raise


def wait_for_master(plan: LaunchPlan) -> None:
    """On nodes other than 0: wait (up to the join timeout) until node 0 accepts connections on
    MASTER_PORT. torchelastic's own client would retry too, but logs a C++ stack trace for each try."""
    import time

    deadline = time.monotonic() + plan.join_timeout
    while True:
        try:
            with socket.create_connection((plan.master_addr, plan.master_port), timeout=2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise EmberError(_unreachable(plan)) from None
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def _unreachable(plan: LaunchPlan) -> str:
    return (f"could not reach node 0 at {plan.master_addr}:{plan.master_port} within {plan.join_timeout} s; start "
            f"node 0 (NODE_RANK 0) with the same MASTER_PORT, check MASTER_ADDR and the firewall, or give it "
            f"longer with --timeout")


def _port_in_use(plan: LaunchPlan, reason: str) -> str:
    return (f"MASTER_PORT {plan.master_port} cannot be used on this node ({reason}; another job?); choose a "
            f"free port with --master-port (or MASTER_PORT), the same on every node")


def rendezvous_error(plan: LaunchPlan, err: Exception) -> EmberError:
    """One line for a failed rendezvous (torchelastic raises DistNetworkError/DistStoreError)."""
    text = str(err).strip()
    where = f"{plan.master_addr}:{plan.master_port}"
    if "EADDRINUSE" in text or "address already in use" in text:
        return EmberError(_port_in_use(plan, "address already in use"))
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        return EmberError(f"only {joined.group(1)} of {joined.group(2)} nodes joined at {where} within "
                          f"{plan.join_timeout} s; start `ember launch` with NODE_RANK 1..{plan.nnodes - 1} on the "
                          f"other nodes (same MASTER_ADDR and MASTER_PORT), or give them longer with --timeout")
    if "timed out" in text.lower() or "connect" in text.lower():
        return EmberError(_unreachable(plan))
    last = text.splitlines()[-1] if text else type(err).__name__
    return EmberError(f"rendezvous at {where} failed: {last}")

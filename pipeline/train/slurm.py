"""Slurm's view of a job step, translated into the rank layout torchrun would have given.

``srun python -m clusterssl train …`` starts one process per task; each task learns its place from
``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` (world size) and ``SLURM_LOCALID`` (rank on its node). The
rendezvous address is the first host of the step's node list and the port is derived from the job id, so
two jobs sharing a node do not collide and every task computes the same address without talking to the
others. ``MASTER_ADDR``/``MASTER_PORT`` set by the user win.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from clusterssl.errors import PipelineError

# Ports 20000..39999: above the usual service ports, below Linux's default ephemeral range (32768+ is
# shared, but a job id collision there only matters when two jobs land on the same head node).
PORT_BASE = 20000
PORT_SPAN = 20000
_BRACKET = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class SlurmLayout:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list in full: ``node[01-03,07],gpu-a`` → node01, node02, node03, node07,
    gpu-a. Zero padding is kept; several bracket groups in one name expand to every combination."""
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        pieces = _BRACKET.split(name)  # literal, ranges, literal, ranges, …
        choices = [
            [piece] if i % 2 == 0 else _expand_ranges(piece, hostlist) for i, piece in enumerate(pieces)
        ]
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split on the commas that separate hosts, not on those inside brackets."""
    names, depth, current = [], 0, ""
    for char in hostlist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += char
    names.append(current)
    if depth != 0 or any(not name for name in names):
        raise PipelineError(f"cannot read the Slurm node list {hostlist!r}")
    return names


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    values: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise PipelineError(f"cannot read the Slurm node list {hostlist!r}")
        high = high or low
        width = len(low) if low.startswith("0") else 0
        values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
    return values


def is_slurm_step(environ: Mapping[str, str]) -> bool:
    """Slurm's task variables are there and torchrun's are not (``srun torchrun`` is torchrun's world)."""
    return "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "RANK" not in environ


def slurm_layout(environ: Mapping[str, str]) -> SlurmLayout:
    """The rank layout of this Slurm task; PipelineError (one line) when the variables do not parse."""
    try:
        rank = int(environ["SLURM_PROCID"])
        world_size = int(environ["SLURM_NTASKS"])
        local_rank = int(environ.get("SLURM_LOCALID", 0))
        job_id = int(environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", 0)))
        port = int(environ.get("MASTER_PORT") or PORT_BASE + job_id % PORT_SPAN)
    except ValueError as error:
        raise PipelineError(f"malformed Slurm environment: {error}") from None
    address = environ.get("MASTER_ADDR")
    if not address:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if world_size > 1 and not nodes:
            raise PipelineError(
                "Slurm task variables are set but no node list (SLURM_STEP_NODELIST/SLURM_JOB_NODELIST) and "
                "no MASTER_ADDR; start the job with srun, or set MASTER_ADDR"
            )
        address = expand_hostlist(nodes)[0] if nodes else "127.0.0.1"
    return SlurmLayout(rank, world_size, local_rank, address, port)

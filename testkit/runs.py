"""What the tests that start generate.py / check.py jobs share: one torch thread in this process
(each torchrun worker has one too; the 2 cores are shared), an environment cleared of launch and
layout settings for in-process runs, the environment a job gets, a free port."""
import os
import socket

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs use one thread, like each torchrun worker. Imported into a test module, it
    applies to that module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def clean_env():
    """In-process runs see no launch, layout or FlagGems settings of the caller's, and one OpenMP thread.
    Imported into a test module, it applies to the whole module, its module-scoped fixtures included
    (an autouse fixture of a wider scope is set up before them)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("USE_FLAGGEMS", "USE_OGROUPS_COMM", "FLAGGEMS_EXCLUDE", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            patch.delenv(name, raising=False)
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def env(**extra) -> dict:
    """This process's environment for a job: no launch or layout settings of its own, one thread a
    rank, FlagGems off, then extra."""
    out = {k: v for k, v in os.environ.items() if k not in ("USE_OGROUPS_COMM", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out.update(OMP_NUM_THREADS="1", USE_FLAGGEMS="0", **extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

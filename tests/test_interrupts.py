"""Ctrl-C while batches come from worker processes lands between batches, never inside a transfer.

A KeyboardInterrupt raised while the main process is receiving a batch's
shared-memory file descriptors from a worker broke the worker's side of the
handshake, and the worker printed a traceback onto the user's terminal.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch
from torch.utils.data import Dataset

from vtransfer.engine.batches import make_loader
from vtransfer.utils.interrupts import catch_sigint

WORKER_DELAY_S = 0.6


class SignalsParentThenSlowlyReturns(Dataset):
    """Item 0 sends SIGINT to the main process, then takes ``WORKER_DELAY_S`` to arrive."""

    def __init__(self):
        self.main_pid = os.getpid()  # not os.getppid(): under forkserver the parent is the server

    def __len__(self):
        return 4

    def __getitem__(self, index):
        if index == 0:
            os.kill(self.main_pid, signal.SIGINT)
            time.sleep(WORKER_DELAY_S)
        return {"clip": torch.full((2, 3, 4, 4), index, dtype=torch.uint8), "label": index % 2, "video": index, "view": 0}


@pytest.fixture
def recording_handler():
    """A SIGINT handler that records its calls instead of raising."""
    calls: list[float] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(time.monotonic()))
    yield calls
    signal.signal(signal.SIGINT, previous)


def test_a_sigint_inside_the_block_reaches_the_handler_once_when_it_ends(recording_handler):
    with catch_sigint(hold=True):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert recording_handler == []
        inside_until = time.monotonic()
    assert len(recording_handler) == 1 and recording_handler[0] >= inside_until


def test_a_second_sigint_is_not_held(recording_handler):
    with catch_sigint(hold=True):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert len(recording_handler) == 1  # the second went through at once
    assert len(recording_handler) == 2  # and the held first one when the block ended


def test_a_held_sigint_wins_over_the_end_of_an_epoch():
    with pytest.raises(KeyboardInterrupt):
        with catch_sigint(hold=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise StopIteration  # what next() raises after an epoch's last batch
    with pytest.raises(KeyboardInterrupt):  # no handler of ours installed: the default raises
        with catch_sigint(hold=True):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_a_worker_batch_is_acted_on_only_after_the_batch_arrived(recording_handler):
    loader = make_loader(SignalsParentThenSlowlyReturns(), batch_size=1, workers=1)
    started = time.monotonic()
    arrived = []
    for batch in loader:
        arrived.append((time.monotonic(), int(batch["video"][0])))
    assert [i for _, i in arrived] == [0, 1, 2, 3]
    # without the deferral the handler ran at once, while the worker was still preparing the batch
    assert len(recording_handler) == 1
    assert started + WORKER_DELAY_S <= recording_handler[0] <= arrived[0][0]


def test_ctrl_c_in_a_worker_epoch_stops_it_without_a_traceback(capfd):
    loader = make_loader(SignalsParentThenSlowlyReturns(), batch_size=1, workers=1)
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    assert "Traceback" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class EndlessSmallClips(Dataset):
    """Batches that arrive every few milliseconds: each one is a file-descriptor handshake with a worker."""

    def __len__(self):
        return 10**6

    def __getitem__(self, index):
        return {"clip": torch.full((8, 3, 32, 32), index % 255, dtype=torch.uint8), "label": 0, "video": index, "view": 0}


def test_ctrl_c_at_random_moments_never_breaks_a_worker_handshake(capfd):
    # Before the fix, 38 of 60 such interrupts (from a terminal, in a separate process) printed
    # the worker's resource-sharer traceback.
    rng = random.Random(0)
    for _ in range(20):
        loader = make_loader(EndlessSmallClips(), batch_size=4, workers=2)
        batches = iter(loader)
        next(batches)  # the workers are up and sending
        threading.Timer(rng.uniform(0.0, 0.1), os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            for _ in batches:
                pass
        del batches  # shuts the workers down, as leaving the epoch does
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]

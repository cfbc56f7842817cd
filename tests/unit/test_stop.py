"""SIGTERM / Ctrl-C handling of the training loop (training/stop.py), with real signals to this process."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from difftrain.training.stop import StopRequested, StopSignals


def test_a_signal_in_the_loop_is_recorded_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.agreed_signal(1, torch.device("cpu")) == signal.SIGTERM
            with pytest.raises(StopRequested) as info:
                os.kill(os.getpid(), signal.SIGINT)
        assert info.value.signum == signal.SIGINT and info.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_a_signal_outside_the_loop_stops_at_once_with_its_exit_code():
    with StopSignals() as stop:
        assert stop.agreed_signal(1, torch.device("cpu")) is None
        with pytest.raises(StopRequested) as info:
            os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.exit_code == 143 and str(info.value) == "stopped by SIGTERM"

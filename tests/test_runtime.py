"""Where encoders run: the device choice, its override, and the decode workers it gets."""
from __future__ import annotations

import pytest
import torch

from retrieval import runtime
from retrieval.errors import SeesayError


def test_device_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.delenv(runtime.DEVICE_ENV, raising=False)
    assert runtime.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_override_and_a_missing_gpu_named(monkeypatch):
    monkeypatch.setenv(runtime.DEVICE_ENV, "cpu")
    assert runtime.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(runtime.DEVICE_ENV, "cuda")
    with pytest.raises(SeesayError, match="SEESAY_DEVICE=cuda"):
        runtime.default_device()


def test_a_gpu_gets_more_decode_workers_than_the_cpu():
    cpu, gpu = runtime.loader_workers(torch.device("cpu")), runtime.loader_workers(torch.device("cuda"))
    assert 1 <= cpu <= 2 and 1 <= gpu <= 16 and gpu >= cpu


def test_autocast_is_bfloat16_on_cuda_only():
    with runtime.autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    if torch.cuda.is_available():
        with runtime.autocast(torch.device("cuda")):
            assert (torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")).dtype == torch.bfloat16


def test_a_query_takes_only_the_cores_nothing_else_is_running_on(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(runtime, "other_running_tasks", lambda: 0)
    assert runtime.query_threads() == 2
    monkeypatch.setattr(runtime, "other_running_tasks", lambda: 3)  # three others on four cores: one is free
    assert runtime.query_threads() == 1
    monkeypatch.setattr(runtime, "other_running_tasks", lambda: 8)
    assert runtime.query_threads() == 1
    monkeypatch.setattr(runtime, "other_running_tasks", lambda: None)  # no /proc: torch's own count
    assert runtime.query_threads() == 2


def test_this_process_s_busy_threads_are_its_own_and_torch_threads_restores_the_setting():
    import threading

    if runtime.other_running_tasks() is None:
        pytest.skip("no /proc here")
    stop = threading.Event()

    def spin() -> None:  # busy: always running or ready to run
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        assert runtime.own_running_threads() >= 2  # the spinner and this thread, which is reading
    finally:
        stop.set()
        spinner.join()
    before = torch.get_num_threads()
    with runtime.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before

"""Long operations log start, progress and a summary through logging ("fastlora"), whatever the
terminal; enable_logging shows them."""

from __future__ import annotations

import logging

import torch
from torch import nn

import fastlora


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


def test_collect_gradients_logs_start_progress_and_summary_without_a_bar(caplog):
    batches = [(torch.randn(4, 8),) for _ in range(20)]
    with caplog.at_level(logging.INFO, logger="fastlora"):
        fastlora.collect_gradients(_mlp(), batches, loss_fn=lambda m, b: m(b[0]).pow(2).mean(), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "fastlora"]
    assert any("started (20 batches)" in line for line in lines)
    assert any("10/20 batches" in line for line in lines)
    assert any("done, 20 batches" in line for line in lines)
    assert any("gradients of 2 layers over 20 batches" in line for line in lines)


def test_initialisers_log_their_progress(caplog):
    model = _mlp()
    with caplog.at_level(logging.INFO, logger="fastlora"):
        fastlora.inject(model, ["0", "2"], r=2, init="olora")
    lines = [r.getMessage() for r in caplog.records if r.name == "fastlora"]
    assert any("olora: started (2 layers)" in line for line in lines)
    assert any("olora: done, 2 layers" in line for line in lines)


def test_enable_logging_adds_one_handler_and_sets_the_level():
    logger = logging.getLogger("fastlora")
    before_level, before = logger.level, list(logger.handlers)
    try:
        fastlora.enable_logging()
        fastlora.enable_logging("DEBUG")
        added = [h for h in logger.handlers if h not in before]
        assert len(added) == 1 and logger.level == logging.DEBUG
    finally:
        logger.handlers[:] = before
        logger.setLevel(before_level)

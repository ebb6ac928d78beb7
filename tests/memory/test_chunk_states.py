"""The chunk state machine is data (DEVICE_TRANSITIONS, HOST_TRANSITIONS), checked on every
move: a move the table does not allow raises IllegalTransition and leaves the state as it
was, so a bookkeeping slip fails at once instead of training on wrong data."""

from __future__ import annotations

import itertools

import pytest
import torch

from heteromem.memory.chunk import (DEVICE_TRANSITIONS, HOST_TRANSITIONS, Chunk, DeviceState,
                                    HostState, IllegalTransition)


def _chunk(device: DeviceState = DeviceState.ABSENT, host: HostState = HostState.PARAMS) -> Chunk:
    chunk = Chunk(index=3, dtype=torch.float32, capacity=64, trainable=True)
    chunk.device_state, chunk.host_state = device, host
    return chunk


def test_tables_cover_every_state():
    assert set(DEVICE_TRANSITIONS) == set(DeviceState)
    assert set(HOST_TRANSITIONS) == set(HostState)


@pytest.mark.parametrize("old,new", list(itertools.product(DeviceState, DeviceState)))
def test_device_moves_follow_the_table(old, new):
    chunk = _chunk(device=old)
    if new in DEVICE_TRANSITIONS[old]:
        chunk.move_device(new)
        assert chunk.device_state is new
    else:
        with pytest.raises(IllegalTransition, match=f"chunk 3.*{old.value}.*{new.value}"):
            chunk.move_device(new)
        assert chunk.device_state is old


@pytest.mark.parametrize("old,new", list(itertools.product(HostState, HostState)))
def test_host_moves_follow_the_table(old, new):
    chunk = _chunk(host=old)
    if new in HOST_TRANSITIONS[old]:
        chunk.move_host(new)
        assert chunk.host_state is new
    else:
        with pytest.raises(IllegalTransition, match=f"chunk 3.*{old.value}.*{new.value}"):
            chunk.move_host(new)
        assert chunk.host_state is old


@pytest.mark.parametrize("move", [
    # Gradients cannot appear in a device copy that does not exist or is still loading.
    lambda c: c.move_device(DeviceState.MIXED),
    lambda c: (c.move_device(DeviceState.LOADING), c.move_device(DeviceState.MIXED)),
    # A loading copy must finish before it can be freed.
    lambda c: (c.move_device(DeviceState.LOADING), c.move_device(DeviceState.ABSENT)),
    # An update in flight must end before another starts.
    lambda c: (c.move_host(HostState.UPDATING), c.move_host(HostState.UPDATING)),
], ids=["absent-to-mixed", "loading-to-mixed", "loading-to-absent", "update-twice"])
def test_illegal_moves_the_runtime_must_never_make(move):
    with pytest.raises(IllegalTransition):
        move(_chunk())


def test_a_normal_life_cycle_is_legal():
    """load, compute, gradients in slots, send home, update, reload."""
    chunk = _chunk()
    chunk.move_device(DeviceState.LOADING)
    chunk.move_device(DeviceState.PARAMS)
    chunk.move_device(DeviceState.MIXED)
    chunk.move_host(HostState.GRADS)
    chunk.move_device(DeviceState.PARAMS)
    chunk.move_device(DeviceState.ABSENT)
    chunk.move_host(HostState.UPDATING)
    chunk.move_host(HostState.PARAMS)
    chunk.move_device(DeviceState.LOADING)
    assert chunk.resident
    assert chunk.device_state is DeviceState.LOADING and chunk.host_state is HostState.PARAMS


def test_a_failed_update_hands_the_gradients_back():
    """An update that failed before it took the host buffer's gradients leaves them there
    (GRADS), for opt.step() to take again or opt.zero_grad() to drop."""
    chunk = _chunk()
    chunk.move_host(HostState.GRADS)
    chunk.move_host(HostState.UPDATING)
    chunk.move_host(HostState.GRADS)
    chunk.move_host(HostState.PARAMS)
    assert chunk.host_state is HostState.PARAMS


def test_illegal_transition_is_an_assertion_error():
    """It signals a heteromem bug, not bad user input."""
    assert issubclass(IllegalTransition, AssertionError)

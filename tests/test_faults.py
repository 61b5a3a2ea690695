"""LLMPIPE_FAULT: each kind of injected fault raises what it stands for."""

from __future__ import annotations

import pytest

from tasks import faults


def test_fault_kinds_raise_what_they_stand_for(monkeypatch) -> None:
    import errno

    from tasks.errors import ConfigError

    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LLMPIPE_FAULT", "register:enospc,tokenize,pretrain:oserror@3")
    with pytest.raises(OSError, match="No space left on device") as full:
        faults.check("register")
    assert full.value.errno == errno.ENOSPC
    faults.check("register")  # each rule fires once per process
    with pytest.raises(OSError) as io:
        faults.check("tokenize")  # the default kind: a transient I/O failure
    assert io.value.errno == errno.EIO
    faults.check("pretrain")
    with pytest.raises(OSError, match="at step 3") as io:
        faults.check("pretrain", 3)
    assert io.value.errno == errno.EIO

    monkeypatch.setenv("LLMPIPE_FAULT", "finetune:nan@2")
    faults.check("finetune", 2)  # a nan rule raises nothing: it poisons the step's loss, once
    assert not faults.poison_loss("finetune", 1) and not faults.poison_loss("pretrain", 2)
    assert faults.poison_loss("finetune", 2) and not faults.poison_loss("finetune", 2)
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:nan")
    with pytest.raises(ConfigError, match="needs the training step"):
        faults.check("pretrain")
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:segfault@3")
    with pytest.raises(ConfigError, match="unknown fault kind 'segfault'"):
        faults.check("tokenize")

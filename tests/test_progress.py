"""The live display of `llmpipe run`: its rows (step, loss, speed, time left, stages done), and silence when
nothing listens."""

from __future__ import annotations

import re


def test_live_display_rows_show_step_loss_speed_time_left_and_stages_done() -> None:
    import io
    import time

    from rich.console import Console

    from flows import progress

    console = Console(file=io.StringIO(), width=120, height=40, force_terminal=False)
    display = progress.LiveDisplay(console, "llm_pipeline")
    display.started("ingest-corpus")
    display.finished("ingest-corpus", ok=True)
    display.started("train-tokenizer")
    display.finished("train-tokenizer", ok=True, reused=True)
    for task in ("tokenize-plan", "tokenize-shard", "tokenize-shard"):
        display.started(task)
        display.finished(task, ok=True)
    assert display.stages["tokenize"].state == "running"  # the plan and the shards do not end the stage
    display.started("tokenize")
    display.finished("tokenize", ok=True)
    display.started("pretrain")
    display.advanced("pretrain", 50, 600, {"loss": 5.91, "tokens_per_s": 44656.0})
    time.sleep(0.05)
    display.advanced("pretrain", 100, 600, {"loss": 5.59, "tokens_per_s": 44180.0})
    display.started("evaluate-lm")
    display.finished("evaluate-lm", ok=False)

    console.print(display.render())
    lines = {line[2:].split()[0]: line for line in console.file.getvalue().splitlines()}  # by stage, after the status
    assert "3 stages done" in lines["llm_pipeline"]
    assert lines["ingest-corpus"].startswith("✓") and lines["train-tokenizer"].split()[2] == "reused"
    assert list(lines)[1:] == ["ingest-corpus", "train-tokenizer", "tokenize", "pretrain", "evaluate-lm"]
    running = lines["pretrain"]
    assert "step 100/600" in running and "loss 5.5900" in running and "44.2k tok/s" in running
    assert re.search(r"\d+\.\ds, \d+\.\ds left$", running), running  # 500 steps at the pace of the last 50
    assert lines["evaluate-lm"].startswith("✗") and "failed" in lines["evaluate-lm"]
    display.finished("pretrain", ok=True)
    console.file.truncate(0)
    console.print(display.render())
    assert re.search(r"✓ pretrain\s+100 steps, final loss 5\.5900\s+\d", console.file.getvalue())


def test_on_an_80_column_terminal_the_bar_goes_and_every_number_fits() -> None:
    import io

    from rich.console import Console

    from flows import progress

    console = Console(file=io.StringIO(), width=80, height=24, force_terminal=False)
    display = progress.LiveDisplay(console, "llm_pipeline")
    display.started("pretrain")
    display.advanced("pretrain", 50, 600, {"loss": 5.91, "tokens_per_s": 44656.0})
    display.advanced("pretrain", 100, 600, {"loss": 5.59, "tokens_per_s": 123456.0})
    console.print(display.render())
    (row,) = [line for line in console.file.getvalue().splitlines() if "pretrain" in line]
    assert len(row) <= 80 and "━" not in row and "…" not in row
    assert re.search(r"step 100/600  loss 5\.5900  123\.5k tok/s +\d+\.\ds, \d+\.\ds left$", row), row


def test_stages_report_to_nothing_without_a_display() -> None:
    from flows import progress

    assert progress.current() is progress._NOTHING
    progress.stage_started("pretrain")  # no display: nothing happens, nothing fails
    progress.stage_advanced("pretrain", 1, 2, {"loss": 1.0})
    progress.stage_finished("pretrain", ok=True)

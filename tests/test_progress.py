"""Training output: plain lines off a terminal (about 100 per run), a rich bar on one."""

import io

from tuneplex.progress import Progress


def event(step):
    return {"epoch": step / 10, "loss": 2.0, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1234.0}


def test_plain_lines_are_throttled_but_keep_first_last_and_validation():
    out = io.StringIO()
    p = Progress(total=1000, stream=out, bar=False)
    for step in range(1, 1001):
        p.train(step, event(step))
    p.val(1000, 100.0, 1.5)
    p.close()
    lines = out.getvalue().splitlines()
    train = [x for x in lines if x.startswith("[train]")]
    assert len(train) == 101  # step 1, then every 10th
    assert train[0].startswith("[train] step 1/1000 | epoch 0.10 | loss 2.0000 | lr 0.0001")
    assert train[-1].startswith("[train] step 1000/1000")
    assert "1,234 tok/s" in train[0]
    assert lines[-1] == "[val] step 1000 | epoch 100.00 | loss 1.5000"


def test_every_step_printed_on_short_runs():
    out = io.StringIO()
    p = Progress(total=5, stream=out, bar=False)
    for step in range(1, 6):
        p.train(step, event(step))
    assert len(out.getvalue().splitlines()) == 5


def test_bar_mode_keeps_validation_lines():
    out = io.StringIO()
    p = Progress(total=4, stream=out, bar=True)
    for step in range(1, 5):
        p.train(step, event(step))
    p.val(4, 1.0, 0.25)
    p.close()
    text = out.getvalue()
    assert "[val] step 4 | epoch 1.00 | loss 0.2500" in text
    assert "4/4" in text

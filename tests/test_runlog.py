"""The log line's clock (runlog.RunLog): time spent writing a checkpoint, evaluating or sampling previews is left
out of img/s and ms/it, so a line's throughput is the training steps' alone (a 16 GB checkpoint write once made
one interval of a full-size run read 0.8 img/s where its steps ran at 12)."""
import types

import torch

import model
import runlog


def test_paused_time_is_left_out_of_the_interval(tmp_path, monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(runlog.time, "time", lambda: now[0])
    procs = types.SimpleNamespace(on=False, master=True, world=1, device="cpu")
    log = runlog.RunLog(procs, model.SDXLConfig.tiny().unet, 1000, 0.0, 10, 2, str(tmp_path))
    for step in range(2):
        log.add_batch(torch.tensor([10, 990]), torch.tensor([0.5, 1.5]), (16, 16))
        log.add_step(torch.tensor(1.0))
        now[0] += 1.0  # a 1 s step
        if step == 0:
            with log.paused():  # a 30 s checkpoint write between the two steps
                now[0] += 30.0
    log.line(2, 1e-5, (0.9, 0.95), torch.tensor(1.0), 0)
    line = capsys.readouterr().out.splitlines()[0]
    assert ", 2.00 img/s, 1000 ms/it," in line, line  # 4 images in the 2 s of steps, not in 32 s
    with log.paused():  # a pause after the line belongs to no interval
        now[0] += 5.0
    log.add_batch(torch.tensor([500, 500]), torch.tensor([1.0, 1.0]), (16, 16))
    log.add_step(torch.tensor(1.0))
    now[0] += 2.0
    log.line(3, 1e-5, (0.9, 0.95), torch.tensor(1.0), 0)
    assert ", 1.00 img/s, 1000 ms/it," in capsys.readouterr().out  # 2 images in 2 s; interval 2 -> 1000 ms/it

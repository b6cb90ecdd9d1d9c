import io
import math

import pytest
import torch

from vaswani.training.schedule import get_noam_schedule, noam_lr, paper_adam


def _optimizer(lr: float = 1.0) -> torch.optim.Adam:
    return paper_adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_peak_at_warmup():
    assert noam_lr(4000, 512) == pytest.approx(512**-0.5 * 4000**-0.5)
    assert noam_lr(4000, 512) == pytest.approx(6.99e-4, rel=1e-3)
    assert max(noam_lr(s, 512) for s in range(1, 20000, 7)) <= noam_lr(4000, 512) * (1 + 1e-12)
    assert noam_lr(4000, 512, scale=2.0) == pytest.approx(2 * noam_lr(4000, 512))


def test_linear_warmup_and_inverse_sqrt_decay():
    assert noam_lr(1000, 512) == pytest.approx(noam_lr(4000, 512) / 4)
    assert noam_lr(2000, 512) == pytest.approx(2 * noam_lr(1000, 512))
    assert noam_lr(16000, 512) == pytest.approx(noam_lr(4000, 512) / 2)
    assert noam_lr(64000, 512) == pytest.approx(noam_lr(16000, 512) / 2)


def test_step_zero_is_step_one():
    assert noam_lr(0, 512) == noam_lr(1, 512) > 0
    with pytest.raises(ValueError, match="warmup_steps"):
        noam_lr(1, 512, warmup_steps=0)


def test_cooldown_decays_linearly_to_zero_over_the_last_steps():
    rates = [noam_lr(s, 64, 10, cooldown_steps=20, total_steps=100) for s in range(1, 101)]
    assert rates[:80] == [noam_lr(s, 64, 10) for s in range(1, 81)]  # untouched before the cool-down
    for step in (81, 90, 100):
        assert noam_lr(step, 64, 10, cooldown_steps=20, total_steps=100) == pytest.approx(
            noam_lr(step, 64, 10) * (101 - step) / 20
        )
    assert rates[-1] == pytest.approx(noam_lr(100, 64, 10) / 20)
    assert noam_lr(101, 64, 10, cooldown_steps=20, total_steps=100) == 0.0
    assert all(a > b for a, b in zip(rates[80:], rates[81:]))


@pytest.mark.parametrize("total", [None, 0, 19])
def test_cooldown_needs_a_total_at_least_as_long(total):
    with pytest.raises(ValueError, match="cooldown_steps=20 needs the run's total_steps"):
        noam_lr(1, 64, 10, cooldown_steps=20, total_steps=total)
    with pytest.raises(ValueError, match="max_steps"):
        get_noam_schedule(_optimizer(), 64, 10, cooldown_steps=20, total_steps=total)


def test_lambdalr_matches_noam_lr_and_ignores_optimizer_lr():
    opt = _optimizer(lr=5e-4)
    sched = get_noam_schedule(opt, d_model=64, warmup_steps=10)
    for k in range(40):
        assert opt.param_groups[0]["lr"] == pytest.approx(noam_lr(k + 1, 64, 10))
        opt.step()
        sched.step()


def test_scheduler_state_dict_round_trip():
    opt = _optimizer()
    sched = get_noam_schedule(opt, d_model=64, warmup_steps=10, scale=2.0, cooldown_steps=5, total_steps=12)
    for _ in range(7):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)  # as the Trainer does; it reloads with weights_only=True
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    opt2 = _optimizer()
    sched2 = get_noam_schedule(opt2, d_model=512, warmup_steps=4000)  # settings come from the state
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert sched2.last_epoch == 8
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched2.get_last_lr()[0] == pytest.approx(noam_lr(9, 64, 10, 2.0, cooldown_steps=5, total_steps=12))
    assert sched2.get_last_lr()[0] < noam_lr(9, 64, 10, 2.0)


def test_paper_adam_hyperparameters():
    group = _optimizer().param_groups[0]
    assert group["betas"] == (0.9, 0.98)
    assert math.isclose(group["eps"], 1e-9)


def test_fine_tuning_schedules_warm_up_to_the_rate_given():
    from vaswani.training.schedule import noam_peak, scheduled_lr

    assert [scheduled_lr(s, 1e-4, 4, "constant") for s in (1, 2, 4, 100)] == pytest.approx([2.5e-5, 5e-5, 1e-4, 1e-4])
    assert scheduled_lr(4, 1e-4, 4, "inverse_sqrt") == pytest.approx(1e-4)
    assert scheduled_lr(16, 1e-4, 4, "inverse_sqrt") == pytest.approx(0.5e-4)  # sqrt(4 / 16)
    # the paper's schedule is inverse_sqrt with its own peak
    for step in (1, 100, 4000, 9000):
        assert noam_lr(step, 512) == pytest.approx(scheduled_lr(step, noam_peak(512, 4000), 4000, "inverse_sqrt"))
    with pytest.raises(ValueError, match="unknown decay 'cosine'"):
        scheduled_lr(1, 1e-4, 4, "cosine")

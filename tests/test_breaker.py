"""The circuit breaker on its own, with a clock the test moves."""

from fksroute.plugins.breaker import CircuitBreaker


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_circuit_breaker_states():
    clock = FakeClock()
    breaker = CircuitBreaker(3, cooldown=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state == "closed"
    breaker.failed()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial only
    breaker.failed()  # the trial failed: open again for a full cool-down
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 10
    assert breaker.allow()
    breaker.released()  # the trial taught nothing: the next caller is the trial
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.failures == 0 and breaker.allow()

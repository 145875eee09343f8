import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serving import start_daemon  # noqa: E402

ALERTS = Path(__file__).parent / "alerts"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def daemon_factory():
    """Start real `fksroute serve` processes; all are stopped at the end of the test."""
    started = []

    def start(config, env=None, args=(), port=None):
        d = start_daemon(config, env, args, port)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()

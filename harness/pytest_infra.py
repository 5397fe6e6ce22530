"""pytest hooks that keep infrastructure failures apart from verdicts and leave nothing behind
(registered by ``harness.pytest_plugin`` through ``pytest_plugins``)."""

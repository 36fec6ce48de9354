"""Entry points (the ``pfl`` CLI), simulation configs, benchmarks and result reports."""

"""Test-session setup shared by every test module."""

import signal

# A suite started in the background of a non-interactive shell (`script &`) inherits SIGINT ignored, and so would
# every vtransfer process a test starts: Python then never raises KeyboardInterrupt, and the Ctrl-C tests
# (test_interrupts, test_crash_safety) would fail for how the suite was launched, not for what vtransfer does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import signal

# SIGINT and SIGTERM are the gateway worker's to take (a terminal's Ctrl-C or systemd's stop
# reaches every process): the helper ends at the end of its stdin, after writing what it holds.
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, signal.SIG_IGN)

from services.telemetry.main import main  # noqa: E402  (after the signals: its imports take a while)

main()

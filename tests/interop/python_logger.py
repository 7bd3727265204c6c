#!/usr/bin/env python3
"""Drives fluent-logger's synchronous fluent.sender.FluentSender for tests/interop.rs.

Sends --count events with distinct ``seq`` in Message mode, one ``emit()`` each, and prints a
one-line JSON summary on stdout; exits 0 only if every ``emit()`` returned True. The sync sender
has no ack option (fluent-logger 0.11 sends no ``chunk``), so True only means the bytes were
written; the test checks delivery at the aggregator. ``--nanosecond`` turns on the sender's
``nanosecond_precision`` option: times become EventTime (msgpack ext 0) instead of integers.
"""

import argparse
import json
import sys
import time

from fluent import sender


def record(seq):
    # A few msgpack types: uint, str, non-ASCII str, array, float, bool, nil.
    return {
        "seq": seq,
        "msg": "python %d" % seq,
        "client": "fluent-logger",
        "utf8": "grüße ✓",
        "list": [seq % 7, "x"],
        "ratio": 0.25,
        "ok": True,
        "none": None,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=24224)
    parser.add_argument("--tag", default="interop.python")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--nanosecond", action="store_true")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    started = time.monotonic()
    logger = sender.FluentSender(
        args.tag,
        host=args.host,
        port=args.port,
        timeout=args.timeout,
        nanosecond_precision=args.nanosecond,
    )
    ok = 0
    failed = []
    for seq in range(args.count):
        # emit() stamps the current time: int(time.time()), or with nanosecond_precision an
        # EventTime from time.time_ns().
        if logger.emit(None, record(seq)):
            ok += 1
        else:
            failed.append("seq %d: %r" % (seq, logger.last_error))
            logger.clear_last_error()
    logger.close()
    print(
        json.dumps(
            {
                "client": "fluent-logger",
                "sent": args.count,
                "ok": ok,
                "failed": len(failed),
                "errors": failed[:5],
                "elapsed_ms": int((time.monotonic() - started) * 1000),
            }
        ),
        flush=True,
    )
    return 0 if ok == args.count and not failed else 1


if __name__ == "__main__":
    sys.exit(main())

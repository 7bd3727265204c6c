#!/usr/bin/env node
// Drives @fluent-org/logger's FluentClient (ack mode) for tests/interop.rs.
//
// Sends --count events with distinct `seq`, in batches of --batch per event-loop turn so the
// client pipelines many chunks without waiting for acks (PROTOCOL.md §6.3: it matches acks by
// id in a Map), awaits every emit promise (with `ack` set, a promise resolves only when the
// chunk's ack arrived), prints a one-line JSON summary on stdout and exits 0 only if every
// event was acked. --report FILE also writes each event as a JSON line
// `{"time": <int seconds>, "record": {...}}`, for runs whose bytes cannot be recorded (TLS).
//
// Options: --host H --port P --tag T --count N --batch K --ack-timeout MS --deadline MS
//          [--event-time] [--base-time SECONDS] [--shared-key KEY --client-hostname NAME]
//          [--tls-ca FILE --tls-servername NAME] [--report FILE]
"use strict";

const fs = require("fs");
const { FluentClient, EventTime, FluentSocketEvent } = require("@fluent-org/logger");

function parseArgs(argv) {
  const args = {
    host: "127.0.0.1",
    port: 24224,
    tag: "interop.node",
    count: 100,
    batch: 1,
    ackTimeout: 30000,
    deadline: 120000,
    eventTime: false,
    baseTime: 1700000000,
    sharedKey: null,
    clientHostname: null,
    tlsCa: null,
    tlsServername: null,
    report: null,
  };
  const names = {
    "--host": ["host", String],
    "--port": ["port", Number],
    "--tag": ["tag", String],
    "--count": ["count", Number],
    "--batch": ["batch", Number],
    "--ack-timeout": ["ackTimeout", Number],
    "--deadline": ["deadline", Number],
    "--base-time": ["baseTime", Number],
    "--shared-key": ["sharedKey", String],
    "--client-hostname": ["clientHostname", String],
    "--tls-ca": ["tlsCa", String],
    "--tls-servername": ["tlsServername", String],
    "--report": ["report", String],
  };
  for (let i = 2; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === "--event-time") {
      args.eventTime = true;
      continue;
    }
    const spec = names[flag];
    if (!spec || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${flag}`);
    }
    const value = spec[1](argv[++i]);
    if (typeof value === "number" && !Number.isFinite(value)) {
      throw new Error(`${flag} needs a number`);
    }
    args[spec[0]] = value;
  }
  return args;
}

function summary(fields) {
  process.stdout.write(JSON.stringify({ client: "@fluent-org/logger", ...fields }) + "\n");
}

// A record with a few msgpack types (uint, str, non-ASCII str, array, float, bool, nil).
function record(seq) {
  return {
    seq,
    msg: `node ${seq}`,
    client: "@fluent-org/logger",
    utf8: "grüße ✓",
    list: [seq % 7, "x"],
    ratio: 0.25,
    ok: true,
    none: null,
  };
}

async function main() {
  const args = parseArgs(process.argv);
  if (args.report && args.eventTime) {
    throw new Error("--report writes integer times: do not combine it with --event-time");
  }
  const started = Date.now();
  const watchdog = setTimeout(() => {
    summary({ error: `deadline of ${args.deadline} ms passed`, elapsed_ms: Date.now() - started });
    process.exit(3);
  }, args.deadline);
  watchdog.unref();

  const socket = { host: args.host, port: args.port, timeout: -1, disableReconnect: false };
  if (args.tlsCa) {
    socket.tls = { ca: fs.readFileSync(args.tlsCa), servername: args.tlsServername || undefined };
  }
  const options = {
    ack: { ackTimeout: args.ackTimeout },
    milliseconds: args.eventTime,
    socket,
    disableAutoconnect: true,
  };
  if (args.sharedKey !== null) {
    options.security = { clientHostname: args.clientHostname || "node-interop", sharedKey: args.sharedKey };
  }
  const client = new FluentClient(args.tag, options);
  const socketErrors = [];
  client.socketOn(FluentSocketEvent.ERROR, (err) => socketErrors.push(String(err)));
  // Established = connected, and with a shared key also past HELO/PING/PONG.
  const established = new Promise((resolve) => client.socketOn(FluentSocketEvent.ESTABLISHED, resolve));
  await client.connect();
  await established;

  let acked = 0;
  const failures = [];
  const pending = [];
  const report = [];
  for (let seq = 0; seq < args.count; seq++) {
    const data = record(seq);
    const seconds = args.baseTime + seq;
    const time = args.eventTime ? new EventTime(seconds, (seq * 1000003) % 1000000000) : seconds * 1000;
    if (args.report) {
      report.push(JSON.stringify({ time: seconds, record: data }));
    }
    pending.push(
      client.emit(data, time).then(
        () => {
          acked += 1;
        },
        (err) => {
          failures.push(`seq ${seq}: ${err && err.name}: ${err && err.message}`);
        },
      ),
    );
    // Let the client flush what this turn queued: one chunk per batch, all in flight at once.
    if ((seq + 1) % args.batch === 0) {
      await new Promise((resolve) => setImmediate(resolve));
    }
  }
  await Promise.all(pending);
  if (args.report) {
    fs.writeFileSync(args.report, report.join("\n") + "\n");
  }
  await client.shutdown();
  clearTimeout(watchdog);
  summary({
    sent: args.count,
    acked,
    failed: failures.length,
    errors: failures.slice(0, 5),
    socket_errors: socketErrors.slice(0, 5),
    elapsed_ms: Date.now() - started,
  });
  process.exit(failures.length === 0 && acked === args.count ? 0 : 1);
}

main().catch((err) => {
  summary({ error: String((err && err.stack) || err) });
  process.exit(2);
});

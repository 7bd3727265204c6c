// Command go_logger drives fluent-logger-golang with RequestAck for tests/interop.rs.
//
// It Posts -count events with distinct "seq" on one synchronous connection. With RequestAck
// every Post writes one Message-mode request with a "chunk" option and blocks until the ack
// with the same id arrives (PROTOCOL.md §6.3); MaxRetry 1 turns a missing or wrong ack into an
// error instead of a silent resend. It prints a one-line JSON summary on stdout and exits 0
// only if every Post returned nil.
//
// Built without network access against Debian's golang-github-fluent-fluent-logger-golang-dev:
// GO111MODULE=off GOPATH=/usr/share/gocode go build (see tests/interop_support).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/fluent/fluent-logger-golang/fluent"
)

func main() {
	host := flag.String("host", "127.0.0.1", "ackgate host")
	port := flag.Int("port", 24224, "ackgate port")
	tag := flag.String("tag", "interop.go", "tag")
	count := flag.Int("count", 100, "events to send")
	subsecond := flag.Bool("subsecond", false, "SubSecondPrecision: EventTime instead of integer times")
	timeout := flag.Duration("timeout", 10*time.Second, "connect, write and ack timeout")
	flag.Parse()

	started := time.Now()
	summary := map[string]interface{}{"client": "fluent-logger-golang", "sent": *count}
	logger, err := fluent.New(fluent.Config{
		FluentHost:         *host,
		FluentPort:         *port,
		RequestAck:         true,
		SubSecondPrecision: *subsecond,
		Timeout:            *timeout,
		WriteTimeout:       *timeout,
		MaxRetry:           1,
	})
	if err != nil {
		summary["error"] = fmt.Sprintf("fluent.New: %v", err)
		emit(summary)
		os.Exit(2)
	}
	acked := 0
	var errors []string
	for seq := 0; seq < *count; seq++ {
		record := map[string]interface{}{
			"seq":    seq,
			"msg":    fmt.Sprintf("go %d", seq),
			"client": "fluent-logger-golang",
			"utf8":   "grüße ✓",
			"list":   []interface{}{seq % 7, "x"},
			"ratio":  0.25,
			"ok":     true,
		}
		if err := logger.Post(*tag, record); err != nil {
			if len(errors) < 5 {
				errors = append(errors, fmt.Sprintf("seq %d: %v", seq, err))
			}
			continue
		}
		acked++
	}
	if err := logger.Close(); err != nil && len(errors) < 5 {
		errors = append(errors, fmt.Sprintf("close: %v", err))
	}
	summary["acked"] = acked
	summary["failed"] = *count - acked
	summary["errors"] = errors
	summary["elapsed_ms"] = time.Since(started).Milliseconds()
	emit(summary)
	if acked != *count {
		os.Exit(1)
	}
}

func emit(summary map[string]interface{}) {
	line, _ := json.Marshal(summary)
	fmt.Println(string(line))
}

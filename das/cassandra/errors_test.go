package cassandra

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"

	"github.com/imd-dev/imd/das"
)

// TestErrorMapping: what a retry may cure is das.ErrUnavailable (the
// client is told to try again); what it cannot is not.
func TestErrorMapping(t *testing.T) {
	retryable := []error{
		&gocql.RequestErrUnavailable{Consistency: gocql.LocalQuorum, Required: 2, Alive: 1},
		&gocql.RequestErrWriteTimeout{WriteType: "BATCH_LOG"},
		&gocql.RequestErrWriteTimeout{WriteType: "CAS"},
		&gocql.RequestErrReadTimeout{},
		&gocql.RequestErrOverloaded{},
		&gocql.RequestErrBootstrapping{},
		&gocql.RequestErrWriteFailure{},
		&gocql.RequestErrReadFailure{},
		&gocql.RequestErrCASWriteUnknown{},
		gocql.ErrNoConnections,
		gocql.ErrNoConnectionsStarted,
		gocql.ErrTimeoutNoResponse,
		gocql.ErrConnectionClosed,
		gocql.ErrNoStreams,
		gocql.ErrUnavailable,
		gocql.ErrSessionClosed,
		&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED},
		io.EOF,
		context.DeadlineExceeded,
		fmt.Errorf("gocql: unable to create session: %w", syscall.ECONNRESET),
	}
	for _, cause := range retryable {
		err := storeErr("put", cause)
		if !errors.Is(err, das.ErrUnavailable) {
			t.Errorf("%T %v: %v is not ErrUnavailable", cause, cause, err)
		}
		if !errors.Is(err, cause) {
			t.Errorf("%T: the cause is lost: %v", cause, err)
		}
		if got := (&retryPolicy{}).GetRetryType(cause); got != gocql.RetryNextHost && !errors.Is(cause, context.DeadlineExceeded) {
			t.Errorf("%T: retry type %v, want RetryNextHost", cause, got)
		}
	}
	permanentErrs := []error{
		&gocql.RequestErrSyntax{},
		&gocql.RequestErrInvalid{},
		&gocql.RequestErrUnauthorized{},
		&gocql.RequestErrCredentials{},
		&gocql.RequestErrConfig{},
		&gocql.RequestErrAlreadyExists{},
		&gocql.RequestErrFunctionFailure{},
		gocql.MarshalError("can not marshal"),
		gocql.UnmarshalError("can not unmarshal"),
		fmt.Errorf("%w: limit 0", ErrInvalid),
		fmt.Errorf("wrapped: %w", &gocql.RequestErrInvalid{}),
	}
	for _, cause := range permanentErrs {
		err := storeErr("put", cause)
		if err == nil || errors.Is(err, das.ErrUnavailable) {
			t.Errorf("%T %v: %v must not be ErrUnavailable", cause, cause, err)
		}
		if got := (&retryPolicy{}).GetRetryType(cause); got != gocql.Rethrow {
			t.Errorf("%T: retry type %v, want Rethrow", cause, got)
		}
	}
	if storeErr("x", nil) != nil {
		t.Error("storeErr(nil) != nil")
	}
	if err := storeErr("x", context.Canceled); !errors.Is(err, context.Canceled) || !errors.Is(err, das.ErrUnavailable) {
		t.Errorf("canceled: %v", err)
	}
}

// TestRetryPolicy: attempts are bounded and a done context stops the
// backoff at once.
func TestRetryPolicy(t *testing.T) {
	p := &retryPolicy{retries: 2, min: time.Millisecond, max: 2 * time.Millisecond}
	for n, want := range map[int]bool{1: true, 2: true, 3: false} {
		if got := p.Attempt(fakeQuery{n: n, ctx: context.Background()}); got != want {
			t.Errorf("Attempt after %d attempts = %v, want %v", n, got, want)
		}
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	slow := &retryPolicy{retries: 5, min: time.Hour, max: time.Hour}
	start := time.Now()
	if slow.Attempt(fakeQuery{n: 1, ctx: done}) || time.Since(start) > time.Second {
		t.Fatal("backoff ignored a done context")
	}
}

type fakeQuery struct {
	n   int
	ctx context.Context
}

func (q fakeQuery) Attempts() int                     { return q.n }
func (q fakeQuery) SetConsistency(gocql.Consistency)  {}
func (q fakeQuery) GetConsistency() gocql.Consistency { return gocql.LocalQuorum }
func (q fakeQuery) Context() context.Context          { return q.ctx }

// TestOpenUnreachable: with no server at the address, Open fails fast
// with a retryable error.
func TestOpenUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // a port that refuses connections
	for _, dc := range []string{"", "dc1"} {
		start := time.Now()
		_, err := Open(context.Background(), Config{Hosts: []string{addr}, LocalDC: dc, ConnectTimeout: time.Second, Timeout: time.Second})
		if !errors.Is(err, das.ErrUnavailable) {
			t.Fatalf("Open(%s, dc %q): %v, want ErrUnavailable", addr, dc, err)
		}
		if el := time.Since(start); el > 10*time.Second {
			t.Fatalf("Open took %v", el)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Open(ctx, Config{Hosts: []string{addr}, LocalDC: "dc1"}); err == nil {
		t.Fatal("Open with a canceled context succeeded")
	}
}

// TestConfig: defaults and validation.
func TestConfig(t *testing.T) {
	var c Config
	if err := c.setDefaults(); err != nil {
		t.Fatal(err)
	}
	if c.Consistency != "LOCAL_QUORUM" || c.SerialConsistency != "LOCAL_SERIAL" || c.Keyspace != "imd" ||
		c.Retention.IdempotencyTTL != 24*time.Hour || c.InboxLag != 2*time.Minute || len(c.Hosts) != 1 {
		t.Fatalf("defaults: %+v", c)
	}
	for _, bad := range []Config{
		{Consistency: "MOST"},
		{SerialConsistency: "QUORUM"},
		{Keyspace: "Imd-1"},
		{Retention: das.Retention{MaxAge: -1}},
		{Retention: das.Retention{IdempotencyTTL: 30 * 24 * time.Hour}},
		{Timeout: time.Minute, InboxLag: time.Minute},
		{MaxPage: -1},
	} {
		if err := bad.setDefaults(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%+v: %v, want ErrInvalid", bad, err)
		}
	}
}

// TestLayout: bucket and TTL arithmetic.
func TestLayout(t *testing.T) {
	now := time.Now()
	id := das.MsgidAt(now)
	if d := das.MsgTime(id).Sub(now); d > time.Millisecond || d < -time.Millisecond {
		t.Fatalf("das.MsgTime(das.MsgidAt(now)) off by %v", d)
	}
	b := bucketOf(id)
	if end := bucketEnd(b); !end.After(now) || end.Sub(now) > bucketWidth {
		t.Fatalf("bucket %d ends %v, now %v", b, end, now)
	}
	if bucketOf(das.MsgidAt(bucketEnd(b))) != b+1 || bucketOf(das.MsgidAt(bucketEnd(b))-1) != b {
		t.Fatal("bucket boundary")
	}
	if got := ttlSeconds(0, now, now); got != 0 {
		t.Fatalf("no max age: ttl %d", got)
	}
	if got := ttlSeconds(time.Hour, now.Add(-2*time.Hour), now); got != -1 {
		t.Fatalf("expired: ttl %d", got)
	}
	if got := ttlSeconds(time.Hour, now.Add(-30*time.Minute), now); got < 1799 || got > 1801 {
		t.Fatalf("half an hour left: ttl %d", got)
	}
	if writeTime(id) != das.MsgTime(id).UnixMicro() {
		t.Fatal("writeTime")
	}
}

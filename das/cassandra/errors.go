package cassandra

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"

	"github.com/imd-dev/imd/das"
)

// ErrInvalid is returned (wrapped) for bad arguments: a nil message, msgid
// 0 or above 2^63-1, a missing sender or recipient, a page limit <= 0, a
// message too large for Config.MaxBatchBytes. A retry cannot cure it.
var ErrInvalid = das.ErrInvalid

// ErrSchema is returned (wrapped) by Open when the keyspace's schema is
// missing or older than this binary's migrations: run `imd migrate`.
var ErrSchema = errors.New("das/cassandra: schema not migrated")

// storeErr maps an error of the driver to the das taxonomy:
//
//   - errors a retry may cure are wrapped in das.ErrUnavailable: the
//     coordinator could not reach enough replicas (Unavailable), replicas
//     did not answer in time (read/write timeouts, including an LWT whose
//     outcome is unknown), a replica or coordinator is overloaded or
//     bootstrapping, a read or write failed on a replica, no host is up
//     or reachable (no connections, connection refused or closed, the
//     driver's own timeout), and the caller's context ending mid-request
//     (also still matched by errors.Is(err, context.DeadlineExceeded));
//   - errors that say the request or the deployment is wrong (syntax,
//     invalid request such as an unknown table or a batch over
//     batch_size_fail_threshold, unauthorized, bad credentials, a protocol
//     or marshalling error) are returned as they are: retrying them would
//     only repeat them;
//   - anything else is taken as retryable, so that a client is told to try
//     again rather than that its message was refused.
//
// The cause stays in the chain, so logs show what the driver said.
func storeErr(op string, err error) error {
	if err == nil {
		return nil
	}
	if permanent(err) {
		return fmt.Errorf("das/cassandra: %s: %w", op, err)
	}
	return fmt.Errorf("%w: %s: %w", das.ErrUnavailable, op, err)
}

// permanent reports whether err is one a retry cannot cure.
func permanent(err error) bool {
	var (
		syntax  *gocql.RequestErrSyntax
		invalid *gocql.RequestErrInvalid
		unauth  *gocql.RequestErrUnauthorized
		creds   *gocql.RequestErrCredentials
		config  *gocql.RequestErrConfig
		exists  *gocql.RequestErrAlreadyExists
		fn      *gocql.RequestErrFunctionFailure
		marshal gocql.MarshalError
		unmarsh gocql.UnmarshalError
	)
	switch {
	case errors.As(err, &syntax), errors.As(err, &invalid), errors.As(err, &unauth),
		errors.As(err, &creds), errors.As(err, &config), errors.As(err, &exists),
		errors.As(err, &fn), errors.As(err, &marshal), errors.As(err, &unmarsh),
		errors.Is(err, gocql.ErrKeyspaceDoesNotExist),
		errors.Is(err, gocql.ErrNoKeyspace), errors.Is(err, gocql.ErrTooManyStmts),
		errors.Is(err, gocql.ErrUnsupported), errors.Is(err, ErrInvalid), errors.Is(err, ErrSchema):
		return true
	}
	var re gocql.RequestError
	if errors.As(err, &re) {
		switch re.Code() {
		case gocql.ErrCodeSyntax, gocql.ErrCodeInvalid, gocql.ErrCodeUnauthorized,
			gocql.ErrCodeCredentials, gocql.ErrCodeConfig, gocql.ErrCodeAlreadyExists,
			gocql.ErrCodeProtocol, gocql.ErrCodeFunctionFailure:
			return true
		}
	}
	return false
}

// retryPolicy retries idempotent statements (gocql never hands a
// non-idempotent one to a retry policy) on errors a retry may cure, on the
// next host, with jittered exponential backoff that ends early when the
// statement's context does.
type retryPolicy struct {
	retries  int
	min, max time.Duration
}

func (p *retryPolicy) Attempt(q gocql.RetryableQuery) bool {
	n := q.Attempts()
	if n > p.retries {
		return false
	}
	d := min(p.min<<min(n-1, 20), p.max)
	d = d/2 + rand.N(d/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-q.Context().Done():
		return false
	}
}

func (p *retryPolicy) GetRetryType(err error) gocql.RetryType {
	if permanent(err) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return gocql.Rethrow
	}
	return gocql.RetryNextHost
}

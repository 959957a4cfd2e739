// Package bus carries c2s messages (client -> app-server) to Kafka topics.
// Producer is the only thing logic sees; the franz-go implementation talks
// to a real Kafka cluster or to the embedded broker (Broker) that `imd all`
// starts by default, so an app-server consumes with any Kafka client either
// way.
package bus

import (
	"context"
	"errors"
)

// Header is a Kafka record header.
type Header struct {
	Key   string
	Value []byte
}

// Record is one message to produce.
type Record struct {
	Topic   string
	Key     []byte // the uid: each user's messages stay in one partition, in order
	Value   []byte
	Headers []Header
}

// Ack is where the broker stored a record.
type Ack struct {
	Partition int32
	Offset    int64
}

// ErrUnavailable wraps failures a retry may cure: the broker is down, slow
// (the produce timed out) or the producer's buffer is full.
var ErrUnavailable = errors.New("bus: unavailable")

// ErrTooLarge is returned for a record over the broker's size limit.
var ErrTooLarge = errors.New("bus: record too large")

// ErrClosed is returned by Produce after Close.
var ErrClosed = errors.New("bus: producer closed")

// ErrUnknownTopic is returned for a record whose topic does not exist on the
// broker (and the producer did not ask for it to be created). Retrying does
// not help until someone creates the topic: it is a configuration error.
var ErrUnknownTopic = errors.New("bus: unknown topic")

// Producer sends records to the bus. Produce returns only once the broker
// acknowledged the record (acks=all, idempotent producer), so a nil error
// means "stored in Kafka". Concurrent calls are batched (linger) into few
// produce requests: never one round trip per record.
type Producer interface {
	Produce(ctx context.Context, r *Record) (Ack, error)
	// Close flushes what is buffered (bounded by ctx) and releases the
	// producer.
	Close(ctx context.Context) error
}

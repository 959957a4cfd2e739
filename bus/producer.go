package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// ProducerConfig configures a KafkaProducer. Zero values get the defaults
// named on each field.
type ProducerConfig struct {
	// Brokers are the seed brokers, "host:port". Required.
	Brokers []string
	// ClientID names the producer in the broker's logs and quotas.
	// Default "imd".
	ClientID string
	// Linger is how long a partition waits for more records before its
	// batch is sent: concurrent Produce calls within it share one produce
	// request. Default 5ms; negative means no linger.
	Linger time.Duration
	// BatchMaxBytes bounds one record batch (before compression). A record
	// that does not fit alone fails at once with ErrTooLarge. Keep it at or
	// below the broker's message.max.bytes (Kafka's default is 1048588).
	// Default 1000012 (kgo's and Kafka's producer default).
	BatchMaxBytes int32
	// MaxBufferedRecords bounds the records waiting for an acknowledgment.
	// When it is reached (the broker is down or slower than the load),
	// Produce fails at once with ErrUnavailable instead of blocking.
	// Default 50000.
	MaxBufferedRecords int
	// MaxBufferedBytes bounds the bytes of buffered records likewise.
	// Default 128 MiB.
	MaxBufferedBytes int
	// DeliveryTimeout bounds one Produce call: it returns ErrUnavailable
	// when the record is not acknowledged within DeliveryTimeout+1s (or
	// sooner, when its ctx ends). kgo also fails records that waited this
	// long (its RecordDeliveryTimeout, Kafka's delivery.timeout.ms) where
	// it safely can: not while a request holding them is unanswered, which
	// is why Produce keeps its own bound. Default 10s.
	DeliveryTimeout time.Duration
	// RequestTimeout is how long the broker may take to answer a produce
	// request (kgo's ProduceRequestTimeout, Kafka's request.timeout.ms).
	// The client drops a connection that stays silent RequestTimeout+5s
	// after a request. At most DeliveryTimeout-Linger. Default 5s.
	RequestTimeout time.Duration
	// DialTimeout bounds connecting to a broker. Default 5s.
	DialTimeout time.Duration
	// AutoCreateTopics asks the broker to create unknown topics (with its
	// default partition count). Off, a record for an unknown topic fails
	// with ErrUnknownTopic after a few metadata lookups (about a second).
	// The embedded Broker creates them when asked; a real Kafka cluster
	// also needs auto.create.topics.enable=true.
	AutoCreateTopics bool
	// Compression is the batch codec: "none", "gzip", "snappy", "lz4" or
	// "zstd". Default "none": c2s records are small and the broker is
	// usually near, so compression costs CPU for little gain.
	Compression string

	// Logger receives the client's warnings and errors (and more if its
	// handler is enabled for lower levels). Nil: no logs.
	Logger *slog.Logger
	// Registry registers the producer's metrics. Nil: not registered.
	Registry prometheus.Registerer
}

// requestTimeoutOverhead is added to RequestTimeout for the connection's
// read deadline, and bounds every other request (metadata, producer id).
const requestTimeoutOverhead = 5 * time.Second

func (c *ProducerConfig) setDefaults() error {
	if len(c.Brokers) == 0 {
		return errors.New("bus: producer: no brokers configured")
	}
	if c.ClientID == "" {
		c.ClientID = "imd"
	}
	switch {
	case c.Linger == 0:
		c.Linger = 5 * time.Millisecond
	case c.Linger < 0:
		c.Linger = 0
	}
	if c.BatchMaxBytes == 0 {
		c.BatchMaxBytes = 1000012
	}
	if c.MaxBufferedRecords == 0 {
		c.MaxBufferedRecords = 50000
	}
	if c.MaxBufferedBytes == 0 {
		c.MaxBufferedBytes = 128 << 20
	}
	if c.DeliveryTimeout == 0 {
		c.DeliveryTimeout = 10 * time.Second
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = min(5*time.Second, c.DeliveryTimeout-c.Linger)
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.Compression == "" {
		c.Compression = "none"
	}
	switch {
	case c.BatchMaxBytes < 512:
		return fmt.Errorf("bus: producer: BatchMaxBytes %d is below 512", c.BatchMaxBytes)
	case c.MaxBufferedRecords < 0 || c.MaxBufferedBytes < 0:
		return errors.New("bus: producer: negative buffer limit")
	case c.DeliveryTimeout < 0 || c.RequestTimeout < 0 || c.DialTimeout < 0:
		return errors.New("bus: producer: negative timeout")
	case c.DeliveryTimeout < c.Linger+c.RequestTimeout || c.RequestTimeout <= 0:
		return fmt.Errorf("bus: producer: DeliveryTimeout %v is below Linger %v + RequestTimeout %v", c.DeliveryTimeout, c.Linger, c.RequestTimeout)
	}
	return nil
}

func compressionCodec(name string) (kgo.CompressionCodec, error) {
	switch strings.ToLower(name) {
	case "none":
		return kgo.NoCompression(), nil
	case "gzip":
		return kgo.GzipCompression(), nil
	case "snappy":
		return kgo.SnappyCompression(), nil
	case "lz4":
		return kgo.Lz4Compression(), nil
	case "zstd":
		return kgo.ZstdCompression(), nil
	}
	return kgo.CompressionCodec{}, fmt.Errorf("bus: producer: unknown compression %q", name)
}

// KafkaProducer is the Producer on franz-go. It is an idempotent producer
// with acks=all, so a record is acknowledged once every in-sync replica
// has it and a retried request never stores it twice within one producer
// session. Records are partitioned by a murmur2 hash of Key, the same
// mapping as Java's default partitioner, so one key (one uid) stays in
// one partition and in order. All methods are safe for concurrent use.
type KafkaProducer struct {
	cfg ProducerConfig
	cl  *kgo.Client
	m   *producerMetrics
	// maxWait bounds one Produce call when its ctx allows longer. kgo
	// fails a record after DeliveryTimeout only where that is safe: an
	// idempotent producer keeps the records of a request that went
	// unanswered (the broker died) until a broker answers, as failing them
	// could leave a gap in the partition's sequence numbers.
	maxWait time.Duration

	// mu orders Produce's hand-off to kgo against Close: once Close holds
	// it, no new record enters the client, so Flush sees every record.
	mu     sync.RWMutex
	closed bool
}

var _ Producer = (*KafkaProducer)(nil)

// NewKafkaProducer returns a producer for cfg.Brokers. It does not connect:
// the first Produce (or Ping) does, so imd can start before Kafka is up.
func NewKafkaProducer(cfg ProducerConfig) (*KafkaProducer, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	codec, err := compressionCodec(cfg.Compression)
	if err != nil {
		return nil, err
	}
	m, err := newProducerMetrics(cfg.Registry)
	if err != nil {
		return nil, err
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ClientID(cfg.ClientID),
		kgo.RequiredAcks(kgo.AllISRAcks()), // also the default; idempotence requires it
		kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)),
		kgo.ProducerLinger(cfg.Linger),
		kgo.ProducerBatchMaxBytes(cfg.BatchMaxBytes),
		kgo.ProducerBatchCompression(codec),
		kgo.MaxBufferedRecords(cfg.MaxBufferedRecords),
		kgo.MaxBufferedBytes(cfg.MaxBufferedBytes),
		kgo.RecordDeliveryTimeout(cfg.DeliveryTimeout),
		kgo.ProduceRequestTimeout(cfg.RequestTimeout),
		kgo.RequestTimeoutOverhead(requestTimeoutOverhead),
		kgo.DialTimeout(cfg.DialTimeout),
	}
	if cfg.AutoCreateTopics {
		opts = append(opts, kgo.AllowAutoTopicCreation())
	}
	if cfg.Logger != nil {
		opts = append(opts, kgo.WithLogger(kgoLogger{cfg.Logger}))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("bus: producer: %w", err)
	}
	return &KafkaProducer{
		cfg:     cfg,
		cl:      cl,
		m:       m,
		maxWait: cfg.DeliveryTimeout + time.Second,
	}, nil
}

type produceResult struct {
	ack Ack
	err error
}

// Produce sends r and waits for the broker's acknowledgment. A nil error
// means the record is stored (acks=all). An error means it is not known to
// be stored: ErrTooLarge, ErrUnknownTopic and ErrClosed are final; an
// error wrapping ErrUnavailable may be retried, but the record may have
// been stored anyway (the ack was lost, or ctx ended while the record was
// in flight), so a retry can store it twice.
//
// Produce returns when ctx ends, and in any case within DeliveryTimeout+1s.
// A record it gave up on may still be stored later, once the broker
// answers. Produce copies r's bytes, so the caller may reuse them as soon
// as it returns.
func (p *KafkaProducer) Produce(ctx context.Context, r *Record) (Ack, error) {
	if r == nil || r.Topic == "" {
		return Ack{}, errors.New("bus: produce: record without a topic")
	}
	if err := ctx.Err(); err != nil {
		p.m.fail(kindUnavailable)
		return Ack{}, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	start := time.Now()
	kr := toKgoRecord(r)
	done := make(chan produceResult, 1)
	p.mu.RLock()
	if p.closed {
		p.mu.RUnlock()
		p.m.fail(kindClosed)
		return Ack{}, ErrClosed
	}
	// The record gets its own background context: kgo cancels a whole
	// batch when its first record's context ends, so one impatient caller
	// must not fail the records of others. The caller's ctx only bounds
	// the wait below. TryProduce fails at once when the buffer is full.
	p.cl.TryProduce(context.Background(), kr, func(kr *kgo.Record, err error) {
		done <- produceResult{Ack{Partition: kr.Partition, Offset: kr.Offset}, err}
	})
	p.mu.RUnlock()

	var timeout <-chan time.Time
	if d, ok := ctx.Deadline(); !ok || time.Until(d) > p.maxWait {
		t := time.NewTimer(p.maxWait)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case res := <-done:
		if res.err != nil {
			err := p.classify(r.Topic, res.err)
			return Ack{}, err
		}
		p.m.ok(time.Since(start))
		return res.ack, nil
	case <-ctx.Done():
		p.m.fail(kindUnavailable)
		return Ack{}, fmt.Errorf("%w: no acknowledgment yet for %s: %w", ErrUnavailable, r.Topic, ctx.Err())
	case <-timeout:
		p.m.fail(kindUnavailable)
		return Ack{}, fmt.Errorf("%w: no acknowledgment for %s within %v", ErrUnavailable, r.Topic, p.maxWait)
	}
}

// toKgoRecord copies r into a kgo record. Key, value and header values
// share one allocation.
func toKgoRecord(r *Record) *kgo.Record {
	n := len(r.Key) + len(r.Value)
	for _, h := range r.Headers {
		n += len(h.Value)
	}
	buf := make([]byte, 0, n)
	take := func(b []byte) []byte {
		if b == nil {
			return nil
		}
		i := len(buf)
		buf = append(buf, b...)
		return buf[i:len(buf):len(buf)]
	}
	kr := &kgo.Record{Topic: r.Topic, Key: take(r.Key), Value: take(r.Value)}
	if len(r.Headers) > 0 {
		kr.Headers = make([]kgo.RecordHeader, len(r.Headers))
		for i, h := range r.Headers {
			kr.Headers[i] = kgo.RecordHeader{Key: h.Key, Value: take(h.Value)}
		}
	}
	return kr
}

// Error kinds, the label values of imd_bus_produce_errors_total.
const (
	kindUnavailable  = "unavailable"
	kindTooLarge     = "too_large"
	kindUnknownTopic = "unknown_topic"
	kindClosed       = "closed"
	kindOther        = "other"
)

// classify maps a kgo or broker error onto the package's sentinels.
// Anything that is not known to be permanent counts as unavailable: kgo's
// own timeouts, retry limits, full buffers, connection and producer-id
// failures and the broker's retriable errors.
func (p *KafkaProducer) classify(topic string, err error) error {
	var ke *kerr.Error
	switch {
	case errors.Is(err, kerr.MessageTooLarge), errors.Is(err, kerr.RecordListTooLarge):
		p.m.fail(kindTooLarge)
		return fmt.Errorf("%w: %s: %w", ErrTooLarge, topic, err)
	case errors.Is(err, kerr.UnknownTopicOrPartition), errors.Is(err, kerr.UnknownTopicID):
		p.m.fail(kindUnknownTopic)
		return fmt.Errorf("%w: %s: %w", ErrUnknownTopic, topic, err)
	case errors.Is(err, kgo.ErrClientClosed):
		p.m.fail(kindClosed)
		return ErrClosed
	case errors.As(err, &ke) && !ke.Retriable:
		p.m.fail(kindOther)
		return fmt.Errorf("bus: produce to %s: %w", topic, err)
	}
	p.m.fail(kindUnavailable)
	return fmt.Errorf("%w: %s: %w", ErrUnavailable, topic, err)
}

// Ping checks that a broker answers; the error wraps ErrUnavailable.
func (p *KafkaProducer) Ping(ctx context.Context) error {
	if err := p.cl.Ping(ctx); err != nil {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return nil
}

// Close stops new records (Produce returns ErrClosed), waits until every
// buffered record is acknowledged or failed, and closes the client. The
// wait is bounded by ctx and by DeliveryTimeout+1s (as kgo never fails the
// records of an unanswered request, a flush could otherwise last as long
// as the broker is unreachable); records still buffered then fail with
// ErrClosed. Close is idempotent.
func (p *KafkaProducer) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, p.maxWait)
	defer cancel()
	err := p.cl.Flush(ctx)
	p.cl.Close()
	if err != nil {
		return fmt.Errorf("bus: close: flush: %w", err)
	}
	return nil
}

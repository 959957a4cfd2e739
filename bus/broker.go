package bus

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// BrokerConfig configures the embedded broker. Zero values get the
// defaults named on each field.
type BrokerConfig struct {
	// Addr is where the broker listens, and the address it tells clients
	// to use, so it must be one they can dial. Port 0 picks a free port
	// (see Broker.Addrs). Default "127.0.0.1:9092".
	Addr string
	// DataDir holds the broker's log segments and state. Empty keeps
	// everything in memory and loses it on Close: for tests only.
	DataDir string
	// NoSync skips the fsync of each appended batch. By default a produce
	// is acknowledged only after its batch is fsynced, so an acknowledged
	// record survives a crash of the process or of the machine.
	NoSync bool
	// Partitions is the partition count of the topics the broker creates.
	// Default 1: the broker fsyncs each partition's batch on its own, one
	// after another, so throughput falls as partitions grow
	// (BenchmarkProduce on 2 cores: 1 partition gave 1.4-1.7x the records/s
	// of 4 and a third of the p99). Raise it when an app-server needs more
	// consumers of one topic than one.
	Partitions int
	// Topics are created at start if they do not exist yet.
	Topics []string
	// NoAutoCreate stops the broker from creating a topic that a client's
	// metadata request asks it to create (a kgo client with
	// AllowAutoTopicCreation, a Java consumer by default). By default it
	// creates it, with Partitions partitions.
	NoAutoCreate bool
	// MaxMessageBytes is the largest record batch the broker accepts
	// (message.max.bytes). Default 1048588, Kafka's default.
	MaxMessageBytes int
	// Retention is how long the topics the broker creates keep records
	// (their retention.ms); the broker drops expired batches every
	// Retention/10, at most hourly. The broker holds about 90 bytes of
	// memory per stored batch (its index; the records stay on disk), so
	// retention bounds its memory as well as its disk. Default 24h
	// (Kafka's is 7 days); negative keeps records forever.
	Retention time.Duration
	// ClusterID is reported to clients; a DataDir keeps the ID it was
	// first created with. Default "imd".
	ClusterID string
	// Logger receives the broker's warnings and errors. Nil: no logs.
	Logger *slog.Logger
}

func (c *BrokerConfig) setDefaults() error {
	if c.Addr == "" {
		c.Addr = "127.0.0.1:9092"
	}
	if c.Partitions == 0 {
		c.Partitions = 1
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = 1048588
	}
	if c.Retention == 0 {
		c.Retention = 24 * time.Hour
	}
	if c.ClusterID == "" {
		c.ClusterID = "imd"
	}
	switch {
	case c.Partitions < 1:
		return fmt.Errorf("bus: broker: Partitions %d is below 1", c.Partitions)
	case c.MaxMessageBytes < 1024:
		return fmt.Errorf("bus: broker: MaxMessageBytes %d is below 1024", c.MaxMessageBytes)
	}
	for _, t := range c.Topics {
		if err := validTopic(t); err != nil {
			return fmt.Errorf("bus: broker: %w", err)
		}
	}
	return nil
}

// validTopic applies Kafka's rules for topic names, which kfake does not
// check: 1 to 249 of [a-zA-Z0-9._-], and not "." or "..". The names become
// directory names under DataDir.
func validTopic(t string) error {
	if t == "" || t == "." || t == ".." || len(t) > 249 {
		return fmt.Errorf("invalid topic name %q", t)
	}
	for i := 0; i < len(t); i++ {
		switch c := t[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("invalid topic name %q", t)
		}
	}
	return nil
}

// Broker is the embedded, single-node Kafka-protocol broker (franz-go's
// kfake) that `imd all` runs instead of a Kafka cluster. Any Kafka client
// can produce to and consume from it, consumer groups included. All
// methods are safe for concurrent use.
//
// Durability with a DataDir (checked by TestRestart and TestCrash):
//
//   - Close, then a start on the same DataDir: topics, every record,
//     committed group offsets, producer ids and their sequence windows
//     survive, so an idempotent producer carries on without duplicates.
//   - A crash (SIGKILL, no Close): every acknowledged record survives, as
//     each batch is fsynced before its ack (unless NoSync), and so do
//     topics and committed offsets (group commits are fsynced as well).
//     The producers' sequence windows do not (kfake writes them only on
//     Close), so a batch that was in flight at the crash can be stored
//     twice when the producer retries it: at least once, not exactly once.
//   - kfake's own topic auto-creation writes the topic list only on Close:
//     after a crash such a topic and all its records would be gone. The
//     broker therefore turns it off and creates requested topics itself
//     through kfake's CreateTopic, which writes the list at once (see
//     onMetadata).
//   - Power loss: kfake never fsyncs a directory, so a file it has just
//     created (a new partition's first segment, a segment after a roll at
//     100 MiB, a rewritten topics.json) may be missing after power loss
//     even with fsynced contents; and it ignores errors from fsync.
type Broker struct {
	cfg     BrokerConfig
	c       *kfake.Cluster
	unlock  func()
	closing atomic.Bool
	// metaCalls counts metadata requests, to renew the observer now and
	// then: kfake keeps one entry per connection in each control function.
	metaCalls atomic.Uint64
	closeOnce sync.Once
	stop      chan struct{}
	wg        sync.WaitGroup
}

// StartBroker starts the broker and returns once it accepts connections.
// With a DataDir, it loads what an earlier run stored there; only one
// broker at a time may use a DataDir.
func StartBroker(cfg BrokerConfig) (*Broker, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	b := &Broker{cfg: cfg, unlock: func() {}, stop: make(chan struct{})}
	opts := []kfake.Opt{
		kfake.NumBrokers(1),
		kfake.ListenFn(func(network, _ string) (net.Listener, error) {
			return net.Listen(network, cfg.Addr)
		}),
		kfake.ClusterID(cfg.ClusterID),
		kfake.DefaultNumPartitions(cfg.Partitions),
		kfake.BrokerConfigs(map[string]string{
			"message.max.bytes": strconv.Itoa(cfg.MaxMessageBytes),
		}),
	}
	if cfg.Logger != nil {
		opts = append(opts, kfake.WithLogger(kfakeLogger{cfg.Logger}))
	}
	if cfg.DataDir != "" {
		if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
			return nil, fmt.Errorf("bus: broker: %w", err)
		}
		unlock, err := lockDir(cfg.DataDir)
		if err != nil {
			return nil, fmt.Errorf("bus: broker: %w", err)
		}
		b.unlock = unlock
		opts = append(opts, kfake.DataDir(cfg.DataDir))
		if !cfg.NoSync {
			opts = append(opts, kfake.SyncWrites())
		}
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		b.unlock()
		return nil, fmt.Errorf("bus: broker: %w", err)
	}
	b.c = c
	for _, t := range cfg.Topics {
		if err := b.createTopic(t); err != nil {
			b.Close()
			return nil, fmt.Errorf("bus: broker: create topic %s: %w", t, err)
		}
	}
	if !cfg.NoAutoCreate {
		c.ControlKey(int16(kmsg.Metadata), b.onMetadata)
	}
	if cfg.Retention > 0 {
		b.wg.Go(b.retain)
	}
	return b, nil
}

// retain applies retention now and then. kfake runs its own hourly pass
// only once a topic was created or reconfigured since it started, so
// after a restart it would never drop anything.
func (b *Broker) retain() {
	t := time.NewTicker(min(max(b.cfg.Retention/10, time.Second), time.Hour))
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
			b.c.ApplyRetention()
		}
	}
}

// Addrs returns the addresses the broker listens on (one).
func (b *Broker) Addrs() []string { return b.c.ListenAddrs() }

// createTopic creates t unless it exists. kfake's CreateTopic writes the
// topic list to DataDir before it returns, so the topic is durable before
// any record can be produced to it.
func (b *Broker) createTopic(t string) error {
	cfg := map[string]string{"retention.ms": "-1"}
	if b.cfg.Retention > 0 {
		cfg["retention.ms"] = strconv.FormatInt(b.cfg.Retention.Milliseconds(), 10)
	}
	err := b.c.CreateTopic(t, int32(b.cfg.Partitions), cfg)
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return err
	}
	return nil
}

// onMetadata observes metadata requests: for each topic a client asks the
// broker to create, it creates the topic durably (createTopic) and then
// lets kfake answer as usual, so the client sees the new topic in this
// very response. It runs on kfake's request loop, which keeps serving
// admin calls such as CreateTopic while a control function runs.
func (b *Broker) onMetadata(kreq kmsg.Request) (kmsg.Response, error, bool) {
	if req, ok := kreq.(*kmsg.MetadataRequest); ok && req.AllowAutoTopicCreation && !b.closing.Load() {
		for _, rt := range req.Topics {
			if rt.Topic == nil || validTopic(*rt.Topic) != nil {
				continue
			}
			if err := b.createTopic(*rt.Topic); err != nil && b.cfg.Logger != nil {
				b.cfg.Logger.Warn("bus: broker: auto-create topic", "topic", *rt.Topic, "err", err)
			}
		}
	}
	// kfake remembers the last request of every connection per control
	// function and never forgets a connection; renewing the function
	// bounds that memory.
	if b.metaCalls.Add(1)%1024 == 0 && !b.closing.Load() {
		b.c.DropControl()
		b.c.ControlKey(int16(kmsg.Metadata), b.onMetadata)
	}
	return nil, nil, false
}

// Close stops the broker. With a DataDir it first writes its full state
// (partition snapshots, producer sequence windows, group state), so the
// next start is fast and idempotent producers carry on without
// duplicates. Close is idempotent.
func (b *Broker) Close() {
	b.closeOnce.Do(func() {
		b.closing.Store(true)
		close(b.stop)
		b.wg.Wait() // kfake's admin calls block forever once it is closed
		b.c.Close()
		b.unlock()
	})
}

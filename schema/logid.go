package schema

import "math/rand/v2"

// NewLogID returns a new trace id for the frame header's logid: 64 random
// bits (never 0), drawn without a lock. Ids are not coordinated between
// nodes; at a million new ids a second across a cluster, two of the same
// second collide with a probability of about 3e-8, which is what a trace
// id needs (W3C trace context makes the same choice). The gateway gives
// one to each request whose client sent 0, the HTTP API to each request
// without an X-Request-Id, and every tier passes it on: into the notifies
// and receipts a message causes, the stored message, Kafka record
// headers and every log line.
func NewLogID() uint64 {
	for {
		if id := rand.Uint64(); id != 0 {
			return id
		}
	}
}

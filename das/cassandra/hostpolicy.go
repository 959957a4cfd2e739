package cassandra

import gocql "github.com/apache/cassandra-gocql-driver/v2"

// localOnly keeps every request in the local DC: the token-aware,
// DC-aware policy underneath would move to another DC's nodes when the
// local ones are down, and then a LOCAL_SERIAL lightweight transaction
// (a group's append, a message's idempotency claim) would run its Paxos
// round among the other DC's replicas, which may not have received the
// local DC's last appends yet: two messages could take one seq. Without
// its own Cassandra nodes a DC answers "unavailable" (retryable) for
// what needs storage, and the other DCs are unaffected
// (docs/two-dc.md).
type localOnly struct {
	gocql.HostSelectionPolicy
	dc string
}

// Pick implements gocql.HostSelectionPolicy: the wrapped policy's hosts
// of the local DC only.
func (p localOnly) Pick(q gocql.ExecutableStatement) gocql.NextHost {
	next := p.HostSelectionPolicy.Pick(q)
	return func() gocql.SelectedHost {
		for {
			h := next()
			if h == nil || h.Info().DataCenter() == p.dc {
				return h
			}
		}
	}
}

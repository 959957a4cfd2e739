package cassandra

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strconv"
	"strings"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"

	"github.com/imd-dev/imd/schema/cql"
)

// ddlTimeout bounds each schema statement: a table creation waits for
// every node to agree, which takes seconds on a loaded cluster.
const ddlTimeout = 60 * time.Second

// Migrate creates or upgrades the schema: the keyspace cfg.Keyspace with
// NetworkTopologyStrategy and the given replicas per data center, and every
// migration of schema/cql that the keyspace's schema_migrations table does
// not list yet, in version order, each followed by a wait for schema
// agreement and a row recording its version and checksum.
//
// replication may be nil for a keyspace that exists: its replication is
// then left as it is. When it is given and differs from the keyspace's,
// the keyspace is altered, which moves data only after a repair (new
// replicas) or a rebuild (a new data center): Migrate logs that.
//
// Migrate is idempotent and safe to run from several processes at once:
// every statement is IF NOT EXISTS. It fails with ErrSchema when a recorded
// migration's checksum differs from this binary's (an edited migration).
func Migrate(ctx context.Context, cfg Config, replication map[string]int) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	log := cfg.Logger.With("component", "das/cassandra", "keyspace", cfg.Keyspace)
	ms, err := cql.Migrations()
	if err != nil {
		return err
	}
	cl := cfg.adminCluster("", log)
	cl.Timeout = max(cl.Timeout, ddlTimeout)
	sess, err := newSession(ctx, cl)
	if err != nil {
		return storeErr("migrate: connect", err)
	}
	defer sess.Close()

	current, exists, err := keyspaceReplication(ctx, sess, cfg.Keyspace)
	if err != nil {
		return err
	}
	switch {
	case !exists:
		stmt, err := cql.CreateKeyspace(cfg.Keyspace, replication)
		if err != nil {
			return fmt.Errorf("%w: migrate: keyspace %s does not exist: %w", ErrInvalid, cfg.Keyspace, err)
		}
		if err := ddl(ctx, sess, stmt); err != nil {
			return err
		}
		log.Info("keyspace created", "replication", replication)
	case len(replication) > 0 && !maps.Equal(current, replication):
		stmt, err := cql.AlterKeyspace(cfg.Keyspace, replication)
		if err != nil {
			return fmt.Errorf("%w: migrate: %w", ErrInvalid, err)
		}
		if err := ddl(ctx, sess, stmt); err != nil {
			return err
		}
		log.Warn("keyspace replication changed: run nodetool repair (more replicas) or nodetool rebuild (a new data center) to move the data",
			"from", current, "to", replication)
	}

	// The tables are created unqualified, in a session bound to the keyspace.
	kcl := cfg.adminCluster(cfg.Keyspace, log)
	kcl.Timeout = max(kcl.Timeout, ddlTimeout)
	ks, err := newSession(ctx, kcl)
	if err != nil {
		return storeErr("migrate: connect to keyspace", err)
	}
	defer ks.Close()
	if err := ddl(ctx, ks, cql.MigrationsTable); err != nil {
		return err
	}
	applied, err := appliedVersions(ctx, ks)
	if err != nil {
		return err
	}
	for _, m := range ms {
		if sum, ok := applied[m.Version]; ok {
			if sum != m.Checksum {
				return fmt.Errorf("%w: migration %03d_%s was applied with checksum %s, this binary has %s",
					ErrSchema, m.Version, m.Name, sum, m.Checksum)
			}
			continue
		}
		for _, stmt := range m.Statements {
			if err := ddl(ctx, ks, stmt); err != nil {
				return fmt.Errorf("migration %03d_%s: %w", m.Version, m.Name, err)
			}
		}
		err := ks.Query(`INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)`,
			m.Version, m.Name, m.Checksum, time.Now()).Idempotent(true).ExecContext(ctx)
		if err != nil {
			return storeErr(fmt.Sprintf("migrate: record %03d_%s", m.Version, m.Name), err)
		}
		log.Info("migration applied", "version", m.Version, "name", m.Name)
	}
	return nil
}

// adminCluster is the driver configuration of the short sessions that
// change or read the schema (Migrate, LocalDC, TruncateAll): one
// connection per node, no schema metadata cache (they need no token-aware
// routing, and the cache's refresh waits 10s for every node listed in
// system.peers to agree, nodes that are down included: gocql issue 1736),
// and after each schema statement a short wait of gocql's own (which
// counts the nodes that are down too) before awaitSchema waits for those
// that are up.
func (c *Config) adminCluster(ks string, log *slog.Logger) *gocql.ClusterConfig {
	cl := c.cluster(ks, log)
	cl.NumConns = 1
	cl.Metadata.CacheMode = gocql.Disabled
	cl.MaxWaitSchemaAgreement = 500 * time.Millisecond
	return cl
}

// ddl runs one schema statement and waits until every node has its result.
func ddl(ctx context.Context, s *gocql.Session, stmt string) error {
	if err := s.Query(stmt).Idempotent(true).ExecContext(ctx); err != nil {
		var exists *gocql.RequestErrAlreadyExists
		if !errors.As(err, &exists) {
			return storeErr("migrate: "+firstLine(stmt), err)
		}
	}
	if err := awaitSchema(ctx, s); err != nil {
		return storeErr("migrate: schema agreement after "+firstLine(stmt), err)
	}
	return nil
}

// awaitSchema waits until every node that the session sees up has the same
// schema version, asking each node for its own. gocql's AwaitSchemaAgreement
// counts the nodes that are down too (their last version stays in
// system.peers): with one data center's node down, every statement would
// wait for ddlTimeout and fail. A node that is down takes the new schema
// from the others when it comes back.
func awaitSchema(ctx context.Context, s *gocql.Session) error {
	deadline := time.Now().Add(ddlTimeout)
	for {
		versions := map[string]bool{}
		var err error
		for _, h := range s.GetHosts() {
			if !h.IsUp() {
				continue
			}
			var v gocql.UUID
			if err = s.Query(`SELECT schema_version FROM system.local`).SetHostID(h.HostID()).
				Idempotent(true).ScanContext(ctx, &v); err != nil {
				err = fmt.Errorf("schema version of %s: %w", h.ConnectAddressAndPort(), err)
				break
			}
			versions[v.String()] = true
		}
		if err == nil && len(versions) <= 1 {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("the nodes that are up have %d schema versions", len(versions))
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return strings.TrimSpace(s)
}

// keyspaceReplication reads the replication of keyspace ks: data center
// -> replicas for NetworkTopologyStrategy, "replication_factor" for
// SimpleStrategy.
func keyspaceReplication(ctx context.Context, s *gocql.Session, ks string) (map[string]int, bool, error) {
	var r map[string]string
	err := s.Query(`SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?`, ks).
		Idempotent(true).ScanContext(ctx, &r)
	if errors.Is(err, gocql.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, storeErr("migrate: read keyspace", err)
	}
	out := map[string]int{}
	for k, v := range r {
		if k == "class" {
			continue
		}
		n, err := strconv.Atoi(v)
		if err != nil {
			continue // e.g. transient replication "3/1": never equal to ours
		}
		out[k] = n
	}
	return out, true, nil
}

// appliedVersions reads schema_migrations: version -> checksum.
func appliedVersions(ctx context.Context, s *gocql.Session) (map[int]string, error) {
	it := s.Query(`SELECT version, checksum FROM schema_migrations`).Idempotent(true).IterContext(ctx)
	out := map[int]string{}
	var (
		v   int
		sum string
	)
	for it.Scan(&v, &sum) {
		out[v] = sum
	}
	if err := it.Close(); err != nil {
		var invalid *gocql.RequestErrInvalid
		if errors.As(err, &invalid) {
			return nil, fmt.Errorf("%w: %w", ErrSchema, err) // no schema_migrations table
		}
		return nil, storeErr("read schema_migrations", err)
	}
	return out, nil
}

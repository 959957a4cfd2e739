package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/imd-dev/imd/das/cassandra"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/platform"
	"github.com/imd-dev/imd/schema/cql"
)

func runMigrate(args []string, stdout, stderr io.Writer) error {
	cfg := config.Default()
	fs := newFlagSet("migrate", "Create or upgrade the Cassandra schema (schema/cql): the keyspace with\n"+
		"NetworkTopologyStrategy and every pending migration, idempotently. Run it\n"+
		"before `imd all --store cassandra` and after every upgrade of imd.", stdout, stderr)
	path := cfg.Flags(fs)
	cfg.CassandraFlags(fs)
	fs.StringVar(&cfg.Store.Cassandra.Replication, "replication", cfg.Store.Cassandra.Replication,
		"replicas per data center for a new keyspace, e.g. dc1:3,dc2:3 (required when the keyspace does not exist; changes an existing one)")
	timeout := fs.Duration("timeout", 5*time.Minute, "how long the migration may take")
	if err := loadConfig(fs, &cfg, path, args); err != nil {
		return err
	}
	log, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	var repl map[string]int
	if cfg.Store.Cassandra.Replication != "" {
		if repl, err = cql.ParseReplication(cfg.Store.Cassandra.Replication); err != nil {
			return fmt.Errorf("--replication: %w", err)
		}
	}
	cc := platform.CassandraConfig(cfg, log)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	began := time.Now()
	if err := cassandra.Migrate(ctx, cc, repl); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	fmt.Fprintf(stdout, "schema version %d in place (%s)\n", cql.Latest(), time.Since(began).Round(time.Millisecond))
	return nil
}

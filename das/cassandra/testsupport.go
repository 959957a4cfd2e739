package cassandra

import (
	"context"
	"errors"
	"fmt"

	gocql "github.com/apache/cassandra-gocql-driver/v2"

	"github.com/imd-dev/imd/schema/cql"
)

// This file serves test suites outside this package that run the platform
// on a real Cassandra: they migrate a keyspace of their own, empty it
// between tests and drop it at the end. Never point these at a keyspace
// that holds data you want.

// LocalDC returns the data center of the first contact point that answers.
func LocalDC(ctx context.Context, cfg Config) (string, error) {
	if err := cfg.setDefaults(); err != nil {
		return "", err
	}
	return localDC(ctx, cfg, cfg.Logger)
}

// TruncateAll empties every table of cfg.Keyspace except the record of
// applied migrations. Cassandra truncates only with every node of the
// cluster up, other data centers' too, whatever the keyspace's
// replication: with one down it fails, saying so.
func TruncateAll(ctx context.Context, cfg Config) error {
	return withSession(ctx, cfg, func(ctx context.Context, run func(string) error, names func() ([]string, error)) error {
		tables, err := names()
		if err != nil {
			return err
		}
		for _, t := range tables {
			if t == "schema_migrations" {
				continue
			}
			if err := run("TRUNCATE " + cfg.Keyspace + "." + t); err != nil {
				return err
			}
		}
		return nil
	})
}

// DropKeyspace drops cfg.Keyspace.
func DropKeyspace(ctx context.Context, cfg Config) error {
	return withSession(ctx, cfg, func(ctx context.Context, run func(string) error, _ func() ([]string, error)) error {
		return run("DROP KEYSPACE IF EXISTS " + cfg.Keyspace)
	})
}

func withSession(ctx context.Context, cfg Config, fn func(ctx context.Context, run func(string) error, names func() ([]string, error)) error) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	if !cql.ValidName(cfg.Keyspace) {
		return fmt.Errorf("%w: keyspace name %q", ErrInvalid, cfg.Keyspace)
	}
	cl := cfg.adminCluster("", cfg.Logger)
	cl.Timeout = ddlTimeout
	s, err := newSession(ctx, cl)
	if err != nil {
		return storeErr("connect", err)
	}
	defer s.Close()
	run := func(stmt string) error {
		if err := s.Query(stmt).ExecContext(ctx); err != nil {
			var re gocql.RequestError
			if errors.As(err, &re) && re.Code() == gocql.ErrCodeTruncate {
				err = fmt.Errorf("%w (TRUNCATE needs every node of the cluster up, another data center's too)", err)
			}
			return fmt.Errorf("%s: %w", stmt, err)
		}
		return nil
	}
	names := func() ([]string, error) {
		it := s.Query(`SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?`, cfg.Keyspace).IterContext(ctx)
		var out []string
		var n string
		for it.Scan(&n) {
			out = append(out, n)
		}
		return out, it.Close()
	}
	return fn(ctx, run, names)
}

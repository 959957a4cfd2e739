// Package cql holds the Cassandra schema of imd as versioned migrations:
// files NNN_name.cql in this folder, embedded in the binary, applied in
// version order by das/cassandra.Migrate (`imd migrate`). README.md explains
// every table, key and compaction choice.
//
// A migration is never edited once released: its checksum is recorded with
// the version when it is applied, and Migrate refuses a keyspace whose
// recorded checksum differs. A change is a new file with the next number.
// Statements must be idempotent (CREATE ... IF NOT EXISTS, ALTER ... ADD IF
// NOT EXISTS), since two migrators may run at once and a migrator that dies
// halfway runs its migration again.
package cql

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

//go:embed *.cql
var files embed.FS

// Migration is one schema version.
type Migration struct {
	Version    int      // the NNN of the file name, from 1 up without gaps
	Name       string   // the file name without NNN_ and .cql
	Checksum   string   // hex SHA-256 of the file
	Statements []string // CQL statements without the trailing semicolon
}

// MigrationsTable is the CQL that creates the table recording applied
// versions, in the keyspace of the other tables.
const MigrationsTable = `CREATE TABLE IF NOT EXISTS schema_migrations (
    version    int PRIMARY KEY,
    name       text,
    checksum   text,
    applied_at timestamp
) WITH comment = 'applied schema/cql migrations'`

var fileName = regexp.MustCompile(`^([0-9]{3})_([a-z0-9_]+)\.cql$`)

// Migrations returns every migration in version order.
func Migrations() ([]Migration, error) {
	entries, err := fs.ReadDir(files, ".")
	if err != nil {
		return nil, err
	}
	var out []Migration
	for _, e := range entries {
		m := fileName.FindStringSubmatch(e.Name())
		if m == nil {
			return nil, fmt.Errorf("schema/cql: %s: not named NNN_name.cql", e.Name())
		}
		v, _ := strconv.Atoi(m[1])
		b, err := files.ReadFile(e.Name())
		if err != nil {
			return nil, err
		}
		stmts, err := Split(string(b))
		if err != nil {
			return nil, fmt.Errorf("schema/cql: %s: %w", e.Name(), err)
		}
		sum := sha256.Sum256(b)
		out = append(out, Migration{Version: v, Name: m[2], Checksum: hex.EncodeToString(sum[:]), Statements: stmts})
	}
	slices.SortFunc(out, func(a, b Migration) int { return a.Version - b.Version })
	for i, m := range out {
		if m.Version != i+1 {
			return nil, fmt.Errorf("schema/cql: migration %d missing (found %03d_%s)", i+1, m.Version, m.Name)
		}
	}
	return out, nil
}

// Latest is the highest migration version.
func Latest() int {
	ms, err := Migrations()
	if err != nil || len(ms) == 0 {
		return 0
	}
	return ms[len(ms)-1].Version
}

var identifier = regexp.MustCompile(`^[a-z][a-z0-9_]{0,47}$`)

// ValidName reports whether name is usable as a keyspace name unquoted:
// lower case letters, digits and _, starting with a letter, at most 48.
func ValidName(name string) bool { return identifier.MatchString(name) }

// CreateKeyspace returns the CQL that creates keyspace name, if it does not
// exist, with NetworkTopologyStrategy and the given replicas per data
// center (at least one data center, each with 1 or more replicas).
func CreateKeyspace(name string, replication map[string]int) (string, error) {
	r, err := ReplicationCQL(replication)
	if err != nil {
		return "", err
	}
	if !ValidName(name) {
		return "", fmt.Errorf("schema/cql: keyspace name %q: want [a-z][a-z0-9_]*, at most 48", name)
	}
	return fmt.Sprintf("CREATE KEYSPACE IF NOT EXISTS %s WITH replication = %s AND durable_writes = true", name, r), nil
}

// AlterKeyspace returns the CQL that sets the replication of keyspace name.
func AlterKeyspace(name string, replication map[string]int) (string, error) {
	r, err := ReplicationCQL(replication)
	if err != nil {
		return "", err
	}
	if !ValidName(name) {
		return "", fmt.Errorf("schema/cql: keyspace name %q: want [a-z][a-z0-9_]*, at most 48", name)
	}
	return fmt.Sprintf("ALTER KEYSPACE %s WITH replication = %s", name, r), nil
}

// ReplicationCQL renders a NetworkTopologyStrategy replication map, data
// centers in name order.
func ReplicationCQL(replication map[string]int) (string, error) {
	if len(replication) == 0 {
		return "", fmt.Errorf("schema/cql: replication: no data center (want e.g. dc1:3)")
	}
	var b strings.Builder
	b.WriteString("{'class': 'NetworkTopologyStrategy'")
	for _, dc := range slices.Sorted(maps.Keys(replication)) {
		n := replication[dc]
		if dc == "" || strings.ContainsAny(dc, "'\\\n") {
			return "", fmt.Errorf("schema/cql: replication: bad data center name %q", dc)
		}
		if n < 1 || n > 99 {
			return "", fmt.Errorf("schema/cql: replication: %d replicas in %s (want 1 to 99)", n, dc)
		}
		fmt.Fprintf(&b, ", '%s': '%d'", dc, n)
	}
	b.WriteString("}")
	return b.String(), nil
}

// ParseReplication parses "dc1:3,dc2:3" (the form of a command-line flag)
// into a replication map.
func ParseReplication(s string) (map[string]int, error) {
	out := map[string]int{}
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		dc, n, ok := strings.Cut(part, ":")
		if !ok {
			return nil, fmt.Errorf("replication %q: want dc:replicas[,dc:replicas...]", s)
		}
		dc = strings.TrimSpace(dc)
		r, err := strconv.Atoi(strings.TrimSpace(n))
		if err != nil || r < 1 || dc == "" {
			return nil, fmt.Errorf("replication %q: bad entry %q", s, part)
		}
		if _, dup := out[dc]; dup {
			return nil, fmt.Errorf("replication %q: data center %s twice", s, dc)
		}
		out[dc] = r
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("replication %q: no data center", s)
	}
	return out, nil
}

// Split splits a CQL script into statements at semicolons outside string
// literals, quoted identifiers and comments (--, // and /* */), and drops
// the comments and empty statements.
func Split(script string) ([]string, error) {
	var (
		out []string
		cur strings.Builder
	)
	flush := func() {
		if s := strings.TrimSpace(cur.String()); s != "" {
			out = append(out, s)
		}
		cur.Reset()
	}
	for i := 0; i < len(script); i++ {
		c := script[i]
		switch {
		case c == '-' && strings.HasPrefix(script[i:], "--"), c == '/' && strings.HasPrefix(script[i:], "//"):
			end := strings.IndexByte(script[i:], '\n')
			if end < 0 {
				i = len(script)
			} else {
				i += end - 1 // the newline itself is kept
			}
		case c == '/' && strings.HasPrefix(script[i:], "/*"):
			end := strings.Index(script[i+2:], "*/")
			if end < 0 {
				return nil, fmt.Errorf("unterminated /* comment")
			}
			i += 2 + end + 1
			cur.WriteByte(' ')
		case c == '\'' || c == '"':
			// A quote inside is doubled ('it''s'), which this loop reads
			// as two adjacent literals: the text is kept either way.
			end := strings.IndexByte(script[i+1:], c)
			if end < 0 {
				return nil, fmt.Errorf("unterminated %c literal", c)
			}
			cur.WriteString(script[i : i+1+end+1])
			i += end + 1
		case c == '$' && strings.HasPrefix(script[i:], "$$"):
			end := strings.Index(script[i+2:], "$$")
			if end < 0 {
				return nil, fmt.Errorf("unterminated $$ literal")
			}
			cur.WriteString(script[i : i+2+end+2])
			i += 2 + end + 1
		case c == ';':
			flush()
		default:
			cur.WriteByte(c)
		}
	}
	if strings.TrimSpace(cur.String()) != "" {
		return nil, fmt.Errorf("last statement has no terminating semicolon")
	}
	return out, nil
}

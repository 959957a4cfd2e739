package cql

import (
	"regexp"
	"slices"
	"strings"
	"testing"
)

func TestMigrations(t *testing.T) {
	ms, err := Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 || Latest() != ms[len(ms)-1].Version {
		t.Fatalf("%d migrations, Latest %d", len(ms), Latest())
	}
	created := map[string]bool{}
	createTable := regexp.MustCompile(`(?is)^CREATE TABLE IF NOT EXISTS ([a-z_]+) \(`)
	for _, m := range ms {
		if len(m.Statements) == 0 || len(m.Checksum) != 64 {
			t.Fatalf("migration %d: %d statements, checksum %q", m.Version, len(m.Statements), m.Checksum)
		}
		for _, s := range m.Statements {
			// Unqualified names only: the keyspace is the deployment's.
			if regexp.MustCompile(`(?i)\b(TABLE|INDEX|TYPE)( IF (NOT )?EXISTS)? [a-z_]+\.`).MatchString(s) {
				t.Errorf("migration %d: keyspace-qualified name in %q", m.Version, s)
			}
			up := strings.ToUpper(s)
			if strings.HasPrefix(up, "CREATE") && !strings.Contains(up, "IF NOT EXISTS") {
				t.Errorf("migration %d: CREATE without IF NOT EXISTS: %q", m.Version, s)
			}
			if strings.HasPrefix(up, "DROP") || strings.HasPrefix(up, "TRUNCATE") {
				t.Errorf("migration %d: destructive statement %q", m.Version, s)
			}
			if c := createTable.FindStringSubmatch(s); c != nil {
				created[c[1]] = true
			}
		}
	}
	// The tables das/cassandra uses and DESIGN.md names.
	for _, table := range []string{"inbox", "inbox_meta", "timeline", "timeline_buckets", "conversation",
		"idempotency", "group_messages", "group_buckets", "group_cursors"} {
		if !created[table] {
			t.Errorf("no migration creates table %s", table)
		}
	}
}

func TestSplit(t *testing.T) {
	script := `-- a comment; with a semicolon
CREATE TABLE a (x int PRIMARY KEY) WITH comment = 'it''s; fine'; // trailing
/* block; comment */ INSERT INTO "odd;name" (x) VALUES (1);
SELECT $$a;b$$ FROM t;

`
	got, err := Split(script)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"CREATE TABLE a (x int PRIMARY KEY) WITH comment = 'it''s; fine'",
		`INSERT INTO "odd;name" (x) VALUES (1)`,
		"SELECT $$a;b$$ FROM t",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Split:\n got %q\nwant %q", got, want)
	}
	for _, bad := range []string{"SELECT 'x", "SELECT 1", "/* x", "SELECT $$a"} {
		if _, err := Split(bad); err == nil {
			t.Errorf("Split(%q): no error", bad)
		}
	}
}

func TestKeyspace(t *testing.T) {
	got, err := CreateKeyspace("imd", map[string]int{"dc2": 3, "dc1": 3})
	if err != nil {
		t.Fatal(err)
	}
	want := "CREATE KEYSPACE IF NOT EXISTS imd WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': '3', 'dc2': '3'} AND durable_writes = true"
	if got != want {
		t.Fatalf("CreateKeyspace:\n got %s\nwant %s", got, want)
	}
	for _, bad := range []struct {
		name string
		r    map[string]int
	}{
		{"imd", nil},
		{"imd", map[string]int{"dc1": 0}},
		{"imd", map[string]int{"d'c": 1}},
		{"Imd", map[string]int{"dc1": 1}},
		{"imd;drop", map[string]int{"dc1": 1}},
		{"", map[string]int{"dc1": 1}},
	} {
		if _, err := CreateKeyspace(bad.name, bad.r); err == nil {
			t.Errorf("CreateKeyspace(%q, %v): no error", bad.name, bad.r)
		}
	}
	if _, err := AlterKeyspace("imd", map[string]int{"dc1": 5}); err != nil {
		t.Fatal(err)
	}
}

func TestParseReplication(t *testing.T) {
	r, err := ParseReplication(" dc1:3, dc2:2 ")
	if err != nil || len(r) != 2 || r["dc1"] != 3 || r["dc2"] != 2 {
		t.Fatalf("ParseReplication = %v, %v", r, err)
	}
	for _, bad := range []string{"", "dc1", "dc1:x", "dc1:0", ":3", "dc1:3,dc1:2"} {
		if _, err := ParseReplication(bad); err == nil {
			t.Errorf("ParseReplication(%q): no error", bad)
		}
	}
}

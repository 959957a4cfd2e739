package platform

import (
	"github.com/imd-dev/imd/internal/config"
)

// dataDirLockName is the file in the data directory that a process using
// it holds locked (flock) and writes its pid into.
const dataDirLockName = "imd.lock"

// usesDataDir reports whether a node of role keeps anything of its own in
// cfg.DataDir: the embedded store or the embedded Kafka broker. Only such
// nodes lock it, so a gateway or a logic node on Cassandra and a real
// Kafka can share a data dir (for secrets.yaml) with another process.
func usesDataDir(role string, cfg config.Config) bool {
	if role == RoleGateway || cfg.DataDir == "" {
		return false
	}
	embeddedStore := cfg.Store.Engine == "" || cfg.Store.Engine == "embedded"
	return embeddedStore || len(cfg.Bus.Brokers) == 0
}

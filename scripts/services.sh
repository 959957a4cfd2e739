#!/usr/bin/env bash
# services.sh — run real Redis, Apache Cassandra and Apache Kafka servers on loopback for
# imd's integration tests, without Docker: a world of two data centers, DC1 on 127.0.0.1 and
# DC2 on 127.0.0.2 (the whole 127.0.0.0/8 is loopback).
#
#   scripts/services.sh up [SERVICE...]      start (default: all); idempotent
#   scripts/services.sh down [SERVICE...]    stop by pid (TERM, then KILL)
#   scripts/services.sh status [SERVICE...]  state + a real protocol probe of each
#   scripts/services.sh env                  export lines for the tests
#   scripts/services.sh clean [SERVICE...]   down, then delete their state (default: everything)
#
# SERVICE is redis, rcluster (a Redis Cluster of 3 masters per DC), cassandra (DC1's node),
# cassandra2 (DC2's node) or kafka. Redis comes from Debian's redis-server package; Cassandra
# and Kafka are fetched once from Maven Central with `mvn dependency:copy-dependencies` into
# .cache/services/ and run with the machine's Java 17. Run with --help for the environment
# variables.
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"

STATE_DIR="${IMD_SERVICES_DIR:-${TMPDIR:-/tmp}/imd-services}"
CACHE_DIR="${IMD_SERVICES_CACHE:-$REPO_ROOT/.cache/services}"
HOST=127.0.0.1                       # DC1
HOST2="${IMD_DC2_HOST:-127.0.0.2}"   # DC2
CASSANDRA_DC=dc1                     # the data centers of the two Cassandra nodes
CASSANDRA2_DC=dc2

REDIS_PORT="${IMD_REDIS_PORT:-6379}"
CASSANDRA_PORT="${IMD_CASSANDRA_PORT:-9042}"
CASSANDRA_STORAGE_PORT="${IMD_CASSANDRA_STORAGE_PORT:-7000}"
KAFKA_PORT="${IMD_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${IMD_KAFKA_CONTROLLER_PORT:-9093}"
# The Redis Cluster of each DC: these ports on $HOST (DC1) and on $HOST2 (DC2).
read -r -a RCLUSTER_PORTS <<<"$(tr ',' ' ' <<<"${IMD_RCLUSTER_PORTS:-7001,7002,7003}")"
RCLUSTER_NODE_TIMEOUT="${IMD_RCLUSTER_NODE_TIMEOUT:-2000}"

CASSANDRA_VERSION="${IMD_CASSANDRA_VERSION:-5.0.9}"
KAFKA_VERSION="${IMD_KAFKA_VERSION:-4.4.0}"
CASSANDRA_HEAP="${IMD_CASSANDRA_HEAP:-1g}"
CASSANDRA2_HEAP="${IMD_CASSANDRA2_HEAP:-768m}"
KAFKA_HEAP="${IMD_KAFKA_HEAP:-512m}"

# Readiness timeouts in seconds (2 shared cores: Cassandra's first start is the slow one).
REDIS_TIMEOUT="${IMD_REDIS_TIMEOUT:-30}"
RCLUSTER_TIMEOUT="${IMD_RCLUSTER_TIMEOUT:-60}"
CASSANDRA_TIMEOUT="${IMD_CASSANDRA_TIMEOUT:-300}"
KAFKA_TIMEOUT="${IMD_KAFKA_TIMEOUT:-180}"
STOP_TIMEOUT="${IMD_STOP_TIMEOUT:-60}"

# In this order for status and env; down goes backwards (kafka first, redis last).
ALL_SERVICES=(redis rcluster cassandra cassandra2 kafka)

# ---------------------------------------------------------------------------------------------
# helpers

log() { printf '%s services: %s\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
	local rports="${RCLUSTER_PORTS[*]}"
	cat <<EOF
Usage: scripts/services.sh COMMAND [SERVICE...]

Runs real servers on loopback for imd's integration tests (no Docker needed): a world of two
data centers, DC1 on $HOST and DC2 on $HOST2.

Commands:
  up [SERVICE...]      fetch what is missing, start the services and wait until each answers
                       its own protocol (default: all). Running ones are left alone; a Redis
                       Cluster node that died is started again and rejoins its cluster.
  down [SERVICE...]    stop the services by pid: TERM, then KILL after ${STOP_TIMEOUT}s.
  status [SERVICE...]  print state, pid, address and a protocol probe; exit 1 if any is not healthy.
  env                  print export lines: eval "\$(scripts/services.sh env)"
  clean [SERVICE...]   stop them and delete their state (data, logs, pids); no SERVICE: everything.
  -h, --help           this help.

Services and ports:
  redis       $HOST:$REDIS_PORT   (Debian redis-server; apt-get installs it when run as root)
  rcluster    a Redis Cluster of ${#RCLUSTER_PORTS[@]} masters per DC, no replicas and no persistence:
              DC1 on $HOST ports ${rports// /,}, DC2 on $HOST2 the same ports (cluster bus: port+10000)
  cassandra   DC1's node (data center $CASSANDRA_DC): $HOST:$CASSANDRA_PORT CQL, storage port $CASSANDRA_STORAGE_PORT (Apache Cassandra $CASSANDRA_VERSION)
  cassandra2  DC2's node (data center $CASSANDRA2_DC): $HOST2:$CASSANDRA_PORT CQL, storage port $CASSANDRA_STORAGE_PORT;
              joins DC1's node (its seed) without streaming; 'up cassandra2' starts cassandra first
  kafka       $HOST:$KAFKA_PORT   KRaft broker+controller, controller port $KAFKA_CONTROLLER_PORT (Apache Kafka $KAFKA_VERSION)

Folders:
  state (data, logs, pids)  \$IMD_SERVICES_DIR, default \${TMPDIR:-/tmp}/imd-services  (now: $STATE_DIR)
  jar cache                 \$IMD_SERVICES_CACHE, default <repo>/.cache/services  (now: $CACHE_DIR)

Pid files (failure drills: kill -9 \$(cat FILE), then 'up SERVICE' starts it again):
  STATE/SERVICE/SERVICE.pid          redis, cassandra, cassandra2, kafka
  STATE/rcluster/DC/PORT/redis.pid   a Redis Cluster node, DC dc1 or dc2; its nodes.conf is beside
                                     it, so a restarted master rejoins with its slots, and EMPTY
                                     (nothing is persisted). A master's pid is also in INFO server.
  e.g. kill -9 \$(cat $STATE_DIR/rcluster/dc1/${RCLUSTER_PORTS[0]}/redis.pid); scripts/services.sh up rcluster

Environment (defaults in brackets):
  IMD_REDIS_PORT [6379]  IMD_CASSANDRA_PORT [9042]  IMD_CASSANDRA_STORAGE_PORT [7000]
  IMD_KAFKA_PORT [9092]  IMD_KAFKA_CONTROLLER_PORT [9093]
  IMD_DC2_HOST [127.0.0.2]  IMD_RCLUSTER_PORTS [7001,7002,7003]  IMD_RCLUSTER_NODE_TIMEOUT [2000] (ms)
  IMD_CASSANDRA_VERSION [5.0.9]  IMD_KAFKA_VERSION [4.4.0]
  IMD_CASSANDRA_HEAP [1g]  IMD_CASSANDRA2_HEAP [768m]  IMD_KAFKA_HEAP [512m]
  IMD_REDIS_TIMEOUT [30]  IMD_RCLUSTER_TIMEOUT [60]  IMD_CASSANDRA_TIMEOUT [300] (cassandra2's too)
  IMD_KAFKA_TIMEOUT [180]  IMD_STOP_TIMEOUT [60]
  IMD_MVN_ARGS  extra arguments for mvn (e.g. "-o" or "-s settings.xml"); ~/.m2/settings.xml is used as usual.

The first 'up' downloads about 110 MB of jars from Maven Central (a minute or so); later runs use the cache.
EOF
}

# port_open PORT [ADDR]: true when something accepts TCP connections on ADDR:PORT (default $HOST).
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/${2:-$HOST}/$1" 2>/dev/null; }

# port_owner PORT [ADDR]: a short description of the process listening on ADDR:PORT, if ss can tell.
port_owner() {
	ss -Hltnp "sport = :$1" 2>/dev/null | awk -v a="${2:-$HOST}:$1" '$4 == a || $4 == "0.0.0.0:'"$1"'" || $4 == "*:'"$1"'"' |
		sed -n 's/.*users:((\(.*\)))/\1/p' | head -n1
}

svc_dir() { printf '%s/%s' "$STATE_DIR" "$1"; }
pid_file() { printf '%s/%s/%s.pid' "$STATE_DIR" "$1" "$1"; }
log_file() { printf '%s/%s/logs/%s.log' "$STATE_DIR" "$1" "$1"; }

# A word that the service's command line contains, to tell our process from a recycled pid.
svc_marker() {
	case "$1" in
	redis) echo redis-server ;;
	cassandra | cassandra2) echo "-Dcassandra.storagedir=$(svc_dir "$1") " ;;
	kafka) echo kafka.Kafka ;;
	esac
}

svc_host() {
	case "$1" in
	cassandra2) echo "$HOST2" ;;
	*) echo "$HOST" ;;
	esac
}

svc_port() {
	case "$1" in
	redis) echo "$REDIS_PORT" ;;
	cassandra | cassandra2) echo "$CASSANDRA_PORT" ;;
	kafka) echo "$KAFKA_PORT" ;;
	esac
}

# svc_pid SERVICE: prints the pid and succeeds when the service's recorded process is alive
# (rcluster: the pids of its nodes, when every one is alive).
svc_pid() {
	local f pid
	[[ "$1" != rcluster ]] || { rc_pids; return; }
	f="$(pid_file "$1")"
	[[ -s "$f" ]] || return 1
	pid="$(tr -dc '0-9' <"$f")"
	[[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
	{ tr '\0' ' ' <"/proc/$pid/cmdline"; echo; } 2>/dev/null | grep -qF -- "$(svc_marker "$1")" || return 1
	echo "$pid"
}

# tail_svc_log SERVICE: the end of its log (rcluster: of each node's, and of the cluster tool's).
tail_svc_log() {
	local dc port
	if [[ "$1" == rcluster ]]; then
		for dc in dc1 dc2; do
			for port in "${RCLUSTER_PORTS[@]}"; do tail_log "$(rc_dir "$dc" "$port")/redis.log" 10; done
		done
		tail_log "$(svc_dir rcluster)/logs/rcluster.log" 20
		return
	fi
	tail_log "$(log_file "$1")"
}

tail_log() {
	local f="$1" n="${2:-60}"
	if [[ -f "$f" ]]; then
		log "last $n lines of $f:"
		tail -n "$n" "$f" | sed 's/^/    | /' >&2
	else
		log "(no log at $f)"
	fi
}

# wait_ready SERVICE...: polls each service's readiness check side by side until every one
# answers, dies or passes its timeout; prints progress every 15 seconds and the log tail of
# each failure. Fails if any did not come up.
wait_ready() {
	local -a pending=("$@") still=()
	local -A launched=()
	local svc now pid limit last=0 t0 failed=0
	t0="$(date +%s)"
	for svc in "${pending[@]}"; do
		launched[$svc]="$(cat "$(svc_dir "$svc")/started-at" 2>/dev/null || echo "$t0")"
	done
	while ((${#pending[@]} > 0)); do
		still=()
		for svc in "${pending[@]}"; do
			now="$(date +%s)"
			if "${svc}_ready" >/dev/null 2>&1; then
				log "$svc is ready, $((now - launched[$svc]))s after its start"
				continue
			fi
			limit="$(svc_timeout "$svc")"
			if ! pid="$(svc_pid "$svc")"; then
				log "$svc exited before it became ready ($((now - launched[$svc]))s after its start)"
				tail_svc_log "$svc"
				failed=1
			elif ((now - t0 >= limit)); then
				log "$svc (pid $pid) is not ready after ${limit}s; left running for a look (stop it: $0 down $svc)"
				tail_svc_log "$svc"
				failed=1
			else
				still+=("$svc")
			fi
		done
		pending=("${still[@]}")
		((${#pending[@]} > 0)) || break
		now="$(date +%s)"
		if ((now - t0 - last >= 15)); then
			last=$((now - t0))
			log "waiting for ${pending[*]}: ${last}s"
		fi
		sleep 1
	done
	return "$failed"
}

svc_timeout() {
	case "$1" in
	redis) echo "$REDIS_TIMEOUT" ;;
	rcluster) echo "$RCLUSTER_TIMEOUT" ;;
	cassandra | cassandra2) echo "$CASSANDRA_TIMEOUT" ;;
	kafka) echo "$KAFKA_TIMEOUT" ;;
	esac
}

# ---------------------------------------------------------------------------------------------
# protocol probes (pure bash: /dev/tcp and od, so nothing else needs installing)

# hex bytes of N bytes read from fd 3, one per line
read_hex() { head -c "$1" <&3 | od -An -v -tx1 | tr -s ' \n' '\n' | sed '/^$/d'; }

# be32 N: N as four big-endian \xHH escapes (for printf %b)
be32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 >> 24 & 255)) $(($1 >> 16 & 255)) $(($1 >> 8 & 255)) $(($1 & 255)); }

# cql_read_frame: reads one CQL v4 response frame from fd 3; sets CQL_OPCODE, CQL_LEN and
# CQL_BODY (the body as hex bytes, one a line).
cql_read_frame() {
	local -a h
	mapfile -t h < <(read_hex 9)
	((${#h[@]} == 9)) || return 1
	[[ "${h[0]}" == 84 ]] || return 1 # response, protocol v4
	CQL_OPCODE="${h[4]}"
	CQL_LEN=$((16#${h[5]}${h[6]}${h[7]}${h[8]}))
	CQL_BODY=""
	if ((CQL_LEN > 0)); then CQL_BODY="$(read_hex "$CQL_LEN")"; fi
}

# cql_probe [ADDR]: STARTUP, then SELECT release_version FROM system.local on ADDR (default
# $HOST); prints the version.
cql_probe() {
	exec 3<>"/dev/tcp/${1:-$HOST}/$CASSANDRA_PORT"
	# STARTUP (opcode 0x01), body {"CQL_VERSION": "3.0.0"} = 22 bytes
	printf '\x04\x00\x00\x01\x01\x00\x00\x00\x16\x00\x01\x00\x0bCQL_VERSION\x00\x053.0.0' >&3
	cql_read_frame || return 1
	[[ "$CQL_OPCODE" == 02 ]] || { echo "STARTUP answered opcode $CQL_OPCODE" >&2; return 1; } # READY
	local q="SELECT release_version FROM system.local" len
	len=${#q}
	# QUERY (opcode 0x07): [long string][consistency ONE][flags 0]
	printf '%b%s%b' "\\x04\\x00\\x00\\x02\\x07$(be32 $((len + 4 + 3)))$(be32 "$len")" "$q" '\x00\x01\x00' >&3
	cql_read_frame || return 1
	[[ "$CQL_OPCODE" == 08 ]] || { echo "QUERY answered opcode $CQL_OPCODE" >&2; return 1; } # RESULT
	# The row's only cell is the last thing in the body: print its printable tail.
	local text
	text="$(printf '%s\n' "$CQL_BODY" | sed 's/^/\\x/' | tr -d '\n')"
	printf '%b' "$text" | tr -c '[:print:]' ' ' | awk '{print $NF}'
}

# kafka_probe: ApiVersions v0 request; succeeds when the broker answers with error code 0.
kafka_probe() {
	exec 3<>"/dev/tcp/$HOST/$KAFKA_PORT"
	# size=19, api_key=18, api_version=0, correlation_id=7, client_id="imd-probe"
	printf '\x00\x00\x00\x13\x00\x12\x00\x00\x00\x00\x00\x07\x00\x09imd-probe' >&3
	local -a h
	mapfile -t h < <(read_hex 10)
	((${#h[@]} == 10)) || return 1
	[[ "${h[4]}${h[5]}${h[6]}${h[7]}" == 00000007 && "${h[8]}${h[9]}" == 0000 ]]
}

redis_probe() { [[ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }

redis_ready() { redis_probe; }

# ---------------------------------------------------------------------------------------------
# rcluster: a Redis Cluster per DC of one master per port of RCLUSTER_PORTS, without replicas
# and without persistence (a master that restarts comes back empty, with its slots: nodes.conf
# is kept beside its pid file).

rc_host() { if [[ "$1" == dc2 ]]; then echo "$HOST2"; else echo "$HOST"; fi; }
rc_dir() { printf '%s/rcluster/%s/%s' "$STATE_DIR" "$1" "$2"; }
rc_cli() {
	local dc="$1" port="$2"
	shift 2
	timeout 3 redis-cli -h "$(rc_host "$dc")" -p "$port" "$@" 2>/dev/null | tr -d '\r'
}
# rc_addrs DC: the cluster's addresses, comma-separated.
rc_addrs() {
	local port out=()
	for port in "${RCLUSTER_PORTS[@]}"; do out+=("$(rc_host "$1"):$port"); done
	(IFS=,; echo "${out[*]}")
}

# rc_node_pid DC PORT: prints the node's pid when it is alive.
rc_node_pid() {
	local f pid
	f="$(rc_dir "$1" "$2")/redis.pid"
	[[ -s "$f" ]] || return 1
	pid="$(tr -dc '0-9' <"$f")"
	[[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
	{ tr '\0' ' ' <"/proc/$pid/cmdline"; echo; } 2>/dev/null | grep -qF -- "$(rc_host "$1"):$2" || return 1
	echo "$pid"
}

# rc_pids: the pids of every node, comma-separated, when all are alive.
rc_pids() {
	local dc port pid out=()
	for dc in dc1 dc2; do
		for port in "${RCLUSTER_PORTS[@]}"; do
			pid="$(rc_node_pid "$dc" "$port")" || return 1
			out+=("$pid")
		done
	done
	(IFS=,; echo "${out[*]}")
}

# rc_field TEXT NAME: the value of "NAME:value" in a CLUSTER INFO or INFO reply.
rc_field() { sed -n "s/^$2://p" <<<"$1" | head -n1; }

# rc_node_ok DC PORT: the node sees its whole cluster healthy: state ok, every slot served,
# every node known and none flagged failing.
rc_node_ok() {
	local info
	info="$(rc_cli "$1" "$2" cluster info)" || return 1
	[[ "$(rc_field "$info" cluster_state)" == ok &&
		"$(rc_field "$info" cluster_slots_assigned)" == 16384 &&
		"$(rc_field "$info" cluster_slots_fail)" == 0 &&
		"$(rc_field "$info" cluster_known_nodes)" == "${#RCLUSTER_PORTS[@]}" ]] || return 1
	! rc_cli "$1" "$2" cluster nodes | awk '$3 ~ /fail|handshake|noaddr/ { bad = 1 } END { exit !bad }'
}

rcluster_ready() {
	local dc port
	for dc in dc1 dc2; do
		for port in "${RCLUSTER_PORTS[@]}"; do rc_node_ok "$dc" "$port" || return 1; done
	done
}

start_rc_node() {
	local dc="$1" port="$2" h d i
	h="$(rc_host "$dc")"
	d="$(rc_dir "$dc" "$port")"
	mkdir -p "$d"
	check_port_free rcluster "$h" "$port" "$((port + 10000))"
	rm -f "$d/redis.pid"
	# --cluster-announce-ip and --bind-source-addr: a DC2 node must never be taken for the DC1
	# node on the same port (loopback connections to 127.0.0.2 leave from 127.0.0.1).
	redis-server --daemonize yes --bind "$h" --port "$port" --protected-mode yes \
		--cluster-enabled yes --cluster-config-file "$d/nodes.conf" \
		--cluster-node-timeout "$RCLUSTER_NODE_TIMEOUT" --cluster-require-full-coverage no \
		--cluster-announce-ip "$h" --bind-source-addr "$h" \
		--dir "$d" --logfile "$d/redis.log" --pidfile "$d/redis.pid" \
		--save "" --appendonly no --maxclients 10000 >"$d/redis-server.out" 2>&1 9>&- ||
		{ tail_log "$d/redis-server.out"; tail_log "$d/redis.log"; die "redis-server $h:$port did not start"; }
	for i in $(seq 1 50); do
		[[ -s "$d/redis.pid" ]] && break
		sleep 0.1
	done
	log "started rcluster node $dc $h:$port (pid $(cat "$d/redis.pid" 2>/dev/null || echo '?')), log: $d/redis.log"
}

# rc_form DC: creates the DC's cluster when every node is new; a cluster already formed is left
# alone (a restarted node rejoins it by itself, from its nodes.conf).
rc_form() {
	local dc="$1" port info known slots fresh=0 formed=0 n="${#RCLUSTER_PORTS[@]}" i lf
	for port in "${RCLUSTER_PORTS[@]}"; do
		for i in $(seq 1 50); do
			[[ "$(rc_cli "$dc" "$port" ping)" == PONG ]] && break
			sleep 0.1
		done
		info="$(rc_cli "$dc" "$port" cluster info)"
		known="$(rc_field "$info" cluster_known_nodes)"
		slots="$(rc_field "$info" cluster_slots_assigned)"
		if [[ "$known" == 1 && "$slots" == 0 ]]; then
			fresh=$((fresh + 1))
		elif [[ "$known" == "$n" ]]; then
			formed=$((formed + 1))
		fi
	done
	((formed == n)) && return 0
	if ((fresh != n)); then
		die "the Redis Cluster of $dc is partly formed ($formed of $n nodes know the others, $fresh are new): start afresh with $0 clean rcluster"
	fi
	lf="$(svc_dir rcluster)/logs/rcluster.log"
	log "creating the Redis Cluster of $dc: $(rc_addrs "$dc")"
	# shellcheck disable=SC2046 # one word per address
	if ! timeout 120 redis-cli --cluster create $(tr ',' ' ' <<<"$(rc_addrs "$dc")") \
		--cluster-replicas 0 --cluster-yes >>"$lf" 2>&1; then
		tail_log "$lf" 30
		die "redis-cli --cluster create failed for $dc"
	fi
}

start_rcluster() {
	local dc port
	mkdir -p "$(svc_dir rcluster)/logs"
	date +%s >"$(svc_dir rcluster)/started-at"
	for dc in dc1 dc2; do
		for port in "${RCLUSTER_PORTS[@]}"; do
			rc_node_pid "$dc" "$port" >/dev/null || start_rc_node "$dc" "$port"
		done
	done
	for dc in dc1 dc2; do rc_form "$dc"; done
}

stop_rcluster() {
	local dc port pid i
	for dc in dc2 dc1; do
		for port in "${RCLUSTER_PORTS[@]}"; do
			pid="$(rc_node_pid "$dc" "$port")" || continue
			log "stopping rcluster node $dc $(rc_host "$dc"):$port (pid $pid)"
			kill -TERM "$pid" 2>/dev/null || true
			for ((i = 0; i < STOP_TIMEOUT * 2; i++)); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.5
			done
			kill -KILL "$pid" 2>/dev/null || true
			rm -f "$(rc_dir "$dc" "$port")/redis.pid"
		done
	done
	log "stopped rcluster"
}

status_rcluster() {
	local dc port h pid info bad=0 role keys
	for dc in dc1 dc2; do
		h="$(rc_host "$dc")"
		for port in "${RCLUSTER_PORTS[@]}"; do
			if ! pid="$(rc_node_pid "$dc" "$port")"; then
				printf '%-10s %-9s %-12s %s:%-6s %s\n' rcluster stopped - "$h" "$port" "$dc"
				bad=1
				continue
			fi
			info="$(rc_cli "$dc" "$port" info replication)"
			role="$(rc_field "$info" role)"
			keys="$(rc_cli "$dc" "$port" dbsize)"
			if rc_node_ok "$dc" "$port"; then
				printf '%-10s %-9s pid %-8s %s:%-6s %s\n' rcluster running "$pid" "$h" "$port" "$dc $role, $keys keys, cluster_state:ok"
			else
				printf '%-10s %-9s pid %-8s %s:%-6s %s\n' rcluster starting "$pid" "$h" "$port" "$dc ${role:-?}, cluster not healthy yet"
				bad=1
			fi
		done
	done
	return "$bad"
}

# probe SERVICE: runs the protocol probe in a child with a timeout; prints its short result.
probe() {
	case "$1" in
	redis) redis_probe && echo PONG ;;
	rcluster) rcluster_ready && echo "cluster_state:ok" ;;
	cassandra | cassandra2 | kafka) timeout 10 bash "$SCRIPT_PATH" __probe "$1" ;;
	esac
}


# Ready means the server answers its own protocol (a CQL query, a Kafka
# ApiVersions): that cannot be a stale line of an earlier run, and it still
# holds when the log was rotated or removed under a running server.
cassandra_ready() { probe cassandra; }

cassandra2_ready() { probe cassandra2; }

kafka_ready() { probe kafka; }

# ---------------------------------------------------------------------------------------------
# artifacts

need_java() {
	command -v java >/dev/null || die "java not found: install a Java 17 JDK (Debian: openjdk-17-jre-headless)"
	local v
	v="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
	[[ "${v%%.*}" -ge 17 ]] 2>/dev/null || die "java $v found; Cassandra 5.0 and Kafka 4 need Java 17 or newer"
}

# maven_fetch DIR POM-DEPENDENCIES-XML [POST-STEP]: copies the runtime classpath of the
# dependencies into DIR/lib once (POST-STEP DIR may add jars to DIR/lib.part first); a marker
# file makes later calls free (no mvn, no network). A lock file keeps two fetches apart.
maven_fetch() {
	local dir="$1" deps="$2" post="${3:-}"
	[[ -f "$dir/.complete" ]] && return 0
	command -v mvn >/dev/null || die "mvn not found: install Maven (Debian: maven) to fetch $(basename "$dir")"
	mkdir -p "$dir"
	(
		flock 8
		[[ -f "$dir/.complete" ]] && exit 0
		local name t0
		name="$(basename "$dir")"
		cat >"$dir/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- generated by scripts/services.sh: only used to copy a runtime classpath -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.imd.services</groupId>
  <artifactId>$name</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
$deps
  </dependencies>
</project>
EOF
		rm -rf "$dir/lib.part" "$dir/mvn.log"
		log "fetching $name with Maven into $dir (first run only)"
		t0="$(date +%s)"
		mvn_in "$dir" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$dir/lib.part"
		[[ -z "$post" ]] || "$post" "$dir"
		rm -rf "${dir:?}/lib"
		mv "$dir/lib.part" "$dir/lib"
		log "fetched $name: $(find "$dir/lib" -name '*.jar' | wc -l) jars, $(du -sh "$dir/lib" | cut -f1), $(($(date +%s) - t0))s"
		date >"$dir/.complete"
	) 8>"$dir.lock" || exit 1
}

# mvn_in DIR GOAL-AND-ARGS...: runs mvn quietly on DIR/pom.xml, output in DIR/mvn.log.
mvn_in() {
	local dir="$1"
	shift
	# shellcheck disable=SC2086 # IMD_MVN_ARGS is a list of words on purpose
	if ! mvn -B -q ${IMD_MVN_ARGS:-} -f "$dir/pom.xml" "$@" >>"$dir/mvn.log" 2>&1; then
		tail_log "$dir/mvn.log" 40
		die "mvn $1 failed for $(basename "$dir") (log: $dir/mvn.log)"
	fi
}

dep_xml() { printf '    <dependency><groupId>%s</groupId><artifactId>%s</artifactId><version>%s</version></dependency>\n' "$1" "$2" "$3"; }

cassandra_home() { printf '%s/cassandra-%s' "$CACHE_DIR" "$CASSANDRA_VERSION"; }
kafka_home() { printf '%s/kafka-%s' "$CACHE_DIR" "$KAFKA_VERSION"; }

fetch_cassandra() {
	need_java
	maven_fetch "$(cassandra_home)" "$(dep_xml org.apache.cassandra cassandra-all "$CASSANDRA_VERSION")"
}

# Kafka's own distribution adds a logging backend that the kafka_2.13 pom leaves out.
# Kafka 3.x logs through reload4j; Kafka 4 through log4j2, whose log4j-core is already a
# dependency: add the slf4j-1.x bridge of the same log4j version.
fetch_kafka() {
	need_java
	case "$KAFKA_VERSION" in
	3.*)
		maven_fetch "$(kafka_home)" "$(dep_xml org.apache.kafka kafka_2.13 "$KAFKA_VERSION")
$(dep_xml org.slf4j slf4j-reload4j 1.7.36)"
		;;
	*)
		maven_fetch "$(kafka_home)" "$(dep_xml org.apache.kafka kafka_2.13 "$KAFKA_VERSION")" add_log4j_slf4j
		;;
	esac
}

add_log4j_slf4j() {
	local dir="$1" jar v
	jar="$(find "$dir/lib.part" -name 'log4j-api-*.jar' | head -n1)"
	[[ -n "$jar" ]] || die "no log4j-api jar among Kafka $KAFKA_VERSION's dependencies; set IMD_KAFKA_VERSION to a 3.9.x or 4.x release"
	v="$(basename "$jar" .jar)"
	v="${v#log4j-api-}"
	mvn_in "$dir" dependency:copy -Dartifact="org.apache.logging.log4j:log4j-slf4j-impl:$v" -DoutputDirectory="$dir/lib.part"
}

need_redis() {
	command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
	if [[ "$(id -u)" != 0 ]]; then
		die "redis-server is not installed; install it with: sudo apt-get install -y redis-server"
	fi
	local before=0
	port_open "$REDIS_PORT" && before=1
	log "installing Debian's redis-server with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -q -o DPkg::Lock::Timeout=300 redis-server >"$STATE_DIR/apt.log" 2>&1; then
		log "apt-get install failed; running apt-get update and trying again"
		apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || true
		apt-get install -y -q -o DPkg::Lock::Timeout=300 redis-server >>"$STATE_DIR/apt.log" 2>&1 || {
			tail_log "$STATE_DIR/apt.log" 30
			die "apt-get install redis-server failed"
		}
	fi
	# The package's init script may have started a system redis on the default port: stop it so
	# that ours (with its data under the state folder) can take the port.
	if ((before == 0)) && port_open "$REDIS_PORT"; then
		log "stopping the redis-server that the package started itself"
		{ service redis-server stop || /etc/init.d/redis-server stop; } >>"$STATE_DIR/apt.log" 2>&1 || true
	fi
	command -v redis-server >/dev/null || die "redis-server still missing after apt-get install"
}

# ---------------------------------------------------------------------------------------------
# configuration files

# write_cassandra_config DIR ADDR DC: the node of data center DC on ADDR, DC1's node its seed.
write_cassandra_config() {
	local d="$1" addr="$2" dc="$3"
	mkdir -p "$d/conf" "$d/data" "$d/commitlog" "$d/hints" "$d/saved_caches" "$d/cdc_raw" "$d/logs" "$d/tmp" "$d/triggers"
	cat >"$d/conf/cassandra-rackdc.properties" <<EOF
# generated by scripts/services.sh
dc=$dc
rack=rack1
EOF
	cat >"$d/conf/cassandra.yaml" <<EOF
# generated by scripts/services.sh: test node of data center $dc on $addr
cluster_name: imd-test
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
# the data center and rack come from conf/cassandra-rackdc.properties
endpoint_snitch: GossipingPropertyFileSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$HOST:$CASSANDRA_STORAGE_PORT"
listen_address: $addr
rpc_address: $addr
# a node of a new data center joins without streaming (its keyspaces gain replicas there by
# ALTER KEYSPACE and nodetool rebuild; the test keyspaces are made after it joined)
auto_bootstrap: false
storage_port: $CASSANDRA_STORAGE_PORT
native_transport_port: $CASSANDRA_PORT
start_native_transport: true
data_file_directories:
  - $d/data
commitlog_directory: $d/commitlog
hints_directory: $d/hints
saved_caches_directory: $d/saved_caches
cdc_raw_directory: $d/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
auto_snapshot: false
snapshot_before_compaction: false
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
# sized for 2 shared cores
concurrent_reads: 2
concurrent_writes: 2
concurrent_counter_writes: 2
concurrent_materialized_view_writes: 2
concurrent_compactors: 1
# a loaded test machine is slow: give requests some slack
read_request_timeout: 10000ms
range_request_timeout: 20000ms
write_request_timeout: 10000ms
counter_write_request_timeout: 10000ms
truncate_request_timeout: 60000ms
request_timeout: 20000ms
# one c2c message is one logged batch holding its body once per inbox and
# twice for the timelines: allow 64 KiB bodies (imd's max_batch_bytes must
# stay below this)
batch_size_warn_threshold: 256KiB
batch_size_fail_threshold: 640KiB
EOF
	cat >"$d/conf/logback.xml" <<'EOF'
<configuration scan="false">
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
</configuration>
EOF
}

# cassandra_jvm_args DIR LIB HEAP: the JPMS flags of Cassandra's conf/jvm17-server.options, and
# the few settings of jvm-server.options and cassandra-env.sh that matter here.
cassandra_jvm_args() {
	local d="$1" lib="$2" heap="$3" jamm
	jamm="$(find "$lib" -name 'jamm-*.jar' | head -n1)"
	local -a a=(
		"-Xms512m" "-Xmx$heap" "-Xss256k"
		-XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:MaxGCPauseMillis=300
		-XX:+UseThreadPriorities -XX:+PerfDisableSharedMem -XX:+ExitOnOutOfMemoryError
		-Djava.net.preferIPv4Stack=true
		-Djdk.attach.allowAttachSelf=true
		--add-exports java.base/jdk.internal.misc=ALL-UNNAMED
		--add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
		--add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
		--add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
		--add-exports java.sql/java.sql=ALL-UNNAMED
		--add-exports java.base/java.lang.ref=ALL-UNNAMED
		--add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
		--add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
		--add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
		--add-exports java.management/com.sun.jmx.remote.security=ALL-UNNAMED
		--add-opens java.base/java.lang.module=ALL-UNNAMED
		--add-opens java.base/jdk.internal.loader=ALL-UNNAMED
		--add-opens java.base/jdk.internal.ref=ALL-UNNAMED
		--add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
		--add-opens java.base/jdk.internal.math=ALL-UNNAMED
		--add-opens java.base/jdk.internal.module=ALL-UNNAMED
		--add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
		--add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
		--add-opens java.base/sun.nio.ch=ALL-UNNAMED
		--add-opens java.base/java.io=ALL-UNNAMED
		--add-opens java.base/java.lang.reflect=ALL-UNNAMED
		--add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
		--add-opens java.base/java.lang=ALL-UNNAMED
		--add-opens java.base/java.util=ALL-UNNAMED
		--add-opens java.base/java.nio=ALL-UNNAMED
		--add-opens java.base/java.nio.charset=ALL-UNNAMED
		-Dio.netty.tryReflectionSetAccessible=true
		-Dio.netty.allocator.useCacheForAllThreads=true
		-Dio.netty.allocator.maxOrder=11
		"-javaagent:$jamm"
		"-Dcassandra.config=file://$d/conf/cassandra.yaml"
		"-Dcassandra-rackdc.properties=file://$d/conf/cassandra-rackdc.properties"
		"-Dlogback.configurationFile=file://$d/conf/logback.xml"
		"-Dcassandra.storagedir=$d"
		"-Dcassandra.logdir=$d/logs"
		"-Dcassandra.triggers_dir=$d/triggers"
		-Dcassandra-foreground=yes
		-Dcassandra.skip_wait_for_gossip_to_settle=0
		-Dcassandra.ring_delay_ms=1000
		-Dcassandra.superuser_setup_delay_ms=0
		-Dcassandra.unsafesystem=true
		-Dcassandra.ignore_kernel_bug_1057843_check=true
		"-Djna.tmpdir=$d/tmp"
		"-Djava.io.tmpdir=$d/tmp"
		-cp "$lib/*"
		org.apache.cassandra.service.CassandraDaemon
	)
	printf '%s\n' "${a[@]}"
}

write_kafka_config() {
	local d="$1"
	mkdir -p "$d/conf" "$d/data" "$d/logs"
	cat >"$d/conf/server.properties" <<EOF
# generated by scripts/services.sh: single KRaft node (broker + controller) on $HOST
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$d/data
num.partitions=1
auto.create.topics.enable=true
delete.topic.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# sized for 2 shared cores
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=2
log.retention.hours=24
log.segment.bytes=67108864
EOF
	cat >"$d/conf/log4j2.properties" <<'EOF'
status = warn
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.kafkarequest.name = kafka.request.logger
logger.kafkarequest.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.zk.name = org.apache.zookeeper
logger.zk.level = WARN
EOF
	cat >"$d/conf/log4j.properties" <<'EOF'
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
EOF
}

kafka_log_args() {
	local d="$1"
	case "$KAFKA_VERSION" in
	3.*) echo "-Dlog4j.configuration=file:$d/conf/log4j.properties" ;;
	*) echo "-Dlog4j2.configurationFile=$d/conf/log4j2.properties" ;;
	esac
}

# ---------------------------------------------------------------------------------------------
# start

# check_port_free SERVICE ADDR PORT...: dies with the owner when another process holds a port.
check_port_free() {
	local svc="$1" addr="$2" p owner
	shift 2
	for p in "$@"; do
		if port_open "$p" "$addr"; then
			owner="$(port_owner "$p" "$addr")"
			die "cannot start $svc: $addr:$p is already in use${owner:+ by $owner} (not a $svc started from $STATE_DIR)"
		fi
	done
}

# launch SERVICE COMMAND...: starts a long-running java process detached, records its pid.
launch() {
	local svc="$1" pid
	shift
	local lf
	lf="$(log_file "$svc")"
	touch "$lf"
	# remember where this run's output starts, so that readiness checks ignore older runs
	stat -c %s "$lf" >"$(svc_dir "$svc")/log-offset"
	printf '\n===== %s start: %s\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$*" >>"$lf"
	# setsid: its own session, so it outlives this script and the job control of its caller.
	# 9>&-: the lock of this script must not leak into the server.
	setsid "$@" >>"$lf" 2>&1 </dev/null 9>&- &
	pid=$!
	echo "$pid" >"$(pid_file "$svc")"
	date +%s >"$(svc_dir "$svc")/started-at"
	log "started $svc (pid $pid), log: $lf"
}

start_redis() {
	local d
	d="$(svc_dir redis)"
	mkdir -p "$d/logs"
	check_port_free redis "$HOST" "$REDIS_PORT"
	rm -f "$(pid_file redis)"
	redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --protected-mode yes \
		--dir "$d" --logfile "$(log_file redis)" --pidfile "$(pid_file redis)" \
		--save "" --appendonly no --maxclients 10000 >"$d/logs/redis-server.out" 2>&1 9>&- ||
		{ tail_log "$d/logs/redis-server.out"; tail_log "$(log_file redis)"; die "redis-server did not start"; }
	local i
	for i in $(seq 1 50); do
		[[ -s "$(pid_file redis)" ]] && break
		sleep 0.1
	done
	date +%s >"$d/started-at"
	log "started redis (pid $(cat "$(pid_file redis)" 2>/dev/null || echo '?')), log: $(log_file redis)"
}

# cassandra_dc SERVICE: the node's data center; cassandra_heap SERVICE: its heap.
cassandra_dc() { if [[ "$1" == cassandra2 ]]; then echo "$CASSANDRA2_DC"; else echo "$CASSANDRA_DC"; fi; }
cassandra_heap() { if [[ "$1" == cassandra2 ]]; then echo "$CASSANDRA2_HEAP"; else echo "$CASSANDRA_HEAP"; fi; }

# cassandra_dc_stale SERVICE: true when the node's data were made in another data center than
# the one it is configured for now: data of the single-node world (SimpleSnitch, data center
# "datacenter1"), which Cassandra refuses to start on with GossipingPropertyFileSnitch.
cassandra_dc_stale() {
	local d
	d="$(svc_dir "$1")"
	[[ -d "$d/data/system" ]] || return 1
	[[ "$(cat "$d/dc" 2>/dev/null)" != "$(cassandra_dc "$1")" ]]
}

start_cassandra_node() {
	local svc="$1" d lib addr dc
	d="$(svc_dir "$svc")"
	lib="$(cassandra_home)/lib"
	addr="$(svc_host "$svc")"
	dc="$(cassandra_dc "$svc")"
	check_port_free "$svc" "$addr" "$CASSANDRA_PORT" "$CASSANDRA_STORAGE_PORT"
	if cassandra_dc_stale "$svc"; then
		# Everything under the state folder is test data (the suites make and drop keyspaces of
		# their own): start this node afresh rather than make the user clean by hand.
		log "$svc: its data were made by the single-DC setup (data center $(cat "$d/dc" 2>/dev/null || echo datacenter1)), which cannot become $dc; deleting them to start afresh (scripts/services.sh clean does the same for everything)"
		rm -rf "${d:?}/data" "$d/commitlog" "$d/hints" "$d/saved_caches" "$d/cdc_raw"
	fi
	write_cassandra_config "$d" "$addr" "$dc"
	echo "$dc" >"$d/dc"
	local -a args
	mapfile -t args < <(cassandra_jvm_args "$d" "$lib" "$(cassandra_heap "$svc")")
	launch "$svc" java "${args[@]}"
}

start_cassandra() { start_cassandra_node cassandra; }

start_cassandra2() { start_cassandra_node cassandra2; }

start_kafka() {
	local d lib cid
	d="$(svc_dir kafka)"
	lib="$(kafka_home)/lib"
	check_port_free kafka "$HOST" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
	write_kafka_config "$d"
	if [[ ! -f "$d/data/meta.properties" ]]; then
		# A cluster id is 16 random bytes in URL-safe base64 without padding (Kafka's Uuid); like
		# Kafka's own Uuid.randomUuid, avoid a leading '-', which the tool would take for an option.
		cid=-
		while [[ "$cid" == -* ]]; do
			cid="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
		done
		log "formatting Kafka storage (cluster id $cid)"
		if ! java "$(kafka_log_args "$d")" -cp "$lib/*" kafka.tools.StorageTool format \
			-t "$cid" -c "$d/conf/server.properties" -g >>"$(log_file kafka)" 2>&1; then
			tail_log "$(log_file kafka)" 30
			die "kafka storage format failed"
		fi
	fi
	launch kafka java "-Xms$KAFKA_HEAP" "-Xmx$KAFKA_HEAP" \
		-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
		-XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
		"$(kafka_log_args "$d")" "-Dkafka.logs.dir=$d/logs" "-Djava.io.tmpdir=$d" \
		-cp "$lib/*" kafka.Kafka "$d/conf/server.properties"
}

# has WORD LIST...: true when WORD is among LIST.
has() {
	local w="$1" x
	shift
	for x in "$@"; do [[ "$x" == "$w" ]] && return 0; done
	return 1
}

# bring_up SERVICE: starts the service unless it runs and answers; succeeds when there is
# something to wait for.
bring_up() {
	local s="$1" pid
	mkdir -p "$(svc_dir "$s")/logs"
	if [[ "$s" == rcluster ]]; then
		if rcluster_ready >/dev/null 2>&1; then
			log "rcluster is already running ($(rc_pids)) and healthy"
			return 1
		fi
		start_rcluster # starts the nodes that are not running, forms new clusters
		return 0
	fi
	if pid="$(svc_pid "$s")"; then
		if [[ "$s" == cassandra* ]] && cassandra_dc_stale "$s"; then
			log "$s (pid $pid) runs the single-DC setup (SimpleSnitch): restarting it as data center $(cassandra_dc "$s")"
			stop_one "$s"
			"start_$s"
			return 0
		fi
		if "${s}_ready" >/dev/null 2>&1; then
			log "$s is already running (pid $pid) and answers"
			return 1
		fi
		log "$s is already running (pid $pid) but does not answer yet"
		return 0
	fi
	"start_$s"
}

cmd_up() {
	local -a svcs=("$@") to_wait=() rest=()
	local s t0
	t0="$(date +%s)"
	mkdir -p "$STATE_DIR"
	# DC2's Cassandra node joins through DC1's, its seed.
	if has cassandra2 "${svcs[@]}" && ! has cassandra "${svcs[@]}"; then
		log "cassandra2 joins through cassandra (its seed): starting that too"
		svcs=(cassandra "${svcs[@]}")
	fi
	# 1. what is missing (network only the first time)
	for s in "${svcs[@]}"; do
		case "$s" in
		redis | rcluster) need_redis ;;
		cassandra | cassandra2) fetch_cassandra ;;
		kafka) fetch_kafka ;;
		esac
	done
	# 2. start the stopped ones; they boot side by side (the slow JVMs first)
	for s in cassandra kafka redis rcluster; do
		has "$s" "${svcs[@]}" || continue
		if bring_up "$s"; then to_wait+=("$s"); fi
	done
	# 3. DC2's Cassandra node once DC1's answers CQL, while the others go on booting
	if has cassandra2 "${svcs[@]}"; then
		if has cassandra "${to_wait[@]}"; then
			wait_ready cassandra || die "not every service came up (logs under $STATE_DIR)"
			rest=()
			for s in "${to_wait[@]}"; do [[ "$s" == cassandra ]] || rest+=("$s"); done
			to_wait=("${rest[@]}")
		fi
		if bring_up cassandra2; then to_wait+=(cassandra2); fi
	fi
	# 4. wait until each answers its own protocol
	if ((${#to_wait[@]} > 0)); then
		wait_ready "${to_wait[@]}" || die "not every service came up (logs under $STATE_DIR)"
	fi
	log "up: ${svcs[*]} in $(($(date +%s) - t0))s (state: $STATE_DIR)"
}

# ---------------------------------------------------------------------------------------------
# stop and status

stop_one() {
	local svc="$1" pid i
	if [[ "$svc" == rcluster ]]; then
		stop_rcluster
		return
	fi
	if ! pid="$(svc_pid "$svc")"; then
		log "$svc is not running"
		rm -f "$(pid_file "$svc")"
		return 0
	fi
	log "stopping $svc (pid $pid)"
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < STOP_TIMEOUT * 2; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.5
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "$svc (pid $pid) still running after ${STOP_TIMEOUT}s: KILL"
		kill -KILL "$pid" 2>/dev/null || true
		for ((i = 0; i < 20; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.5
		done
	fi
	rm -f "$(pid_file "$svc")"
	log "stopped $svc"
}

cmd_down() {
	local s i
	# reverse order: kafka, cassandra2, cassandra, rcluster, redis
	for ((i = $#; i >= 1; i--)); do
		s="${!i}"
		stop_one "$s"
	done
}

cmd_status() {
	local s pid host port res bad=0
	for s in "$@"; do
		if [[ "$s" == rcluster ]]; then
			status_rcluster || bad=1
			continue
		fi
		host="$(svc_host "$s")"
		port="$(svc_port "$s")"
		if pid="$(svc_pid "$s")"; then
			if res="$(probe "$s" 2>/dev/null)" && [[ -n "$res" || "$s" == kafka ]]; then
				case "$s" in
				cassandra*) res="CQL ok, release $res, data center $(cassandra_dc "$s")" ;;
				kafka) res="ApiVersions ok" ;;
				esac
				printf '%-10s %-9s pid %-8s %s:%-6s %s\n' "$s" running "$pid" "$host" "$port" "$res"
			else
				printf '%-10s %-9s pid %-8s %s:%-6s %s\n' "$s" starting "$pid" "$host" "$port" "not answering yet"
				bad=1
			fi
		else
			printf '%-10s %-9s %-12s %s:%-6s\n' "$s" stopped - "$host" "$port"
			bad=1
		fi
	done
	return "$bad"
}

cmd_env() {
	cat <<EOF
export IMD_TEST_REDIS=$HOST:$REDIS_PORT
export IMD_TEST_REDIS_CLUSTER_DC1=$(rc_addrs dc1)
export IMD_TEST_REDIS_CLUSTER_DC2=$(rc_addrs dc2)
export IMD_TEST_CASSANDRA=$HOST:$CASSANDRA_PORT
export IMD_TEST_CASSANDRA_DC2=$HOST2:$CASSANDRA_PORT
export IMD_TEST_KAFKA=$HOST:$KAFKA_PORT
export IMD_SERVICES_DIR=$STATE_DIR
EOF
}

# cmd_clean [SERVICE...]: no SERVICE, everything: stop all and delete the state folder.
cmd_clean() {
	local s
	case "$STATE_DIR" in
	"" | / | "$HOME" | "$REPO_ROOT") die "refusing to delete $STATE_DIR" ;;
	esac
	if (($# == 0)); then
		cmd_down "${ALL_SERVICES[@]}"
		rm -rf "$STATE_DIR"
		log "deleted $STATE_DIR"
		return
	fi
	cmd_down "$@"
	for s in "$@"; do
		rm -rf "${STATE_DIR:?}/$s"
		log "deleted $STATE_DIR/$s"
	done
}

# ---------------------------------------------------------------------------------------------
# main

# parse_services ARGS...: sets SVCS to the validated names (default all), in ALL_SERVICES order.
SVCS=()
parse_services() {
	local a s
	local -A want=()
	(($# > 0)) || set -- all
	for a in "$@"; do
		case "$a" in
		redis | rcluster | cassandra | cassandra2 | kafka) want[$a]=1 ;;
		all) for s in "${ALL_SERVICES[@]}"; do want[$s]=1; done ;;
		*) die "unknown service '$a' (known: ${ALL_SERVICES[*]})" ;;
		esac
	done
	SVCS=()
	for s in "${ALL_SERVICES[@]}"; do
		if [[ -n "${want[$s]:-}" ]]; then SVCS+=("$s"); fi
	done
}

# One up/down/clean at a time per state folder.
lock_state() {
	mkdir -p "$STATE_DIR"
	exec 9>"$STATE_DIR/.lock"
	if ! flock -n 9; then
		log "another services.sh is working on $STATE_DIR; waiting"
		flock 9
	fi
}

main() {
	local cmd="${1:-}"
	[[ $# -gt 0 ]] && shift
	case "$cmd" in
	-h | --help | help)
		usage
		;;
	up | down | status)
		parse_services "$@"
		case "$cmd" in
		up) lock_state && cmd_up "${SVCS[@]}" ;;
		down) lock_state && cmd_down "${SVCS[@]}" ;;
		status) cmd_status "${SVCS[@]}" ;;
		esac
		;;
	env)
		cmd_env
		;;
	clean)
		if (($# > 0)); then parse_services "$@"; else SVCS=(); fi
		lock_state
		cmd_clean "${SVCS[@]}"
		;;
	__probe) # internal: run inside `timeout` by probe()
		case "${1:-}" in
		cassandra) cql_probe "$HOST" ;;
		cassandra2) cql_probe "$HOST2" ;;
		kafka) kafka_probe ;;
		*) exit 2 ;;
		esac
		;;
	"")
		usage >&2
		exit 2
		;;
	*)
		usage >&2
		die "unknown command '$cmd'"
		;;
	esac
}

main "$@"

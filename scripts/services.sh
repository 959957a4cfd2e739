#!/usr/bin/env bash
# services.sh — run real Redis, Apache Cassandra and Apache Kafka servers on 127.0.0.1
# for imd's integration tests, without Docker.
#
#   scripts/services.sh up [redis|cassandra|kafka ...]    start (default: all three); idempotent
#   scripts/services.sh down [redis|cassandra|kafka ...]  stop by pid (TERM, then KILL)
#   scripts/services.sh status [...]                      state + a real protocol probe of each
#   scripts/services.sh env                               export lines for the tests
#   scripts/services.sh clean                             down, then delete the state folder
#
# Redis comes from Debian's redis-server package; Cassandra and Kafka are fetched once from
# Maven Central with `mvn dependency:copy-dependencies` into .cache/services/ and run with the
# machine's Java 17. Run with --help for the environment variables.
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"

STATE_DIR="${IMD_SERVICES_DIR:-${TMPDIR:-/tmp}/imd-services}"
CACHE_DIR="${IMD_SERVICES_CACHE:-$REPO_ROOT/.cache/services}"
HOST=127.0.0.1

REDIS_PORT="${IMD_REDIS_PORT:-6379}"
CASSANDRA_PORT="${IMD_CASSANDRA_PORT:-9042}"
CASSANDRA_STORAGE_PORT="${IMD_CASSANDRA_STORAGE_PORT:-7000}"
KAFKA_PORT="${IMD_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${IMD_KAFKA_CONTROLLER_PORT:-9093}"

CASSANDRA_VERSION="${IMD_CASSANDRA_VERSION:-5.0.9}"
KAFKA_VERSION="${IMD_KAFKA_VERSION:-4.4.0}"
CASSANDRA_HEAP="${IMD_CASSANDRA_HEAP:-1g}"
KAFKA_HEAP="${IMD_KAFKA_HEAP:-512m}"

# Readiness timeouts in seconds (2 shared cores: Cassandra's first start is the slow one).
REDIS_TIMEOUT="${IMD_REDIS_TIMEOUT:-30}"
CASSANDRA_TIMEOUT="${IMD_CASSANDRA_TIMEOUT:-300}"
KAFKA_TIMEOUT="${IMD_KAFKA_TIMEOUT:-180}"
STOP_TIMEOUT="${IMD_STOP_TIMEOUT:-60}"

ALL_SERVICES=(redis cassandra kafka)

# ---------------------------------------------------------------------------------------------
# helpers

log() { printf '%s services: %s\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
	cat <<EOF
Usage: scripts/services.sh COMMAND [SERVICE...]

Runs real servers on $HOST for imd's integration tests (no Docker needed).

Commands:
  up [SERVICE...]      fetch what is missing, start the services and wait until each answers
                       its own protocol (default: redis cassandra kafka). Running ones are left alone.
  down [SERVICE...]    stop the services by pid: TERM, then KILL after ${STOP_TIMEOUT}s.
  status [SERVICE...]  print state, pid, address and a protocol probe; exit 1 if any is not healthy.
  env                  print export lines: eval "\$(scripts/services.sh env)"
  clean                stop everything and delete the state folder (data, logs, pids).
  -h, --help           this help.

Services and ports:
  redis      $HOST:$REDIS_PORT   (Debian redis-server; apt-get installs it when run as root)
  cassandra  $HOST:$CASSANDRA_PORT   CQL, storage port $CASSANDRA_STORAGE_PORT (Apache Cassandra $CASSANDRA_VERSION)
  kafka      $HOST:$KAFKA_PORT   KRaft broker+controller, controller port $KAFKA_CONTROLLER_PORT (Apache Kafka $KAFKA_VERSION)

Folders:
  state (data, logs, pids)  \$IMD_SERVICES_DIR, default \${TMPDIR:-/tmp}/imd-services  (now: $STATE_DIR)
  jar cache                 \$IMD_SERVICES_CACHE, default <repo>/.cache/services  (now: $CACHE_DIR)

Environment (defaults in brackets):
  IMD_REDIS_PORT [6379]  IMD_CASSANDRA_PORT [9042]  IMD_CASSANDRA_STORAGE_PORT [7000]
  IMD_KAFKA_PORT [9092]  IMD_KAFKA_CONTROLLER_PORT [9093]
  IMD_CASSANDRA_VERSION [5.0.9]  IMD_KAFKA_VERSION [4.4.0]  IMD_CASSANDRA_HEAP [1g]  IMD_KAFKA_HEAP [512m]
  IMD_REDIS_TIMEOUT [30]  IMD_CASSANDRA_TIMEOUT [300]  IMD_KAFKA_TIMEOUT [180]  IMD_STOP_TIMEOUT [60]
  IMD_MVN_ARGS  extra arguments for mvn (e.g. "-o" or "-s settings.xml"); ~/.m2/settings.xml is used as usual.

The first 'up' downloads about 110 MB of jars from Maven Central (a minute or so); later runs use the cache.
EOF
}

# port_open PORT: true when something accepts TCP connections on $HOST:PORT.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# port_owner PORT: a short description of the process listening on PORT, if ss can tell.
port_owner() { ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -n1; }

svc_dir() { printf '%s/%s' "$STATE_DIR" "$1"; }
pid_file() { printf '%s/%s/%s.pid' "$STATE_DIR" "$1" "$1"; }
log_file() { printf '%s/%s/logs/%s.log' "$STATE_DIR" "$1" "$1"; }

# A word that the service's command line contains, to tell our process from a recycled pid.
svc_marker() {
	case "$1" in
	redis) echo redis-server ;;
	cassandra) echo org.apache.cassandra.service.CassandraDaemon ;;
	kafka) echo kafka.Kafka ;;
	esac
}

svc_port() {
	case "$1" in
	redis) echo "$REDIS_PORT" ;;
	cassandra) echo "$CASSANDRA_PORT" ;;
	kafka) echo "$KAFKA_PORT" ;;
	esac
}

# svc_pid SERVICE: prints the pid and succeeds when the service's recorded process is alive.
svc_pid() {
	local f pid
	f="$(pid_file "$1")"
	[[ -s "$f" ]] || return 1
	pid="$(tr -dc '0-9' <"$f")"
	[[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(svc_marker "$1")" || return 1
	echo "$pid"
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
				tail_log "$(log_file "$svc")"
				failed=1
			elif ((now - t0 >= limit)); then
				log "$svc (pid $pid) is not ready after ${limit}s; left running for a look (stop it: $0 down $svc)"
				tail_log "$(log_file "$svc")"
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
	cassandra) echo "$CASSANDRA_TIMEOUT" ;;
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

# cql_probe: STARTUP, then SELECT release_version FROM system.local; prints the version.
cql_probe() {
	exec 3<>"/dev/tcp/$HOST/$CASSANDRA_PORT"
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

# probe SERVICE: runs the protocol probe in a child with a timeout; prints its short result.
probe() {
	case "$1" in
	redis) redis_probe && echo PONG ;;
	cassandra) timeout 10 bash "$SCRIPT_PATH" __probe cassandra ;;
	kafka) timeout 10 bash "$SCRIPT_PATH" __probe kafka ;;
	esac
}


# Ready means the server answers its own protocol (a CQL query, a Kafka
# ApiVersions): that cannot be a stale line of an earlier run, and it still
# holds when the log was rotated or removed under a running server.
cassandra_ready() { probe cassandra; }

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

write_cassandra_config() {
	local d="$1"
	mkdir -p "$d/conf" "$d/data" "$d/commitlog" "$d/hints" "$d/saved_caches" "$d/cdc_raw" "$d/logs" "$d/tmp" "$d/triggers"
	cat >"$d/conf/cassandra.yaml" <<EOF
# generated by scripts/services.sh: single test node on $HOST
cluster_name: imd-test
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$HOST:$CASSANDRA_STORAGE_PORT"
listen_address: $HOST
rpc_address: $HOST
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

# The JPMS flags of Cassandra's conf/jvm17-server.options, and the few settings of
# jvm-server.options and cassandra-env.sh that matter here.
cassandra_jvm_args() {
	local d="$1" lib="$2" jamm
	jamm="$(find "$lib" -name 'jamm-*.jar' | head -n1)"
	local -a a=(
		"-Xms512m" "-Xmx$CASSANDRA_HEAP" "-Xss256k"
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

# check_port_free SERVICE PORT...: dies with the owner when another process holds a port.
check_port_free() {
	local svc="$1" p owner
	shift
	for p in "$@"; do
		if port_open "$p"; then
			owner="$(port_owner "$p")"
			die "cannot start $svc: $HOST:$p is already in use${owner:+ by $owner} (not a $svc started from $STATE_DIR)"
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
	check_port_free redis "$REDIS_PORT"
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

start_cassandra() {
	local d lib
	d="$(svc_dir cassandra)"
	lib="$(cassandra_home)/lib"
	check_port_free cassandra "$CASSANDRA_PORT" "$CASSANDRA_STORAGE_PORT"
	write_cassandra_config "$d"
	local -a args
	mapfile -t args < <(cassandra_jvm_args "$d" "$lib")
	launch cassandra java "${args[@]}"
}

start_kafka() {
	local d lib cid
	d="$(svc_dir kafka)"
	lib="$(kafka_home)/lib"
	check_port_free kafka "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
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

cmd_up() {
	local -a svcs=("$@") to_wait=()
	local s pid
	mkdir -p "$STATE_DIR"
	# 1. what is missing (network only the first time)
	for s in "${svcs[@]}"; do
		case "$s" in
		redis) need_redis ;;
		cassandra) fetch_cassandra ;;
		kafka) fetch_kafka ;;
		esac
	done
	# 2. start the stopped ones; they boot side by side
	for s in "${svcs[@]}"; do
		mkdir -p "$(svc_dir "$s")/logs"
		if pid="$(svc_pid "$s")"; then
			if "${s}_ready" >/dev/null 2>&1; then
				log "$s is already running (pid $pid) and answers"
				continue
			fi
			log "$s is already running (pid $pid) but does not answer yet"
		else
			"start_$s"
		fi
		to_wait+=("$s")
	done
	# 3. wait until each answers its own protocol
	if ((${#to_wait[@]} > 0)); then
		wait_ready "${to_wait[@]}" || die "not every service came up (logs under $STATE_DIR)"
	fi
	log "up: ${svcs[*]} (state: $STATE_DIR)"
}

# ---------------------------------------------------------------------------------------------
# stop and status

stop_one() {
	local svc="$1" pid i
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
	# reverse order: kafka, cassandra, redis
	for ((i = $# ; i >= 1; i--)); do
		s="${!i}"
		stop_one "$s"
	done
}

cmd_status() {
	local s pid port res bad=0
	for s in "$@"; do
		port="$(svc_port "$s")"
		if pid="$(svc_pid "$s")"; then
			if res="$(probe "$s" 2>/dev/null)" && [[ -n "$res" || "$s" == kafka ]]; then
				case "$s" in
				cassandra) res="CQL ok, release $res" ;;
				kafka) res="ApiVersions ok" ;;
				esac
				printf '%-10s %-9s pid %-8s %s:%-6s %s\n' "$s" running "$pid" "$HOST" "$port" "$res"
			else
				printf '%-10s %-9s pid %-8s %s:%-6s %s\n' "$s" starting "$pid" "$HOST" "$port" "not answering yet"
				bad=1
			fi
		else
			printf '%-10s %-9s %-12s %s:%-6s\n' "$s" stopped - "$HOST" "$port"
			bad=1
		fi
	done
	return "$bad"
}

cmd_env() {
	cat <<EOF
export IMD_TEST_REDIS=$HOST:$REDIS_PORT
export IMD_TEST_CASSANDRA=$HOST:$CASSANDRA_PORT
export IMD_TEST_KAFKA=$HOST:$KAFKA_PORT
export IMD_SERVICES_DIR=$STATE_DIR
EOF
}

cmd_clean() {
	cmd_down "${ALL_SERVICES[@]}"
	case "$STATE_DIR" in
	"" | / | "$HOME" | "$REPO_ROOT") die "refusing to delete $STATE_DIR" ;;
	esac
	rm -rf "$STATE_DIR"
	log "deleted $STATE_DIR"
}

# ---------------------------------------------------------------------------------------------
# main

# parse_services ARGS...: sets SVCS to the validated names (default all), in start order.
SVCS=()
parse_services() {
	local a s
	local -A want=()
	(($# > 0)) || set -- all
	for a in "$@"; do
		case "$a" in
		redis | cassandra | kafka) want[$a]=1 ;;
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
		lock_state
		cmd_clean
		;;
	__probe) # internal: run inside `timeout` by probe()
		case "${1:-}" in
		cassandra) cql_probe ;;
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

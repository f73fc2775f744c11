#!/usr/bin/env bash
# Start a throwaway SLURM cluster on this one machine, for tests and for trying sbatch files.
#
#   slurm/dev-cluster/start.sh [--nodes 1|2] [--dir DIR] [--ctld-port PORT] [--node-port PORT]
#                              [--kill-wait SECONDS] [--timeout SECONDS]
#   source DIR/env.sh && srun -N1 hostname        # DIR defaults to /tmp/clustertune-slurm
#   slurm/dev-cluster/stop.sh [--dir DIR]
#
# Debian 12 packages (Slurm 22.05), root, no systemd: a private munged, `slurmctld -D -i` and one
# `slurmd -D -N nK` per node, all under `setsid nohup`, with config, state, logs and pids under
# DIR. Idempotent: if DIR already runs a cluster with the same node count, nothing happens.
# Exit status 3 means this machine cannot run it (not root, packages not installable): tests skip.
# Why each setting is there: /work/shared/PITFALLS.md, "A local SLURM cluster for tests".
set -euo pipefail

NODES=1
DIR=/tmp/clustertune-slurm
CTLD_PORT=6817
NODE_PORT=17001 # node K listens on NODE_PORT+K-1
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued (SLURM default 30).
# submitit ignores SIGTERM, so a requeued submitit job restarts this much later than one that
# exits on SIGTERM (measured with 10: 21 s against 11 s).
KILL_WAIT=10
TIMEOUT=60

die() {
    echo "start.sh: error: $*" >&2
    exit 1
}
unavailable() {
    echo "start.sh: cannot run a dev cluster here: $*" >&2
    exit 3
}

while [[ $# -gt 0 ]]; do
    case "$1" in
    --nodes) NODES="${2:?--nodes needs a value}"; shift 2 ;;
    --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
    --ctld-port) CTLD_PORT="${2:?--ctld-port needs a value}"; shift 2 ;;
    --node-port) NODE_PORT="${2:?--node-port needs a value}"; shift 2 ;;
    --kill-wait) KILL_WAIT="${2:?--kill-wait needs a value}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'; see --help" ;;
    esac
done

[[ "$NODES" == 1 || "$NODES" == 2 ]] || die "--nodes must be 1 or 2, got '$NODES'"
for value in "$CTLD_PORT" "$NODE_PORT" "$KILL_WAIT" "$TIMEOUT"; do
    [[ "$value" =~ ^[0-9]+$ ]] || die "ports and times must be whole numbers, got '$value'"
done
[[ "$DIR" != *[[:space:]]* ]] || die "--dir '$DIR' contains whitespace, which slurm.conf cannot hold"
[[ "$(id -u)" == 0 ]] || unavailable "run as root (it installs packages and runs slurmd as root)"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
START_SECONDS=$SECONDS

# pid_alive PIDFILE COMM: true if the pid in PIDFILE runs a program called COMM (not a reused pid).
pid_alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

node_names() { for ((k = 1; k <= NODES; k++)); do echo "n$k"; done; }

# --- already running? ---------------------------------------------------------------------------
if pid_alive "$DIR/pids/slurmctld.pid" slurmctld; then
    running_nodes="$(cat "$DIR/nodes" 2>/dev/null || echo '?')"
    [[ "$running_nodes" == "$NODES" ]] ||
        die "$DIR already runs a cluster with $running_nodes node(s); stop it first: $HERE/stop.sh --dir $DIR"
    all_up=1
    pid_alive "$DIR/pids/munged.pid" munged || all_up=0
    for node in $(node_names); do pid_alive "$DIR/pids/slurmd-$node.pid" slurmd || all_up=0; done
    if [[ $all_up == 1 ]]; then
        echo "start.sh: cluster with $NODES node(s) already running in $DIR; source $DIR/env.sh"
        exit 0
    fi
    echo "start.sh: cluster in $DIR is only partly running; restarting it" >&2
fi
"$HERE/stop.sh" --dir "$DIR" >/dev/null

# --- packages -----------------------------------------------------------------------------------
missing=()
for pkg_cmd in slurmctld:slurmctld slurmd:slurmd slurm-client:sinfo munge:munged munge:mungekey; do
    command -v "${pkg_cmd#*:}" >/dev/null || missing+=("${pkg_cmd%%:*}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    packages=(slurmctld slurmd slurm-client munge)
    echo "start.sh: installing ${packages[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Update the package lists only when apt does not know the packages yet.
    if ! apt-cache show "${packages[@]}" >/dev/null 2>&1; then
        apt-get update -q >&2 || unavailable "apt-get update failed; is the Debian mirror reachable?"
    fi
    apt-get install -y -q --no-install-recommends "${packages[@]}" >&2 ||
        unavailable "apt-get install ${packages[*]} failed"
fi
SACCT="$(PATH=/usr/local/bin:/usr/bin:/bin command -v sacct)" # the real one, not a wrapper

# --- ports --------------------------------------------------------------------------------------
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$CTLD_PORT" $(seq "$NODE_PORT" $((NODE_PORT + NODES - 1))); do
    if port_in_use "$port"; then
        die "port $port is in use (another dev cluster?); stop it or pick --ctld-port/--node-port"
    fi
done

mkdir -p "$DIR"/{bin,log,pids,state,spool,munge}
chmod 755 "$DIR"

# --- munge: a private munged whose socket and key live in DIR/munge -----------------------------
id munge >/dev/null 2>&1 || die "user 'munge' is missing; reinstall the munge package"
setpriv --reuid=munge --regid=munge --clear-groups test -x "$DIR" ||
    die "user 'munge' cannot enter $DIR (a parent directory is private); use a --dir under /tmp"
chown munge:munge "$DIR/munge"
chmod 755 "$DIR/munge" # clients need to reach the socket; the key itself is 0600
if [[ ! -s "$DIR/munge/munge.key" ]]; then
    setpriv --reuid=munge --regid=munge --clear-groups mungekey --create --keyfile="$DIR/munge/munge.key"
fi
MUNGE_SOCKET="$DIR/munge/munge.socket"
rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
setsid nohup setpriv --reuid=munge --regid=munge --clear-groups \
    munged --foreground --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" >"$DIR/log/munged.out" 2>&1 </dev/null &
echo $! >"$DIR/pids/munged.pid"
for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.1; done
[[ -S "$MUNGE_SOCKET" ]] || die "munged did not start; see $DIR/log/munged.out and $DIR/munge/munged.log"

# --- slurm.conf ---------------------------------------------------------------------------------
HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MIB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
NODE_MEM_MIB=$((MEM_MIB * 9 / 10 / NODES)) # the nodes share this host's memory; keep 10% spare
if [[ $NODES == 1 ]]; then
    NODE_LINE="NodeName=n1 Port=$NODE_PORT"
else
    NODE_LINE="NodeName=n[1-$NODES] Port=$NODE_PORT-$((NODE_PORT + NODES - 1))"
fi
cat >"$DIR/slurm.conf" <<EOF
# Dev cluster written by $HERE/start.sh --nodes $NODES --dir $DIR
ClusterName=clustertune-dev
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible cred_expire+1 s after its old instance ends (default 120 s).
# Backfill then skips it (nothing changed since its last pass) and only the main loop, every
# sched_interval (default 60) s, starts it. Measured gap after the old instance ends:
# 57 s with cred_expire=10 alone, 12 s with sched_interval=1 as well (6 s with cred_expire=5).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# No systemd, no cgroups: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# No accounting database: finished jobs go to a text file that \`sacct --completion\` reads.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobRequeue=1
KillWait=$KILL_WAIT
ReturnToService=2
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# $NODES node(s) on this one host, each with all $CPUS CPUs and ${NODE_MEM_MIB} MiB of ${MEM_MIB} MiB.
$NODE_LINE NodeHostname=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$NODE_MEM_MIB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
echo "$NODES" >"$DIR/nodes"

cat >"$DIR/bin/sacct" <<EOF
#!/bin/sh
# No accounting database on the dev cluster: answer from the job-completion log instead.
for arg in "\$@"; do
    case "\$arg" in -c | --completion) exec $SACCT "\$@" ;; esac
done
exec $SACCT --completion "\$@"
EOF
chmod 755 "$DIR/bin/sacct"

cat >"$DIR/env.sh" <<EOF
# Use the dev cluster in $DIR from this shell: source $DIR/env.sh
export SLURM_CONF=$DIR/slurm.conf
case ":\$PATH:" in *":$DIR/bin:"*) ;; *) export PATH="$DIR/bin:\$PATH" ;; esac
EOF
export SLURM_CONF="$DIR/slurm.conf"

# --- daemons ------------------------------------------------------------------------------------
# SLURM_CONF in the daemons' environment also marks their slurmstepd processes, so stop.sh can
# find job steps that outlive slurmd.
setsid nohup slurmctld -D -i -f "$SLURM_CONF" >"$DIR/log/slurmctld.out" 2>&1 </dev/null &
echo $! >"$DIR/pids/slurmctld.pid"
for node in $(node_names); do
    setsid nohup slurmd -D -N "$node" -f "$SLURM_CONF" >"$DIR/log/slurmd-$node.out" 2>&1 </dev/null &
    echo $! >"$DIR/pids/slurmd-$node.pid"
done

fail_and_stop() {
    echo "start.sh: error: $*" >&2
    for log in "$DIR"/log/*.out "$DIR"/log/slurmctld.log "$DIR"/log/slurmd-*.log; do
        [[ -s "$log" ]] && { echo "--- tail $log" >&2; tail -n 15 "$log" >&2; }
    done
    "$HERE/stop.sh" --dir "$DIR" >&2 || true
    exit 1
}

# Up means registered and responding. Jobs recovered from DIR/state (a run that ended without
# stop.sh) restart right away and keep their nodes mixed or allocated rather than idle.
deadline=$((SECONDS + TIMEOUT))
while true; do
    up="$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null |
        awk '$2 ~ /^(idle|mixed|allocated|completing)$/' | wc -l)"
    [[ "$up" -ge "$NODES" ]] && break
    pid_alive "$DIR/pids/slurmctld.pid" slurmctld || fail_and_stop "slurmctld exited"
    for node in $(node_names); do
        pid_alive "$DIR/pids/slurmd-$node.pid" slurmd || fail_and_stop "slurmd for $node exited"
    done
    if ((SECONDS >= deadline)); then
        fail_and_stop "nodes not up after ${TIMEOUT} s: $(sinfo -h -N -o '%N=%T' 2>&1 | tr '\n' ' ')"
    fi
    sleep 0.5
done
recovered="$(squeue -h -o %i | wc -l)"
[[ "$recovered" == 0 ]] || echo "start.sh: note: $recovered job(s) recovered from the last run in $DIR"
echo "start.sh: $NODES node(s) up in $((SECONDS - START_SECONDS)) s; source $DIR/env.sh"

#!/usr/bin/env bash
# Stop the dev cluster that start.sh started in DIR (default /tmp/clustertune-slurm).
#
#   slurm/dev-cluster/stop.sh [--dir DIR]
#
# Cancels its jobs, then stops slurmd, slurmctld and munged by the pids recorded in DIR/pids
# (never by name, so other clusters and other users' daemons are left alone) and waits for them
# to exit. Job steps that outlive slurmd are found by the SLURM_CONF=DIR/slurm.conf that their
# slurmstepd inherited, and their whole process tree is killed. Safe to run when nothing runs.
set -euo pipefail

DIR=/tmp/clustertune-slurm
while [[ $# -gt 0 ]]; do
    case "$1" in
    --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "stop.sh: error: unknown argument '$1'; see --help" >&2; exit 1 ;;
    esac
done
if [[ ! -d "$DIR" ]]; then
    echo "stop.sh: $DIR does not exist; nothing to stop"
    exit 0
fi
DIR="$(cd "$DIR" && pwd -P)"
export SLURM_CONF="$DIR/slurm.conf"

# pid_of PIDFILE COMM: print the pid in PIDFILE if it still runs COMM (not a reused pid).
pid_of() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    echo "$pid"
}

# stop_pids SECONDS PID...: SIGTERM, wait up to SECONDS, then SIGKILL what is left.
stop_pids() {
    local wait_s=$1 pid alive
    shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((tick = 0; tick < wait_s * 10; tick++)); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && return 0
        sleep 0.1
    done
    echo "stop.sh: pids $* ignored SIGTERM for ${wait_s} s; sending SIGKILL" >&2
    kill -KILL "$@" 2>/dev/null || true
    for pid in "$@"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done; done
}

# tree PID: PID and all its descendants, parents first.
tree() {
    local child
    echo "$1"
    # shellcheck disable=SC2013  # the children files hold space-separated pids: words are right
    for child in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$child"; done
}

# 1. Cancel the jobs while the controller still runs, so that their processes end cleanly.
if pid_of "$DIR/pids/slurmctld.pid" slurmctld >/dev/null; then
    kill_wait="$(awk -F= '/^KillWait=/ {print $2}' "$SLURM_CONF" 2>/dev/null || true)"
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)"
    if [[ -n "${jobs// /}" ]]; then
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null || true
        for ((tick = 0; tick < (${kill_wait:-30} + 10) * 10; tick++)); do
            [[ -z "$(squeue -h -o %i 2>/dev/null || true)" ]] && break
            sleep 0.1
        done
    fi
fi

# 2. The daemons, all at once: each takes 1-2 s to notice SIGTERM, and none needs another to exit.
daemon_pids=()
for pidfile in "$DIR"/pids/slurmd-*.pid; do
    pid="$(pid_of "$pidfile" slurmd)" && daemon_pids+=("$pid")
done
pid="$(pid_of "$DIR/pids/slurmctld.pid" slurmctld)" && daemon_pids+=("$pid")
pid="$(pid_of "$DIR/pids/munged.pid" munged)" && daemon_pids+=("$pid")
stop_pids 15 "${daemon_pids[@]}"

# 3. Job steps that survived: slurmstepd processes of this cluster, with everything below them.
leftovers=()
for environ in /proc/[0-9]*/environ; do
    pid="${environ#/proc/}"
    pid="${pid%/environ}"
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] || continue
    if { tr '\0' '\n' <"$environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then
        mapfile -t -O "${#leftovers[@]}" leftovers < <(tree "$pid")
    fi
done
if [[ ${#leftovers[@]} -gt 0 ]]; then
    echo "stop.sh: killing ${#leftovers[@]} leftover job process(es): ${leftovers[*]}" >&2
    stop_pids 5 "${leftovers[@]}"
fi

rm -f "$DIR"/pids/*.pid
echo "stop.sh: stopped the dev cluster in $DIR"

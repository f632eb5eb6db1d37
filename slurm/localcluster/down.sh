#!/usr/bin/env bash
# Stop the private SLURM cluster started by slurm/localcluster/up.sh DIR.
#
#   slurm/localcluster/down.sh DIR
#
# Cancels leftover jobs, then stops slurmd (n1, n2), slurmctld and munged by
# their pid files, and finally kills any straggler (e.g. an orphaned
# slurmstepd) whose environment carries this cluster's marker
# KDSLIM_SLURM_CLUSTER_DIR=DIR. Nothing else is touched. Safe to run twice.
# DIR itself is left in place (logs stay readable); rm -rf it if you like.
set -uo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
[[ -d $1 ]] || { echo "down.sh: $1: no such directory, nothing to do" >&2; exit 0; }
DIR=$(cd "$1" && pwd)
CONF=$DIR/etc/slurm.conf
unset KDSLIM_SLURM_CLUSTER_DIR
log() { echo "down.sh: $*" >&2; }

pid_of() {  # pid_of PIDFILE NAME -> prints pid if alive and is NAME
    local pf=$1 name=$2 pid
    [[ -s $pf ]] || return 1
    pid=$(tr -dc '0-9' <"$pf")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]] || return 1
    echo "$pid"
}

# stop PID...: SIGTERM, wait up to 10 s, then SIGKILL.
stop() {
    local pids=("$@") p alive
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null
    for _ in $(seq 100); do
        alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    log "SIGKILL ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null
    sleep 0.2
}

# 1. cancel leftover jobs while slurmctld/slurmd can still clean them up
if [[ -s $CONF ]] && pid_of "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    export SLURM_CONF=$CONF
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling leftover jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        # wait (bounded) until nothing is pending/running/completing
        for _ in $(seq 100); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null | tr -d '[:space:]') ]] && break
            sleep 0.1
        done
    fi
fi

# 2. daemons by pid file: slurmd first, then slurmctld, munge last
pids=()
for pf in "$DIR"/run/slurmd.*.pid; do
    [[ -e $pf ]] || continue
    p=$(pid_of "$pf" slurmd) && pids+=("$p")
done
stop "${pids[@]}"
p=$(pid_of "$DIR/run/slurmctld.pid" slurmctld) && stop "$p"
p=$(pid_of "$DIR/munge/munged.pid" munged) && stop "$p"

# 3. stragglers started by this cluster's daemons (e.g. an orphaned slurmstepd):
#    only Slurm/munge daemons whose environment carries this cluster's marker
strays=()
for env in /proc/[0-9]*/environ; do
    p=${env#/proc/}; p=${p%/environ}
    case $(cat "/proc/$p/comm" 2>/dev/null) in
        slurmstepd | slurmd | slurmctld | munged) ;;
        *) continue ;;
    esac
    if tr '\0' '\n' <"$env" 2>/dev/null | grep -qxF "KDSLIM_SLURM_CLUSTER_DIR=$DIR"; then
        strays+=("$p")
    fi
done
if ((${#strays[@]})); then
    log "stopping stragglers: ${strays[*]}"
    stop "${strays[@]}"
fi

rm -f "$DIR"/run/*.pid "$DIR/munge/munged.pid" "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
log "stopped cluster in $DIR"

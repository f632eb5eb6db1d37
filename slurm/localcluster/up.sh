#!/usr/bin/env bash
# Start a private two-node SLURM cluster (n1, n2) on loopback, rooted in DIR.
#
#   slurm/localcluster/up.sh DIR      # then: source DIR/env.sh
#
# Idempotent: daemons that are already running from DIR are left alone; the
# script always ends by waiting until both nodes are up and idle. Everything
# (config, munge key/socket, spool, state, logs, pid files) lives under DIR.
# Stop with slurm/localcluster/down.sh DIR. See README.md for the knobs.
set -euo pipefail

usage() { echo "usage: $0 DIR" >&2; exit 2; }
[[ $# -eq 1 ]] || usage
die() { echo "up.sh: ERROR: $*" >&2; exit 1; }
log() { echo "up.sh: $*" >&2; }

export PATH=$PATH:/usr/sbin:/sbin   # daemons live in /usr/sbin
mkdir -p "$1"
DIR=$(cd "$1" && pwd)

PORT_BASE=${KDSLIM_SLURM_PORT_BASE:-26817}
CRED_EXPIRE=${KDSLIM_SLURM_CRED_EXPIRE:-5}
UP_TIMEOUT=${KDSLIM_SLURM_UP_TIMEOUT:-60}
if ! [[ $PORT_BASE =~ ^[0-9]+$ ]] || ((PORT_BASE < 1024 || PORT_BASE > 65533)); then
    die "KDSLIM_SLURM_PORT_BASE=$PORT_BASE: want an integer in 1024..65533"
fi
# Slurm rejects cred_expire < 5 ("AuthInfo=cred_expire=N invalid") and silently
# falls back to 120 s, so refuse such values here instead.
if ! [[ $CRED_EXPIRE =~ ^[0-9]+$ ]] || ((CRED_EXPIRE < 5)); then
    die "KDSLIM_SLURM_CRED_EXPIRE=$CRED_EXPIRE: Slurm needs an integer >= 5"
fi
CTLD_PORT=$PORT_BASE
N1_PORT=$((PORT_BASE + 1))
N2_PORT=$((PORT_BASE + 2))
NODES=(n1 n2)

# --------------------------------------------------------------------------
# 1. packages
# --------------------------------------------------------------------------
need_install=0
for b in slurmctld slurmd sinfo squeue sbatch srun scontrol scancel munged munge unmunge; do
    command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [[ $need_install -eq 1 ]]; then
    log "installing slurmctld slurmd slurm-client munge via apt-get"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "packages missing and not root (no sudo)"
        SUDO=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    # an apt-get update failure is not fatal by itself (cached lists may do)
    "${SUDO[@]}" apt-get update -q >"$DIR/apt.log" 2>&1 \
        || { tail -n 10 "$DIR/apt.log" >&2; log "WARNING: apt-get update failed, trying install"; }
    "${SUDO[@]}" apt-get install -y -q -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold slurmctld slurmd slurm-client munge \
        >>"$DIR/apt.log" 2>&1 \
        || { tail -n 30 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
    for b in slurmctld slurmd sinfo munged; do
        command -v "$b" >/dev/null 2>&1 || die "'$b' still missing after apt-get install"
    done
fi

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
# pid_alive PIDFILE NAME: the pid in PIDFILE is alive and is program NAME.
pid_alive() {
    local pf=$1 name=$2 pid
    [[ -s $pf ]] || return 1
    pid=$(tr -dc '0-9' <"$pf")
    [[ -n $pid ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]] || return 1
    # a daemon that died is a zombie until something reaps it (in a container nothing may):
    # its pid still answers kill -0, but it is not running
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
tails() {
    local f
    for f in "$DIR"/log/*.log; do
        [[ -e $f ]] || continue
        echo "----- tail $f -----" >&2
        tail -n 25 "$f" >&2
    done
}
fail() { echo "up.sh: ERROR: $*" >&2; tails; exit 1; }

SOCK=$DIR/munge/munge.socket
CONF=$DIR/etc/slurm.conf
# sun_path is 108 bytes; munged also creates SOCK.lock next to it
(( ${#SOCK} + 5 < 108 )) || die "DIR path too long for a unix socket: $SOCK (use a shorter DIR)"

mkdir -p "$DIR"/{etc,munge,state,spool,log,run}
chmod 0755 "$DIR/munge"   # clients need x on the socket dir; the key is 0400
for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done

# Marker in the daemons' environment: down.sh uses it to find stragglers
# (e.g. slurmstepd) that belong to this cluster and to no other.
export KDSLIM_SLURM_CLUSTER_DIR=$DIR

ctld_up=0; pid_alive "$DIR/run/slurmctld.pid" slurmctld && ctld_up=1
munge_up=0; pid_alive "$DIR/munge/munged.pid" munged && munge_up=1
any_up=$((ctld_up + munge_up))
for n in "${NODES[@]}"; do
    pid_alive "$DIR/run/slurmd.$n.pid" slurmd && any_up=$((any_up + 1))
done

# --------------------------------------------------------------------------
# 2. config (rewritten only while nothing from DIR is running)
# --------------------------------------------------------------------------
if [[ $any_up -eq 0 || ! -s $CONF ]]; then
    for p in "$CTLD_PORT" "$N1_PORT" "$N2_PORT"; do
        port_busy "$p" && die "port $p already in use; set KDSLIM_SLURM_PORT_BASE (uses BASE..BASE+2)"
    done
    HOST=$(hostname -s 2>/dev/null || hostname)
    NCPU=$(nproc)
    MEM_MB=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
    REAL_MEM=$((MEM_MB < 1024 ? MEM_MB / 2 : 1024))
    cat >"$CONF.tmp" <<EOF
# generated by slurm/localcluster/up.sh -- private test cluster, do not edit
ClusterName=kdslim
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${N1_PORT}
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job is held (BeginTime = requeue
# time + cred_expire) before it may start again; Slurm's default is 120 s.
AuthInfo=socket=${SOCK},cred_expire=${CRED_EXPIRE}
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.%n.log
MailProg=/bin/true
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=${DIR}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=60
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=${HOST} Port=${N1_PORT} CPUs=${NCPU} RealMemory=${REAL_MEM} State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=${HOST} Port=${N2_PORT} CPUs=${NCPU} RealMemory=${REAL_MEM} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    : >"$DIR/etc/plugstack.conf"
fi

# --------------------------------------------------------------------------
# 3. munge
# --------------------------------------------------------------------------
if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 0400 "$DIR/munge/munge.key"
if [[ $munge_up -eq 0 ]]; then
    log "starting munged"
    rm -f "$SOCK" "$SOCK.lock"
    # --force: munged refuses some setups (e.g. running as root) without it.
    munged --force --socket="$SOCK" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || fail "munged failed to start"
fi
for _ in $(seq 50); do
    munge -n --socket="$SOCK" 2>/dev/null | unmunge --socket="$SOCK" >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n --socket="$SOCK" | unmunge --socket="$SOCK" >/dev/null || fail "munge round-trip failed"

# --------------------------------------------------------------------------
# 4. slurmctld + two slurmd
# --------------------------------------------------------------------------
export SLURM_CONF=$CONF
if [[ $ctld_up -eq 0 ]]; then
    log "starting slurmctld"
    slurmctld -f "$CONF" || fail "slurmctld failed to start"
fi
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.2
done
scontrol ping 2>/dev/null | grep -q 'is UP' || fail "slurmctld does not answer 'scontrol ping'"
declare -A starts=()
start_slurmds() {  # (re)start any slurmd of DIR that is not running
    local n
    for n in "${NODES[@]}"; do
        pid_alive "$DIR/run/slurmd.$n.pid" slurmd && continue
        starts[$n]=$((${starts[$n]:-0} + 1))
        ((${starts[$n]} <= 3)) || fail "slurmd -N $n keeps dying"
        log "starting slurmd -N $n"
        slurmd -f "$CONF" -N "$n" || fail "slurmd -N $n failed to start"
    done
}
start_slurmds

# --------------------------------------------------------------------------
# 5. wait until both nodes are up (idle, or busy with jobs on a re-run)
# --------------------------------------------------------------------------
cat >"$DIR/env.sh" <<EOF
# source me: client environment for the kdslim local SLURM cluster in $DIR
export SLURM_CONF='$CONF'
export KDSLIM_SLURM_DIR='$DIR'
export KDSLIM_MUNGE_SOCKET='$SOCK'
EOF

deadline=$((SECONDS + UP_TIMEOUT))
state=""
while :; do
    state=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    ok=1
    for n in "${NODES[@]}"; do
        [[ $state =~ (^|\ )$n\ (idle|mix|alloc|comp)(\ |$) ]] || ok=0
    done
    # a slurmd that was stopping when we looked (or crashed) is restarted
    sleep 0.5
    start_slurmds
    [[ $ok -eq 1 ]] && pid_alive "$DIR/run/slurmd.n1.pid" slurmd \
        && pid_alive "$DIR/run/slurmd.n2.pid" slurmd && break
    # nodes drained/down by an earlier broken start: return them to service
    if [[ $state =~ (down|drain|drng|fail) && ! $state =~ \* ]]; then
        scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    fi
    ((SECONDS < deadline)) || fail "nodes not idle after ${UP_TIMEOUT}s (sinfo: ${state:-<no answer>})"
done
log "cluster up in $DIR: ${state}(source $DIR/env.sh)"
